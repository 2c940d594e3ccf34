//! `assets/openapi.yaml` checked against the router (DESIGN 1.3: the spec must
//! match what the server does).
//!
//! `table::ROUTES` is what `route()` dispatches from. The tests check that
//! the table and the spec name the same (method, path) pairs, that every
//! documented operation reaches a handler (not the "no route for" fallback)
//! and answers a status the spec documents, and that every method the table
//! does not list on a known path answers 405 with the table's `Allow`, so the
//! check can fail both ways. The service runs on a temporary store with a Runtime pointed at a
//! socket that does not exist: nothing here needs Docker.

use super::*;
use crate::config::Config;
use crate::runtime::Runtime;
use crate::scheduler::Scheduler;
use serde_yaml_ng::Value;
use std::collections::BTreeSet;

/// (METHOD, path template) of every route of the table the spec documents;
/// a route taking any method is documented as GET and POST.
fn table_routes() -> BTreeSet<(String, String)> {
    table::ROUTES
        .iter()
        .filter(|r| r.in_spec)
        .flat_map(|r| {
            let methods: &[&str] = if r.method == table::ANY {
                &["GET", "POST"]
            } else {
                std::slice::from_ref(&r.method)
            };
            methods.iter().map(|m| (m.to_string(), r.path.to_string()))
        })
        .collect()
}

/// The methods probed for the converse check.
const PROBE_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// OpenAPI's operation keys under a path item.
const SPEC_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

const SECRET: &str = "3f2b8c1e-5d4a-4c6b-9e7f-0a1b2c3d4e5f";
const CALL_ID: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";

struct Fixture {
    _dir: tempfile::TempDir,
    svc: Arc<Service>,
    key: String,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Arc::new(Config::default());
    let store = crate::store::open(
        &dir.path().join("db"),
        crate::store::StoreConfig::from_config(&config),
    )
    .expect("open store");
    // Connects lazily: a socket that does not exist keeps Docker out of this test.
    let runtime = Arc::new(Runtime::new(
        "/nonexistent.sock".into(),
        "openapi-check".into(),
        config.container.clone(),
    ));
    let scheduler = Scheduler::new(
        Arc::clone(&store),
        Arc::clone(&runtime),
        Arc::clone(&config),
    )
    .expect("scheduler");
    let svc = Arc::new(Service::new(
        store,
        scheduler,
        runtime,
        config,
        "https://localhost:8443".into(),
    ));
    let (_, key) = svc
        .create_user(Name::parse("admin").expect("name"), None, true)
        .await
        .expect("create admin");
    Fixture {
        _dir: dir,
        svc,
        key: key.as_str().to_string(),
    }
}

fn spec() -> Value {
    serde_yaml_ng::from_str(OPENAPI).expect("assets/openapi.yaml is not valid YAML")
}

/// Follows a local `$ref` (`#/components/...`), if `v` is one.
fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let target = r
                .strip_prefix("#/")
                .unwrap_or_else(|| panic!("non-local $ref {r}"))
                .split('/')
                .try_fold(spec, |node, key| node.get(key))
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
            resolve(spec, target)
        }
        None => v,
    }
}

/// (METHOD, path template, path item, operation) of every operation in the spec.
fn operations(spec: &Value) -> Vec<(String, String, &Value, &Value)> {
    let paths = spec
        .get("paths")
        .and_then(Value::as_mapping)
        .expect("spec has no paths");
    let mut ops = Vec::new();
    for (path, item) in paths {
        let path = path.as_str().expect("path keys are strings");
        let item_map = item.as_mapping().expect("path items are mappings");
        for (key, op) in item_map {
            let key = key.as_str().expect("path item keys are strings");
            if SPEC_METHODS.contains(&key) {
                ops.push((key.to_ascii_uppercase(), path.to_string(), item, op));
            }
        }
    }
    ops
}

