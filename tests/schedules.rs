//! Schedules (issue 25): `func create --schedule`, one ordinary call per
//! tick, counted by the Engine's own events and by the function's log and
//! call history; exactly one call per tick across a kill -9 (one catch-up
//! call for the ticks missed while down), a crash right after a tick's
//! accept, and two NATS nodes.

mod common;

use common::nats::*;
use common::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn epoch_secs(rfc3339: &str) -> u64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339:?}: {e}"))
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// (tick in seconds since the epoch, call id) of each SCHEDULE event in
/// `name`'s log, in log order.
fn ticks(d: &Daemon, name: &str) -> Vec<(u64, String)> {
    let out = d.ok(&["func", "logs", "-o", "json", name]);
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON log line"))
        .filter(|v| v["Event"] == "SCHEDULE")
        .map(|v| {
            let m = v["Message"].as_str().expect("a message");
            // "tick 2026-01-01T00:00:02Z of "@every 2s" (UTC)"
            let at = m.split_whitespace().nth(1).unwrap_or_else(|| panic!("{m}"));
            (
                epoch_secs(at),
                v["CallId"].as_str().expect("a call id").to_string(),
            )
        })
        .collect()
}

/// The calls of `name`'s history (newest first, at most 100); `name` may
/// be OWNER/NAME.
fn history(d: &Daemon, name: &str) -> Vec<serde_json::Value> {
    let path = match name.split_once('/') {
        Some((owner, name)) => format!("/v1/functions/{name}/calls?limit=100&owner={owner}"),
        None => format!("/v1/functions/{name}/calls?limit=100"),
    };
    let (code, v) = d.api(&path);
    assert_eq!(code, 200, "{v}");
    v["Calls"].as_array().expect("calls").clone()
}

/// Waits until every call of `name` has ended; answers them.
fn all_ended(d: &Daemon, name: &str) -> Vec<serde_json::Value> {
    d.wait_until(60, "every scheduled call to end", || {
        history(d, name)
            .iter()
            .all(|c| matches!(c["State"].as_str(), Some("FINISHED" | "FAILED")))
    });
    history(d, name)
}

/// No tick twice, one call per tick, and those calls are the history's.
fn one_call_per_tick(fired: &[(u64, String)], calls: &[serde_json::Value]) {
    let ticks: HashSet<u64> = fired.iter().map(|(t, _)| *t).collect();
    assert_eq!(ticks.len(), fired.len(), "a tick fired twice: {fired:?}");
    let ids: HashSet<&str> = fired.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(ids.len(), fired.len(), "one call per tick: {fired:?}");
    let history: HashSet<&str> = calls
        .iter()
        .map(|c| c["CallId"].as_str().expect("an id"))
        .collect();
    assert_eq!(ids, history, "the ticks' calls are the function's calls");
}

/// Starts per call id among the Engine's events.
fn starts_per_call(starts: &[String]) -> HashMap<&str, usize> {
    let mut n = HashMap::new();
    for c in starts {
        *n.entry(c.as_str()).or_default() += 1;
    }
    n
}

