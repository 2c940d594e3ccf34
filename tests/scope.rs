//! Function names per user (issue 13): two users may own the same name; the
//! call URL finds a function by its secret, and a 409 is only for the
//! caller's own names. The same flow runs on the NATS backend in
//! `tests/cluster.rs`.

mod common;

use common::*;

#[test]
fn two_users_can_own_the_same_function_name() {
    let d = Daemon::start();
    scope::two_users_own_one_name(&d, &d);
    d.finish();
}

/// `?owner=` names whose function a route means, so on create (where the
/// key is the owner) it is refused rather than quietly ignored: the admin
/// would otherwise get a function of their own.
#[test]
fn create_refuses_owner_in_the_query() {
    let d = Daemon::start();
    d.add_user("bob", 2);
    let auth = format!("Authorization: Bearer {}", d.admin_key());
    let body = format!(r#"{{"name":"resize","image":"{IMAGE}","command":["cat"]}}"#);
    let (code, v) = d.curl(&[
        "-X",
        "POST",
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &body,
        &format!("{}/v1/functions?owner=bob", d.endpoint),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&v).unwrap_or_default();
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    assert_eq!(
        v["error"]["message"],
        "owner= is not accepted here: a function is created by its owner's key"
    );
    // Nobody got a function.
    let (code, list) = d.api("/v1/functions");
    assert_eq!((code, list), (200, serde_json::json!([])));
    d.finish();
}

/// Follows `/logs/NAME/SECRET?follow=1` until the first event is in, runs
/// `change`, and returns once the stream has ended (curl's exit status:
/// 0 when the server closed it, 28 if only curl's own bound ended it).
fn follow_until_ended(d: &Daemon, url: &str, change: impl FnOnce()) -> std::process::ExitStatus {
    use std::io::BufRead;
    let logs = format!("{}?follow=1", url.replacen("/call/", "/logs/", 1));
    let mut curl = std::process::Command::new("curl")
        .arg("--cacert")
        .arg(d.ca())
        .args(["-sSfN", "--max-time", "60", &logs])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    let mut out = std::io::BufReader::new(curl.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("read the stream");
    assert!(first.contains("CallId") || first.contains('{'), "{first:?}");
    change();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut out, &mut rest).expect("read the stream");
    curl.wait().expect("curl")
}

/// A follower holds the URL it came by: once that URL is refreshed away,
/// or its function removed and another of the name created, the stream
/// ends instead of showing the new URL's calls.
#[test]
fn a_log_follow_ends_when_its_url_is_refreshed_or_recreated() {
    let d = Daemon::start();
    let url = d.create("tail", &[IMAGE, "cat"]);
    d.call("tail", b"x");
    let ended = follow_until_ended(&d, &url, || {
        d.ok(&["func", "update", "tail", "--refresh"]);
    });
    assert!(ended.success(), "the follow did not end: {ended}");

    let url = d.inspect("tail")["Address"]
        .as_str()
        .expect("Address")
        .to_string();
    let ended = follow_until_ended(&d, &url, || {
        d.ok(&["func", "rm", "--force", "tail"]);
        d.create("tail", &[IMAGE, "cat"]);
    });
    assert!(ended.success(), "the follow did not end: {ended}");
    d.ok(&["func", "rm", "--force", "tail"]);
    d.finish();
}
