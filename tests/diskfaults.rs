//! A sick disk, against the real binary and Engine: ENOSPC, EIO and EMFILE
//! injected (`io_fault!` failpoints, `FAILPOINTS` of `serve`) at each file
//! operation of a call's path: the payload file's write and read, the
//! output file's write and read, sled's flush (where the event log and
//! every record are written) and the fdatasync after it. Every fault ends
//! in one of its meanings: refused with nothing stored (507 for a full
//! disk, 503 `store_unavailable` otherwise), tried again and done, the
//! call FAILED with the reason, or 503 `outcome_unknown` with the daemon
//! restarting to settle it. Nothing stays RUNNING, nothing is declared lost
//! that was not.
//!
//! Needs the `failpoints` feature.

mod common;

use common::*;

/// Payloads and outputs over 4 KiB are files of their own, smaller ones
/// inline; the warm pool is off (one cold container per call).
const CONFIG: &str = "[store]\ninline_max_bytes = 4096\n[pool]\nper_function = 0";

/// Bound of every wait for calls to end.
const END_SECS: u64 = 120;

/// POSTs `payload` to a call URL: (status, JSON body or null).
fn post(d: &Daemon, url: &str, payload: &[u8]) -> (u16, serde_json::Value) {
    let file = d.dir.path().join("payload.bin");
    std::fs::write(&file, payload).expect("write the payload");
    let (code, body) = d.curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", file.display()),
        url,
    ]);
    (
        code,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Waits until `id` has ended; returns its record.
fn ended(d: &Daemon, id: &str) -> serde_json::Value {
    d.wait_until(END_SECS, &format!("call {id} to end"), || {
        let (_, c) = d.call_record(id);
        c["State"] == "FINISHED" || c["State"] == "FAILED"
    });
    d.call_record(id).1
}

/// Nothing of `function` is PENDING or RUNNING, and no container is left.
fn settled(d: &Daemon, function: &str) {
    d.wait_until(END_SECS, "every call to end", || {
        let s = d.status(function);
        s["Pending"] == 0 && s["Running"] == 0
    });
    d.wait_until(30, "no container left", || d.containers(false).is_empty());
}

/// A moment without file descriptors, an interrupted call, an I/O error
/// that passes: at the payload's write and read and the output's write and
/// read, each is tried again; every call finishes with its own bytes and
/// none is declared lost. A read still failing after its retries answers
/// 503 and loses nothing: the next try hands the bytes out.
#[test]
fn transient_faults_are_tried_again_and_lose_nothing() {
    let d = Daemon::start_with_env(
        CONFIG,
        &[(
            "FAILPOINTS",
            "payload-write=2*return(EMFILE);payload-read=6*return(EIO);\
             output-write=1*return(EINTR);output-read=6*return(EMFILE)",
        )],
    );
    let cat = d.create("cat", &[IMAGE, "cat"]);
    let payload = random_bytes(20_000);
    let (code, body) = post(&d, &cat, &payload);
    assert_eq!(code, 202, "two EMFILE at the payload's write: {body}");
    let id = body["CallId"].as_str().expect("call id").to_string();
    // Five failed reads (the first try and four more) make one dispatch
    // give up; the next, a second later, reads it.
    let call = ended(&d, &id);
    assert_eq!(call["State"], "FINISHED", "{call}");
    // Five failed reads of the output: 503, nothing lost.
    let (code, body) = d.output(&id);
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&body));
    let err: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(err["error"]["code"], "store_unavailable", "{err}");
    let (code, body) = d.output(&id);
    assert_eq!(code, 200, "the output after the fault passed");
    assert!(body == payload, "the output is not the call's own bytes");
    assert!(
        !d.log().contains("is lost"),
        "something was declared lost:\n{}",
        d.log()
    );
    settled(&d, "cat");
    d.finish();
}

/// A payload file that is gone is lost, and only that: the call ends
/// FAILED saying so.
#[test]
fn a_missing_payload_file_is_lost_and_says_so() {
    let d = Daemon::start_with_env(CONFIG, &[("FAILPOINTS", "payload-read=return(ENOENT)")]);
    let cat = d.create("cat", &[IMAGE, "cat"]);
    let (code, body) = post(&d, &cat, &random_bytes(10_000));
    assert_eq!(code, 202, "{body}");
    let call = ended(&d, body["CallId"].as_str().expect("call id"));
    assert_eq!(call["State"], "FAILED", "{call}");
    let msg = call["Message"].as_str().unwrap_or("");
    assert!(msg.contains("is lost"), "{call}");
    settled(&d, "cat");
    d.finish();
}