/// A concrete, valid-looking path for a template.
fn concrete(template: &str) -> String {
    let name = if template.starts_with("/v1/users/") {
        "bob"
    } else {
        "f"
    };
    template
        .replace("{name}", name)
        .replace("{secret}", SECRET)
        .replace("{callId}", CALL_ID)
}

async fn send(svc: &Arc<Service>, method: &str, path: &str, key: Option<&str>) -> (u16, Bytes) {
    let (status, _, body) = send_full(svc, method, path, key, &[]).await;
    (status, body)
}

async fn send_full(
    svc: &Arc<Service>,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(String, String)],
) -> (u16, warp::http::HeaderMap, Bytes) {
    let mut req = warp::test::request().method(method).path(path);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.reply(&routes(Arc::clone(svc))).await;
    (
        resp.status().as_u16(),
        resp.headers().clone(),
        resp.body().clone(),
    )
}

/// The error code of a JSON error body, if it is one of the spec's shape.
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["error"]["message"].as_str()?;
    v["error"]["code"].as_str().map(str::to_string)
}

/// The router's own "no route" answer, as opposed to a handler's 404.
fn is_fallback(status: u16, body: &[u8]) -> bool {
    status == 404
        && serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .is_some_and(|m| m.starts_with("no route for"))
}

/// The error codes the spec lists in `ErrorDetail.code`.
fn error_codes(spec: &Value) -> BTreeSet<String> {
    spec["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"]
        .as_sequence()
        .expect("ErrorDetail.code has an enum")
        .iter()
        .map(|c| c.as_str().expect("codes are strings").to_string())
        .collect()
}

fn documented_statuses(op: &Value) -> BTreeSet<String> {
    op.get("responses")
        .and_then(Value::as_mapping)
        .expect("operation without responses")
        .keys()
        .map(|k| match k {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("bad response key {other:?}"),
        })
        .collect()
}

fn has_bearer_auth(op: &Value) -> bool {
    op.get("security")
        .and_then(Value::as_sequence)
        .is_some_and(|reqs| reqs.iter().any(|r| r.get("bearerAuth").is_some()))
}

#[test]
fn spec_is_openapi_3_0_3_and_refs_resolve() {
    let spec = spec();
    assert_eq!(spec["openapi"].as_str(), Some("3.0.3"));
    assert!(spec["components"]["securitySchemes"]["bearerAuth"].is_mapping());

    // Every $ref anywhere points at something.
    fn walk(spec: &Value, v: &Value) {
        match v {
            Value::Mapping(m) => {
                if m.contains_key("$ref") {
                    resolve(spec, v);
                }
                m.values().for_each(|c| walk(spec, c));
            }
            Value::Sequence(s) => s.iter().for_each(|c| walk(spec, c)),
            _ => {}
        }
    }
    walk(&spec, &spec);

    // Every `{param}` of a path is declared as a path parameter.
    for (method, path, item, op) in operations(&spec) {
        let declared: BTreeSet<String> = [item.get("parameters"), op.get("parameters")]
            .into_iter()
            .flatten()
            .flat_map(|ps| ps.as_sequence().expect("parameters is a list"))
            .map(|p| resolve(&spec, p))
            .filter(|p| p["in"].as_str() == Some("path"))
            .map(|p| p["name"].as_str().expect("parameter name").to_string())
            .collect();
        let used: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_string)
            .collect();
        assert_eq!(declared, used, "path parameters of {method} {path}");
    }
}

#[test]
fn spec_lists_exactly_the_routes_of_the_router() {
    let spec = spec();
    let in_spec: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(m, p, _, _)| (m, p))
        .collect();
    let in_code = table_routes();
    let missing: Vec<_> = in_code.difference(&in_spec).collect();
    let extra: Vec<_> = in_spec.difference(&in_code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "spec and router disagree: routed but not documented {missing:?}; documented but not routed {extra:?}"
    );
    // The dashboard is served but deliberately not part of the API.
    assert!(!in_spec.iter().any(|(_, p)| p.starts_with("/ui")));
}

