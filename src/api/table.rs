//! The route table: every (method, path template) the server answers, in one
//! declaration. `route()` dispatches from it and `openapi_check` compares it
//! with `assets/openapi.yaml`, so the router and the spec cannot drift apart
//! without a test failing. It only matches; it must never hold a handler's
//! logic.

use warp::http::Method;

/// What a matched route does; `route()` and `v1()` match on this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    CallAsync,
    CallSync,
    Output,
    OutputWait,
    Logs,
    Status,
    Health,
    Metrics,
    OpenApi,
    Root,
    Ui,
    ListFunctions,
    CreateFunction,
    GetFunction,
    UpdateFunction,
    DeleteFunction,
    CallFunction,
    FunctionLogs,
    FunctionStatus,
    FunctionActivity,
    FunctionCalls,
    Activity,
    GetCall,
    CallEvents,
    CallOutput,
    RedeliverCall,
    Whoami,
    ListUsers,
    CreateUser,
    UpdateUser,
    DeleteUser,
    ListRegistryLogins,
    RegistryLogin,
    RegistryLogout,
    ListImages,
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Route {
    /// The method, or `ANY`: the data plane's call URLs take every method
    /// (it reaches the container as `REQUEST_METHOD`).
    pub method: &'static str,
    /// `/`-separated segments; `{x}` matches one segment, a final `*` any
    /// number of them (zero included).
    pub path: &'static str,
    pub op: Op,
    /// Whether `assets/openapi.yaml` documents it: the dashboard's files are
    /// not part of the API. Read by the spec check, a test.
    #[cfg_attr(not(test), allow(dead_code))]
    pub in_spec: bool,
}

/// Any method. The spec documents such a route as GET and POST.
pub(crate) const ANY: &str = "*";

const fn r(method: &'static str, path: &'static str, op: Op) -> Route {
    Route {
        method,
        path,
        op,
        in_spec: true,
    }
}

pub(crate) const ROUTES: &[Route] = &[
    // ---- data plane: capability URLs, the secret is the credential ----
    r(ANY, "/call/{name}/{secret}", Op::CallAsync),
    r(ANY, "/call/{name}/{secret}/sync", Op::CallSync),
    r("GET", "/output/{name}/{secret}/{callId}", Op::Output),
    r(
        "GET",
        "/output/{name}/{secret}/{callId}/wait",
        Op::OutputWait,
    ),
    r("GET", "/logs/{name}/{secret}", Op::Logs),
    r("GET", "/status/{name}/{secret}", Op::Status),
    // ---- service ----
    r("GET", "/healthz", Op::Health),
    r("GET", "/metrics", Op::Metrics),
    r("GET", "/openapi.yaml", Op::OpenApi),
    Route {
        method: "GET",
        path: "/",
        op: Op::Root,
        in_spec: false,
    },
    Route {
        method: "GET",
        path: "/ui/*",
        op: Op::Ui,
        in_spec: false,
    },
    // ---- management API (bearer key) ----
    r("GET", "/v1/functions", Op::ListFunctions),
    r("POST", "/v1/functions", Op::CreateFunction),
    r("GET", "/v1/functions/{name}", Op::GetFunction),
    r("PATCH", "/v1/functions/{name}", Op::UpdateFunction),
    r("DELETE", "/v1/functions/{name}", Op::DeleteFunction),
    r("POST", "/v1/functions/{name}/call", Op::CallFunction),
    r("GET", "/v1/functions/{name}/logs", Op::FunctionLogs),
    r("GET", "/v1/functions/{name}/status", Op::FunctionStatus),
    r("GET", "/v1/functions/{name}/activity", Op::FunctionActivity),
    r("GET", "/v1/functions/{name}/calls", Op::FunctionCalls),
    r("GET", "/v1/activity", Op::Activity),
    r("GET", "/v1/calls/{callId}", Op::GetCall),
    r("GET", "/v1/calls/{callId}/events", Op::CallEvents),
    r("GET", "/v1/calls/{callId}/output", Op::CallOutput),
    r("POST", "/v1/calls/{callId}/redeliver", Op::RedeliverCall),
    r("GET", "/v1/whoami", Op::Whoami),
    r("GET", "/v1/users", Op::ListUsers),
    r("POST", "/v1/users", Op::CreateUser),
    r("PATCH", "/v1/users/{name}", Op::UpdateUser),
    r("DELETE", "/v1/users/{name}", Op::DeleteUser),
    r("GET", "/v1/registries", Op::ListRegistryLogins),
    r("PUT", "/v1/registries/{host}", Op::RegistryLogin),
    r("DELETE", "/v1/registries/{host}", Op::RegistryLogout),
    r("GET", "/v1/images", Op::ListImages),
];