/// The payload's write refused: a full disk is 507, an I/O error or no file
/// descriptors (after the retries) 503 `store_unavailable`; nothing is
/// stored either way, the daemon keeps serving, and the next call runs.
#[test]
fn a_refused_payload_write_stores_nothing() {
    let d = Daemon::start_with_env(
        CONFIG,
        &[(
            "FAILPOINTS",
            "payload-write=1*return(ENOSPC)->5*return(EIO)->5*return(EMFILE)->off",
        )],
    );
    let cat = d.create("cat", &[IMAGE, "cat"]);
    for (want, code_name) in [
        (507, "insufficient_storage"),
        (503, "store_unavailable"),
        (503, "store_unavailable"),
    ] {
        let (code, body) = post(&d, &cat, &random_bytes(8_000));
        assert_eq!(code, want, "{body}");
        assert_eq!(body["error"]["code"], code_name, "{body}");
        assert_eq!(d.status("cat")["Total"], 0, "a refused call was stored");
    }
    let payload = random_bytes(8_000);
    let (code, body) = post(&d, &cat, &payload);
    assert_eq!(code, 202, "{body}");
    let id = body["CallId"].as_str().expect("call id").to_string();
    assert_eq!(ended(&d, &id)["State"], "FINISHED");
    assert!(d.output(&id).1 == payload, "not its own bytes");
    settled(&d, "cat");
    d.finish();
}

/// An output that cannot be stored (a full disk; an I/O error that does
/// not pass) ends its call FAILED with the reason: never RUNNING, the
/// container removed, a `/sync` waiter answered.
#[test]
fn an_output_that_cannot_be_stored_ends_its_call_failed() {
    let d = Daemon::start_with_env(
        CONFIG,
        &[("FAILPOINTS", "output-write=1*return(ENOSPC)->return(EIO)")],
    );
    let cat = d.create("cat", &[IMAGE, "cat"]);
    let (code, body) = post(&d, &cat, &random_bytes(10_000));
    assert_eq!(code, 202, "{body}");
    let call = ended(&d, body["CallId"].as_str().expect("call id"));
    assert_eq!(call["State"], "FAILED", "{call}");
    let msg = call["Message"].as_str().unwrap_or("");
    assert!(msg.contains("no space left to store the output"), "{call}");
    settled(&d, "cat");

    // A /sync waiter gets the end (after the retries of the EIO).
    let (code, body) = post(&d, &format!("{cat}/sync"), &random_bytes(10_000));
    assert_eq!(code, 500, "{body}");
    assert_eq!(body["error"]["code"], "call_failed", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("cannot store the output"), "{body}");
    settled(&d, "cat");
    assert_eq!(d.status("cat")["Failed"], 2);
    d.finish();
}

/// sled's flush, or the fdatasync after it, fails: the write's outcome is
/// unknown, so the client gets 503 `outcome_unknown` (never 507, even for
/// ENOSPC), the daemon stops, and after the restart the call either exists
/// and runs or does not exist; nothing is stuck.
#[test]
fn a_failed_flush_is_an_unknown_outcome_that_the_restart_settles() {
    let mut d = Daemon::start_with(CONFIG);
    let cat = d.create("cat", &[IMAGE, "cat"]);
    for (point, errno) in [
        ("sled-flush", "EIO"),
        ("sled-flush", "ENOSPC"),
        ("log-fdatasync", "EIO"),
    ] {
        let before = d.status("cat")["Total"].as_u64().unwrap_or(0);
        d.restart_with_env(&[("FAILPOINTS", &format!("{point}=return({errno})"))]);
        let (code, body) = post(&d, &cat, b"inline payload");
        assert_eq!(code, 503, "{point} {errno}: {body}");
        assert_eq!(body["error"]["code"], "outcome_unknown", "{body}");
        let status = d.wait_dead(30);
        assert_eq!(
            status.code(),
            Some(74),
            "{point} {errno}: the daemon must stop for the restart to recover"
        );
        d.restart_with_env(&[]);
        let total = d.status("cat")["Total"].as_u64().unwrap_or(0);
        assert!(
            (before..=before + 1).contains(&total),
            "{point} {errno}: {before} calls before, {total} after"
        );
        eprintln!(
            "{point} {errno}: the call whose outcome was unknown {}",
            if total > before {
                "was stored"
            } else {
                "was not stored"
            }
        );
        settled(&d, "cat");
    }
    let s = d.status("cat");
    assert_eq!(s["Total"], s["Finished"], "{s}");
    d.finish();
}
