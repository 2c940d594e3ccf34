//! Quotas, the persistent per-user FIFO, crash recovery and Engine faults,
//! observed from the Docker Engine itself; and what a sync call answers.

mod common;

use common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn quota_fifo_and_fairness_seen_from_the_engine() {
    let d = Daemon::start();
    let alice = d.add_user("alice", 2);
    let bob = d.add_user("bob", 2);
    let run = |key: &str, args: &[&str]| {
        let out = d.cli_as(key, args, None);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    run(
        &alice,
        &["func", "create", "--name", "nap", IMAGE, "sleep", "2"],
    );
    run(
        &bob,
        &["func", "create", "--name", "quick", IMAGE, "echo", "hi"],
    );
    let events = EngineEvents::start(&d.instance, None);

    // One client connection, so acceptance order is submission order.
    let nap = d.inspect("nap")["Address"].as_str().unwrap().to_string();
    let submitted: Vec<String> = submit_all(
        &d.ca(),
        &nap,
        vec![Vec::new(); 10],
        1,
        Arc::new(AtomicBool::new(false)),
    )
    .into_iter()
    .map(|(_, id)| id)
    .collect();
    assert_eq!(submitted.len(), 10);
    let bob_call = run(&bob, &["func", "call", "quick"])
        .trim()
        .trim_start_matches("CallId: ")
        .to_string();

    d.wait_until(120, "alice's ten calls to finish", || {
        d.status("nap")["Finished"] == 10
    });
    d.wait_until(30, "bob's call to finish", || {
        d.status("quick")["Finished"] == 1
    });
    // docker events may trail the API by a moment.
    d.wait_until(10, "the Engine's die events", || {
        events
            .all()
            .iter()
            .filter(|(a, _, f)| a == "die" && f == "nap")
            .count()
            == 10
    });

    assert!(
        events.max_running("nap") <= 2,
        "alice ran more than 2 at once: {:?}",
        events.all()
    );
    assert_eq!(
        events.max_running("nap"),
        2,
        "the quota should be used fully"
    );
    // FIFO by dispatch: containers are created in submission order; their
    // starts may overlap.
    let created: Vec<String> = events
        .all()
        .into_iter()
        .filter(|(a, _, f)| a == "create" && f == "nap")
        .map(|(_, c, _)| c)
        .collect();
    assert_eq!(
        created, submitted,
        "alice's containers are created in submission order"
    );
    let order: Vec<String> = events
        .all()
        .into_iter()
        .filter(|(a, _, _)| a == "start")
        .map(|(_, c, _)| c)
        .collect();
    let bob_at = order
        .iter()
        .position(|c| *c == bob_call)
        .expect("bob's call started");
    let alice_fifth = order
        .iter()
        .position(|c| *c == submitted[4])
        .expect("alice's 5th started");
    assert!(
        bob_at < alice_fifth,
        "bob's call must not wait for alice's backlog: start order {order:?}"
    );

    // Users see only their own things; admin-only commands say so.
    assert_cli_error(
        &d.cli_as(&bob, &["func", "inspect", "nap"], None),
        "not found",
    );
    assert_cli_error(
        &d.cli_as(&bob, &["func", "get", &submitted[0]], None),
        "not found",
    );
    assert_cli_error(&d.cli_as(&bob, &["user", "ls"], None), "admin");
    assert!(d.ok(&["user", "ls"]).contains("alice"));
    let out = run(&alice, &["func", "get", &submitted[0]]);
    assert_eq!(out, "");
    d.finish();
}

/// FIFO by dispatch, not by start: an owner's containers are created in
/// submission order, and the Engine starts them while the next ones are
/// being created (not one after another, as parallel `docker run`s would).
#[test]
fn an_owners_containers_are_created_in_order_and_start_overlapping() {
    let d = Daemon::start();
    let carol = d.add_user("carol", 6);
    let out = d.cli_as(
        &carol,
        &["func", "create", "--name", "echo6", IMAGE, "cat"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events = EngineEvents::start(&d.instance, None);
    let url = d.inspect("echo6")["Address"].as_str().unwrap().to_string();
    let payloads: Vec<Vec<u8>> = (0..6u8).map(|i| vec![b'a' + i; 16]).collect();
    // One client connection, so acceptance order is submission order.
    let submitted: Vec<String> =
        submit_all(&d.ca(), &url, payloads, 1, Arc::new(AtomicBool::new(false)))
            .into_iter()
            .map(|(_, id)| id)
            .collect();
    assert_eq!(submitted.len(), 6);
    d.wait_until(60, "the six calls to finish", || {
        d.status("echo6")["Finished"] == 6
    });
    d.wait_until(10, "the Engine's start events", || {
        events.starts("echo6").len() == 6
    });
    let seen: Vec<(String, String)> = events
        .all()
        .into_iter()
        .filter(|(a, _, f)| f == "echo6" && (a == "create" || a == "start"))
        .map(|(a, c, _)| (a, c))
        .collect();
    let created: Vec<&String> = seen
        .iter()
        .filter(|(a, _)| a == "create")
        .map(|(_, c)| c)
        .collect();
    assert_eq!(
        created,
        submitted.iter().collect::<Vec<_>>(),
        "containers are created in submission order: {seen:?}"
    );
    let at = |action: &str, call: &String| {
        seen.iter()
            .position(|(a, c)| a == action && c == call)
            .unwrap_or_else(|| panic!("no {action} of {call}: {seen:?}"))
    };
    let overlapped = submitted
        .windows(2)
        .any(|w| at("create", &w[1]) < at("start", &w[0]));
    assert!(
        overlapped,
        "no container was created before its predecessor started: {seen:?}"
    );
    d.finish();
}

#[test]
fn rm_with_live_calls_needs_force() {
    let d = Daemon::start();
    d.create("long", &[IMAGE, "sleep", "30"]);
    let running = d.call("long", b"");
    d.wait_until(30, "the call to run", || d.status("long")["Running"] == 1);
    assert_cli_error(&d.cli(&["func", "rm", "long"]), "use --force");
    let t = std::time::Instant::now();
    assert_eq!(d.ok(&["func", "rm", "--force", "long"]), "long\n");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "--force must kill, not wait: {:?}",
        t.elapsed()
    );
    let (code, _) = d.api(&format!("/v1/calls/{running}"));
    assert_eq!(code, 404, "the removed function's calls are gone");

    // A timeout kills the call and says so.
    d.create("sleepy", &["--timeout", "1s", IMAGE, "sleep", "30"]);
    let id = d.call("sleepy", b"");
    assert_cli_error(&d.cli(&["func", "get", "--wait", &id]), "timeout after 1s");
    d.finish();
}

/// SIGTERM: a running call that ends within the grace period finishes; one
/// that does not is killed and FAILED with the reason; no container stays.
#[test]
fn sigterm_lets_calls_finish_then_kills_the_rest() {
    // RUNNING is recorded before the container starts: under load the quick
    // call's start alone can take seconds, so the grace leaves room for it.
    let mut d = Daemon::start_with("[scheduler]\nshutdown_grace_secs = 8");
    d.create("quick", &[IMAGE, "sh", "-c", "sleep 1; echo done"]);
    d.create("long", &[IMAGE, "sleep", "60"]);
    let quick = d.call("quick", b"");
    let long = d.call("long", b"");
    d.wait_until(30, "both calls to run", || {
        d.status("quick")["Running"] == 1 && d.status("long")["Running"] == 1
    });
    let t = std::time::Instant::now();
    d.stop();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(
        d.containers(false).is_empty(),
        "containers left after SIGTERM: {:?}",
        d.containers(false)
    );
    d.restart();
    assert_eq!(d.ok(&["func", "get", &quick]), "done\n");
    let call = d.api(&format!("/v1/calls/{long}")).1;
    assert_eq!(call["State"], "FAILED", "{call}");
    assert_eq!(
        call["Message"], "cancelled: hyperfuncd was stopped",
        "{call}"
    );
    d.finish();
}

/// kill -9 of the real binary during intake, while the queue drains, and
/// while calls run: every acknowledged call ends FINISHED with its exact
/// output or FAILED with a reason; none is lost, stuck, or run twice.
#[test]
fn acknowledged_calls_survive_kill_9() {
    let mut d = Daemon::start_with("[scheduler]\nhost_max_running = 8");
    let url = d.create(
        "work",
        &[IMAGE, "sh", "-c", "read x; sleep 0.3; echo out-$x"],
    );
    let events = EngineEvents::start(&d.instance, None);
    let mut acked: HashMap<String, usize> = HashMap::new();
    let payload = |i: usize| format!("{i}\n").into_bytes();

    // 1. During intake: kill while a client is still submitting.
    let stop = Arc::new(AtomicBool::new(false));
    let (ca, u, s) = (d.ca(), url.clone(), stop.clone());
    let intake =
        std::thread::spawn(move || submit_all(&ca, &u, (0..150).map(payload).collect(), 4, s));
    d.wait_until(60, "some calls to be accepted", || {
        d.status("work")["Total"].as_u64().unwrap_or(0) >= 40
    });
    d.kill9();
    stop.store(true, Ordering::SeqCst);
    for (i, id) in intake.join().expect("intake thread") {
        acked.insert(id, i);
    }
    assert!(
        acked.len() >= 30,
        "only {} acknowledged before the kill",
        acked.len()
    );
    d.restart();

    // 2. While draining: about 200 calls queued or running, kill once some
    //    have finished.
    let stop = Arc::new(AtomicBool::new(false));
    for (i, id) in submit_all(&d.ca(), &url, (1000..1200).map(payload).collect(), 4, stop) {
        acked.insert(id, 1000 + i);
    }
    let before = d.status("work")["Finished"].as_u64().unwrap_or(0);
    d.wait_until(120, "the queue to drain a little", || {
        d.status("work")["Finished"].as_u64().unwrap_or(0) >= before + 10
    });
    let s = d.status("work");
    let in_flight = s["Pending"].as_u64().unwrap_or(0) + s["Running"].as_u64().unwrap_or(0);
    eprintln!("kill -9 while draining: {in_flight} calls queued or running");
    assert!(in_flight >= 150, "only {in_flight} in flight at the kill");
    d.kill9();
    d.restart();

    // 3. While calls run.
    d.wait_until(60, "calls to be running", || !d.containers(true).is_empty());
    d.kill9();
    d.restart();

    d.wait_until(240, "every call to end", || {
        let s = d.status("work");
        s["Pending"] == 0 && s["Running"] == 0
    });
    let mut finished = 0;
    for (id, i) in &acked {
        let (code, call) = d.api(&format!("/v1/calls/{id}"));
        assert_eq!(code, 200, "acknowledged call {id} was lost");
        match call["State"].as_str() {
            Some("FINISHED") => {
                finished += 1;
                let (code, out) = d.curl(&[
                    "-H",
                    &format!("Authorization: Bearer {}", d.admin_key()),
                    &format!("{}/v1/calls/{id}/output", d.endpoint),
                ]);
                assert_eq!(code, 200);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    format!("out-{i}\n"),
                    "call {id}"
                );
            }
            Some("FAILED") => {
                let msg = call["Message"].as_str().unwrap_or("");
                assert!(!msg.is_empty(), "call {id} FAILED without a reason");
            }
            other => panic!("call {id} ended {other:?}"),
        }
    }
    assert!(
        finished * 2 > acked.len(),
        "most calls should finish: {finished}/{}",
        acked.len()
    );
    d.wait_until(10, "die events", || {
        let all = events.all();
        all.iter().filter(|e| e.0 == "die").count() >= all.iter().filter(|e| e.0 == "start").count()
    });
    let mut starts: HashMap<String, usize> = HashMap::new();
    for c in events.starts("work") {
        *starts.entry(c).or_default() += 1;
    }
    for (id, n) in &starts {
        let log: Vec<String> = d
            .log()
            .lines()
            .filter(|l| {
                l.contains(id.as_str())
                    || l.contains("listed")
                    || l.contains("recovery")
                    || l.contains("leftover")
            })
            .map(str::to_string)
            .collect();
        assert_eq!(
            *n,
            1,
            "call {id} was executed {n} times; daemon log:\n{}",
            log.join("\n")
        );
    }
    let s = d.status("work");
    eprintln!(
        "kill -9 test: {} acknowledged, {finished} finished, status {s}",
        acked.len()
    );
    d.finish();
}

/// An Engine fault, on a private dockerd: running calls fail clearly, new
/// calls queue, and the queue drains once that Engine is back.
#[test]
fn engine_fault_on_a_private_dockerd() {
    let mut engine = PrivateEngine::start();
    let d = Daemon::start_with(&format!("[docker]\nsocket = \"{}\"", engine.host));
    let url = d.create("nap", &[IMAGE, "sh", "-c", "sleep 3; echo done"]);
    let a = d.call("nap", b"");
    let b = d.call("nap", b"");

    d.wait_until(30, "two containers running on the private Engine", || {
        engine.running(&d.instance) == 2
    });
    engine.kill9();
    for id in [&a, &b] {
        d.wait_until(30, "the running calls to fail", || {
            d.api(&format!("/v1/calls/{id}")).1["State"] == "FAILED"
        });
        let (_, call) = d.api(&format!("/v1/calls/{id}"));
        let msg = call["Message"].as_str().unwrap_or("");
        assert!(msg.contains("Docker Engine"), "unclear failure: {msg}");
    }
    let health = d.curl_json(&[&format!("{}/healthz", d.endpoint)]);
    assert_eq!(health["Engine"], "down");

    let queued: Vec<String> = (0..3).map(|_| d.call("nap", b"")).collect();
    let (code, _) = d.curl(&["-X", "POST", &url]);
    assert_eq!(code, 202, "calls are accepted while the Engine is down");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.status("nap")["Pending"], 4, "{}", d.status("nap"));

    engine.up();
    d.wait_until(90, "the queue to drain after the Engine is back", || {
        d.status("nap")["Finished"] == 4
    });
    for id in &queued {
        assert_eq!(d.ok(&["func", "get", id]), "done\n");
    }
    let health = d.curl_json(&[&format!("{}/healthz", d.endpoint)]);
    assert_eq!(health["Engine"], "up");
    d.wait_until(90, "the killed calls' containers to be swept", || {
        engine.containers(&d.instance).is_empty()
    });
    d.finish();
}