#[test]
fn every_2s_for_10s_makes_5_calls_each_started_once() {
    let d = Daemon::start();
    let events = EngineEvents::start(&d.instance, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let payload = dir.path().join("payload");
    std::fs::write(&payload, b"tick tock").expect("payload");
    let p = payload.to_str().expect("utf-8 path");

    // Bad schedules are refused with the reason, before anything is stored.
    for (args, says) in [
        (vec!["--schedule", "61 * * * *"], "invalid schedule"),
        (vec!["--schedule", "* * * *"], "invalid schedule"),
        (vec!["--schedule", "@every 500ms"], "at least 1s"),
        (
            vec!["--schedule", "* * * * *", "--timezone", "Mars/Olympus"],
            "unknown time zone",
        ),
        (vec!["--timezone", "UTC"], "need --schedule"),
    ] {
        let mut all = vec!["func", "create", "--name", "bad"];
        all.extend(args);
        all.extend([IMAGE, "cat"]);
        assert_cli_error(&d.cli(&all), says);
    }
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 64 * 1024 + 1]).expect("big payload");
    let o = d.cli(&[
        "func",
        "create",
        "--name",
        "bad",
        "--schedule",
        "@every 1m",
        "--schedule-payload",
        big.to_str().expect("utf-8"),
        IMAGE,
        "cat",
    ]);
    assert_cli_error(&o, "at most 64 KiB");
    let (code, _) = d.api("/v1/functions/bad");
    assert_eq!(code, 404, "nothing was created");

    let created = Instant::now();
    d.create(
        "every",
        &[
            "--schedule",
            "@every 2s",
            "--schedule-payload",
            p,
            IMAGE,
            "cat",
        ],
    );
    let f = d.inspect("every");
    assert_eq!(f["Schedule"]["Expression"], "@every 2s", "{f}");
    assert_eq!(f["Schedule"]["Timezone"], "UTC", "{f}");
    assert_eq!(f["Schedule"]["PayloadBytes"], 9, "{f}");
    let next: Vec<u64> = f["Schedule"]["Next"]
        .as_array()
        .expect("next ticks")
        .iter()
        .map(|t| epoch_secs(t.as_str().expect("a time")))
        .collect();
    assert_eq!(next.len(), 3, "{f}");
    assert!(
        next.windows(2).all(|w| w[1] == w[0] + 2) && next[0] % 2 == 0,
        "{next:?}"
    );
    let ls = d.ok(&["func", "ls"]);
    assert!(ls.contains("SCHEDULE") && ls.contains("@every 2s"), "{ls}");

    std::thread::sleep(Duration::from_secs(10).saturating_sub(created.elapsed()));
    d.ok(&["func", "update", "every", "--no-schedule"]);
    let stopped = now_secs();
    assert!(d.inspect("every")["Schedule"].is_null());
    let calls = all_ended(&d, "every");
    let fired = ticks(&d, "every");
    assert!(
        (4..=6).contains(&fired.len()),
        "@every 2s for 10 s: 5 (±1) calls, not {}: {fired:?}",
        fired.len()
    );
    one_call_per_tick(&fired, &calls);
    assert!(
        fired.windows(2).all(|w| w[1].0 == w[0].0 + 2),
        "no tick skipped: {fired:?}"
    );
    assert!(calls.iter().all(|c| c["State"] == "FINISHED"), "{calls:?}");
    // The Engine started one container per call, and no other.
    d.wait_until(30, "every start to be seen", || {
        events.starts("every").len() >= fired.len()
    });
    let starts = events.starts("every");
    let per_call = starts_per_call(&starts);
    assert_eq!(starts.len(), fired.len(), "{starts:?} vs {fired:?}");
    assert!(
        fired
            .iter()
            .all(|(_, c)| per_call.get(c.as_str()) == Some(&1)),
        "{per_call:?}"
    );
    // Each tick's call got the payload as STDIN.
    let (_, last) = fired.last().expect("a tick");
    let (code, out) = d.output(last);
    assert_eq!((code, &out[..]), (200, &b"tick tock"[..]));
    // The text log says which tick made each call.
    let logs = d.ok(&["func", "logs", "every"]);
    assert!(
        logs.contains("[SCHEDULE]") && logs.contains("of \"@every 2s\" (UTC)"),
        "{logs}"
    );

    // Removed: no tick fires any more.
    std::thread::sleep(Duration::from_secs(5));
    let after = ticks(&d, "every");
    assert_eq!(
        after.len(),
        fired.len(),
        "ticks after --no-schedule: {after:?}"
    );
    assert!(after.iter().all(|(t, _)| *t <= stopped));
    d.finish();
}

