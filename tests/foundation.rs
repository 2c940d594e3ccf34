//! The Hyper Func usage flow end to end: the real binary, the real Engine.

mod common;

use common::*;

#[test]
fn usage_flow_output_for_output() {
    let d = Daemon::start();
    let url = d.create("helloworld", &[IMAGE, "echo", "HelloWorld"]);
    assert!(
        url.starts_with(&format!("{}/call/helloworld/", d.endpoint)),
        "{url}"
    );

    let id1 = d.call("helloworld", b"");
    let id2 = d.call("helloworld", b"Hello\n");
    assert_ne!(id1, id2);
    assert_eq!(d.ok(&["func", "get", "--wait", &id1]), "HelloWorld\n");
    assert_eq!(d.ok(&["func", "get", "--wait", &id2]), "HelloWorld\n");

    let logs = d.ok(&["func", "logs", "helloworld", "--callid", &id2]);
    let kinds: Vec<&str> = logs
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        ["[CALL]", "[PENDING]", "[RUNNING]", "[FINISHED]"],
        "{logs}"
    );
    let first = logs.lines().next().unwrap_or("");
    assert!(
        first.ends_with(&format!("[CALL] CallId: {id2}, ShortStdin: Hello ")),
        "{first}"
    );
    // 2017-03-16T15:05:58Z
    let ts = first.split_whitespace().next().unwrap_or("");
    assert!(
        ts.len() == 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{ts}"
    );
    assert!(logs.contains(&format!(
        "[FINISHED] CallId: {id2}, ShortStdout: HelloWorld , ShortStderr: "
    )));
    assert_eq!(d.ok(&["func", "logs", "helloworld"]).lines().count(), 8);
    assert_eq!(
        d.ok(&["func", "logs", "--tail", "1", "helloworld"])
            .lines()
            .count(),
        1
    );

    let status = d.ok(&["func", "status", "helloworld"]);
    assert_eq!(
        status.split_whitespace().collect::<Vec<_>>(),
        ["TOTAL", "PENDING", "RUNNING", "FINISHED", "FAILED", "2", "0", "0", "2", "0"]
    );
    let json: serde_json::Value =
        serde_json::from_str(&d.ok(&["func", "status", "-o", "json", "helloworld"])).unwrap();
    assert_eq!(json["Finished"], 2);

    // The same through curl and the capability URL.
    let (code, body) = d.curl(&["--data-binary", "x", &url]);
    assert_eq!(code, 202);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id3 = v["CallId"].as_str().unwrap().to_string();
    let out_url = url.replace("/call/", "/output/") + "/" + &id3 + "/wait";
    let (code, body) = d.curl(&[&out_url]);
    assert_eq!((code, body.as_slice()), (200, &b"HelloWorld\n"[..]));
    // Fetched outputs are gone.
    let (code, _) = d.curl(&[&out_url]);
    assert_eq!(code, 410);

    let inspect: serde_json::Value =
        serde_json::from_str(&d.ok(&["func", "inspect", "helloworld"])).unwrap();
    assert_eq!(inspect["Address"], url.as_str());
    assert_eq!(inspect["Image"], IMAGE);
    assert!(d.ok(&["func", "ls"]).contains("helloworld"));

    assert_eq!(d.ok(&["func", "rm", "helloworld"]), "helloworld\n");
    let (code, _) = d.curl(&["-X", "POST", &url]);
    assert_eq!(code, 404);
    d.finish();
}

