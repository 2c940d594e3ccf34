//! The warm pool (DESIGN 6) against the real binary and Engine: a warm call
//! still sees a fresh container with its own payload and headers, follows
//! function updates, fails clearly, and survives kill -9 without running a
//! call twice or leaving a container behind. The pool is on by default and
//! adaptive: only a called function gets warm containers, an idle one loses
//! them, and an operator can turn it off.

mod common;

use common::*;
use std::collections::HashSet;
use std::process::Command;

const POOL: &str = "[pool]\nper_function = 2";

/// The warm containers of `function` waiting for a call, by id.
fn warm(d: &Daemon, function: &str) -> HashSet<String> {
    let label = format!("label=io.hyperfuncd.pool={function}");
    d.ps(&["--filter", &label, "--filter", "name=hyperfuncd-pool-"])
        .into_iter()
        .collect()
}

/// Calls `function` `n` times, one after the other, whatever each answers:
/// the pool gives a function as many warm containers as its recent calls.
fn prime(d: &Daemon, function: &str, n: usize) {
    for _ in 0..n {
        let id = d.call(function, b"");
        let _ = d.cli(&["func", "get", "--wait", &id]);
    }
}

/// SIGTERM, then no container of this daemon may remain: the pool's idle
/// containers are removed on shutdown.
fn stop_clean(mut d: Daemon) {
    d.stop();
    let left = d.containers(false);
    assert!(
        left.is_empty(),
        "containers left after shutdown: {left:?} ({}); daemon log:\n{}",
        String::from_utf8_lossy(
            &Command::new("docker")
                .args([
                    "inspect",
                    "--format",
                    "{{.Name}} {{.State.Status}} {{.Config.Labels}}"
                ])
                .args(&left)
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        ),
        d.log()
    );
}

#[test]
fn warm_calls_are_fresh_exact_and_follow_updates() {
    let d = Daemon::start_with(POOL);
    // Prints "reused" if a container ever served a second call. A header
    // never overrides the function's env, nor PATH.
    let script = "test -e /tmp/mark && echo reused; touch /tmp/mark; \
                  echo A=$A H=$HTTP_X_TRACE O=$HTTP_X_OVER P=$PATH; cat";
    let url = d.create(
        "warm",
        &[
            "-e",
            "A=1",
            "-e",
            "HTTP_X_OVER=fn",
            IMAGE,
            "sh",
            "-c",
            script,
        ],
    );
    prime(&d, "warm", 2);
    d.wait_until(60, "two warm containers", || warm(&d, "warm").len() == 2);

    let payload: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let file = d.dir.path().join("payload");
    std::fs::write(&file, &payload).expect("payload file");
    let body = format!("@{}", file.display());
    for round in 0..3 {
        let before = warm(&d, "warm");
        let (code, out) = d.curl(&[
            "-H",
            "X-Trace: 7",
            "-H",
            "X-Over: header",
            "-H",
            "Path: /evil",
            "--data-binary",
            &body,
            &format!("{url}/sync"),
        ]);
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
        let mut expected = b"A=1 H=7 O=fn P=/bin\n".to_vec();
        expected.extend_from_slice(&payload);
        assert!(
            out == expected,
            "round {round}: output differs ({} bytes, starts {:?})",
            out.len(),
            String::from_utf8_lossy(&out[..out.len().min(40)])
        );
        let after = warm(&d, "warm");
        assert!(
            before.iter().any(|c| !after.contains(c)),
            "round {round}: no warm container was used ({before:?} → {after:?})"
        );
        d.wait_until(60, "the pool to refill", || warm(&d, "warm").len() == 2);
    }

    // An update replaces the warm containers: the next call sees the new env.
    let old = warm(&d, "warm");
    d.ok(&["func", "update", "warm", "-e", "A=2"]);
    d.wait_until(60, "new warm containers", || {
        let now = warm(&d, "warm");
        now.len() == 2 && now.is_disjoint(&old)
    });
    let id = d.call("warm", b"x");
    assert_eq!(
        d.ok(&["func", "get", "--wait", &id]),
        "A=2 H= O=fn P=/bin\nx"
    );
    // An empty payload: the command sees EOF at once.
    let id = d.call("warm", b"");
    assert_eq!(
        d.ok(&["func", "get", "--wait", &id]),
        "A=2 H= O=fn P=/bin\n"
    );

    // A failing command, and a command the image lacks, fail clearly.
    d.create("three", &[IMAGE, "sh", "-c", "exit 3"]);
    prime(&d, "three", 2);
    d.wait_until(60, "warm containers of three", || {
        warm(&d, "three").len() == 2
    });
    let id = d.call("three", b"");
    assert_cli_error(&d.cli(&["func", "get", "--wait", &id]), "exit code 3");
    d.create("missing", &[IMAGE, "no-such-program"]);
    // Calls that fail to start (cold) still give the function its pool.
    prime(&d, "missing", 2);
    d.wait_until(60, "warm containers of missing", || {
        warm(&d, "missing").len() == 2
    });
    let id = d.call("missing", b"");
    assert_cli_error(
        &d.cli(&["func", "get", "--wait", &id]),
        "cannot start the container: no-such-program: executable file not found",
    );

    // Removing a function removes its warm containers.
    d.ok(&["func", "rm", "three"]);
    d.wait_until(30, "the removed function's warm containers to go", || {
        warm(&d, "three").is_empty()
    });
    stop_clean(d);
}

