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

#[test]
fn a_short_bench_fills_every_row_and_leaves_nothing() {
    let start = Instant::now();
    let out = Command::new(common::BIN)
        .args([
            "bench",
            "--calls",
            "3",
            "--batch",
            "2",
            "--concurrency",
            "1,2",
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
    let accepted = row(&stdout, "300 calls, 4 clients");
    assert!(accepted.first().is_some_and(|r| *r > 0.0), "{stdout}");
    let rss = row(&stdout, "500 calls queued");
    assert!(rss.first().is_some_and(|m| *m > 0.0), "{stdout}");
    assert!(
        stdout.contains("containers left after SIGTERM (removed by bench): warm 0, cold 0"),
        "{stdout}"
    );
    let left = Command::new("docker")
        .args(["ps", "-aq", "--filter", "label=io.hyperfuncd.bench"])
        .output()
        .expect("docker ps");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "the bench left containers behind"
    );
}