#[tokio::test]
async fn every_documented_operation_reaches_a_handler_and_answers_a_documented_status() {
    let fx = fixture().await;
    let spec = spec();
    let codes = error_codes(&spec);
    let ops = operations(&spec);
    assert!(!ops.is_empty());
    for (method, template, _, op) in ops {
        let path = concrete(&template);
        // /metrics needs a key too, though it lives outside /v1.
        let v1 = template.starts_with("/v1/") || template == "/metrics";
        assert_eq!(
            has_bearer_auth(op),
            v1,
            "{method} {template}: bearerAuth security must be set exactly on /v1 routes and /metrics"
        );
        let documented = documented_statuses(op);
        let key = v1.then_some(fx.key.as_str());
        let (status, body) = send(&fx.svc, &method, &path, key).await;
        assert!(
            !is_fallback(status, &body),
            "{method} {path} ({template}) is documented but the router has no route for it"
        );
        assert!(
            documented.contains(&status.to_string()),
            "{method} {path} answered {status}, which the spec does not document (it has {documented:?}): {}",
            String::from_utf8_lossy(&body)
        );
        if status >= 400 {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{method} {path}: error body is not JSON: {e}"));
            let code = v["error"]["code"].as_str().unwrap_or_default();
            assert!(
                codes.contains(code) && v["error"]["message"].is_string(),
                "{method} {path}: error body {v} does not match the Error schema"
            );
        }
        if v1 {
            let (status, body) = send(&fx.svc, &method, &path, None).await;
            assert_eq!(status, 401, "{method} {path} without a key");
            assert!(
                documented.contains("401"),
                "{method} {template} does not document 401"
            );
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(v["error"]["code"], "unauthorized");
        }
    }
}

