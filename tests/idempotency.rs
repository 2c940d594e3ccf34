//! Safe resubmission (`Idempotency-Key`) against the real binary and
//! Engine: a key answers its first call again and never runs the work
//! twice, on the call URL, the management API and the CLI; another body
//! under the key is 422; and a kill -9 between the durable accept and its
//! 202 leaves a call that the resubmission finds, run once.
//!
//! The crash test needs the `failpoints` feature (`FAILPOINTS` in the env
//! of `serve`).

mod common;

use common::*;

/// Payloads over 4 KiB go to their own file, smaller ones inline; the warm
/// pool is off so every call is one cold container, seen by its label.
const CONFIG: &str = "[store]\ninline_max_bytes = 4096\n[pool]\nper_function = 0";

/// A POST to `url` with `key` (if any): (status, headers, body).
fn post(d: &Daemon, url: &str, key: Option<&str>, extra: &[&str], body: &[u8]) -> Answer {
    let dir = tempfile::tempdir().expect("temp dir");
    let (heads, data) = (dir.path().join("heads"), dir.path().join("body"));
    std::fs::write(&data, body).expect("body file");
    let header = key.map(|k| format!("Idempotency-Key: {k}"));
    let data_arg = format!("@{}", data.display());
    let heads_arg = heads.display().to_string();
    let mut args = vec!["-X", "POST", "-D", &heads_arg, "--data-binary", &data_arg];
    if let Some(h) = &header {
        args.extend(["-H", h.as_str()]);
    }
    args.extend_from_slice(extra);
    args.push(url);
    let (status, body) = d.curl(&args);
    let heads = std::fs::read_to_string(&heads)
        .unwrap_or_default()
        .to_ascii_lowercase();
    Answer {
        status,
        heads,
        body,
    }
}