#[test]
fn kill_9_and_a_pause_of_several_ticks_make_one_catch_up_call_and_no_tick_twice() {
    let mut d = Daemon::start();
    let events = EngineEvents::start(&d.instance, None);
    d.create("killed", &["--schedule", "@every 2s", IMAGE, "true"]);
    std::thread::sleep(Duration::from_secs(5));
    let killed = now_secs();
    d.kill9();
    // Down for 8-10 s: four or five ticks are missed. Started again just
    // after an odd second, so the latest missed tick is the second before
    // and the next one almost 2 s away.
    std::thread::sleep(Duration::from_secs(8));
    let since_epoch = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
    };
    while since_epoch().as_secs() % 2 == 0 || since_epoch().subsec_millis() > 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let restarted = now_secs();
    let starting = Instant::now();
    d.restart();
    let start_took = starting.elapsed();
    std::thread::sleep(Duration::from_secs(6));
    d.ok(&["func", "update", "killed", "--no-schedule"]);
    let calls = all_ended(&d, "killed");
    let fired = ticks(&d, "killed");
    eprintln!("ticks {fired:?}; killed at {killed}, restarted at {restarted} in {start_took:?}");
    one_call_per_tick(&fired, &calls);
    let (before, after): (Vec<u64>, Vec<u64>) =
        fired.iter().map(|(t, _)| *t).partition(|t| *t <= killed);
    assert!(before.len() >= 2, "ticks before the kill: {fired:?}");
    assert!(
        before.windows(2).all(|w| w[1] == w[0] + 2),
        "before the kill: {before:?}"
    );
    // The first tick after the kill is the catch-up: the latest one missed
    // (not an earlier one, so nothing in between fired: no burst) ...
    let catch_up = *after.first().expect("a tick after the restart");
    assert!(
        catch_up + 2 > restarted,
        "the catch-up is the latest missed tick, not an earlier one: {fired:?} (killed {killed}, restarted {restarted})"
    );
    let missed: Vec<u64> = after
        .iter()
        .copied()
        .filter(|t| *t > killed && *t <= restarted)
        .collect();
    if start_took < Duration::from_millis(1900) {
        // Up before the next tick: the catch-up is the tick missed last,
        // the second before the restart.
        assert_eq!(
            missed,
            vec![restarted - 1],
            "exactly one catch-up call, for the latest missed tick"
        );
    } else {
        assert!(missed.len() <= 1, "one catch-up call at most: {missed:?}");
    }
    // ... and from it on, every tick fired.
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 2) && after.len() >= 3,
        "after the restart: {after:?}"
    );
    // Each call's container started once (a call running at the kill is
    // ended by recovery, not run again).
    let starts = events.starts("killed");
    let per_call = starts_per_call(&starts);
    assert!(per_call.values().all(|n| *n == 1), "{per_call:?}");
    assert!(starts.len() <= fired.len(), "{starts:?} vs {fired:?}");
    d.finish();
}

#[test]
fn a_kill_right_after_a_ticks_accept_does_not_fire_it_again() {
    let mut d = Daemon::start_with_env("", &[("FAILPOINTS", "accept-durable=return")]);
    d.create("crashed", &["--schedule", "@every 2s", IMAGE, "true"]);
    // The first tick's call is durable, then the daemon dies at once.
    d.wait_failpoint("accept-durable", 10);
    d.set_env(&[]);
    d.restart();
    std::thread::sleep(Duration::from_secs(3));
    d.ok(&["func", "update", "crashed", "--no-schedule"]);
    let calls = all_ended(&d, "crashed");
    let fired = ticks(&d, "crashed");
    assert!(!fired.is_empty(), "the crashed tick's call is there");
    one_call_per_tick(&fired, &calls);
    d.finish();
}