/// The `{name}` values of a matched path, by template name.
#[derive(Debug, Default)]
pub(crate) struct Params<'a>(Vec<(&'static str, &'a str)>);

impl<'a> Params<'a> {
    /// The segment the template calls `name`; empty if it has none (a
    /// handler only asks for names its own template has).
    pub fn get(&self, name: &str) -> &'a str {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v)
    }

    /// Segments matched by the final `*`.
    pub fn rest(&self) -> Vec<&'a str> {
        self.0
            .iter()
            .filter(|(n, _)| *n == "*")
            .map(|(_, v)| *v)
            .collect()
    }
}

/// Why nothing matched.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    /// No template matches the path.
    NoRoute,
    /// The path is known under other methods: the value for `Allow`.
    Method(String),
}

/// Whether `path` (canonical segments) matches `template`, and its params.
fn matches<'a>(template: &'static str, path: &[&'a str]) -> Option<Params<'a>> {
    let mut params = Params::default();
    if template == "/" {
        return path.is_empty().then_some(params);
    }
    let mut t = template.trim_start_matches('/').split('/').peekable();
    let mut p = path.iter();
    while let Some(ts) = t.next() {
        if ts == "*" && t.peek().is_none() {
            params.0.extend(p.by_ref().map(|s| ("*", *s)));
            return Some(params);
        }
        let ps = p.next()?;
        match ts.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => params.0.push((name, ps)),
            None if ts == *ps => {}
            None => return None,
        }
    }
    p.next().is_none().then_some(params)
}

/// The route for `method` on `path`, or why there is none.
pub(crate) fn find<'a>(method: &Method, path: &[&'a str]) -> Result<(Op, Params<'a>), Miss> {
    let mut allow: Vec<&str> = Vec::new();
    for route in ROUTES {
        let Some(params) = matches(route.path, path) else {
            continue;
        };
        if route.method == ANY || route.method == method.as_str() {
            return Ok((route.op, params));
        }
        allow.push(route.method);
    }
    if allow.is_empty() {
        return Err(Miss::NoRoute);
    }
    // HEAD is not offered: hyper does not turn GET into HEAD here.
    allow.sort_unstable();
    allow.dedup();
    Err(Miss::Method(allow.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_params_and_misses() {
        let (op, p) = find(&Method::GET, &["output", "f", "s", "c", "wait"]).unwrap();
        assert_eq!(op, Op::OutputWait);
        assert_eq!(
            (p.get("name"), p.get("secret"), p.get("callId")),
            ("f", "s", "c")
        );
        let (op, _) = find(&Method::PUT, &["call", "f", "s"]).unwrap();
        assert_eq!(op, Op::CallAsync);
        assert_eq!(find(&Method::GET, &[]).unwrap().0, Op::Root);
        let (op, p) = find(&Method::GET, &["ui"]).unwrap();
        assert_eq!((op, p.rest().len()), (Op::Ui, 0));
        let (_, p) = find(&Method::GET, &["ui", "a", "b"]).unwrap();
        assert_eq!(p.rest(), ["a", "b"]);
        assert_eq!(
            find(&Method::PUT, &["v1", "functions", "f"]).unwrap_err(),
            Miss::Method("DELETE, GET, PATCH".into())
        );
        assert_eq!(
            find(&Method::DELETE, &["healthz"]).unwrap_err(),
            Miss::Method("GET".into())
        );
        assert_eq!(
            find(&Method::GET, &["v1", "functions", "f", "x"]).unwrap_err(),
            Miss::NoRoute
        );
        assert_eq!(
            find(&Method::GET, &["call", "f"]).unwrap_err(),
            Miss::NoRoute
        );
    }

    #[test]
    fn no_two_rows_claim_the_same_method_and_path() {
        let mut seen = std::collections::BTreeSet::new();
        for r in ROUTES {
            assert!(seen.insert((r.method, r.path)), "{} {}", r.method, r.path);
        }
    }
}