#[test]
fn binary_payloads_and_headers_reach_the_container() {
    let d = Daemon::start();
    d.create("cat", &[IMAGE, "cat"]);
    let payload: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let id = d.call("cat", &payload);
    let out = d.cli(&["func", "get", "--wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        out.stdout == payload,
        "1 MiB binary payload must come back byte-exact"
    );

    let url = d.create("env", &["-e", "FOO=from-function", IMAGE, "env"]);
    let (code, body) = d.curl(&[
        "-H",
        "X-Trace: 7",
        "-H",
        "Foo: header",
        "-H",
        "Path: /evil",
        // Would fold into HTTP_X_TRACE: dropped, as nginx drops it.
        "-H",
        "X_Trace: spoofed",
        "--data-binary",
        "",
        &format!("{url}/sync?a=b"),
    ]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let env = String::from_utf8_lossy(&body);
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines.contains(&"HTTP_X_TRACE=7"), "{env}");
    assert!(!env.contains("spoofed"), "{env}");
    assert!(lines.contains(&"FOO=from-function"), "{env}");
    assert!(lines.contains(&"HTTP_FOO=header"), "{env}");
    assert!(lines.contains(&"REQUEST_METHOD=POST"), "{env}");
    assert!(lines.contains(&"QUERY_STRING=a=b"), "{env}");
    assert!(
        lines.contains(&"PATH=/bin"),
        "a header must not override PATH: {env}"
    );
    d.finish();
}

#[test]
fn failures_are_clear() {
    let d = Daemon::start();
    d.create("ex3", &[IMAGE, "sh", "-c", "echo oops >&2; exit 3"]);
    let id = d.call("ex3", b"");
    let out = d.cli(&["func", "get", "--wait", &id]);
    assert_cli_error(&out, "exit code 3");
    let logs = d.ok(&["func", "logs", "ex3"]);
    let last = logs.lines().last().unwrap_or("");
    assert!(
        last.contains(&format!("[FAILED] CallId: {id}"))
            && last.contains("ShortStderr: oops")
            && last.ends_with("Message: exit code 3"),
        "{logs}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&d.ok(&["func", "status", "-o", "json", "ex3"])).unwrap();
    assert_eq!(status["Failed"], 1);

    // A missing image is refused at create, quickly and in one line.
    let t = std::time::Instant::now();
    let out = d.cli(&[
        "func",
        "create",
        "--name",
        "ghost",
        "hyperfuncd-test/not-there:1",
    ]);
    assert_cli_error(&out, "hyperfuncd-test/not-there:1");
    assert!(t.elapsed() < std::time::Duration::from_secs(120));

    // Unknown names and ids: 404 on the API, one error line from the CLI.
    assert_cli_error(
        &d.cli(&["func", "get", "3f1b4c36-8a3d-4a57-9a0b-0f0e4d6c1a11"]),
        "not found",
    );
    assert_cli_error(&d.cli(&["func", "get", "not-an-id"]), "not found");
    assert_cli_error(
        &d.cli(&["func", "logs", "nosuch"]),
        "function nosuch not found",
    );
    assert_cli_error(&d.cli(&["func", "call", "nosuch"]), "not found");
    assert_cli_error(
        &d.cli(&["func", "create", "--name", "Bad_Name", IMAGE]),
        "invalid name",
    );
    let profile = std::fs::read_to_string(d.profile()).unwrap();
    let key = profile
        .lines()
        .find_map(|l| l.strip_prefix("key = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let auth = format!("Authorization: Bearer {key}");
    for path in [
        "/v1/functions/nosuch",
        "/v1/calls/3f1b4c36-8a3d-4a57-9a0b-0f0e4d6c1a11",
        "/v1/calls/3f1b4c36-8a3d-4a57-9a0b-0f0e4d6c1a11/output",
    ] {
        let (code, body) = d.curl(&["-H", &auth, &format!("{}{path}", d.endpoint)]);
        assert_eq!(code, 404, "{path}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "not_found", "{path}");
    }
    let (code, _) = d.curl(&[&format!("{}/v1/functions", d.endpoint)]);
    assert_eq!(code, 401);
    let (code, _) = d.curl(&[
        "-H",
        "Authorization: Bearer nope",
        &format!("{}/v1/functions", d.endpoint),
    ]);
    assert_eq!(code, 401);
    d.finish();
}

#[test]
fn update_and_refresh() {
    let d = Daemon::start();
    let old = d.create(
        "greet",
        &["-e", "WHO=world", IMAGE, "sh", "-c", "echo hello $WHO"],
    );
    let (code, body) = d.curl(&["-X", "POST", &format!("{old}/sync")]);
    assert_eq!(
        (code, String::from_utf8_lossy(&body).as_ref()),
        (200, "hello world\n")
    );
    let out = d.ok(&[
        "func",
        "update",
        "greet",
        "-e",
        "WHO=you",
        "--refresh",
        "--timeout",
        "30s",
    ]);
    let new = out.trim().rsplit(' ').next().unwrap().to_string();
    assert_ne!(new, old);
    let (code, _) = d.curl(&["-X", "POST", &old]);
    assert_eq!(code, 404, "the old URL must stop working after --refresh");
    let (code, body) = d.curl(&["-X", "POST", &format!("{new}/sync")]);
    assert_eq!(
        (code, String::from_utf8_lossy(&body).as_ref()),
        (200, "hello you\n")
    );
    let f: serde_json::Value = serde_json::from_str(&d.ok(&["func", "inspect", "greet"])).unwrap();
    assert_eq!(f["Timeout"], "30s");
    assert_eq!(f["Env"], serde_json::json!(["WHO=you"]));
    d.finish();
}

#[test]
fn output_status_codes_follow_the_call() {
    let d = Daemon::start();
    let url = d.create("slow", &[IMAGE, "sh", "-c", "sleep 2; echo done"]);
    let (_, body) = d.curl(&["-X", "POST", &url]);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = v["CallId"].as_str().unwrap().to_string();
    let out = format!("{}/{id}", url.replace("/call/", "/output/"));
    d.wait_until(30, "the call to run", || d.curl(&[&out]).0 == 201);
    let (code, body) = d.curl(&[&format!("{out}/wait")]);
    assert_eq!((code, body.as_slice()), (200, &b"done\n"[..]));
    assert_eq!(d.curl(&[&out]).0, 410);
    let (code, _) = d.curl(&[&format!(
        "{}/3f1b4c36-8a3d-4a57-9a0b-0f0e4d6c1a11",
        url.replace("/call/", "/output/")
    )]);
    assert_eq!(code, 404);
    let status: serde_json::Value = d.curl_json(&[&url.replace("/call/", "/status/")]);
    assert_eq!(status["Total"], 1);
    let (code, body) = d.curl(&[&url.replace("/call/", "/logs/")]);
    assert_eq!(code, 200);
    let events: Vec<serde_json::Value> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(events.len(), 4);
    assert_eq!(events[3]["Event"], "FINISHED");
    assert_eq!(events[3]["ShortStdout"], "done\n");
    d.finish();
}

#[test]
fn stdin_limit_is_enforced_before_anything_is_stored() {
    let d = Daemon::start();
    let url = d.create("cat", &[IMAGE, "cat"]);
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    let exact: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut over = exact.clone();
    over.push(1);
    std::fs::write(&big, &over).unwrap();
    let (code, body) = d.curl(&["--data-binary", &format!("@{}", big.display()), &url]);
    assert_eq!(code, 413, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "payload_too_large");
    assert_cli_error(
        &d.cli_stdin(&["func", "call", "cat"], Some(&over)),
        "exceeds the STDIN limit of 5 MiB",
    );
    let s: serde_json::Value = d.curl_json(&[&url.replace("/call/", "/status/")]);
    assert_eq!(s["Total"], 0, "a refused body creates no call");
    assert_eq!(d.ok(&["func", "logs", "cat"]), "", "and no log event");

    std::fs::write(&big, &exact).unwrap();
    let (code, body) = d.curl(&[
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("{url}/sync"),
    ]);
    assert_eq!(code, 200);
    assert!(
        body == exact,
        "exactly 5 MiB is accepted and echoed byte-exact"
    );
    d.finish();
}

#[test]
fn stdout_limit_fails_the_call() {
    let d = Daemon::start();
    d.create(
        "flood",
        &[
            IMAGE,
            "sh",
            "-c",
            "head -c 6291456 /dev/zero; echo never-here >&2",
        ],
    );
    let id = d.call("flood", b"");
    assert_cli_error(
        &d.cli(&["func", "get", "--wait", &id]),
        "stdout exceeded 5 MiB",
    );
    d.finish();
}

/// Bytes a function prints (or a caller sends) reach `func logs`' reader as
/// text: ESC, BEL, CR are shown escaped, so they cannot drive the reader's
/// terminal; `-o json` keeps them as they are.
#[test]
fn func_logs_shows_control_characters_escaped() {
    let d = Daemon::start();
    d.create(
        "ansi",
        &[
            IMAGE,
            "sh",
            "-c",
            r"cat >/dev/null; printf '\033[2Jred\007\r\tok'",
        ],
    );
    let id = d.call("ansi", b"in\x1b]0;title\x07");
    let out = d.cli(&["func", "get", "--wait", &id]);
    assert_eq!(out.stdout, b"\x1b[2Jred\x07\r\tok", "{}", stderr(&out));
    let logs = d.ok(&["func", "logs", "ansi"]);
    assert!(!logs.contains(['\x1b', '\x07', '\r']), "{logs:?}");
    assert!(logs.contains(r"ShortStdin: in\x1b]0;title\x07"), "{logs:?}");
    assert!(
        logs.contains("ShortStdout: \\x1b[2Jred\\x07\\x0d\tok,"),
        "{logs:?}"
    );
    let json = d.ok(&["func", "logs", "-o", "json", "ansi"]);
    let finished: serde_json::Value = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["Event"] == "FINISHED")
        .unwrap_or_else(|| panic!("no FINISHED event: {json}"));
    assert_eq!(finished["ShortStdout"], "\x1b[2Jred\x07\r\tok", "{json}");
    d.finish();
}