#[test]
fn two_nats_nodes_fire_each_tick_once() {
    let _one = one_at_a_time();
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_on(&tmp.path().join("a"), &nats.config(""));
    let b = join(&a, &tmp.path().join("b"), &nats.config(""));
    let events = FunctionEvents::start("shared");
    let created = Instant::now();
    a.create("shared", &["--schedule", "@every 2s", IMAGE, "true"]);
    // B sees the schedule too (within its ticker's refresh).
    assert_eq!(b.inspect("shared")["Schedule"]["Expression"], "@every 2s");
    std::thread::sleep(Duration::from_secs(12).saturating_sub(created.elapsed()));
    b.ok(&["func", "update", "shared", "--no-schedule"]);
    let calls = all_ended(&a, "shared");
    let fired = ticks(&a, "shared");
    assert!(
        (5..=7).contains(&fired.len()),
        "@every 2s for 12 s on two nodes: 6 (±1) calls, not {}: {fired:?}",
        fired.len()
    );
    one_call_per_tick(&fired, &calls);
    assert!(
        fired.windows(2).all(|w| w[1].0 > w[0].0),
        "in tick order: {fired:?}"
    );
    // Both nodes ran the ticker; the Engine saw one start per tick (the
    // function's name is this test's alone: the Engine is shared).
    // Only these two nodes' containers: the Engine is shared with other
    // tests' daemons.
    let ours = |events: &FunctionEvents| -> HashMap<String, usize> {
        let mut n = HashMap::new();
        for (action, call, instance) in events.all() {
            if action == "start" && (instance == a.instance || instance == b.instance) {
                *n.entry(call).or_default() += 1;
            }
        }
        n
    };
    a.wait_until(30, "every start to be seen", || {
        ours(&events).values().sum::<usize>() >= fired.len()
    });
    std::thread::sleep(Duration::from_secs(1));
    let starts = ours(&events);
    assert_eq!(starts.len(), fired.len(), "{starts:?} vs {fired:?}");
    assert!(starts.values().all(|n| *n == 1), "{starts:?}");
    assert!(
        fired
            .iter()
            .all(|(_, c)| starts.get(c.as_str()) == Some(&1)),
        "{starts:?}"
    );
    // Either node's log and history say the same.
    assert_eq!(ticks(&b, "shared").len(), fired.len());
    a.finish();
    b.finish();
}

