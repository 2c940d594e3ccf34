//! Crash consistency of the store, against the real binary and Engine: a
//! kill -9 at each step of every write path (failpoints), kill -9 at random
//! moments under mixed load, and a full disk. After each, one verdict
//! (`common::verdict`): every acknowledged call ends FINISHED with exactly its
//! own bytes or FAILED with a reason; none is stuck, none runs twice, none
//! runs with bytes nobody sent; no container is left behind.
//!
//! Needs the `failpoints` feature (`FAILPOINTS` in the env of `serve`).

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Payloads over 4 KiB go to their own file, smaller ones inline; the warm
/// pool is off so every call is one cold container, seen by its label.
const CONFIG: &str = "[store]\ninline_max_bytes = 4096\n\
                      [scheduler]\nhost_max_running = 4\n\
                      [pool]\nper_function = 0";

/// Bound of every wait for calls to end after a restart.
const DRAIN_SECS: u64 = 180;

/// What recovery says of a call that was running when the daemon died.
const CRASHED: &str = "hyperfuncd stopped";

/// A daemon started with one failpoint armed, the Engine's events for its
/// containers, and what was sent to it. Drops the daemon first.
struct Crash {
    d: Daemon,
    events: EngineEvents,
    ledger: Ledger,
    failpoint: &'static str,
    cat: String,
}

impl Crash {
    /// Starts `serve` with `FAILPOINTS=failpoint=actions` and a `cat` function.
    fn arm(failpoint: &'static str, actions: &str, config: &str) -> Crash {
        let spec = format!("{failpoint}={actions}");
        let d = Daemon::start_with_env(config, &[("FAILPOINTS", &spec)]);
        let cat = d.create("cat", &[IMAGE, "cat"]);
        let events = EngineEvents::start(&d.instance, None);
        Crash {
            d,
            events,
            ledger: Ledger::new(&[("cat", Behaviour::Echo)]),
            failpoint,
            cat,
        }
    }

    /// Posts `payloads` to `cat`; returns how many were acknowledged.
    fn submit_cat(&mut self, payloads: Vec<Vec<u8>>, workers: usize) -> usize {
        let (ca, url) = (self.d.ca(), self.cat.clone());
        self.ledger.submit(&ca, "cat", &url, payloads, workers)
    }

    /// The failpoint's own kill -9, then a restart without failpoints.
    fn crash_and_restart(&mut self) {
        self.d.wait_failpoint(self.failpoint, 120);
        self.d.restart_with_env(&[]);
    }

    fn verdict(&self) -> Verdict {
        verdict(&self.d, &self.events, &self.ledger, DRAIN_SECS)
    }

    /// Checks no container of this daemon is left, and stops it.
    fn finish(self) {
        self.d.finish();
    }
}

/// Killed after a payload file is written and before the call is recorded:
/// the call in flight does not exist; every acknowledged one runs once.
#[test]
fn kill_9_at_accept_payload_written() {
    let mut c = Crash::arm("accept-payload-written", "8*off->return", CONFIG);
    // One connection: the one payload in flight is the one killed.
    let acked = c.submit_cat(mixed_payloads(40), 1);
    assert!(acked >= 8, "{acked} acknowledged before the kill");
    c.crash_and_restart();
    let v = c.verdict();
    assert_eq!(
        c.d.status("cat")["Total"],
        acked,
        "a call whose payload was written but never recorded exists"
    );
    assert_eq!(v.unacked_ran, 0);
    c.finish();
}

/// Killed after the accept is committed in memory, before the flush: no
/// 202 was sent for it; after restart it exists or not, and if it does it
/// runs with its own bytes.
#[test]
fn kill_9_at_accept_committed() {
    let mut c = Crash::arm("accept-committed", "12*off->return", CONFIG);
    let acked = c.submit_cat(mixed_payloads(40), 3);
    assert!(
        (1..=12).contains(&acked),
        "{acked} acknowledged although the 13th accept killed the daemon before its flush"
    );
    c.crash_and_restart();
    c.verdict();
    c.finish();
}

/// Killed in the middle of a staged write (an inline accept): its intent
/// and part of its writes are in sled's buffers, none acknowledged.
#[test]
fn kill_9_mid_staged_write() {
    let mut c = Crash::arm("staged-write-applying", "5*off->return", CONFIG);
    let acked = c.submit_cat(mixed_payloads(40), 3);
    // Writes of one round are answered after its flush: the 6th staged
    // write's kill may take a few earlier ones unanswered with it.
    assert!(
        acked < 40,
        "all 40 acknowledged: the 6th inline accept should have killed the daemon"
    );
    c.crash_and_restart();
    c.verdict();
    c.finish();
}