#[test]
fn kill_9_during_a_warm_call_neither_loses_nor_repeats_it() {
    let mut d = Daemon::start_with(POOL);
    // One call at a time: the first runs warm, the other two stay queued.
    let key = d.add_user("solo", 1);
    let as_solo = |args: &[&str], stdin: Option<&[u8]>| {
        let out = d.cli_as(&key, args, stdin);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
            .trim()
            .trim_start_matches("CallId: ")
            .to_string()
    };
    as_solo(
        &[
            "func",
            "create",
            "--name",
            "slow",
            IMAGE,
            "sh",
            "-c",
            "read x; case $x in p) ;; *) sleep 3;; esac; echo done-$x",
        ],
        None,
    );
    // Two quick calls: the function then gets two warm containers.
    for _ in 0..2 {
        let id = as_solo(&["func", "call", "slow"], Some(b"p\n"));
        as_solo(&["func", "get", "--wait", &id], None);
    }
    d.wait_until(60, "warm containers", || warm(&d, "slow").len() == 2);
    let running = as_solo(&["func", "call", "slow"], Some(b"1\n"));
    let queued = as_solo(&["func", "call", "slow"], Some(b"2\n"));
    let queued2 = as_solo(&["func", "call", "slow"], Some(b"3\n"));
    d.wait_until(30, "the first call to run", || {
        d.api(&format!("/v1/calls/{running}")).1["State"] == "RUNNING"
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The idle one, left by the kill: recovery must remove it.
    let stale = warm(&d, "slow");
    assert_eq!(stale.len(), 1, "{stale:?}");
    d.kill9();
    d.restart();

    // The call that ran in a warm container ends FAILED, never run again.
    d.wait_until(60, "every call to end", || {
        let s = d.status("slow");
        s["Pending"] == 0 && s["Running"] == 0
    });
    let call = d.api(&format!("/v1/calls/{running}")).1;
    assert_eq!(call["State"], "FAILED", "{call}");
    assert!(
        call["Message"]
            .as_str()
            .unwrap_or("")
            .contains("hyperfuncd stopped while the call was running"),
        "{call}"
    );
    // The queued ones were not lost: each ran once, to its end.
    for (id, n) in [(&queued, 2), (&queued2, 3)] {
        let call = d.api(&format!("/v1/calls/{id}")).1;
        assert_eq!(call["State"], "FINISHED", "{call}");
        assert_eq!(d.ok(&["func", "get", id]), format!("done-{n}\n"));
    }
    // The warm containers from before the kill are gone; new ones replaced them.
    d.wait_until(60, "fresh warm containers", || {
        let now = warm(&d, "slow");
        now.len() == 2 && now.is_disjoint(&stale)
    });
    for id in &stale {
        let gone = Command::new("docker")
            .args(["inspect", id])
            .output()
            .expect("docker inspect");
        assert!(!gone.status.success(), "stale warm container {id} remains");
    }
    stop_clean(d);
}

/// An image with its own ENTRYPOINT, CMD, WORKDIR and ENV: a warm call runs
/// what `docker run` would.
#[test]
fn warm_calls_keep_the_image_entrypoint_workdir_and_env() {
    let tag = format!("hyperfuncd-test/entrypoint:{}", std::process::id());
    let built = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'FROM {IMAGE}\\nWORKDIR /tmp\\nENV IMG=yes\\n\
             ENTRYPOINT [\"sh\", \"-c\", \"echo ep $PWD $IMG $0 $*\"]\\nCMD [\"dflt\"]\\n' \
             | docker build -q -t {tag} -"
        ))
        .output()
        .expect("docker build");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let d = Daemon::start_with(POOL);
    d.create("ep-default", &[&tag]);
    d.create("ep-args", &[&tag, "x", "y"]);
    for (f, expected) in [
        ("ep-default", "ep /tmp yes dflt\n"),
        ("ep-args", "ep /tmp yes x y\n"),
    ] {
        // Cold first (the pool warms only called functions), then warm.
        let id = d.call(f, b"");
        assert_eq!(d.ok(&["func", "get", "--wait", &id]), expected, "{f}");
        d.wait_until(60, "a warm container", || !warm(&d, f).is_empty());
        let id = d.call(f, b"");
        assert_eq!(d.ok(&["func", "get", "--wait", &id]), expected, "{f}");
    }
    d.ok(&["func", "rm", "ep-default"]);
    d.ok(&["func", "rm", "ep-args"]);
    stop_clean(d);
    let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
}