struct Answer {
    status: u16,
    /// The response head, lower-cased.
    heads: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    fn call_id(&self) -> String {
        match self.json()["CallId"].as_str() {
            Some(id) => id.to_string(),
            None => panic!(
                "no CallId in {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            ),
        }
    }

    fn replayed(&self) -> bool {
        self.heads.contains("idempotent-replayed: true")
    }

    /// The `hyperfuncd-call-id` header.
    fn call_header(&self) -> Option<String> {
        self.heads
            .lines()
            .find_map(|l| l.strip_prefix("hyperfuncd-call-id:"))
            .map(|v| v.trim().to_string())
    }
}

fn wait_ended(d: &Daemon, id: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    d.wait_until(60, &format!("call {id} to end"), || {
        last = d.call_record(id).1;
        last["State"] == "FINISHED" || last["State"] == "FAILED"
    });
    last
}

#[test]
fn a_key_answers_its_first_call_and_another_body_is_422() {
    test_image();
    let d = Daemon::start_with(CONFIG);
    let url = d.create("cat", &[IMAGE, "cat"]);
    let events = EngineEvents::start(&d.instance, None);

    let first = post(&d, &url, Some("order-1"), &[], b"hello");
    assert_eq!(
        first.status,
        202,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert!(!first.replayed(), "a first submission is not a replay");
    let id = first.call_id();
    let again = post(&d, &url, Some("order-1"), &[], b"hello");
    assert_eq!((again.status, again.call_id()), (202, id.clone()));
    assert!(again.replayed(), "heads: {}", again.heads);

    // Another body under the key: refused, nothing stored.
    let other = post(&d, &url, Some("order-1"), &[], b"HELLO");
    assert_eq!(other.status, 422);
    assert_eq!(other.json()["error"]["code"], "idempotency_key_reused");
    let message = other.json()["error"]["message"].to_string();
    assert!(message.contains(&id), "{message}");

    // A key out of bounds: a clear 400 before anything is stored.
    for bad in ["a b", &"k".repeat(256)] {
        let a = post(&d, &url, Some(bad), &[], b"x");
        assert_eq!(a.status, 400, "{bad:?}");
        assert!(
            a.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Idempotency-Key")),
            "{}",
            String::from_utf8_lossy(&a.body)
        );
    }

    // The management API's call endpoint shares the scope (owner, function).
    let auth = format!("Authorization: Bearer {}", d.admin_key());
    let api = format!("{}/v1/functions/cat/call", d.endpoint);
    let via_api = post(&d, &api, Some("order-1"), &["-H", &auth], b"hello");
    assert_eq!((via_api.status, via_api.call_id()), (202, id.clone()));

    // The CLI.
    let cli = |key: &str| {
        let out = d.cli_stdin(
            &["func", "call", "--idempotency-key", key, "cat"],
            Some(b"from the cli"),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let by_cli = cli("cli-1");
    assert_eq!(cli("cli-1"), by_cli);
    let cli_id = by_cli
        .trim()
        .strip_prefix("CallId: ")
        .unwrap_or_else(|| panic!("unexpected call output {by_cli:?}"))
        .to_string();
    let bad = d.cli_stdin(
        &["func", "call", "--idempotency-key", "no spaces", "cat"],
        Some(b"x"),
    );
    assert_cli_error(&bad, "Idempotency-Key");

    // `/sync`: the first answer is the output; a resubmission names the
    // same call (its output was handed out once, so it is gone now).
    let sync_url = format!("{url}/sync");
    let s1 = post(&d, &sync_url, Some("sync-1"), &[], b"sync body");
    assert_eq!((s1.status, s1.body.as_slice()), (200, &b"sync body"[..]));
    let sync_id = s1.call_header().expect("call id header");
    let s2 = post(&d, &sync_url, Some("sync-1"), &[], b"sync body");
    assert_eq!(s2.call_header(), Some(sync_id.clone()));
    assert!(s2.replayed());
    assert_eq!(s2.status, 410, "{}", String::from_utf8_lossy(&s2.body));

    for call in [&id, &cli_id, &sync_id] {
        assert_eq!(wait_ended(&d, call)["State"], "FINISHED");
    }
    assert_eq!(d.output(&id), (200, b"hello".to_vec()));
    let starts = events.start_counts();
    for call in [&id, &cli_id, &sync_id] {
        assert_eq!(starts.get(call.as_str()).map(|s| s.1), Some(1), "{call}");
    }
    assert_eq!(starts.len(), 3, "one container per key: {starts:?}");
    assert_eq!(d.status("cat")["Total"], 3, "{}", d.status("cat"));
    d.finish();
}

/// Killed right after the accept is durable, before the 202 went out: the
/// client saw no answer and resubmits after the restart. It gets the first
/// call's id, and the work runs once, inline and file payloads both.
#[test]
fn a_resubmission_after_a_kill_9_before_the_202_gets_the_first_call() {
    test_image();
    let armed = [("FAILPOINTS", "accept-durable=return")];
    let mut d = Daemon::start_with_env(CONFIG, &armed);
    let url = d.create("cat", &[IMAGE, "cat"]);
    let events = EngineEvents::start(&d.instance, None);
    let mut ids = Vec::new();
    for (key, payload) in [
        ("inline", random_bytes(100)),
        ("file", random_bytes(64 * 1024)),
    ] {
        let lost = post(&d, &url, Some(key), &[], &payload);
        assert_eq!(lost.status, 0, "the daemon answered before dying");
        d.wait_failpoint("accept-durable", 60);
        d.restart_with_env(&[]);
        let again = post(&d, &url, Some(key), &[], &payload);
        assert_eq!(
            again.status,
            202,
            "{}",
            String::from_utf8_lossy(&again.body)
        );
        assert!(again.replayed(), "not the first call: {}", again.heads);
        let id = again.call_id();
        assert_eq!(wait_ended(&d, &id)["State"], "FINISHED");
        assert_eq!(d.output(&id), (200, payload));
        ids.push(id);
        d.restart_with_env(&armed);
    }
    d.restart_with_env(&[]);
    let starts = events.start_counts();
    for id in &ids {
        assert_eq!(starts.get(id.as_str()).map(|s| s.1), Some(1), "{id}");
    }
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(d.status("cat")["Total"], 2, "{}", d.status("cat"));
    d.finish();
}