/// Killed after a call's RUNNING state is durable, before its container
/// exists.
#[test]
fn kill_9_at_start_durable() {
    let mut c = Crash::arm("start-durable", "4*off->return", CONFIG);
    c.submit_cat(mixed_payloads(30), 3);
    c.crash_and_restart();
    c.verdict();
    c.finish();
}

/// Killed after a call's outcome is committed, before it is durable.
#[test]
fn kill_9_at_finish_committed() {
    let mut c = Crash::arm("finish-committed", "4*off->return", CONFIG);
    c.submit_cat(mixed_payloads(30), 3);
    c.crash_and_restart();
    c.verdict();
    c.finish();
}

/// Killed after a call's outcome is durable, before its container is removed.
#[test]
fn kill_9_at_finish_durable() {
    let mut c = Crash::arm("finish-durable", "4*off->return", CONFIG);
    c.submit_cat(mixed_payloads(30), 3);
    c.crash_and_restart();
    c.verdict();
    c.finish();
}

/// Killed while finishing calls evict older outputs from a 4 KiB cache:
/// outputs are byte-exact or 410, and the accounting stays within budget.
#[test]
fn kill_9_at_evict_committed() {
    let mut c = Crash::arm(
        "evict-committed",
        "2*off->return",
        "[store]\ninline_max_bytes = 0\n\
         [limits]\noutput_cache_bytes = 4096\n\
         [scheduler]\nhost_max_running = 4\n\
         [pool]\nper_function = 0",
    );
    c.ledger.evictable = true;
    c.submit_cat(sized_payloads(24, 1024..=2048), 3);
    c.crash_and_restart();
    c.d.wait_until(DRAIN_SECS, "the calls to end", || {
        let s = c.d.status("cat");
        s["Pending"] == 0 && s["Running"] == 0
    });
    let bytes = c.d.inspect("cat")["OutputCacheBytes"].as_u64();
    assert!(
        bytes.is_some_and(|b| b <= 4096),
        "output cache accounting after the crash: {bytes:?} bytes for a 4096-byte budget"
    );
    let v = c.verdict();
    assert!(v.finished > 0, "{v:?}");
    c.finish();
}

/// Killed after a `get` committed "fetched", before the bytes went out: that
/// output is afterwards byte-exact or 410, never other bytes.
#[test]
fn kill_9_at_fetch_committed() {
    let mut c = Crash::arm("fetch-committed", "return", CONFIG);
    assert_eq!(c.submit_cat(mixed_payloads(10), 2), 10);
    let d = &c.d;
    d.wait_until(DRAIN_SECS, "the calls to finish", || {
        d.status("cat")["Finished"] == 10
    });
    // The biggest output: a file of its own, deleted once fetched.
    let (id, _) = c
        .ledger
        .acked
        .iter()
        .max_by_key(|(_, (_, p))| p.len())
        .map(|(id, v)| (id.clone(), v.clone()))
        .expect("calls");
    // More calls in flight while the daemon dies.
    c.submit_cat(mixed_payloads(10), 2);
    c.ledger.fetched.insert(id.clone());
    let (code, body) = c.d.output(&id);
    assert_eq!(
        code,
        0,
        "the fetch must die with the daemon, not answer: {}",
        String::from_utf8_lossy(&body)
    );
    c.crash_and_restart();
    c.verdict();
    c.finish();
}

/// Killed after `func rm --force` failed the queued calls, before it killed
/// the running one and purged the function: afterwards the function is gone
/// or can be removed, no call ran twice, no container is left.
#[test]
fn kill_9_at_rm_cancelled() {
    let mut c = Crash::arm("rm-cancelled", "return", CONFIG);
    let key = c.d.add_user("holder", 1);
    let hold =
        c.d.create_as(&key, "hold", &[IMAGE, "sh", "-c", "cat; sleep 5"]);
    c.ledger.functions.insert("hold".into(), Behaviour::Echo);
    c.ledger.removable.insert("hold".into());
    let ca = c.d.ca();
    assert_eq!(c.ledger.submit(&ca, "hold", &hold, mixed_payloads(5), 1), 5);
    c.submit_cat(mixed_payloads(6), 2);
    let d = &c.d;
    d.wait_until(60, "one hold call running and four queued", || {
        let s = d.status("hold");
        s["Running"] == 1 && s["Pending"] == 4
    });
    let rm = d.cli_as(&key, &["func", "rm", "--force", "hold"], None);
    assert!(
        !rm.status.success(),
        "rm cannot succeed when the daemon dies in it: {}",
        stdout(&rm)
    );
    c.crash_and_restart();
    let survived = c.d.api("/v1/functions/hold?owner=holder").0 == 200;
    eprintln!(
        "after the crash in rm, the function is {}",
        if survived { "still there" } else { "gone" }
    );
    c.verdict();
    let d = &c.d;
    if survived {
        let rm = d.cli_as(&key, &["func", "rm", "--force", "hold"], None);
        assert!(rm.status.success(), "rm after the crash: {}", stderr(&rm));
        assert_eq!(stdout(&rm), "hold\n");
    }
    assert_eq!(d.api("/v1/functions/hold?owner=holder").0, 404);
    for (id, (f, _)) in &c.ledger.acked {
        if f == "hold" {
            assert_eq!(
                d.call_record(id).0,
                404,
                "call {id} of the removed function"
            );
        }
    }
    c.finish();
}

