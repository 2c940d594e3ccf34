//! The byte-budgeted output and log caches, and the STDOUT limit, against the
//! real binary and Engine.

mod common;

use common::*;
use std::io::BufRead;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                // Not data: the space held back for a full disk, and second
                // names (hard links) of blobs already counted.
                .filter(|e| e.file_name() != "hf-ballast" && e.file_name() != "hf-blob-links")
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn expected_output(i: usize) -> Vec<u8> {
    format!("{i}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(MIB as usize)
        .collect()
}

/// 120 calls print 1 MiB each into a 50 MiB output cache: the cache never
/// holds more than its budget, the oldest outputs answer 410, the newest come
/// back byte-exact, and the same holds after a restart.
#[test]
fn output_cache_rotates_within_its_budget() {
    let mut d = Daemon::start_with("[limits]\noutput_cache_bytes = 52428800");
    let url = d.create(
        "mib",
        &[IMAGE, "sh", "-c", "read x; yes $x | head -c 1048576"],
    );
    let ids = submit_all(
        &d.ca(),
        &url,
        (0..120).map(|i| format!("{i}\n").into_bytes()).collect(),
        4,
        Arc::new(AtomicBool::new(false)),
    );
    assert_eq!(ids.len(), 120);
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let f = d.inspect("mib");
        let bytes = f["OutputCacheBytes"].as_u64().unwrap();
        peak = peak.max(bytes);
        assert!(
            bytes <= 50 * MIB,
            "output cache holds {bytes} bytes, over its 50 MiB budget"
        );
        if d.status("mib")["Finished"] == 120 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "calls did not finish: {}",
            d.status("mib")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = d.inspect("mib")["OutputCacheBytes"].as_u64().unwrap();
    let db_full = dir_size(&d.data_dir().join("db"));
    assert_eq!(before, 50 * MIB, "50 outputs of 1 MiB fit exactly");
    eprintln!("output cache: peak {peak} bytes, settled {before} bytes");

    d.stop();
    d.restart();
    assert_eq!(
        d.inspect("mib")["OutputCacheBytes"].as_u64().unwrap(),
        before,
        "accounting survives a restart"
    );

    let out = |id: &str| url.replace("/call/", "/output/") + "/" + id;
    let (mut kept, mut gone) = (0, 0);
    for (i, id) in &ids {
        let (code, body) = d.curl(&[&out(id)]);
        match code {
            200 => {
                kept += 1;
                assert!(
                    body == expected_output(*i),
                    "output of call {i} is not byte-exact"
                );
            }
            410 => {
                gone += 1;
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("rotated out"),
                    "{v}"
                );
            }
            other => panic!("call {i}: unexpected {other}"),
        }
        if *i < 10 {
            assert_eq!(code, 410, "the oldest outputs are evicted first (call {i})");
        }
        if *i >= 110 {
            assert_eq!(code, 200, "the newest outputs are kept (call {i})");
        }
    }
    assert_eq!((kept, gone), (50, 70));
    assert_eq!(
        d.inspect("mib")["OutputCacheBytes"],
        0,
        "fetching gives the bytes back"
    );
    // Outputs are files: fetching them deletes them.
    let db_after = dir_size(&d.data_dir().join("db"));
    eprintln!("sled dir: {db_full} bytes with 50 MiB cached, {db_after} bytes after fetching all");
    assert!(
        db_full < 80 * MIB,
        "the database holds {db_full} bytes for 50 MiB of outputs"
    );
    assert!(
        db_after < 16 * MIB,
        "fetching must give the space back: {db_after} bytes remain"
    );
    d.finish();
}

/// Thousands of events into a 64 KiB log cache: the budget holds and the
/// oldest events go first; `--follow` sees a new call's events live.
#[test]
fn log_cache_budget_and_follow() {
    let mut d = Daemon::start_with("[limits]\nlog_cache_bytes = 65536");
    let url = d.create("burst", &[IMAGE, "true"]);
    // With no Engine reachable, accepted calls stay queued: CALL + PENDING
    // events at HTTP speed (a rate above the default's 100/s), without
    // running thousands of containers.
    d.restart_with(
        "[limits]\nlog_cache_bytes = 65536\n[docker]\nsocket = \"/nonexistent/docker.sock\"\n[scheduler]\ndefault_rate = 100000",
    );
    // The function itself survived the kill -9.
    let (code, body) = d.curl(&["-X", "POST", &url]);
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let ids = submit_all(
        &d.ca(),
        &url,
        (0..2500).map(|_| Vec::new()).collect(),
        4,
        Arc::new(AtomicBool::new(false)),
    );
    assert_eq!(ids.len(), 2500);
    let f = d.inspect("burst");
    let bytes = f["LogCacheBytes"].as_u64().unwrap();
    assert!(
        bytes <= 65536 && bytes > 60000,
        "log cache holds {bytes} bytes for a 65536 budget"
    );
    let logs = d.ok(&["func", "logs", "burst"]);
    let lines: Vec<&str> = logs.lines().collect();
    assert!(
        lines.len() > 100 && lines.len() < 1000,
        "{} lines",
        lines.len()
    );
    let oldest_kept = lines[0]
        .split("CallId: ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    let position = ids
        .iter()
        .find(|(_, id)| id == oldest_kept)
        .expect("a known call")
        .0;
    assert!(
        position > 2000,
        "the oldest events were evicted first (oldest kept: call #{position})"
    );
    assert_eq!(
        d.status("burst")["Total"],
        2501,
        "counts are not part of the log budget"
    );
    assert_eq!(d.ok(&["func", "rm", "--force", "burst"]), "burst\n");

    d.restart_with("[limits]\nlog_cache_bytes = 65536");
    d.create("echo", &[IMAGE, "cat"]);
    let mut follow = std::process::Command::new(BIN)
        .args(["func", "logs", "--follow", "echo"])
        .env("HYPERFUNC_PROFILE", d.profile())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let id = d.call("echo", b"live");
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("[FINISHED]")) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("--follow showed no FINISHED event; saw {seen:?}"),
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let kinds: Vec<&str> = seen
        .iter()
        .filter(|l| l.contains(&id))
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(kinds, ["[CALL]", "[PENDING]", "[RUNNING]", "[FINISHED]"]);
    d.finish();
}

/// A call that writes far past the STDOUT limit fails with the limit in its
/// message, and the daemon's memory stays bounded.
#[test]
fn stdout_flood_fails_with_bounded_memory() {
    let d = Daemon::start();
    d.create(
        "flood",
        &[IMAGE, "sh", "-c", "head -c 1073741824 /dev/zero"],
    );
    let (rss_before, _) = d.rss_kib();
    let id = d.call("flood", b"");
    assert_cli_error(
        &d.cli(&["func", "get", "--wait", &id]),
        "stdout exceeded 5 MiB",
    );
    let (rss_after, peak) = d.rss_kib();
    eprintln!("daemon RSS: {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB, for a 1 GiB flood");
    assert!(
        peak < 100 * 1024,
        "peak RSS {peak} KiB: output must not be buffered past the limit"
    );
    d.finish();
}
