//! The host's slots shared fairly (issue 20, point 8): tenants whose quotas
//! add up to more than `host_max_running` cannot take the slots reserved
//! for the admin and for users with a reservation, so those calls start at
//! once on a full host; reservations that would leave no slot unreserved
//! are refused.

mod common;

use common::*;

/// A small host, no warm pool (every call is one cold container, which
/// the Engine's events count per function).
const HOST4: &str = "[scheduler]\nhost_max_running = 4\n[pool]\nper_function = 0";

/// A sync call through a call URL, bounded: (status, body).
fn sync(d: &Daemon, url: &str, payload: &str) -> (u16, String) {
    let (code, body) = d.curl(&[
        "--max-time",
        "90",
        "-X",
        "POST",
        "--data-binary",
        payload,
        &format!("{url}/sync"),
    ]);
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn count(d: &Daemon, function: &str, state: &str) -> u64 {
    d.status(function)[state].as_u64().unwrap_or(0)
}

/// `user add NAME ARGS...` as admin: its key.
fn add(d: &Daemon, name: &str, args: &[&str]) -> String {
    let mut all = vec!["user", "add", name];
    all.extend_from_slice(args);
    d.ok(&all).lines().last().expect("key").trim().to_string()
}

/// The issue's scenario: two tenants with quotas that add up to more than
/// the host fill it with `sleep 600` calls; the admin's sync call (one slot
/// kept by default) and that of a user with `--reserved 1` still start at
/// once and answer, and the tenants never hold more than the host minus
/// those two reservations.
#[test]
fn an_idle_admin_and_a_reserved_user_run_at_once_on_a_full_host() {
    let d = Daemon::start_with(HOST4);
    let events = EngineEvents::start(&d.instance, None);
    let alice = d.add_user("alice", 2);
    let bob = d.add_user("bob", 3);
    let carol = add(&d, "carol", &["--max-concurrency", "2", "--reserved", "1"]);
    let hogs = [(&alice, "hog-a"), (&bob, "hog-b")];
    for (key, name) in hogs {
        d.create_as(key, name, &[IMAGE, "sleep", "600"]);
    }
    for _ in 0..3 {
        for (key, name) in hogs {
            let out = d.cli_as(key, &["func", "call", name], Some(b"x"));
            assert!(out.status.success(), "{}", stderr(&out));
        }
    }
    // 4 slots, 1 kept for the admin, 1 for carol: the tenants get 2.
    d.wait_until(60, "the tenants to hold two slots", || {
        count(&d, "hog-a", "Running") + count(&d, "hog-b", "Running") == 2
    });
    let admin_echo = d.create("echo", &[IMAGE, "cat"]);
    assert_eq!(sync(&d, &admin_echo, "admin"), (200, "admin".to_string()));
    let carol_echo = d.create_as(&carol, "echo-c", &[IMAGE, "cat"]);
    assert_eq!(sync(&d, &carol_echo, "carol"), (200, "carol".to_string()));
    // Each call that ended gave the dispatcher another look: the tenants
    // still hold two, and the rest of their calls wait.
    let running = count(&d, "hog-a", "Running") + count(&d, "hog-b", "Running");
    let pending = count(&d, "hog-a", "Pending") + count(&d, "hog-b", "Pending");
    assert_eq!((running, pending), (2, 4));
    let most = events.max_running("hog-a") + events.max_running("hog-b");
    assert!(
        most <= 2,
        "the tenants ran {most} calls at once on the Engine"
    );
    for (key, name) in hogs {
        let out = d.cli_as(key, &["func", "rm", "--force", name], None);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    d.finish();
}

/// One tenant with a quota above the host gets the host minus the others'
/// reservations (here the admin's one), even with nobody else calling;
/// the admin's calls take the kept slot, one after the other.
#[test]
fn a_tenant_stops_at_the_host_minus_the_others_reservations() {
    let d = Daemon::start_with(HOST4);
    let events = EngineEvents::start(&d.instance, None);
    let greedy = d.add_user("greedy", 10);
    d.create_as(&greedy, "hog", &[IMAGE, "sleep", "600"]);
    for _ in 0..6 {
        let out = d.cli_as(&greedy, &["func", "call", "hog"], Some(b"x"));
        assert!(out.status.success(), "{}", stderr(&out));
    }
    d.wait_until(60, "greedy to hold three slots", || {
        count(&d, "hog", "Running") == 3
    });
    let echo = d.create("echo", &[IMAGE, "cat"]);
    for i in 0..3 {
        let payload = format!("admin {i}");
        assert_eq!(sync(&d, &echo, &payload), (200, payload));
    }
    assert_eq!(
        (count(&d, "hog", "Running"), count(&d, "hog", "Pending")),
        (3, 3)
    );
    assert_eq!(events.max_running("hog"), 3);
    let out = d.cli_as(&greedy, &["func", "rm", "--force", "hog"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    d.finish();
}

/// Reservations must leave a slot unreserved: `user add/update` past that
/// is refused (409, nothing changed) with the numbers; lowering one, or a
/// default that no longer fits after a restart with a smaller host, is not
/// refused but cut, with a warning in the log.
#[test]
fn reservations_that_leave_no_slot_unreserved_are_refused() {
    let mut d = Daemon::start_with(
        "[scheduler]\nhost_max_running = 4\ndefault_reserved = 1\n[pool]\nper_function = 0",
    );
    // The admin keeps 1; each user gets 1 by default; 3 of 4 may be kept.
    add(&d, "amy", &[]);
    let out = d.cli(&["user", "add", "bea", "--reserved", "2"]);
    assert_cli_error(&out, "one slot must stay unreserved");
    assert_cli_error(&out, "other users reserve 2 (admin 1, amy 1)");
    add(&d, "bea", &[]);
    let out = d.cli(&["user", "add", "cid"]);
    assert_cli_error(&out, "from [scheduler] default_reserved");
    assert_cli_error(&out, "at most 0 can be reserved");
    let cid = add(&d, "cid", &["--reserved", "0"]);
    let out = d.cli(&["user", "update", "cid", "--reserved", "1"]);
    assert_cli_error(&out, "cannot reserve 1 host slot for cid");
    // Through the API: 409 with the stable code.
    let (code, v) = common::scope::send_as(
        &d,
        &d.admin_key(),
        "PATCH",
        "/v1/users/cid",
        r#"{"Reserved": 2}"#,
    );
    assert_eq!(
        (code, &v["error"]["code"]),
        (409, &"conflict".into()),
        "{v}"
    );
    // Lowering one makes room.
    d.ok(&["user", "update", "amy", "--reserved", "0"]);
    d.ok(&["user", "update", "cid", "--reserved", "1"]);
    let users: serde_json::Value =
        serde_json::from_str(&d.ok(&["user", "ls", "-o", "json"])).expect("JSON");
    let reserved: Vec<(String, u64)> = users
        .as_array()
        .expect("array")
        .iter()
        .map(|u| {
            (
                u["Name"].as_str().unwrap_or_default().to_string(),
                u["Reserved"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        reserved,
        [
            ("admin".to_string(), 1),
            ("amy".to_string(), 0),
            ("bea".to_string(), 1),
            ("cid".to_string(), 1)
        ]
    );
    let table = d.ok(&["user", "ls"]);
    assert!(
        table
            .lines()
            .next()
            .unwrap_or_default()
            .contains("RESERVED"),
        "{table}"
    );
    // A smaller host: the reservations no longer fit and are cut, admins
    // first, then by name; the tenant with none still runs.
    d.restart_with(
        "[scheduler]\nhost_max_running = 2\ndefault_reserved = 1\n[pool]\nper_function = 0",
    );
    let echo = d.create_as(&cid, "echo", &[IMAGE, "cat"]);
    assert_eq!(sync(&d, &echo, "cid"), (200, "cid".to_string()));
    let log = d.log();
    assert!(
        log.contains("reserved slots add up to more than host_max_running - 1 leaves")
            && log.contains("bea 0 of 1, cid 0 of 1"),
        "{log}"
    );
    d.finish();
}
