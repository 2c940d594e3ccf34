//! Power cuts, against the real binary and Engine: the daemon's data dir is
//! on a filesystem that keeps only what was fsynced (`powerfs`, FUSE in
//! this process). Under mixed load (inline and file payloads, calls that
//! finish and calls that fail, outputs fetched meanwhile) the power goes
//! 20 times at random moments: the daemon dies with kill -9 and every write
//! and name change not yet synced is forgotten; then the filesystem is
//! mounted again and the daemon restarted on it. At the end, one verdict
//! (`common::verdict`): every call that got a 202 is there and ends with
//! its own bytes or FAILED with a reason; none is lost, none has another's
//! bytes, none ran twice (the Engine's start events say), and no container
//! is left behind.
//!
//! Needs root and /dev/fuse (`fuse3`, installed by `scripts/deps`).

mod common;
mod powerfs;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Payloads over 4 KiB are files of their own, smaller ones inline in the
/// database; the warm pool is off so every call is one cold container.
const CONFIG: &str = "[store]\ninline_max_bytes = 4096\n\
                      [scheduler]\nhost_max_running = 4\n\
                      [pool]\nper_function = 0";

const CUTS: usize = 20;

/// What recovery says of a call that was running when the daemon died.
const CRASHED: &str = "hyperfuncd stopped";

/// A call's state (`FINISHED`, ...) as admin, over curl; empty if unknown.
fn state(endpoint: &str, ca: &std::path::Path, key: &str, id: &str) -> String {
    let out = std::process::Command::new("curl")
        .arg("--cacert")
        .arg(ca)
        .args(["-s", "-m", "10", "-H"])
        .arg(format!("Authorization: Bearer {key}"))
        .arg(format!("{endpoint}/v1/calls/{id}"))
        .output()
        .expect("curl missing");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["State"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `GET /v1/calls/ID/output` as admin, over curl: (status, body).
fn fetch(endpoint: &str, ca: &std::path::Path, key: &str, id: &str) -> (u16, Vec<u8>) {
    let out = std::process::Command::new("curl")
        .arg("--cacert")
        .arg(ca)
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {key}"))
        .arg(format!("{endpoint}/v1/calls/{id}/output"))
        .output()
        .expect("curl missing");
    let mut body = out.stdout;
    let Some(pos) = body.iter().rposition(|&b| b == b'\n') else {
        return (0, body);
    };
    let code = String::from_utf8_lossy(&body[pos + 1..])
        .parse()
        .unwrap_or(0);
    body.truncate(pos);
    (code, body)
}

#[test]
fn power_cuts_under_mixed_load_lose_nothing_acknowledged() {
    require_root("the power-cut test (FUSE)");
    let started = Instant::now();
    // Declared before the daemon, so it is unmounted after the daemon died.
    let mut fs = powerfs::PowerFs::mount();
    let mut d = Daemon::start_on(&fs.path().join("data"), CONFIG);
    let fails = Behaviour::Fails(vec!["exit code 3".into(), CRASHED.into()]);
    let cat = d.create("cat", &[IMAGE, "cat"]);
    let fail = d.create("fail", &[IMAGE, "sh", "-c", "cat >/dev/null; exit 3"]);
    // The installation (TLS material, admin profile, the functions) is in
    // place before the power is ever cut: this test is about calls.
    fs.sync_everything();
    let installed = fs.counts();
    let ledger = Arc::new(Mutex::new(Ledger::new(&[
        ("cat", Behaviour::Echo),
        ("fail", fails),
    ])));
    let events = EngineEvents::start(&d.instance, None);
    // The clients keep their own copy of the CA: the mount comes and goes.
    let outside = tempfile::tempdir().expect("tempdir");
    let ca = outside.path().join("ca.pem");
    std::fs::copy(d.ca(), &ca).expect("copy the CA");
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (name, url) in [("cat", cat.clone()), ("fail", fail), ("cat", cat)] {
        let (ca, ledger, stop) = (ca.clone(), ledger.clone(), stop.clone());
        clients.push(std::thread::spawn(move || {
            // Bounded load: the queue must drain within the test's budget.
            let mut acked = 0;
            while !stop.load(Ordering::SeqCst) && acked < 120 {
                let batch = mixed_payloads(4);
                let ok = submit_all(
                    &ca,
                    &url,
                    batch.clone(),
                    2,
                    Arc::new(AtomicBool::new(false)),
                );
                acked += ok.len();
                ledger.lock().unwrap().record(name, &batch, &ok);
                let pause = if ok.len() == batch.len() { 150 } else { 100 };
                std::thread::sleep(Duration::from_millis(pause));
            }
        }));
    }
    // Fetches while the power goes: an output handed out is its call's own
    // bytes; afterwards a fetched call may answer 410.
    let fetcher = {
        let (endpoint, ca, key) = (d.endpoint.clone(), ca.clone(), d.admin_key());
        let (ledger, stop) = (ledger.clone(), stop.clone());
        std::thread::spawn(move || {
            use rand::seq::IteratorRandom;
            let mut fetched = 0;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let candidates: Vec<(String, Vec<u8>)> = {
                    let l = ledger.lock().unwrap();
                    l.acked
                        .iter()
                        .filter(|(id, (f, _))| f == "cat" && !l.fetched.contains(*id))
                        .map(|(id, (_, p))| (id.clone(), p.clone()))
                        .choose_multiple(&mut rand::thread_rng(), 5)
                };
                // One that has finished, if any of these has.
                let Some((id, payload)) = candidates
                    .into_iter()
                    .find(|(id, _)| state(&endpoint, &ca, &key, id) == "FINISHED")
                else {
                    continue;
                };
                ledger.lock().unwrap().fetched.insert(id.clone());
                let (code, body) = fetch(&endpoint, &ca, &key, &id);
                match code {
                    200 => {
                        assert!(
                            body == payload,
                            "call {id}: a fetch handed out {} bytes that are not its own",
                            body.len()
                        );
                        fetched += 1;
                    }
                    // No answer (the power went): it may have been taken.
                    0 => {}
                    // Not ended yet, failed, or refused: nothing was taken.
                    _ => {
                        ledger.lock().unwrap().fetched.remove(&id);
                    }
                }
            }
            fetched
        })
    };

    use rand::Rng;
    let mut rng = rand::thread_rng();
    for cut in 0..CUTS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..=1500)));
        d.kill9();
        fs.cut();
        eprintln!("power cut {} at {:?}", cut + 1, started.elapsed());
        d.restart();
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client thread");
    }
    let fetched = fetcher.join().expect("fetcher thread");
    let ledger = ledger.lock().unwrap();
    let counts = fs.counts();
    eprintln!(
        "{} acknowledged, {} fetched during the cuts; the filesystem saw {} writes, {} file syncs, {} directory syncs, and the cuts dropped {} unsynced pages and changed names in {} directories",
        ledger.acked.len(),
        fetched,
        counts.writes,
        counts.file_syncs,
        counts.dir_syncs,
        counts.bytes_lost / 4096,
        counts.names_lost
    );
    assert!(
        ledger.acked.len() >= 60,
        "only {} calls acknowledged under the cuts",
        ledger.acked.len()
    );
    assert!(
        counts.file_syncs > installed.file_syncs,
        "{counts:?}: the daemon synced nothing under load"
    );
    let v = verdict(&d, &events, &ledger, 240);
    assert!(v.finished > 0 && v.failed > 0, "{v:?}");
    d.finish();
    eprintln!("took {:?}", started.elapsed());
}
