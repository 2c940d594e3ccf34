//! Per-user budgets (issue 20, point 3): a tenant past their queued calls,
//! queued bytes, functions or request rate gets 429 with `Retry-After` and
//! nothing is stored, while other tenants and the admin carry on.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

/// An answer as a client sees it: status, `Retry-After` if any, body.
struct Answer {
    code: u16,
    retry_after: Option<u64>,
    body: String,
}

/// One request with curl: `method url`, `payload` as the body, `key` as
/// the bearer key if given.
fn send(d: &Daemon, method: &str, url: &str, key: Option<&str>, payload: &[u8]) -> Answer {
    let mut cmd = Command::new("curl");
    cmd.arg("--cacert").arg(d.ca()).args([
        "-s",
        "-D",
        "-",
        "-X",
        method,
        "--data-binary",
        "@-",
        url,
    ]);
    if let Some(k) = key {
        cmd.args(["-H", &format!("Authorization: Bearer {k}")]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(payload)
        .expect("payload");
    let out = child.wait_with_output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let retry_after = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().parse().ok())?
    });
    Answer {
        code,
        retry_after,
        body: body.to_string(),
    }
}

/// A 429 with a `Retry-After` of at least a second and the stable code.
fn assert_throttled(a: &Answer, says: &str) {
    assert_eq!(a.code, 429, "{}", a.body);
    assert!(
        a.retry_after.unwrap_or(0) >= 1,
        "Retry-After: {:?}",
        a.retry_after
    );
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("JSON error");
    assert_eq!(v["error"]["code"], "too_many_requests", "{v}");
    let m = v["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains(says), "{m:?} should say {says:?}");
}

fn counts(d: &Daemon, url: &str) -> (u64, u64, u64) {
    let v = d.curl_json(&[&url.replacen("/call/", "/status/", 1)]);
    let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    (n("Total"), n("Pending"), n("Running"))
}

#[test]
fn a_tenant_over_their_budgets_gets_429_and_others_carry_on() {
    let d = Daemon::start();
    let greedy = d
        .ok(&[
            "user",
            "add",
            "greedy",
            "--max-concurrency",
            "1",
            "--max-queued",
            "3",
            "--max-queued-bytes",
            "1000",
            "--max-functions",
            "2",
        ])
        .lines()
        .last()
        .expect("key")
        .trim()
        .to_string();
    let calm = d.add_user("calm", 2);

    // `user ls` shows each user's budgets, their own or the defaults.
    let users: serde_json::Value =
        serde_json::from_str(&d.ok(&["user", "ls", "-o", "json"])).expect("user ls JSON");
    let of = |n: &str| {
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["Name"] == n)
            .cloned()
    };
    let g = of("greedy").expect("greedy listed");
    assert_eq!(
        (
            &g["MaxQueued"],
            &g["MaxQueuedBytes"],
            &g["MaxFunctions"],
            &g["Rate"]
        ),
        (&3.into(), &1000.into(), &2.into(), &100.into()),
        "{g}"
    );
    let c = of("calm").expect("calm listed");
    assert_eq!(
        (&c["MaxQueued"], &c["MaxQueuedBytes"], &c["MaxFunctions"]),
        (&10000.into(), &(1u64 << 30).into(), &100.into()),
        "{c}"
    );
    let table = d.ok(&["user", "ls"]);
    assert!(
        table.contains("MAX_QUEUED") && table.contains("RATE"),
        "{table}"
    );

    // greedy's quota holds one `sleep 600`; the rest of their calls queue.
    let hog = d.create_as(&greedy, "hog", &[IMAGE, "sleep", "600"]);
    assert_eq!(send(&d, "POST", &hog, None, b"").code, 202);
    d.wait_until(60, "the first call runs", || counts(&d, &hog).2 == 1);

    // Queued bytes: 900 queued, then 200 more would pass the 1000.
    assert_eq!(send(&d, "POST", &hog, None, &[b'x'; 900]).code, 202);
    let over = send(&d, "POST", &hog, None, &[b'y'; 200]);
    assert_throttled(&over, "max_queued_bytes");
    assert_eq!(counts(&d, &hog), (2, 1, 1), "a refused call is not stored");
    // Queued calls: three queued is the limit.
    assert_eq!(send(&d, "POST", &hog, None, &[b'z'; 50]).code, 202);
    assert_eq!(send(&d, "POST", &hog, None, b"").code, 202);
    let over = send(&d, "POST", &hog, None, b"");
    assert_throttled(&over, "max_queued 3");
    // The management API refuses the same way, with the same code.
    let over = send(
        &d,
        "POST",
        &format!("{}/v1/functions/hog/call", d.endpoint),
        Some(&greedy),
        b"",
    );
    assert_throttled(&over, "max_queued 3");
    assert_eq!(counts(&d, &hog), (4, 3, 1), "refused calls are not stored");

    // Meanwhile another tenant and the admin are answered as ever.
    d.create_as(&calm, "echo", &[IMAGE, "cat"]);
    let out = d.cli_as(&calm, &["func", "call", "--sync", "echo"], Some(b"calm"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"calm");
    d.create("admin-echo", &[IMAGE, "cat"]);
    let out = d.cli_stdin(&["func", "call", "--sync", "admin-echo"], Some(b"admin"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"admin");

    // A raised budget takes effect at once.
    d.ok(&["user", "update", "greedy", "--max-queued", "4"]);
    assert_eq!(send(&d, "POST", &hog, None, b"").code, 202);
    assert_eq!(counts(&d, &hog), (5, 4, 1));

    // Functions: two are greedy's limit, whether asked by the CLI or the API.
    d.create_as(&greedy, "two", &[IMAGE, "cat"]);
    let out = d.cli_as(
        &greedy,
        &["func", "create", "--name", "three", IMAGE, "cat"],
        None,
    );
    assert_cli_error(&out, "owns 2 functions");
    let body = format!(r#"{{"Name":"three","Image":"{IMAGE}","Command":["cat"]}}"#);
    let over = send(
        &d,
        "POST",
        &format!("{}/v1/functions", d.endpoint),
        Some(&greedy),
        body.as_bytes(),
    );
    assert_throttled(&over, "owns 2 functions");
    let listed = d.cli_as(&greedy, &["func", "ls", "-o", "json"], None);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("ls JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");

    let out = d.cli_as(&greedy, &["func", "rm", "--force", "hog", "two"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    d.finish();
}

#[test]
fn request_rates_are_limited_per_key_and_per_call_url() {
    let d = Daemon::start();
    let chatty = d
        .ok(&["user", "add", "chatty", "--rate", "2"])
        .lines()
        .last()
        .expect("key")
        .trim()
        .to_string();
    let calm = d.add_user("calm", 2);
    let url = d.create_as(&chatty, "echo", &[IMAGE, "cat"]);
    let list = format!("{}/v1/functions", d.endpoint);

    // Per key: a burst of two, then 429 until a token is back.
    let answers: Vec<Answer> = (0..6)
        .map(|_| send(&d, "GET", &list, Some(&chatty), b""))
        .collect();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.code == 429).collect();
    assert!(
        !refused.is_empty(),
        "six requests at once all passed a rate of 2/s"
    );
    assert_throttled(refused[0], "this API key is over its rate of 2");
    assert!(answers.iter().all(|a| a.code == 200 || a.code == 429));
    // Another user's key has a bucket of its own.
    for _ in 0..4 {
        assert_eq!(send(&d, "GET", &list, Some(&calm), b"").code, 200);
    }

    // Per call URL: the owner's rate, and a refused call is not stored.
    let answers: Vec<Answer> = (0..6)
        .map(|_| send(&d, "POST", &url, None, b"hi"))
        .collect();
    let accepted = answers.iter().filter(|a| a.code == 202).count() as u64;
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.code == 429).collect();
    assert!(
        !refused.is_empty(),
        "six calls at once all passed a rate of 2/s"
    );
    assert_throttled(refused[0], "this function's URL is over its rate of 2");
    // Counted through the admin's key: the URL's own bucket is spent.
    d.wait_until(30, "the accepted calls end", || {
        let s = d.status("echo");
        s["Total"] == accepted && s["Pending"] == 0 && s["Running"] == 0
    });
    // After a second the bucket has tokens again.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(send(&d, "POST", &url, None, b"again").code, 202);
    d.finish();
}