#[tokio::test]
async fn wrong_methods_answer_405_with_allow_and_unknown_paths_the_fallback() {
    let fx = fixture().await;
    let codes = error_codes(&spec());
    for route in table::ROUTES.iter().filter(|r| r.in_spec) {
        let path = concrete(route.path);
        let key = route.path.starts_with("/v1/").then_some(fx.key.as_str());
        let allow: BTreeSet<&str> = table::ROUTES
            .iter()
            .filter(|r| r.path == route.path)
            .map(|r| r.method)
            .collect();
        for &method in PROBE_METHODS {
            let (status, headers, body) = send_full(&fx.svc, method, &path, key, &[]).await;
            let text = String::from_utf8_lossy(&body);
            if allow.contains(table::ANY) || allow.contains(method) {
                assert!(
                    !is_fallback(status, &body) && status != 405,
                    "{method} {path} is routed but answered {status} {text}"
                );
                continue;
            }
            assert_eq!(status, 405, "{method} {path}: {text}");
            let code = error_code(&body).unwrap_or_default();
            assert!(
                code == "method_not_allowed" && codes.contains(&code),
                "{method} {path}: {text}"
            );
            let header: BTreeSet<&str> = headers
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(", ")
                .collect();
            assert_eq!(header, allow, "{method} {path}: Allow");
        }
    }
    for (method, path) in [
        ("GET", "/v1/nothing"),
        ("GET", "/v1/functions/f/nothing"),
        ("GET", "/nothing"),
        ("GET", "/call/f"),
        ("GET", format!("/status/f/{SECRET}/x").as_str()),
    ] {
        let key = path.starts_with("/v1/").then_some(fx.key.as_str());
        let (status, body) = send(&fx.svc, method, path, key).await;
        assert!(
            is_fallback(status, &body),
            "{method} {path} should answer the fallback, got {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    // Without a key a `/v1` path says nothing about which methods it takes.
    let (status, body) = send(&fx.svc, "PUT", "/v1/functions/f", None).await;
    assert_eq!(
        (status, error_code(&body).as_deref()),
        (401, Some("unauthorized"))
    );
}

#[tokio::test]
async fn the_dashboard_is_routed_though_not_in_the_spec() {
    let fx = fixture().await;
    for path in ["/ui", "/ui/", "/ui/app.js"] {
        let (status, headers, _) = send_full(&fx.svc, "GET", path, None, &[]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(headers["content-security-policy"], ui::CSP);
    }
    let (status, headers, body) = send_full(&fx.svc, "GET", "/ui/nope.js", None, &[]).await;
    assert_eq!(
        (status, error_code(&body).as_deref()),
        (404, Some("not_found"))
    );
    assert_eq!(headers["content-security-policy"], ui::CSP);
    let (status, headers, _) = send_full(&fx.svc, "POST", "/ui/", None, &[]).await;
    assert_eq!((status, headers["allow"].to_str().ok()), (405, Some("GET")));
}

type Headers = [(String, String)];

#[tokio::test]
async fn every_refusal_is_a_json_error_with_a_code_the_spec_lists() {
    let fx = fixture().await;
    let codes = error_codes(&spec());
    let long = format!("/v1/functions/{}", "a".repeat(MAX_URI_BYTES));
    let many: Vec<(String, String)> = (0..=MAX_HEADERS)
        .map(|i| (format!("x-h{i}"), "v".into()))
        .collect();
    let big = vec![("x-big".to_string(), "v".repeat(MAX_HEADER_BYTES))];
    let none: Vec<(String, String)> = Vec::new();
    let cases: [(&str, &str, &Headers, u16, &str); 6] = [
        ("GET", long.as_str(), &none, 414, "uri_too_long"),
        ("GET", "/healthz", &many, 431, "headers_too_large"),
        ("GET", "/healthz", &big, 431, "headers_too_large"),
        ("GET", "//v1/functions", &none, 400, "bad_request"),
        ("TRACE", "/healthz", &none, 405, "method_not_allowed"),
        ("GET", "/nothing", &none, 404, "not_found"),
    ];
    for (method, path, headers, want, want_code) in cases {
        let (status, _, body) = send_full(&fx.svc, method, path, None, headers).await;
        let code = error_code(&body);
        assert_eq!(
            (status, code.as_deref()),
            (want, Some(want_code)),
            "{method} {}",
            &path[..path.len().min(40)]
        );
        assert!(codes.contains(want_code), "{want_code} is not in the spec");
    }
    // At the limits themselves, nothing is refused.
    let at: Vec<(String, String)> = (1..MAX_HEADERS)
        .map(|i| (format!("x-h{i}"), "v".into()))
        .collect();
    let (status, _, _) = send_full(&fx.svc, "GET", "/healthz", None, &at).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_served_spec_is_the_file() {
    let fx = fixture().await;
    let (status, body) = send(&fx.svc, "GET", "/openapi.yaml", None).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], OPENAPI.as_bytes());
}

/// The property names of `components.schemas.<name>`.
fn schema_properties(spec: &Value, name: &str) -> BTreeSet<String> {
    spec["components"]["schemas"][name]["properties"]
        .as_mapping()
        .unwrap_or_else(|| panic!("schema {name} has no properties"))
        .keys()
        .map(|k| k.as_str().expect("property names are strings").to_string())
        .collect()
}

fn json_keys<T: serde::Serialize>(value: &T) -> BTreeSet<String> {
    serde_json::to_value(value)
        .expect("serializes")
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect()
}

/// A request body holding exactly the spec's `required` fields, with
/// placeholder values of the right JSON type.
fn minimal_body(spec: &Value, name: &str) -> serde_json::Value {
    let schema = &spec["components"]["schemas"][name];
    let mut body = serde_json::Map::new();
    for field in schema["required"].as_sequence().into_iter().flatten() {
        let field = field.as_str().expect("required names are strings");
        let prop = resolve(spec, &schema["properties"][field]);
        let value = match prop["type"].as_str() {
            Some("string") => serde_json::json!("x"),
            Some("integer") => serde_json::json!(1),
            Some("boolean") => serde_json::json!(false),
            Some("array") => serde_json::json!([]),
            other => panic!("{name}.{field}: unexpected type {other:?}"),
        };
        body.insert(field.to_string(), value);
    }
    serde_json::Value::Object(body)
}

/// Checks a request type against its schema: the same fields, the `required`
/// ones suffice, and unknown fields are refused as the schema says.
fn check_request<T: serde::Serialize + serde::de::DeserializeOwned>(
    spec: &Value,
    name: &str,
    sample: &T,
) {
    assert_eq!(json_keys(sample), schema_properties(spec, name), "{name}");
    let body = minimal_body(spec, name);
    serde_json::from_value::<T>(body.clone()).unwrap_or_else(|e| {
        panic!("{name}: the spec's required fields {body} do not suffice: {e}")
    });
    let mut extra = body;
    extra["NoSuchField"] = serde_json::json!(1);
    assert_eq!(
        spec["components"]["schemas"][name]["additionalProperties"].as_bool() == Some(false),
        serde_json::from_value::<T>(extra).is_err(),
        "{name}: additionalProperties disagrees with deny_unknown_fields"
    );
}

/// Checks a response type against its schema: the same fields, all required
/// (`Option`s serialize as null) except the ones named in `optional`.
fn check_response<T: serde::Serialize>(spec: &Value, name: &str, sample: &T, optional: &[&str]) {
    let keys = json_keys(sample);
    assert_eq!(keys, schema_properties(spec, name), "{name}");
    let required: BTreeSet<String> = spec["components"]["schemas"][name]["required"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|r| r.as_str().expect("required names are strings").to_string())
        .collect();
    let expected: BTreeSet<String> = keys
        .into_iter()
        .filter(|k| !optional.contains(&k.as_str()))
        .collect();
    assert_eq!(required, expected, "{name}: required fields");
}

#[test]
fn schemas_match_the_api_types() {
    let spec = spec();

    check_request(
        &spec,
        "FunctionCreate",
        &FunctionCreate {
            name: "f".into(),
            image: "i".into(),
            command: vec![],
            env: vec![],
            timeout: None,
            memory: None,
            cpus: None,
            runtime: None,
            webhook: None,
            webhook_on: None,
            schedule: Some(ScheduleBody::default()),
        },
    );
    check_request(&spec, "FunctionPatch", &FunctionPatch::default());
    check_request(&spec, "ScheduleBody", &ScheduleBody::default());
    check_request(
        &spec,
        "UserCreate",
        &UserCreate {
            name: "bob".into(),
            max_concurrency: None,
            max_queued: None,
            max_queued_bytes: None,
            max_functions: None,
            rate: None,
            reserved: None,
            admin: false,
        },
    );
    check_request(&spec, "UserPatch", &UserPatch::default());

    check_response(
        &spec,
        "FunctionView",
        &FunctionView {
            image_digest: None,
            name: "f".into(),
            owner: "admin".into(),
            image: "i".into(),
            command: vec![],
            env: vec![],
            timeout: None,
            memory: None,
            cpus: None,
            runtime: Some("runc".into()),
            address: "https://localhost:8443/call/f/x".into(),
            created: String::new(),
            updated: String::new(),
            calls: crate::store::FunctionStats::default().into(),
            output_cache_bytes: 0,
            output_cache_budget: 1,
            log_cache_bytes: 0,
            log_cache_budget: 1,
            webhook: Some(WebhookView {
                url: Some("https://example.com/h".into()),
                on: vec!["finished".into()],
            }),
            webhook_secret: Some("whsec_x".into()),
            schedule: Some(ScheduleView {
                expression: "@every 5m".into(),
                timezone: "UTC".into(),
                payload_bytes: 0,
                since: String::new(),
                next: vec![],
            }),
        },
        &["Webhook", "WebhookSecret"],
    );
    check_response(
        &spec,
        "WebhookView",
        &WebhookView {
            url: None,
            on: vec![],
        },
        &[],
    );
    check_response(
        &spec,
        "Delivery",
        &DeliveryView {
            state: "PENDING".into(),
            url: "https://example.com/h".into(),
            webhook_id: "msg_x".into(),
            attempts: 0,
            last_status: None,
            last_error: None,
            next_attempt: None,
            ended: None,
        },
        &[],
    );
    check_response(
        &spec,
        "CallAccepted",
        &CallAccepted {
            call_id: CALL_ID.into(),
        },
        &[],
    );
    check_response(
        &spec,
        "CallView",
        &CallView {
            image_digest: None,
            call_id: CALL_ID.into(),
            function: "f".into(),
            owner: "admin".into(),
            state: "PENDING".into(),
            created: String::new(),
            started: None,
            finished: None,
            duration_ms: Some(1),
            exit_code: None,
            message: None,
            stdin_bytes: 0,
            stdout_bytes: 0,
            short_stderr: String::new(),
            webhook: Some(DeliveryView {
                state: "DELIVERED".into(),
                url: "https://example.com/h".into(),
                webhook_id: "msg_x".into(),
                attempts: 1,
                last_status: Some(200),
                last_error: None,
                next_attempt: None,
                ended: None,
            }),
        },
        &["Webhook"],
    );
    check_response(
        &spec,
        "CallPage",
        &CallPageView {
            calls: vec![],
            cursor: Some("1-2".into()),
        },
        &["Cursor"],
    );
    check_response(
        &spec,
        "EventView",
        &EventView {
            image_digest: Some("sha256:ab".into()),
            time: String::new(),
            event: "FINISHED".into(),
            call_id: CALL_ID.into(),
            short_stdin: String::new(),
            short_stdout: String::new(),
            short_stderr: String::new(),
            message: String::new(),
            seq: 1,
        },
        &["ImageDigest"],
    );
    check_response(
        &spec,
        "StatusView",
        &StatusView {
            total: 0,
            pending: 0,
            running: 0,
            finished: 0,
            failed: 0,
        },
        &[],
    );
    check_response(
        &spec,
        "UserView",
        &UserView {
            name: "bob".into(),
            max_concurrency: 1,
            max_queued: 1,
            max_queued_bytes: 1,
            max_functions: 1,
            rate: 1,
            reserved: 0,
            admin: false,
            created: String::new(),
            key: Some("hfk_x".into()),
        },
        &["Key"],
    );
    check_response(
        &spec,
        "Health",
        &Health {
            status: "ok".into(),
            engine: "down".into(),
            store: "ok".into(),
            instance: "i".into(),
        },
        &[],
    );
    let error = ErrorBody {
        error: ErrorDetail {
            code: "not_found".into(),
            message: String::new(),
        },
    };
    let progress = PullProgressView {
        id: "1af6936d28e1".into(),
        status: "Downloading".into(),
        current: Some(1),
        total: Some(2),
    };
    check_response(&spec, "PullProgress", &progress, &["Current", "Total"]);
    let states: BTreeSet<String> = spec["components"]["schemas"]["PullProgress"]["properties"]
        ["Status"]["enum"]
        .as_sequence()
        .expect("PullProgress.Status enum")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    assert_eq!(
        states,
        crate::runtime::LAYER_STATES
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        "PullProgress.Status"
    );
    let start = PullStart { image: "i".into() };
    check_response(&spec, "PullStart", &start, &[]);
    let line = PullLine {
        pull: Some(start),
        progress: Some(progress),
        status: Some(201),
        function: None,
        error: Some(error.error.clone()),
    };
    let mut keys = json_keys(&line);
    keys.insert("Function".into());
    assert_eq!(keys, schema_properties(&spec, "PullLine"), "PullLine");
    assert!(
        spec["components"]["schemas"]["PullLine"]["required"].is_null(),
        "PullLine: every field is optional"
    );
    check_response(&spec, "Error", &error, &[]);
    check_response(&spec, "ErrorDetail", &error.error, &[]);
}