/// A sync call is answered from memory once its end is durable: the answer
/// is the exact output (inline and file-sized), the record is FINISHED, and
/// the output leaves the cache as a fetched one does; a failing sync call
/// answers its stored failure.
#[test]
fn sync_calls_answer_the_stored_end_and_leave_no_output_cached() {
    let d = Daemon::start();
    let url = d.create("echo", &[IMAGE, "cat"]);
    let big: Vec<u8> = (0..200 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let file = d.dir.path().join("payload");
    for payload in [b"small".to_vec(), big] {
        std::fs::write(&file, &payload).expect("payload file");
        let body = format!("@{}", file.display());
        let (code, out) = d.curl(&["--data-binary", &body, &format!("{url}/sync")]);
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
        assert!(out == payload, "output differs ({} bytes)", out.len());
    }
    let s = d.status("echo");
    assert_eq!(
        (s["Finished"].clone(), s["Running"].clone()),
        (2.into(), 0.into()),
        "{s}"
    );
    d.wait_until(30, "the answered outputs to leave the cache", || {
        d.api("/v1/functions/echo").1["OutputCacheBytes"] == 0
    });

    let url = d.create("fail", &[IMAGE, "sh", "-c", "echo oops >&2; exit 4"]);
    let (code, out) = d.curl(&["--data-binary", "x", &format!("{url}/sync")]);
    assert_eq!(code, 500, "{}", String::from_utf8_lossy(&out));
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    assert_eq!(v["ExitCode"], 4, "{v}");
    assert_eq!(v["ShortStderr"], "oops\n", "{v}");
    assert_eq!(d.status("fail")["Failed"], 1);
}

/// `func rm --force` with 10,000 calls queued answers within seconds (the
/// cancellation does not grow with the queue the way it once did: 24.9 s
/// at 100,000), and nothing of the function stays queued.
#[test]
fn rm_force_with_10000_queued_calls_answers_within_seconds() {
    const QUEUED: usize = 10_000;
    let d = Daemon::start_with(
        "[scheduler]\ndefault_max_concurrency = 1\ndefault_max_queued = 20000\ndefault_rate = 100000\n",
    );
    let url = d.create("deep", &[IMAGE, "sleep", "3600"]);
    // The first call runs (quota 1), the rest wait behind it.
    let payloads: Vec<Vec<u8>> = (0..QUEUED).map(|_| b"x".to_vec()).collect();
    let accepted = submit_all(&d.ca(), &url, payloads, 4, Arc::new(AtomicBool::new(false)));
    assert_eq!(accepted.len(), QUEUED, "every call accepted");
    d.wait_until(60, "the first call to run", || {
        d.status("deep")["Running"] == 1
    });
    let t = std::time::Instant::now();
    assert_eq!(d.ok(&["func", "rm", "--force", "deep"]), "deep\n");
    let took = t.elapsed();
    eprintln!("func rm --force with {QUEUED} calls queued: {took:?}");
    assert!(took < Duration::from_secs(10), "rm --force took {took:?}");
    for (_, id) in [
        accepted[0].clone(),
        accepted[QUEUED / 2].clone(),
        accepted[QUEUED - 1].clone(),
    ] {
        let (code, _) = d.api(&format!("/v1/calls/{id}"));
        assert_eq!(code, 404, "call {id} of the removed function is gone");
    }
    let (_, metrics) = d.curl(&[
        "-H",
        &format!("Authorization: Bearer {}", d.admin_key()),
        &format!("{}/metrics", d.endpoint),
    ]);
    let metrics = String::from_utf8_lossy(&metrics);
    let queued: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("hyperfuncd_queued_calls{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(queued, 0.0, "nothing queued:\n{metrics}");
    d.finish();
}