#[test]
fn an_update_changes_only_the_parts_it_names_and_the_api_refuses_what_cannot_be() {
    let d = Daemon::start();
    d.create(
        "weekdays",
        &[
            "--schedule",
            "0 9 * * MON-FRI",
            "--timezone",
            "Europe/Paris",
            IMAGE,
            "true",
        ],
    );
    let f = d.inspect("weekdays");
    let s = &f["Schedule"];
    assert_eq!(
        (&s["Expression"], &s["Timezone"]),
        (&"0 9 * * MON-FRI".into(), &"Europe/Paris".into())
    );
    // 09:00 in Paris is 07:00 or 08:00 UTC, on weekdays only.
    for t in s["Next"].as_array().expect("next") {
        let t = t.as_str().expect("a time");
        assert!(
            t.ends_with("T07:00:00Z") || t.ends_with("T08:00:00Z"),
            "{f}"
        );
    }
    let since = s["Since"].clone();
    std::thread::sleep(Duration::from_millis(1100));
    // Set again unchanged: the time it was set stays.
    d.ok(&[
        "func",
        "update",
        "weekdays",
        "--schedule",
        "0 9 * * MON-FRI",
    ]);
    assert_eq!(d.inspect("weekdays")["Schedule"]["Since"], since);
    // Only the zone: the expression stays, the schedule is a new one.
    d.ok(&[
        "func",
        "update",
        "weekdays",
        "--timezone",
        "America/New_York",
    ]);
    let s = d.inspect("weekdays")["Schedule"].clone();
    assert_eq!(s["Expression"], "0 9 * * MON-FRI");
    assert_eq!(s["Timezone"], "America/New_York");
    assert_ne!(s["Since"], since);
    for t in s["Next"].as_array().expect("next") {
        let t = t.as_str().expect("a time");
        assert!(
            t.ends_with("T13:00:00Z") || t.ends_with("T14:00:00Z"),
            "{s}"
        );
    }
    let ls = d.ok(&["func", "ls"]);
    assert!(ls.contains("0 9 * * MON-FRI"), "{ls}");
    let o = d.cli(&[
        "func",
        "update",
        "weekdays",
        "--no-schedule",
        "--timezone",
        "UTC",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("cannot be used with"),
        "{}",
        stderr(&o)
    );

    // The API: a payload in base64, refusals as 400 with the reason.
    let key = d.admin_key();
    let patch = |body: &str| {
        d.curl(&[
            "-X",
            "PATCH",
            "-H",
            &format!("Authorization: Bearer {key}"),
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            &format!("{}/v1/functions/weekdays", d.endpoint),
        ])
    };
    let (code, body) = patch(r#"{"Schedule": {"Payload": "aGk="}}"#);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(d.inspect("weekdays")["Schedule"]["PayloadBytes"], 2);
    for (body, says) in [
        (r#"{"Schedule": {"Payload": "not base64!"}}"#, "base64"),
        (
            r#"{"Schedule": {"Expression": "@every 1m"}, "NoSchedule": true}"#,
            "both set and removed",
        ),
        (
            r#"{"Schedule": {"Expression": "0 0 30 2 *"}}"#,
            "never fires",
        ),
        (
            r#"{"Schedule": {"Timezone": "Nowhere/Town"}}"#,
            "unknown time zone",
        ),
    ] {
        let (code, answer) = patch(body);
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    let (code, _) = patch(r#"{"NoSchedule": true}"#);
    assert_eq!(code, 200);
    let (code, answer) = patch(r#"{"Schedule": {"Timezone": "UTC"}}"#);
    assert_eq!(code, 400);
    assert!(
        String::from_utf8_lossy(&answer).contains("no schedule to change"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    d.finish();
}

#[test]
fn a_tick_refused_for_a_full_queue_is_logged_once_and_the_schedule_goes_on() {
    let d = Daemon::start();
    let bob = d.add_user("bob", 1);
    d.ok(&["user", "update", "bob", "--max-queued", "1"]);
    d.create_as(&bob, "nap", &[IMAGE, "sleep", "6"]);
    // One nap runs (quota 1), one waits: bob's queue is full for ~6 s.
    for _ in 0..2 {
        let o = d.cli_as(&bob, &["func", "call", "nap"], Some(b""));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    d.create_as(&bob, "beat", &["--schedule", "@every 2s", IMAGE, "true"]);
    d.wait_until(20, "a refused tick in the log", || {
        d.log().contains("schedule tick refused")
    });
    // The queue drains; the schedule goes on by itself.
    d.wait_until(40, "a tick's call once the queue has room", || {
        !ticks(&d, "bob/beat").is_empty()
    });
    std::thread::sleep(Duration::from_secs(3));
    d.ok(&["func", "update", "bob/beat", "--no-schedule"]);
    let calls = all_ended(&d, "bob/beat");
    let fired = ticks(&d, "bob/beat");
    one_call_per_tick(&fired, &calls);
    // Refused ticks are logged once each, however often they are tried.
    let refused: Vec<String> = d
        .log()
        .lines()
        .filter(|l| l.contains("schedule tick refused"))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tick="))
                .unwrap_or_else(|| panic!("{l}"))
                .to_string()
        })
        .collect();
    let distinct: HashSet<&String> = refused.iter().collect();
    assert_eq!(distinct.len(), refused.len(), "{refused:?}");
    let why = d
        .log()
        .lines()
        .find(|l| l.contains("schedule tick refused"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(why.contains("max_queued 1"), "the refusal says why: {why}");
    d.wait_until(30, "the naps to end", || {
        history(&d, "bob/nap")
            .iter()
            .all(|c| c["State"] == "FINISHED")
    });
    d.finish();
}
