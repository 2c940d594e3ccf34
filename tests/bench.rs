//! `hyperfuncd bench` in a short mode, so the benchmark cannot rot: every
//! row runs against the real Engine and the table comes out whole. The
//! figures themselves are not asserted (a timing belongs in BENCHMARKS.md,
//! measured on a quiet machine), only that each row measured something and
//! that nothing was left behind.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

/// Numbers on the first line that starts with `label` (after trimming).
fn row(out: &str, label: &str) -> Vec<f64> {
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{out}"));
    line[label.len()..]
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(',').parse().ok())
        .collect()
}

/// One bench at a time: each measures, and two at once on two cores would
/// starve each other's daemons.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn assert_no_bench_containers() {
    let left = Command::new("docker")
        .args(["ps", "-aq", "--filter", "label=io.hyperfuncd.bench"])
        .output()
        .expect("docker ps");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "the bench left containers behind"
    );
}

#[test]
fn a_short_bench_fills_every_row_and_leaves_nothing() {
    let _one = one_at_a_time();
    let start = Instant::now();
    let out = Command::new(common::BIN)
        .args([
            "bench",
            // The default network would put the bench's daemons' firewall
            // rules on this host's iptables; the rows are the same.
            "--network",
            "none",
            "--calls",
            "3",
            // Four calls: one for each of the four users of the shared-host rows.
            "--batch",
            "4",
            "--concurrency",
            "1,4",
            "--pool",
            "1",
            "--accept",
            "300",
            "--queued",
            "500",
        ])
        .output()
        .expect("run hyperfuncd bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        start.elapsed() < Duration::from_secs(240),
        "the short bench took {:?}",
        start.elapsed()
    );
    for label in ["docker run --rm -i", "hyperfuncd cold", "hyperfuncd warm"] {
        let latency = row(&stdout, label);
        assert!(
            latency.len() >= 3 && latency.iter().all(|v| *v > 0.0),
            "{label}: {latency:?}\n{stdout}"
        );
    }
    // The four-user finished-calls/s rows, and their ratios against the
    // same docker run row as the one-user rows'.
    for label in [
        "hyperfuncd cold, 4 users",
        "hyperfuncd warm, 4 users",
        "cold, 4 users vs docker run",
        "warm, 4 users vs docker run",
    ] {
        let rates = row(&stdout, label);
        assert!(
            // c=1 and c=4 (a daemon CPU column may round to 0.0).
            rates.len() >= 2 && rates[..2].iter().all(|v| *v > 0.0),
            "{label}: {rates:?}\n{stdout}"
        );
    }
    assert!(
        stdout.contains("warm calls of 4 users that started their own container: "),
        "{stdout}"
    );
    let accepted = row(&stdout, "300 calls, 4 clients");
    assert!(accepted.first().is_some_and(|r| *r > 0.0), "{stdout}");
    let rss = row(&stdout, "500 calls queued");
    assert!(rss.first().is_some_and(|m| *m > 0.0), "{stdout}");
    assert!(
        stdout.contains("containers left after SIGTERM (removed by bench): warm 0, cold 0"),
        "{stdout}"
    );
    assert_no_bench_containers();
}

/// `--cluster` in a short run (three `nats-server`s, scripts/deps installs
/// them, and three daemons): every row has a figure, and the bench stopped
/// everything it started.
#[test]
fn a_short_cluster_bench_fills_every_row_and_leaves_nothing() {
    let _one = one_at_a_time();
    let out = Command::new(common::BIN)
        .args([
            "bench",
            "--cluster",
            "--batch",
            "4",
            "--concurrency",
            "2",
            "--seconds",
            "2",
        ])
        .output()
        .expect("run hyperfuncd bench --cluster");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench --cluster failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let finished = |label: &str| {
        let v = row(&stdout, label);
        assert!(
            v.first().is_some_and(|r| *r > 0.0),
            "{label}: {v:?}\n{stdout}"
        );
    };
    finished("docker run --rm -i");
    // The first such row is the finished-calls/s one, the second the
    // accepts: (calls, calls/s, CPU ms/call).
    finished("hyperfuncd, sled, one node");
    finished("hyperfuncd, NATS R3, two nodes");
    let accepts = |label: &str, nth: usize| -> Vec<f64> {
        stdout
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with(label))
            .nth(nth)
            .unwrap_or_else(|| panic!("no accepts row {label:?} in:\n{stdout}"))[label.len()..]
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    for (label, nth) in [
        ("hyperfuncd, sled, one node", 1),
        ("hyperfuncd, NATS R3, node A alone", 0),
        ("hyperfuncd, NATS R3, two nodes", 1),
    ] {
        let v = accepts(label, nth);
        assert!(
            v.len() == 3 && v[0] >= 1.0 && v[1] > 0.0,
            "{label}: {v:?}\n{stdout}"
        );
    }
    assert!(
        stdout.contains(
            "containers left after SIGTERM (removed by bench): node A 0, node B 0, sled 0"
        ),
        "{stdout}"
    );
    assert_no_bench_containers();
    // Its nats-servers ran from its temp dir, which is gone with them.
    let ps = Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("ps");
    assert!(
        !String::from_utf8_lossy(&ps.stdout)
            .lines()
            .any(|l| l.contains("nats-server") && l.contains("hyperfuncd-bench-")),
        "a nats-server of the bench is still running"
    );
}
