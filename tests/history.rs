//! Call history (issue 26): `GET /v1/functions/NAME/calls` and
//! `func calls` on the sled store: newest first, state and time filters,
//! cursor pages that stay put while calls arrive, the same view as
//! `GET /v1/calls/ID`, and another tenant's function a 404. (The NATS
//! backend runs the same store checks in `src/store/nats/tests.rs`, and
//! the API over it in `tests/cluster.rs`.)

mod common;

use common::scope::api_as;
use common::*;
use serde_json::Value;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn ids(page: &Value) -> Vec<String> {
    page["Calls"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["CallId"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Every page of `query`, `limit` at a time, following the cursors.
fn walk(d: &Daemon, query: &str, limit: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor = String::new();
    for _ in 0..200 {
        let (code, page) = d.api(&format!(
            "/v1/functions/hist/calls?limit={limit}{query}{cursor}"
        ));
        assert_eq!(code, 200, "{page}");
        let calls = page["Calls"].as_array().cloned().unwrap_or_default();
        assert!(calls.len() <= limit, "{page}");
        all.extend(calls);
        match page["Cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return all,
        }
    }
    panic!("more than 200 pages");
}

#[test]
fn a_calls_state_streams_as_server_sent_events_until_it_ends() {
    let d = Daemon::start();
    d.create("nap", &[test_image(), "sh", "-c", "sleep 2; echo slept"]);
    let id = d.call("nap", b"");
    let auth = format!("Authorization: Bearer {}", d.admin_key());
    // Ends by itself once the call has ended.
    let started = std::time::Instant::now();
    let (code, body) = d.curl(&[
        "-N",
        "-H",
        &auth,
        &format!("{}/v1/calls/{id}/events", d.endpoint),
    ]);
    assert_eq!(code, 200);
    let text = String::from_utf8_lossy(&body);
    let states: Vec<String> = text
        .split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let mut lines = f.lines();
            assert_eq!(lines.next(), Some("event: state"), "{text}");
            let data = lines.next().and_then(|l| l.strip_prefix("data: "));
            let v: Value = serde_json::from_str(data.unwrap_or("")).unwrap_or(Value::Null);
            assert_eq!(v["CallId"], id.as_str(), "{text}");
            v["State"].as_str().unwrap_or("?").to_string()
        })
        .collect();
    // Each change once, in order: it was seen before it ran or while it ran.
    assert!(
        states == ["PENDING", "RUNNING", "FINISHED"] || states == ["RUNNING", "FINISHED"],
        "{states:?} in {text}"
    );
    assert!(started.elapsed().as_secs() < 30);
    // An ended call: one event, its end, and the stream is over.
    let (_, again) = d.curl(&[
        "-N",
        "-H",
        &auth,
        &format!("{}/v1/calls/{id}/events", d.endpoint),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&again)
            .matches("event: state")
            .count(),
        1
    );
    assert!(String::from_utf8_lossy(&again).contains("\"State\":\"FINISHED\""));
    // Another user's call, or no call at all: 404.
    let bob = d.add_user("bob", 1);
    let (code, _) = api_as(&d, &bob, "GET", &format!("/v1/calls/{id}/events"));
    assert_eq!(code, 404);
    let (code, _) = d.api("/v1/calls/not-a-call/events");
    assert_eq!(code, 404);
    d.finish();
}

#[test]
fn a_functions_calls_page_newest_first_with_filters_in_the_api_and_the_cli() {
    let d = Daemon::start();
    let url = d.create(
        "hist",
        &[
            test_image(),
            "sh",
            "-c",
            "read x; [ \"$x\" = fail ] && exit 3; echo ok",
        ],
    );
    // 64 calls, every fourth one failing.
    let payloads: Vec<Vec<u8>> = (0..64)
        .map(|i| {
            if i % 4 == 0 {
                b"fail\n".to_vec()
            } else {
                b"x\n".to_vec()
            }
        })
        .collect();
    let acked = submit_all(&d.ca(), &url, payloads, 4, Arc::new(AtomicBool::new(false)));
    assert_eq!(acked.len(), 64);
    d.wait_until(180, "every call ended", || {
        let s = d.status("hist");
        s["Finished"].as_u64().unwrap_or(0) + s["Failed"].as_u64().unwrap_or(0) == 64
    });

    // All of them, newest first: acceptance times never go up.
    let (code, page) = d.api("/v1/functions/hist/calls?limit=500");
    assert_eq!(code, 200, "{page}");
    assert!(page.get("Cursor").is_none(), "{page}");
    let all = ids(&page);
    let mut want: Vec<String> = acked.iter().map(|(_, id)| id.clone()).collect();
    want.sort();
    let mut got = all.clone();
    got.sort();
    assert_eq!(got, want);
    let created: Vec<&str> = page["Calls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["Created"].as_str())
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");
    // The default page is 50.
    let (_, first) = d.api("/v1/functions/hist/calls");
    assert_eq!(ids(&first), all[..50]);

    // Each item is the call's detail.
    for item in page["Calls"].as_array().into_iter().flatten().take(3) {
        let id = item["CallId"].as_str().unwrap_or_default();
        let (code, detail) = d.api(&format!("/v1/calls/{id}"));
        assert_eq!(code, 200);
        assert_eq!(&detail, item);
    }
    let failed = walk(&d, "&state=FAILED", 5);
    assert_eq!(failed.len(), 16);
    for c in &failed {
        assert_eq!(c["State"], "FAILED", "{c}");
        assert_eq!(c["ExitCode"], 3, "{c}");
        assert!(c["DurationMs"].as_u64().is_some(), "{c}");
        assert!(c["Finished"].as_str().is_some(), "{c}");
        assert_eq!(c["StdinBytes"], 5, "{c}");
    }
    let finished = walk(&d, "&state=finished", 500);
    assert!(finished
        .iter()
        .all(|c| c["State"] == "FINISHED" && c["StdoutBytes"] == 3));
    assert_eq!(finished.len(), 48);
    assert_eq!(walk(&d, "&state=FINISHED,FAILED", 500).len(), 64);
    assert!(walk(&d, "&state=PENDING,RUNNING", 500).is_empty());

    // Pages of 25 while calls arrive: the pages go on where they stopped.
    let (_, p1) = d.api("/v1/functions/hist/calls?limit=25");
    let cursor = p1["Cursor"].as_str().unwrap_or_default().to_string();
    let newer = d.call("hist", b"x\n");
    let mut paged = ids(&p1);
    let mut next = Some(cursor);
    while let Some(c) = next {
        let (code, p) = d.api(&format!("/v1/functions/hist/calls?limit=25&cursor={c}"));
        assert_eq!(code, 200, "{p}");
        paged.extend(ids(&p));
        next = p["Cursor"].as_str().map(String::from);
    }
    assert_eq!(paged, all);
    let (_, fresh) = d.api("/v1/functions/hist/calls?limit=1");
    assert_eq!(ids(&fresh), vec![newer.clone()]);

    // Times: everything is from the last hour, nothing from the future.
    assert_eq!(walk(&d, "&since=1h", 500).len(), 65);
    assert!(walk(&d, "&until=1h", 500).is_empty());
    assert!(walk(&d, "&since=2100-01-01T00:00:00Z", 500).is_empty());
    assert_eq!(walk(&d, "&until=2100-01-01T00:00:00Z", 500).len(), 65);

    // Bad input is a 400 that says what is expected.
    for (q, says) in [
        ("state=DONE", "invalid state"),
        ("limit=0", "invalid limit"),
        ("limit=501", "invalid limit"),
        ("cursor=zz", "invalid cursor"),
        ("since=yesterday", "invalid since"),
    ] {
        let (code, e) = d.api(&format!("/v1/functions/hist/calls?{q}"));
        assert_eq!(code, 400, "{q}: {e}");
        assert_eq!(e["error"]["code"], "bad_request", "{q}: {e}");
        let m = e["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains(says), "{q}: {e}");
    }

    // The CLI: a `docker ps`-style table, and JSON.
    let table = d.ok(&["func", "calls", "--state", "FAILED", "--limit", "3", "hist"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    for col in [
        "CALL ID", "STATE", "ACCEPTED", "DURATION", "EXIT", "MESSAGE",
    ] {
        assert!(lines[0].contains(col), "{table}");
    }
    assert!(
        lines[1].starts_with(failed[0]["CallId"].as_str().unwrap_or("?")),
        "{table}"
    );
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.contains("FAILED") && l.contains(" ago")),
        "{table}"
    );
    let json = d.ok(&[
        "func", "calls", "-o", "json", "--limit", "600", "--since", "1h", "hist",
    ]);
    let listed: Vec<Value> = serde_json::from_str(&json).unwrap_or_default();
    assert_eq!(listed.len(), 65, "{json}");
    assert_eq!(listed[0]["CallId"], newer.as_str());
    let two = d.ok(&[
        "func", "calls", "-o", "json", "-s", "FINISHED", "-s", "FAILED", "-n", "2", "hist",
    ]);
    let two: Vec<Value> = serde_json::from_str(&two).unwrap_or_default();
    assert_eq!(two.len(), 2);
    let bad = d.cli(&["func", "calls", "--state", "DONE", "hist"]);
    assert_cli_error(&bad, "invalid state");

    // Another tenant's function is not there, by API or CLI.
    let bob = d.add_user("bob", 1);
    for path in [
        "/v1/functions/hist/calls",
        "/v1/functions/hist/calls?owner=admin",
    ] {
        let (code, e) = api_as(&d, &bob, "GET", path);
        assert_eq!(code, 404, "{path}: {e}");
    }
    let out = d.cli_as(&bob, &["func", "calls", "admin/hist"], None);
    assert_cli_error(&out, "not found");

    // Whose key is it: the caller's own record, never a key.
    let (code, me) = api_as(&d, &bob, "GET", "/v1/whoami");
    assert_eq!(code, 200, "{me}");
    assert_eq!(
        (me["Name"].as_str(), me["Admin"].as_bool()),
        (Some("bob"), Some(false))
    );
    assert!(me.get("Key").is_none(), "{me}");
    let (code, me) = d.api("/v1/whoami");
    assert_eq!(
        (code, me["Name"].as_str(), me["Admin"].as_bool()),
        (200, Some("admin"), Some(true))
    );
    let (code, _) = api_as(&d, "hfk_not-a-key", "GET", "/v1/whoami");
    assert_eq!(code, 401);
    d.finish();
}
