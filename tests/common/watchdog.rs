//! A bound on one test binary's run. A test that hangs (a process stuck on
//! a dead pipe, a wait with no deadline, a FUSE call nobody answers) would
//! otherwise hold CI until its own timeout, which keeps no output; this
//! fails the binary after `HYPERFUNCD_TEST_LIMIT_S` (default 1500 s, over
//! twice the slowest binary's run, tests/cluster.rs) with the processes it
//! started killed, so the log shows which tests were still running
//! (libtest's "has been running for over 60 seconds" lines).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Once;
use std::time::Duration;

const DEFAULT_LIMIT_S: u64 = 1500;

/// Starts the watchdog once per test binary; every helper that starts a
/// process or an image calls it.
pub fn arm() {
    static ARMED: Once = Once::new();
    ARMED.call_once(|| {
        let limit = std::env::var("HYPERFUNCD_TEST_LIMIT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_LIMIT_S);
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_secs(limit));
                let exe = std::env::args().next().unwrap_or_default();
                // Straight to fd 2: eprintln! in a thread a test spawned is
                // captured with that test's output and lost at the exit.
                let _ = writeln!(
                    std::io::stderr(),
                    "WATCHDOG: {exe} is still running after {limit} s \
                     (HYPERFUNCD_TEST_LIMIT_S): a test hangs; the tests still \
                     running are those libtest named above as running for over \
                     60 seconds without a result. Killing the processes it \
                     started and failing."
                );
                for pid in descendants(std::process::id()) {
                    // SAFETY: kill(2) with a pid read from /proc; at worst
                    // the process is gone already (ESRCH).
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                }
                std::process::exit(124);
            })
            .expect("watchdog thread");
    });
}

/// Every process below `root`, read from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}