/// Ten kill -9 at random moments while three clients keep submitting to an
/// echoing, a failing and a slow function; then the queue drains and every
/// acknowledged call gets the verdict.
#[test]
fn random_kill_9_under_mixed_load() {
    use rand::Rng;
    let mut d = Daemon::start_with(
        "[store]\ninline_max_bytes = 4096\n\
         [scheduler]\nhost_max_running = 6\n\
         [pool]\nper_function = 0",
    );
    let fails = Behaviour::Fails(vec!["exit code 3".into(), CRASHED.into()]);
    let functions: [(&str, &[&str], Behaviour); 3] = [
        ("cat", &[IMAGE, "cat"], Behaviour::Echo),
        (
            "fail",
            &[IMAGE, "sh", "-c", "cat >/dev/null; exit 3"],
            fails.clone(),
        ),
        (
            "slow",
            &[IMAGE, "sh", "-c", "sleep 0.5; cat"],
            Behaviour::Echo,
        ),
    ];
    let ledger = Arc::new(Mutex::new(Ledger::new(&[
        ("cat", Behaviour::Echo),
        ("fail", fails),
        ("slow", Behaviour::Echo),
    ])));
    let events = EngineEvents::start(&d.instance, None);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (name, args, _) in &functions {
        let url = d.create(name, args);
        let (ca, ledger, stop, name) = (d.ca(), ledger.clone(), stop.clone(), name.to_string());
        clients.push(std::thread::spawn(move || {
            // Bounded load: the queue must drain within the test's budget.
            let mut acked = 0;
            while !stop.load(Ordering::SeqCst) && acked < 80 {
                let batch = mixed_payloads(3);
                let ok = submit_all(
                    &ca,
                    &url,
                    batch.clone(),
                    1,
                    Arc::new(AtomicBool::new(false)),
                );
                acked += ok.len();
                ledger.lock().unwrap().record(&name, &batch, &ok);
                // Pace the load; retry soon while the daemon is down.
                let pause = if ok.len() == batch.len() { 300 } else { 100 };
                std::thread::sleep(Duration::from_millis(pause));
            }
        }));
    }
    let mut rng = rand::thread_rng();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..=1500)));
        d.kill9();
        d.restart();
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client thread");
    }
    let ledger = ledger.lock().unwrap();
    assert!(
        ledger.acked.len() >= 30,
        "only {} calls acknowledged under the kills",
        ledger.acked.len()
    );
    let v = verdict(&d, &events, &ledger, 300);
    assert!(v.finished > 0 && v.failed > 0, "{v:?}");
    d.finish();
}

