//! Function names per user (issue 13): the flow every store backend must
//! pass, driven through the real binary. `a` and `b` may be one daemon or
//! two nodes sharing a store; alice works through `a`, bob through `b`.

use super::*;

/// `POST` to a call URL (`/call/NAME/SECRET`): (status, JSON).
pub fn post_url(d: &Daemon, url: &str, payload: &str) -> (u16, serde_json::Value) {
    let (code, body) = d.curl(&["-X", "POST", "--data-binary", payload, url]);
    (
        code,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// `GET` of a management API path with `key`: (status, JSON or null).
pub fn api_as(d: &Daemon, key: &str, method: &str, path: &str) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {key}");
    let (code, body) = d.curl(&["-X", method, "-H", &auth, &format!("{}{path}", d.endpoint)]);
    (
        code,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A management API request with a JSON `body` as the user holding `key`:
/// (status, JSON or null).
pub fn send_as(
    d: &Daemon,
    key: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {key}");
    let (code, out) = d.curl(&[
        "-X",
        method,
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
        &format!("{}{path}", d.endpoint),
    ]);
    (
        code,
        serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null),
    )
}

/// A call URL's sibling on the data plane: `/call/N/S` -> `/{kind}/N/S{rest}`.
fn plane(url: &str, kind: &str, rest: &str) -> String {
    format!("{}{rest}", url.replacen("/call/", &format!("/{kind}/"), 1))
}

/// Accepts a call through `url` and returns its output, fetched through
/// the same URL's `/output`.
fn run_through(d: &Daemon, url: &str, payload: &str) -> (String, String) {
    let (code, v) = post_url(d, url, payload);
    assert_eq!(code, 202, "call through {url}: {v}");
    let id = v["CallId"].as_str().expect("CallId").to_string();
    let (code, out) = d.curl(&[&plane(url, "output", &format!("/{id}/wait"))]);
    assert_eq!(
        code,
        200,
        "output of {id}: {}",
        String::from_utf8_lossy(&out)
    );
    (id, String::from_utf8_lossy(&out).into_owned())
}

/// Two users both own `resize`; each has its own record, secret, calls,
/// output and log caches and counters, and neither can see or reach the
/// other's, while the admin addresses either as OWNER/NAME.
pub fn two_users_own_one_name(a: &Daemon, b: &Daemon) {
    let alice = a.add_user("alice", 2);
    let bob = a.add_user("bob", 2);
    let url_a = a.create_as(&alice, "resize", &[IMAGE, "sh", "-c", "echo alice; cat"]);
    let url_b = b.create_as(&bob, "resize", &[IMAGE, "sh", "-c", "echo bob; cat"]);
    assert!(url_a.contains("/call/resize/") && url_b.contains("/call/resize/"));
    assert_ne!(url_a, url_b, "each has its own secret");

    // A second create is a conflict for the owner only; the API says 409.
    let again = a.cli_as(
        &alice,
        &["func", "create", "--name", "resize", IMAGE, "true"],
        None,
    );
    assert_cli_error(&again, "already exists");
    let auth = format!("Authorization: Bearer {alice}");
    let (code, body) = a.curl(&[
        "-X",
        "POST",
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "--data",
        &format!(r#"{{"Name":"resize","Image":"{IMAGE}","Command":["true"]}}"#),
        &format!("{}/v1/functions", a.endpoint),
    ]);
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));

    // Each one's call runs its own command, fetched through its own URL.
    let (id_a, out_a) = run_through(a, &url_a, "from-a");
    assert_eq!(out_a, "alice\nfrom-a");
    let (id_b, out_b) = run_through(b, &url_b, "from-b");
    assert_eq!(out_b, "bob\nfrom-b");
    // A second call of bob's stays in his output cache for later.
    let (code, v) = post_url(b, &url_b, "kept");
    assert_eq!(code, 202, "{v}");
    let kept = v["CallId"].as_str().expect("CallId").to_string();
    b.wait_until(60, "bob's kept call to finish", || {
        b.call_record(&kept).1["State"] == "FINISHED"
    });
    // One name's URL with the other's secret is no URL at all; neither
    // URL reaches the other's calls.
    let secret_b = url_b.rsplit('/').next().expect("secret");
    let (code, _) = a.curl(&[&format!("{}/status/resize/{secret_b}x", a.endpoint)]);
    assert_eq!(code, 404);
    let (code, _) = a.curl(&[&format!("{}/status/other/{secret_b}", a.endpoint)]);
    assert_eq!(
        code, 404,
        "the secret finds bob's resize, whose name is not other"
    );
    let (code, _) = a.curl(&[&plane(&url_a, "output", &format!("/{kept}"))]);
    assert_eq!(code, 404, "alice's URL does not reach bob's call");

    // ls and inspect show each user only their own.
    for (d, key, own, cmd) in [
        (a, &alice, "alice", "echo alice; cat"),
        (b, &bob, "bob", "echo bob; cat"),
    ] {
        let out = d.cli_as(key, &["func", "ls", "-o", "json"], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let list: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("ls JSON");
        let list = list.as_array().expect("array");
        assert_eq!(list.len(), 1, "{own}: {list:?}");
        assert_eq!(list[0]["Owner"], own);
        let out = d.cli_as(key, &["func", "inspect", "resize"], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("inspect JSON");
        assert_eq!(v["Owner"], own);
        assert_eq!(v["Command"][2], cmd);
    }
    // A user naming another owner gets what an unknown function gets.
    let (code, unknown) = api_as(a, &alice, "GET", "/v1/functions/nosuch");
    assert_eq!(code, 404);
    for path in [
        "/v1/functions/resize?owner=bob",
        "/v1/functions/resize/status?owner=bob",
        "/v1/functions/resize/logs?owner=bob",
        "/v1/functions/resize/calls?owner=bob",
    ] {
        let (code, v) = api_as(a, &alice, "GET", path);
        assert_eq!(code, 404, "{path}: {v}");
        assert_eq!(
            v["error"]["code"], unknown["error"]["code"],
            "{path}: {v} vs {unknown}"
        );
        assert!(!v.to_string().contains("bob"), "{path} tells of bob: {v}");
    }
    let (code, _) = api_as(a, &alice, "DELETE", "/v1/functions/resize?owner=bob");
    assert_eq!(code, 404);
    assert_cli_error(
        &a.cli_as(&alice, &["func", "status", "bob/resize"], None),
        "not found",
    );
    let (code, v) = api_as(a, &alice, "GET", "/v1/functions?owner=bob");
    assert_eq!((code, v.as_array().map(Vec::len)), (200, Some(0)), "{v}");

    // The admin sees both, with their owners, and addresses bob's by OWNER/NAME.
    let all = a.ok(&["func", "ls"]);
    assert!(
        all.lines()
            .any(|l| l.starts_with("resize") && l.contains("alice"))
            && all
                .lines()
                .any(|l| l.starts_with("resize") && l.contains("bob")),
        "{all}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["func", "inspect", "bob/resize"])).expect("inspect JSON");
    assert_eq!(v["Owner"], "bob");
    assert_eq!(v["Command"][2], "echo bob; cat");
    // The admin owns no resize: the 404 says whose exist.
    assert_cli_error(&a.cli(&["func", "status", "resize"]), "bob/resize");
    let id = stdout(&a.cli_stdin(&["func", "call", "bob/resize"], Some(b"by-admin")));
    let id = id
        .trim()
        .strip_prefix("CallId: ")
        .expect("call id")
        .to_string();
    let out = a.ok(&["func", "get", "--wait", &id]);
    assert_eq!(out, "bob\nby-admin");

    // Stats and logs are separate.
    let stats = |d: &Daemon, key: &str| -> serde_json::Value {
        let (code, v) = api_as(d, key, "GET", "/v1/functions/resize/status");
        assert_eq!(code, 200, "{v}");
        v
    };
    // So are their call histories, one name, two owners.
    let history = |d: &Daemon, key: &str| -> Vec<serde_json::Value> {
        let (code, v) = api_as(d, key, "GET", "/v1/functions/resize/calls");
        assert_eq!(code, 200, "{v}");
        v["Calls"].as_array().cloned().unwrap_or_default()
    };
    let (ha, hb) = (history(a, &alice), history(b, &bob));
    assert_eq!((ha.len(), hb.len()), (1, 3), "{ha:?} {hb:?}");
    assert!(ha.iter().all(|c| c["Owner"] == "alice"), "{ha:?}");
    assert!(hb.iter().all(|c| c["Owner"] == "bob"), "{hb:?}");
    assert_eq!(
        hb[0]["CallId"],
        id.as_str(),
        "the admin's call is bob's newest"
    );
    let (sa, sb) = (stats(a, &alice), stats(b, &bob));
    assert_eq!(
        (sa["Total"].as_u64(), sa["Finished"].as_u64()),
        (Some(1), Some(1)),
        "{sa}"
    );
    assert_eq!(
        (sb["Total"].as_u64(), sb["Finished"].as_u64()),
        (Some(3), Some(3)),
        "{sb}"
    );
    let admin_view: serde_json::Value =
        serde_json::from_str(&a.ok(&["func", "status", "-o", "json", "alice/resize"]))
            .expect("JSON");
    assert_eq!(admin_view["Total"].as_u64(), Some(1), "{admin_view}");
    let logs = |d: &Daemon, key: &str| {
        stdout(&d.cli_as(key, &["func", "logs", "-o", "json", "resize"], None))
    };
    let (la, lb) = (logs(a, &alice), logs(b, &bob));
    assert!(
        la.contains(&id_a) && !la.contains(&id_b) && !la.contains(&kept),
        "{la}"
    );
    assert!(
        lb.contains(&id_b) && lb.contains(&kept) && !lb.contains(&id_a),
        "{lb}"
    );
    let (code, body) = b.curl(&[&plane(&url_b, "logs", "")]);
    assert_eq!(code, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(&id_b) && !body.contains(&id_a), "{body}");

    // Removing alice's leaves bob's working, with his calls and outputs.
    let out = a.cli_as(&alice, &["func", "rm", "resize"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, _) = post_url(a, &url_a, "gone");
    assert_eq!(code, 404, "alice's URL died with her function");
    let (code, out) = b.curl(&[&plane(&url_b, "output", &format!("/{kept}"))]);
    assert_eq!(code, 200);
    assert_eq!(String::from_utf8_lossy(&out), "bob\nkept");
    let (_, again) = run_through(b, &url_b, "still");
    assert_eq!(again, "bob\nstill");
    assert_eq!(stats(b, &bob)["Total"].as_u64(), Some(4));
    // alice may now make a resize again; it starts afresh.
    let url_a2 = a.create_as(&alice, "resize", &[IMAGE, "cat"]);
    assert_ne!(url_a2, url_a);
    assert_eq!(stats(a, &alice)["Total"].as_u64(), Some(0));

    for (key, d) in [(&alice, a), (&bob, b)] {
        let out = d.cli_as(key, &["func", "rm", "resize"], None);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    a.ok(&["user", "rm", "alice"]);
    a.ok(&["user", "rm", "bob"]);
}