/// The pool with its default size: a function that was never called has no
/// warm container; once called it has one; after `idle_secs` without a call
/// it has none again, removed from the Engine.
#[test]
fn only_called_functions_get_warm_containers_until_they_go_idle() {
    let d = Daemon::start_with("[pool]\nidle_secs = 10");
    d.create("never", &[IMAGE, "cat"]);
    d.create("used", &[IMAGE, "cat"]);
    assert!(warm(&d, "used").is_empty(), "{:?}", warm(&d, "used"));
    let id = d.call("used", b"x");
    assert_eq!(d.ok(&["func", "get", "--wait", &id]), "x");
    d.wait_until(60, "a warm container after the first call", || {
        warm(&d, "used").len() == 1
    });
    // Its fill came after both creates: an eager pool would have filled
    // "never" too by now.
    assert!(warm(&d, "never").is_empty(), "{:?}", warm(&d, "never"));
    d.wait_until(60, "the idle pool to expire", || {
        warm(&d, "used").is_empty()
    });
    assert!(warm(&d, "never").is_empty(), "{:?}", warm(&d, "never"));
    stop_clean(d);
}

/// `per_function = 0` turns the pool off: calls run cold and no warm
/// container is ever made.
#[test]
fn with_the_pool_off_there_is_never_a_warm_container() {
    let d = Daemon::start_with("[pool]\nper_function = 0");
    d.create("cold", &[IMAGE, "cat"]);
    for n in 0..3 {
        let payload = format!("call {n}");
        let id = d.call("cold", payload.as_bytes());
        assert_eq!(d.ok(&["func", "get", "--wait", &id]), payload);
        assert!(warm(&d, "cold").is_empty(), "{:?}", warm(&d, "cold"));
    }
    let any_warm = d.ps(&["-a", "--filter", "name=hyperfuncd-pool-"]);
    assert!(any_warm.is_empty(), "{any_warm:?}");
    stop_clean(d);
}