/// A data dir on a 64 MiB tmpfs, filled until less than the 8 MiB reserve is
/// free: intake answers 507 and stores nothing, /healthz says why, a running
/// call with a big output ends (FAILED for lack of space) instead of hanging;
/// once space is freed everything works and nothing accepted is lost.
#[test]
fn full_disk_on_a_small_tmpfs() {
    const RESERVE: u64 = 8 << 20;
    const BIG: usize = 3_000_000;
    require_root("full_disk_on_a_small_tmpfs");
    // Declared before the daemon, so it is unmounted after the daemon stopped.
    let disk = Tmpfs::mount(64);
    let mut d = Daemon::start_on(
        &disk.path().join("data"),
        &format!("[store]\nmin_free_bytes = {RESERVE}\n[pool]\nper_function = 0"),
    );
    let events = EngineEvents::start(&d.instance, None);
    let cat = d.create("cat", &[IMAGE, "cat"]);
    // One user with a quota of 1: `gate` runs until the test releases it
    // (by creating /tmp/go in its container: the root is read-only), `later`
    // queues behind it.
    let key = d.add_user("slow", 1);
    d.create_as(
        &key,
        "gate",
        &[
            "--timeout",
            "120s",
            IMAGE,
            "sh",
            "-c",
            "cat >/dev/null; i=0; while [ ! -e /tmp/go ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done; head -c 3000000 /dev/zero",
        ],
    );
    let later = d.create_as(&key, "later", &[IMAGE, "cat"]);
    let gate_url = d.inspect("gate")["Address"].as_str().unwrap().to_string();
    let mut ledger = Ledger::new(&[
        ("cat", Behaviour::Echo),
        ("gate", Behaviour::Prints(vec![0; BIG])),
        ("later", Behaviour::Echo),
    ]);

    let ca = d.ca();
    assert_eq!(ledger.submit(&ca, "cat", &cat, mixed_payloads(8), 2), 8);
    assert_eq!(
        ledger.submit(&ca, "gate", &gate_url, vec![Vec::new()], 1),
        1
    );
    let gate = ledger
        .acked
        .iter()
        .find(|(_, (f, _))| f == "gate")
        .map(|(id, _)| id.clone())
        .expect("gate call");
    let gate_label = format!("label=io.hyperfuncd.call={gate}");
    d.wait_until(60, "the gate call to run", || {
        !d.ps(&["--filter", &gate_label]).is_empty()
    });
    assert_eq!(ledger.submit(&ca, "later", &later, mixed_payloads(4), 1), 4);
    d.wait_until(60, "the cat calls to finish", || {
        d.status("cat")["Finished"] == 8
    });

    // Fill the disk: 1 MiB left, well under the reserve and the gate's output.
    let fill = disk.fill("fill", 1 << 20);
    let free = disk.free_bytes();
    assert!(free < RESERVE, "{free} bytes still free");
    d.wait_until(30, "/healthz to report the store unavailable", || {
        d.health().0 == 503
    });
    let (_, health) = d.health();
    assert_eq!(health["Status"], "unavailable", "{health}");
    let store = health["Store"].as_str().unwrap_or("");
    assert!(
        !store.is_empty() && store != "ok",
        "/healthz must say why the store is unavailable: {health}"
    );
    let total = d.status("cat")["Total"].clone();
    let (code, body) = d.curl(&["-X", "POST", "--data-binary", "no room", &cat]);
    assert_eq!(code, 507, "{}", String::from_utf8_lossy(&body));
    let err: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(err["error"]["code"], "insufficient_storage", "{err}");
    assert_eq!(d.status("cat")["Total"], total, "a refused call was stored");

    // Release the gate: its 3 MB output cannot be stored in 1 MiB.
    let container = d.ps(&["--filter", &gate_label]);
    let exec = std::process::Command::new("docker")
        .args(["exec", &container[0], "touch", "/tmp/go"])
        .output()
        .expect("docker exec");
    assert!(exec.status.success(), "docker exec: {}", stderr(&exec));
    d.wait_until(120, "the gate call to end", || {
        let (_, call) = d.call_record(&gate);
        call["State"] == "FINISHED" || call["State"] == "FAILED"
    });
    let (_, call) = d.call_record(&gate);
    eprintln!("gate call on a full disk: {call}");
    if call["State"] == "FAILED" {
        let msg = call["Message"].as_str().unwrap_or("");
        assert!(
            msg.contains("no space left to store the output"),
            "unclear failure: {call}"
        );
    }
    d.wait_until(30, "the gate call's container to be removed", || {
        d.ps(&["-a", "--filter", &gate_label]).is_empty()
    });
    // `later` runs now or once there is room again; nothing hangs meanwhile.
    d.wait_until(60, "no container running on a full disk", || {
        d.containers(true).is_empty()
    });

    // Free the space: everything works again, and survives a kill -9.
    std::fs::remove_file(&fill).expect("remove the fill");
    d.wait_until(30, "/healthz to recover", || {
        let (code, h) = d.health();
        code == 200 && h["Status"] == "ok" && h["Store"] == "ok"
    });
    d.wait_until(
        DRAIN_SECS,
        "the calls queued on the full disk to end",
        || {
            let s = d.status("later");
            s["Pending"] == 0 && s["Running"] == 0
        },
    );
    d.kill9();
    d.restart();
    let fresh = mixed_payloads(5);
    let before: Vec<String> = ledger.acked.keys().cloned().collect();
    assert_eq!(ledger.submit(&d.ca(), "cat", &cat, fresh, 2), 5);
    let v = verdict(&d, &events, &ledger, DRAIN_SECS);
    for (id, state) in &v.states {
        let (_, call) = d.call_record(id);
        eprintln!(
            "{} {id}: {state} {}",
            call["Function"],
            call["Message"].as_str().unwrap_or("")
        );
        if !before.contains(id) {
            assert_eq!(
                state, "FINISHED",
                "call {id} accepted after the space was freed"
            );
        }
    }
    d.finish();
}
