//! The prune against the rest: a function removed and created again while
//! a prune holds a stale list of removed functions (the prune must not
//! cancel or kill the new function's calls; failpoints hold the removal's
//! purge, so the prune lists the function meanwhile, and then the prune
//! itself, while the name is created again and called); and a prune held
//! on a removed function never delays another user's calls (it runs on a
//! task of its own, not in the dispatch loop).
//!
//! Needs the `failpoints` feature (`FAILPOINTS` in the env of `serve`).

mod common;

use common::*;
use std::time::{Duration, Instant};

const CONFIG: &str = "[pool]\nper_function = 0";

#[test]
fn a_prune_held_across_a_remove_and_re_create_leaves_the_new_calls_alone() {
    test_image();
    let d = Daemon::start_with_env(
        CONFIG,
        &[
            // The removal waits 3 s before its purge: the prune (every
            // 300 ms) lists the function as removed meanwhile, then holds
            // 8 s with that list while the name is created again and called.
            (
                "FAILPOINTS",
                "rm-before-purge=1*sleep(3000);prune-function=1*sleep(8000)",
            ),
            ("HYPERFUNCD_TEST_PRUNE_MS", "300"),
        ],
    );
    d.create("cat", &[IMAGE, "cat"]);
    let old = d.call("cat", b"old");
    d.wait_until(60, "the old call to end", || {
        d.call_record(&old).1["State"] == "FINISHED"
    });
    let started = Instant::now();
    d.ok(&["func", "rm", "--force", "cat"]);
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "the removal was not held: the failpoint did not fire"
    );
    d.create("cat", &[IMAGE, "cat"]);
    let payloads: Vec<Vec<u8>> = (0..3).map(|_| random_bytes(64)).collect();
    let ids: Vec<String> = payloads.iter().map(|p| d.call("cat", p)).collect();
    // Still inside the prune's hold: the calls are accepted, not yet run.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "too slow to land inside the prune's hold"
    );
    for (id, payload) in ids.iter().zip(&payloads) {
        d.wait_until(60, &format!("call {id} to end"), || {
            let s = d.call_record(id).1["State"].clone();
            s == "FINISHED" || s == "FAILED"
        });
        let (_, rec) = d.call_record(id);
        assert_eq!(rec["State"], "FINISHED", "{rec}");
        assert_eq!(d.output(id), (200, payload.clone()));
    }
    // The prune did resume (past its hold) and left the function alone.
    d.wait_until(30, "the prune's hold to end", || {
        started.elapsed() > Duration::from_secs(12)
    });
    let (code, f) = d.api("/v1/functions/cat");
    assert_eq!(code, 200, "{f}");
    d.finish();
}

#[test]
fn a_held_prune_does_not_delay_another_users_calls() {
    test_image();
    let mut d = Daemon::start_with_env(CONFIG, &[("FAILPOINTS", "rm-cancelled=return")]);
    let bob = d.add_user("bob", 2);
    let out = d.cli_as(
        &bob,
        &["func", "create", "--name", "echo", IMAGE, "cat"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    d.create("gone", &[IMAGE, "cat"]);
    // The removal dies between its cancel and its purge: after the restart
    // the prune finds `gone` removed and not purged, and holds there.
    let _ = d.cli(&["func", "rm", "--force", "gone"]);
    d.wait_failpoint("rm-cancelled", 60);
    d.restart_with_env(&[("FAILPOINTS", "prune-function=1*sleep(12000)")]);
    let started = std::time::Instant::now();
    let out = d.cli_as(&bob, &["func", "call", "echo"], Some(b"not held up"));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let id = text
        .trim()
        .strip_prefix("CallId: ")
        .expect("call id")
        .to_string();
    d.wait_until(30, "bob's call to end", || {
        let s = d.call_record(&id).1["State"].clone();
        s == "FINISHED" || s == "FAILED"
    });
    let took = started.elapsed();
    assert_eq!(d.call_record(&id).1["State"], "FINISHED");
    assert!(
        took < Duration::from_secs(8),
        "bob's call waited for the prune: {took:?}"
    );
    // The prune was held meanwhile: `gone` is not purged yet.
    let again = d.cli(&["func", "create", "--name", "gone", IMAGE, "cat"]);
    assert_cli_error(&again, "still being removed");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "too slow to tell the prune was held"
    );
    // And once it goes on, it finishes the removal.
    d.wait_until(60, "the prune to purge gone", || {
        d.cli(&["func", "create", "--name", "gone", IMAGE, "cat"])
            .status
            .success()
    });
    d.finish();
}
