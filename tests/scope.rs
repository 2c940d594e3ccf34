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
