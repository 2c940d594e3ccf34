//! What an operator reads: `/metrics` after real calls on the real Engine,
//! checked against the calls made and by Prometheus' own `promtool`.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

/// The value of the sample `name` whose labels are exactly `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let mut got: Vec<(String, String)> = rest
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((k.to_string(), v.trim_matches('"').to_string()))
            })
            .collect();
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        got.sort();
        want.sort();
        (got == want).then(|| value.parse().ok())?
    })
}

fn scrape(d: &Daemon) -> String {
    scrape_as(d, &d.admin_key())
}

fn scrape_as(d: &Daemon, key: &str) -> String {
    let auth = format!("Authorization: Bearer {key}");
    let (code, body) = d.curl(&["-H", &auth, &format!("{}/metrics", d.endpoint)]);
    let text = String::from_utf8(body).expect("metrics are UTF-8");
    assert_eq!(code, 200, "{text}");
    text
}

/// Prometheus' own parser and linter accept `text`.
fn promtool_accepts(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: run scripts/deps (it installs promtool from Debian)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics refused /metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_count_the_calls_made_and_promtool_accepts_them() {
    let d = Daemon::start();
    d.create("ok", &[IMAGE, "cat"]);
    d.create("bad", &[IMAGE, "sh", "-c", "cat; exit 3"]);
    const N: usize = 3;
    const M: usize = 2;
    for i in 0..N {
        d.call("ok", format!("payload {i}").as_bytes());
    }
    for i in 0..M {
        d.call("bad", format!("payload {i}").as_bytes());
    }
    d.wait_until(60, "every call to end", || {
        d.status("ok")["Finished"] == N && d.status("bad")["Failed"] == M
    });

    let text = scrape(&d);
    let calls = |f: &str, state: &str| {
        sample(
            &text,
            "hyperfuncd_calls_total",
            &[("function", f), ("owner", "admin"), ("state", state)],
        )
    };
    assert_eq!(calls("ok", "finished"), Some(N as f64), "{text}");
    assert_eq!(calls("bad", "failed"), Some(M as f64), "{text}");
    assert_eq!(calls("ok", "failed"), None, "{text}");
    assert_eq!(calls("bad", "finished"), None, "{text}");
    // Metrics of a function name its owner: two users' functions of one
    // name are two series.
    let of = |f| [("function", f), ("owner", "admin")];
    let accepted = |f| sample(&text, "hyperfuncd_calls_accepted_total", &of(f));
    assert_eq!(accepted("ok"), Some(N as f64), "{text}");
    assert_eq!(accepted("bad"), Some(M as f64), "{text}");
    // Every call that ran has one run time and one queue wait.
    let count = |h: &str, f| sample(&text, &format!("{h}_count"), &of(f));
    assert_eq!(count("hyperfuncd_call_run_seconds", "ok"), Some(N as f64));
    assert_eq!(count("hyperfuncd_call_run_seconds", "bad"), Some(M as f64));
    assert_eq!(
        count("hyperfuncd_call_queue_wait_seconds", "ok"),
        Some(N as f64)
    );
    assert!(
        text.contains(
            "hyperfuncd_call_run_seconds_bucket{function=\"ok\",owner=\"admin\",le=\"+Inf\"} 3"
        ),
        "histograms have buckets: {text}"
    );
    // Levels, read at scrape time.
    let admin = [("user", "admin")];
    assert_eq!(sample(&text, "hyperfuncd_queued_calls", &admin), Some(0.0));
    assert_eq!(sample(&text, "hyperfuncd_running_calls", &admin), Some(0.0));
    // The outputs wait in the cache, unfetched: "payload 0".."payload 2".
    assert_eq!(
        sample(&text, "hyperfuncd_output_cache_bytes", &of("ok")),
        Some((N * "payload 0".len()) as f64),
        "{text}"
    );
    assert!(sample(&text, "hyperfuncd_log_cache_bytes", &of("bad")).unwrap_or(0.0) > 0.0);
    assert_eq!(sample(&text, "hyperfuncd_engine_up", &[]), Some(1.0));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(&text, "hyperfuncd_build_info", &[("version", version)]),
        Some(1.0)
    );
    // The CLI's calls went through /v1/functions/NAME/call and were answered 202.
    assert!(
        sample(
            &text,
            "hyperfuncd_http_requests_total",
            &[("route", "v1_functions"), ("status", "202")]
        )
        .unwrap_or(0.0)
            >= (N + M) as f64,
        "{text}"
    );
    // No label carries a path, a secret or a call id.
    assert!(!text.contains("/call/"), "{text}");

    // Prometheus' own parser and linter.
    promtool_accepts(&text);

    // A removed function's failed queued calls are counted too.
    let key = d.add_user("slow", 1);
    let out = d.cli_as(
        &key,
        &["func", "create", "--name", "hold", IMAGE, "sleep", "600"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for _ in 0..3 {
        let out = d.cli_as(&key, &["func", "call", "hold"], Some(b""));
        assert!(out.status.success(), "{}", stderr(&out));
    }
    d.wait_until(60, "one call running, two queued", || {
        let s = d.status("hold");
        s["Running"] == 1 && s["Pending"] == 2
    });
    let text = scrape(&d);
    let slow = [("user", "slow")];
    assert_eq!(
        sample(&text, "hyperfuncd_queued_calls", &slow),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "hyperfuncd_running_calls", &slow),
        Some(1.0),
        "{text}"
    );
    // A user's own scrape: their series and the process-wide ones, nothing
    // that names another user or their functions.
    let own = scrape_as(&d, &key);
    assert_eq!(
        sample(&own, "hyperfuncd_queued_calls", &slow),
        Some(2.0),
        "{own}"
    );
    assert_eq!(
        sample(
            &own,
            "hyperfuncd_calls_accepted_total",
            &[("function", "hold"), ("owner", "slow")]
        ),
        Some(3.0),
        "{own}"
    );
    assert_eq!(sample(&own, "hyperfuncd_engine_up", &[]), Some(1.0));
    // The HTTP answers add up every user's traffic: the admin's only.
    assert!(text.contains("hyperfuncd_http_requests_total{"), "{text}");
    assert!(!own.contains("hyperfuncd_http_requests_total"), "{own}");
    for other in ["\"admin\"", "\"ok\"", "\"bad\""] {
        assert!(!own.contains(other), "{other} in a user's scrape:\n{own}");
    }
    promtool_accepts(&own);
    let out = d.cli_as(&key, &["func", "rm", "--force", "hold"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = scrape(&d);
    assert_eq!(
        sample(
            &text,
            "hyperfuncd_calls_total",
            &[("function", "hold"), ("owner", "slow"), ("state", "failed")]
        ),
        Some(3.0),
        "{text}"
    );
    d.finish();
}

/// The daemon's stderr as JSON objects, one per line; fails on any other line.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

/// `[log] format = "json"` at the default level: every line is one JSON
/// object, and the audit trail is there without any debug detail or secret.
#[test]
fn json_log_parses_line_by_line_with_the_audit_trail() {
    // An empty HYPERFUNCD_LOG is the default level, as in the unit.
    let d = Daemon::start_with_env("[log]\nformat = \"json\"", &[("HYPERFUNCD_LOG", "")]);
    let url = d.create("audited", &[IMAGE, "sh", "-c", "echo oops >&2; exit 7"]);
    let failed = d.call("audited", b"x");
    d.wait_until(60, "the call to fail", || {
        d.status("audited")["Failed"] == 1
    });
    let key = d.add_user("carol", 2);
    let rotated = d.ok(&["user", "update", "carol", "--rotate-key"]);
    d.ok(&["user", "update", "carol", "--max-concurrency", "3"]);
    d.ok(&["func", "update", "audited", "--refresh"]);
    d.ok(&["func", "rm", "audited"]);
    d.ok(&["user", "rm", "carol"]);
    let log = d.log();
    assert!(!log.contains('\u{1b}'), "escape codes in a file: {log}");
    let lines = json_lines(&log);
    let audit: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "hyperfuncd::audit")
        .collect();
    let find = |message: &str| {
        audit
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no audit event {message:?} in:\n{log}"))
    };
    let e = find("function created");
    assert_eq!(
        (e["actor"].as_str(), e["function"].as_str()),
        (Some("admin"), Some("audited"))
    );
    assert_eq!(e["level"], "INFO");
    let e = find("call failed");
    assert_eq!(e["call"], failed.as_str());
    assert_eq!(e["exit_code"], 7);
    assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
    assert_eq!(find("user added")["user"], "carol");
    assert_eq!(find("user key rotated")["user"], "carol");
    assert!(audit
        .iter()
        .any(|l| l["message"] == "user updated" && l["max_concurrency"] == 3));
    assert_eq!(find("function updated")["url_refreshed"], true);
    assert_eq!(find("function removed")["function"], "audited");
    assert_eq!(find("user removed")["user"], "carol");
    // Per-call detail is debug, not in the default level.
    assert!(lines.iter().all(|l| l["level"] != "DEBUG"), "{log}");
    // No key or capability secret reaches the log.
    let new_key = rotated.lines().last().unwrap_or("").trim();
    let secret = url.rsplit('/').next().unwrap_or("");
    for s in [key.as_str(), new_key, secret, d.admin_key().as_str()] {
        assert!(!s.is_empty() && !log.contains(s), "{s} is in the log");
    }
    d.finish();
}

/// `serve 2>file` in the default text format: no colour codes, and the
/// per-call detail shows at debug. `HYPERFUNCD_LOG_FORMAT=json` switches
/// a text config to JSON.
#[test]
fn text_log_in_a_file_has_no_escape_codes_and_the_env_picks_json() {
    let d = Daemon::start();
    d.create("plain", &[IMAGE, "false"]);
    let id = d.call("plain", b"");
    d.wait_until(60, "the call to fail", || d.status("plain")["Failed"] == 1);
    let log = d.log();
    assert!(!log.contains('\u{1b}'), "escape codes in a file: {log}");
    assert!(
        log.lines()
            .any(|l| l.contains("call failed") && l.contains(&id) && l.contains("INFO")),
        "{log}"
    );
    // The harness runs at hyperfuncd=debug.
    assert!(log.contains("call accepted"), "{log}");
    d.finish();

    let d = Daemon::start_with_env("", &[("HYPERFUNCD_LOG_FORMAT", "json")]);
    let lines = json_lines(&d.log());
    assert!(
        lines.iter().any(|l| l["message"] == "recovery done"),
        "{lines:?}"
    );
    d.finish();
}

/// The CLI without a profile (an empty HOME; with --endpoint and --key
/// given, no admin profile is read): only the flags given here.
fn bare_cli(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("HOME", home)
        .env_remove("HYPERFUNC_PROFILE")
        .env_remove("HYPERFUNC_ENDPOINT")
        .env_remove("HYPERFUNC_KEY")
        .env_remove("HYPERFUNC_CA")
        .output()
        .expect("run hyperfuncd")
}

/// Completions and man pages come from the binary itself, and the two
/// usual connection errors say what to do.
#[test]
fn completions_man_pages_and_errors_that_say_what_to_do() {
    let home = tempfile::tempdir().expect("tempdir");
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef hyperfuncd"),
        ("fish", "complete -c hyperfuncd"),
    ] {
        let out = bare_cli(home.path(), &["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("rotate-key"),
            "{shell} completes subcommand flags"
        );
    }
    let man = home.path().join("man");
    let out = bare_cli(home.path(), &["man", man.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "hyperfuncd.1",
        "hyperfuncd-func-get.1",
        "hyperfuncd-user-update.1",
    ] {
        let text = std::fs::read_to_string(man.join(page)).expect(page);
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }

    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let out = bare_cli(
        home.path(),
        &["--endpoint", &endpoint, "--key", "k", "func", "ls"],
    );
    assert_cli_error(&out, "is `hyperfuncd serve` running there?");

    // A daemon whose self-signed certificate the client was not given.
    let d = Daemon::start();
    let out = bare_cli(
        home.path(),
        &["--endpoint", &d.endpoint, "--key", "k", "func", "ls"],
    );
    assert_cli_error(&out, "--ca");
    d.finish();
}

/// Client options are listed where they apply (`func`, `user` and their
/// subcommands), not in `serve --help`, and `serve` refuses them.
#[test]
fn client_options_only_where_they_apply() {
    let home = tempfile::tempdir().expect("tempdir");
    let client = ["--endpoint", "--key", "--ca", "--profile"];
    for args in [&["serve", "--help"][..], &["completions", "--help"]] {
        let out = bare_cli(home.path(), args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let help = stdout(&out);
        for flag in client {
            assert!(!help.contains(flag), "{args:?} lists {flag}:\n{help}");
        }
    }
    for args in [
        &["func", "--help"][..],
        &["func", "get", "--help"],
        &["user", "add", "--help"],
    ] {
        let out = bare_cli(home.path(), args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let help = stdout(&out);
        for flag in client {
            assert!(help.contains(flag), "{args:?} lacks {flag}:\n{help}");
        }
    }
    let out = bare_cli(
        home.path(),
        &["serve", "--endpoint", "https://127.0.0.1:1", "--help"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Before a command that is no client: refused, not ignored.
    let out = bare_cli(home.path(), &["--key", "k", "completions", "bash"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("client options"), "{}", stderr(&out));
}

/// `func call --sync` and `func get --wait` on a terminal show a spinner
/// with the elapsed time and the call's state; off a terminal, nothing.
#[test]
fn waiting_shows_the_call_state_on_a_terminal_only() {
    let d = Daemon::start();
    d.create("slow", &[IMAGE, "sh", "-c", "sleep 3; echo done"]);

    // Off a terminal: the output and not a byte on stderr.
    let out = d.cli(&["func", "call", "--sync", "slow"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "done\n");
    assert_eq!(stderr(&out), "", "stderr off a terminal");
    let id = d.call("slow", b"");
    let out = d.cli(&["func", "get", "--wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        (stdout(&out).as_str(), stderr(&out).as_str()),
        ("done\n", "")
    );

    // On a terminal: script(1) gives the CLI a pseudo-terminal and
    // records what it wrote there.
    let on_a_terminal = |args: &str| d.on_a_terminal(args);
    for get in [false, true] {
        // The call is made just before `get`, so it is still running then.
        let args = if get {
            format!("func get --wait {}", d.call("slow", b""))
        } else {
            "func call --sync slow".to_string()
        };
        let screen = on_a_terminal(&args);
        assert!(screen.contains("RUNNING"), "{args}: {screen:?}");
        assert!(
            screen.contains(" 1s ") || screen.contains(" 2s "),
            "{args}: elapsed time: {screen:?}"
        );
        assert!(screen.contains("done"), "{args}: {screen:?}");
    }
    d.finish();
}

/// `func create` and `func update` are answered once the server has the
/// image (it pulls an absent one first): on a terminal a spinner says what
/// the request waits for, then the usual line; off a terminal, only the line.
#[test]
fn create_and_update_say_what_they_wait_for_on_a_terminal_only() {
    let d = Daemon::start();

    // Off a terminal: the one line on stdout and not a byte on stderr.
    let out = d.cli(&["func", "create", "--name", "piped", IMAGE, "cat"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("piped is created with the address of https://"),
        "{}",
        stdout(&out)
    );
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    assert_eq!(stderr(&out), "", "stderr off a terminal");
    let out = d.cli(&["func", "update", "piped", "--timeout", "5s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("piped is updated with the address of https://"),
        "{}",
        stdout(&out)
    );
    assert_eq!(stderr(&out), "", "stderr off a terminal");

    // On a terminal (script(1) gives the CLI a pseudo-terminal and records
    // what it wrote there): the spinner's text, with the elapsed time after
    // the ellipsis, then the usual line.
    let on_a_terminal = |args: &str| d.on_a_terminal(args);
    let elapsed_after = |screen: &str, text: &str| {
        screen.split(text).skip(1).any(|rest| {
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            digits > 0 && rest[digits..].starts_with('s')
        })
    };
    for (args, spinner, line) in [
        (
            format!("func create --name tty {IMAGE} cat"),
            format!("creating tty: pulling/checking image {IMAGE}… "),
            "tty is created with the address of https://",
        ),
        (
            format!("func update tty --image {IMAGE}"),
            format!("updating tty: pulling/checking image {IMAGE}… "),
            "tty is updated with the address of https://",
        ),
        (
            "func update tty --timeout 5s".to_string(),
            "updating tty: checking its image… ".to_string(),
            "tty is updated with the address of https://",
        ),
    ] {
        let screen = on_a_terminal(&args);
        assert!(screen.contains(&spinner), "{args}: {screen:?}");
        assert!(
            elapsed_after(&screen, &spinner),
            "{args}: elapsed time: {screen:?}"
        );
        assert!(screen.contains(line), "{args}: {screen:?}");
    }
    // An error still reads as one: the spinner's line is cleared first.
    let screen = {
        let out = Command::new("script")
            .args([
                "-qfec",
                &format!("{BIN} func create --name tty {IMAGE} cat"),
                "/dev/null",
            ])
            .env("HYPERFUNC_PROFILE", d.profile())
            .env("HOME", d.dir.path())
            .env("TERM", "xterm")
            .stdin(Stdio::null())
            .output()
            .expect("script(1) from util-linux");
        assert!(!out.status.success(), "creating tty twice succeeded");
        stdout(&out)
    };
    assert!(
        screen.contains("creating tty: pulling/checking image"),
        "{screen:?}"
    );
    assert!(screen.contains("already exists"), "{screen:?}");
    d.finish();
}

/// A TLS client that names an IP address as SNI (which RFC 6066 forbids,
/// and rustls warns of) costs the journal nothing at the default level:
/// the warning is debug, so a flood of such handshakes cannot push the
/// audit trail out of the journal's rate limit.
#[test]
fn a_tls_peer_cannot_flood_the_log_with_warnings() {
    // rustls at debug, the rest at the default level: the line is there,
    // at debug, not at warn.
    let d = Daemon::start_with_env("", &[("HYPERFUNCD_LOG", "info,rustls=debug")]);
    const N: usize = 5;
    for _ in 0..N {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &d.addr(),
                "-servername",
                "127.0.0.1",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("openssl is missing: run scripts/deps");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
            "no handshake: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = d.log();
    let sni: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("IP address presented as hostname"))
        .collect();
    assert_eq!(sni.len(), N, "one line per handshake, at debug:\n{log}");
    for line in &sni {
        assert!(line.contains("DEBUG") && !line.contains("WARN"), "{line}");
    }
    assert!(
        !log.lines().any(|l| l.contains(" WARN ")),
        "a warning at start or from a handshake:\n{log}"
    );
    d.finish();
}
