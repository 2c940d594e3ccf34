//! Completion webhooks against the real binary, the real Engine and real
//! receivers: HTTPS servers this test starts on loopback (Python's
//! `http.server` with a certificate of a CA made here, which the daemon
//! trusts through `[webhooks] ca_file`), verifying every delivery with
//! PyPI's `standardwebhooks` (not with hyperfuncd's signing code).
//! Traffic goes only to 127.0.0.1: the config allows `127.0.0.0/8`.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RECEIVER: &str = r#"
import http.server, ssl, sys, json, time, os
from standardwebhooks.webhooks import Webhook
port, ready, log_path, secret_file, plan, cert, key = sys.argv[1:8]
plan = plan.split(',')
seen = [0]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('content-length', '0')))
        n = seen[0]; seen[0] += 1
        answer = plan[min(n, len(plan) - 1)]
        verified, error = False, ''
        try:
            secret = open(secret_file).read().strip()
            Webhook(secret).verify(body, {k.lower(): v for k, v in self.headers.items()})
            verified = True
        except Exception as e:
            error = repr(e)
        rec = {'n': n, 'id': self.headers.get('webhook-id'), 'verified': verified,
               'error': error, 'answer': answer, 'call': self.headers.get('hyperfuncd-call-id'),
               'state': self.headers.get('hyperfuncd-state'), 'exit': self.headers.get('hyperfuncd-exit-code'),
               'path': self.path, 'body': json.loads(body or b'{}')}
        with open(log_path, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        if answer == 'hang':
            time.sleep(3600)
            return
        self.send_response(int(answer))
        self.send_header('content-length', '0')
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(('127.0.0.1', int(port)), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
with open(ready + '.tmp', 'w') as f:
    f.write(str(srv.server_address[1]))
os.rename(ready + '.tmp', ready)
srv.serve_forever()
"#;

/// A CA and a server certificate for 127.0.0.1 it signed.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl missing");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=webhook test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        run(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&csr);
        std::fs::write(
            dir.path().join("ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// One receiver: answers its deliveries by `plan` (statuses in order, the
/// last repeated; `hang` never answers) and logs each, verified or not.
struct Receiver {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Receiver {
    fn start(pki: &Pki, plan: &str, port: u16, secret: &Path) -> Receiver {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("receiver.py"), RECEIVER).expect("script");
        let ready = dir.path().join("port");
        let child = Command::new("python3")
            .arg(dir.path().join("receiver.py"))
            .arg(port.to_string())
            .arg(&ready)
            .arg(dir.path().join("log"))
            .arg(secret)
            .arg(plan)
            .arg(pki.path("srv.pem"))
            .arg(pki.path("srv.key"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 missing");
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&ready) {
                break p.trim().parse().expect("port");
            }
            assert!(
                Instant::now() < deadline,
                "the receiver did not start (is standardwebhooks installed?)"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Receiver { child, port, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{path}", self.port)
    }

    fn deliveries(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log line"))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(pki: &Pki) -> String {
    format!(
        "[webhooks]\nallow_private = [\"127.0.0.0/8\"]\nca_file = \"{}\"\nmin_backoff = \"1s\"\nmax_backoff = \"2s\"\nresponse_timeout = \"30s\"\n",
        pki.path("ca.pem").display()
    )
}

/// Creates `name` (`cat`) with `args` added; answers its webhook secret,
/// written to `secret` for the receivers.
fn create_hooked(d: &Daemon, name: &str, args: &[&str], secret: &Path) -> String {
    let mut all = vec!["func", "create", "--name", name];
    all.extend_from_slice(args);
    all.extend([test_image(), "cat"]);
    let out = d.ok(&all);
    let s = out
        .lines()
        .find_map(|l| l.strip_prefix("WebhookSecret: "))
        .unwrap_or_else(|| panic!("no secret in {out:?}"))
        .trim()
        .to_string();
    assert!(s.starts_with("whsec_"), "{s}");
    std::fs::write(secret, &s).expect("secret file");
    s
}

/// A call through the management API with `headers`: (status, body).
fn call_with(
    d: &Daemon,
    name: &str,
    headers: &[String],
    payload: &str,
) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {}", d.admin_key());
    let url = format!("{}/v1/functions/{name}/call", d.endpoint);
    let mut args: Vec<&str> = vec!["-X", "POST", "-H", &auth, "--data-binary", payload];
    for h in headers {
        args.extend(["-H", h.as_str()]);
    }
    args.push(&url);
    let (status, body) = d.curl(&args);
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn webhook_of(d: &Daemon, id: &str) -> serde_json::Value {
    d.call_record(id).1["Webhook"].clone()
}

fn wait_for(what: &str, secs: u64, d: &Daemon, mut f: impl FnMut() -> bool) {
    d.wait_until(secs, what, &mut f);
}

#[test]
fn retried_on_500_until_delivered_with_one_webhook_id_and_a_4xx_is_not_retried() {
    let pki = Pki::new();
    let secrets = tempfile::tempdir().expect("temp dir");
    let secret = secrets.path().join("secret");
    std::fs::write(&secret, "").expect("secret");
    let flaky = Receiver::start(&pki, "500,500,200", 0, &secret);
    let refusing = Receiver::start(&pki, "404", 0, &secret);
    let d = Daemon::start_with(&config(&pki));
    let s = create_hooked(&d, "hooked", &["--webhook", &flaky.url("hook")], &secret);
    // Never again: not in inspect, not in the daemon's log.
    let inspect = d.ok(&["func", "inspect", "hooked"]);
    assert!(
        !inspect.contains(&s) && inspect.contains("\"Webhook\""),
        "{inspect}"
    );

    let id = d.call("hooked", b"hello webhook");
    wait_for("three attempts at the flaky receiver", 60, &d, || {
        flaky.deliveries().len() >= 3
    });
    wait_for("the delivery to be recorded", 20, &d, || {
        webhook_of(&d, &id)["State"] == "DELIVERED"
    });
    let got = flaky.deliveries();
    assert_eq!(got.len(), 3, "{got:?}");
    for (n, r) in got.iter().enumerate() {
        assert_eq!(r["verified"], true, "attempt {n} not verified: {r}");
        assert_eq!(r["id"], format!("msg_{id}"), "{r}");
        assert_eq!(r["call"], id.as_str());
        assert_eq!(r["state"], "FINISHED");
        assert_eq!(r["exit"], "0");
        assert_eq!(r["path"], "/hook");
    }
    let body = &got[2]["body"];
    assert_eq!(body["CallId"], id.as_str());
    assert_eq!(body["State"], "FINISHED");
    assert_eq!(body["Output"], "aGVsbG8gd2ViaG9vaw=="); // base64 of the STDOUT
    assert_eq!(body["OutputTruncated"], false);
    let w = webhook_of(&d, &id);
    assert_eq!(
        (w["Attempts"].as_u64(), w["LastStatus"].as_u64()),
        (Some(3), Some(200)),
        "{w}"
    );
    // The output is still fetched once, as ever.
    assert_eq!(d.ok(&["func", "get", &id]), "hello webhook");
    let logs = d.ok(&["func", "logs", "--callid", &id, "hooked"]);
    assert!(
        logs.contains(&format!(
            "[WEBHOOK] CallId: {id}, delivered 200 after 3 attempts"
        )),
        "{logs}"
    );
    let (_, metrics) = d.curl(&[
        "-H",
        &format!("Authorization: Bearer {}", d.admin_key()),
        &format!("{}/metrics", d.endpoint),
    ]);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hyperfuncd_webhook_deliveries_total")
                && l.contains("result=\"delivered\"")),
        "{metrics}"
    );

    // The call's own X-Callback-Url wins; a 404 is given up at once.
    let (status, v) = call_with(
        &d,
        "hooked",
        &[format!("X-Callback-Url: {}", refusing.url("own"))],
        "x",
    );
    assert_eq!(status, 202, "{v}");
    let own = v["CallId"].as_str().expect("call id").to_string();
    wait_for("the 404 to be given up", 30, &d, || {
        webhook_of(&d, &own)["State"] == "GAVE_UP"
    });
    std::thread::sleep(Duration::from_secs(4));
    let refused = refusing.deliveries();
    assert_eq!(refused.len(), 1, "a 4xx was retried: {refused:?}");
    assert_eq!(refused[0]["verified"], true, "{}", refused[0]);
    assert_eq!(
        flaky.deliveries().len(),
        3,
        "the function's webhook got the call's own"
    );
    let logs = d.ok(&["func", "logs", "--callid", &own, "hooked"]);
    assert!(
        logs.contains("gave up after 1 attempt: answered 404"),
        "{logs}"
    );
    // Redelivered on demand, with the same webhook-id.
    let out = d.ok(&["func", "redeliver", &own]);
    assert!(out.contains("queued again"), "{out}");
    wait_for("the redelivery", 30, &d, || {
        refusing.deliveries().len() == 2
    });
    assert_eq!(refusing.deliveries()[1]["id"], format!("msg_{own}"));
    assert!(!d.log().contains(&s), "the secret reached the daemon's log");
    d.finish();
}

#[test]
fn a_receiver_down_through_a_kill9_and_restart_still_gets_its_delivery() {
    let pki = Pki::new();
    let secrets = tempfile::tempdir().expect("temp dir");
    let secret = secrets.path().join("secret");
    // A port nothing listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut d = Daemon::start_with(&config(&pki));
    create_hooked(
        &d,
        "later",
        &["--webhook", &format!("https://127.0.0.1:{port}/late")],
        &secret,
    );
    let id = d.call("later", b"late");
    wait_for("a failed attempt", 30, &d, || {
        webhook_of(&d, &id)["Attempts"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(webhook_of(&d, &id)["State"], "PENDING");
    d.kill9();
    d.restart();
    let up = Receiver::start(&pki, "200", port, &secret);
    wait_for("the delivery after the restart", 60, &d, || {
        webhook_of(&d, &id)["State"] == "DELIVERED"
    });
    let got = up.deliveries();
    assert!(!got.is_empty());
    for r in &got {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["id"], format!("msg_{id}"));
    }
    d.finish();
}

#[test]
fn a_loopback_callback_is_refused_at_call_time_unless_allowed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let mut d = Daemon::start_with("");
    let url = format!("https://127.0.0.1:{port}/x");
    // Not as a function's webhook either.
    let out = d.cli(&[
        "func",
        "create",
        "--name",
        "f",
        "--webhook",
        &url,
        test_image(),
        "cat",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{out:?}"
    );
    d.ok(&["func", "create", "--name", "f", test_image(), "cat"]);
    // Without a secret a callback cannot be signed.
    let (status, v) = call_with(
        &d,
        "f",
        &["X-Callback-Url: https://example.com/h".into()],
        "x",
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_webhook")),
        "{v}"
    );
    let out = d.ok(&["func", "update", "f", "--rotate-webhook-secret"]);
    assert!(out.contains("WebhookSecret: whsec_"), "{out}");
    for bad in [
        url.clone(),
        format!("https://[::ffff:127.0.0.1]:{port}/x"),
        format!("https://localhost:{port}/x"),
        format!("https://[::1]:{port}/x"),
        "https://169.254.169.254/latest/meta-data".to_string(),
        format!("http://127.0.0.1:{port}/x"),
    ] {
        let (status, v) = call_with(&d, "f", &[format!("X-Callback-Url: {bad}")], "x");
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_webhook")),
            "{bad}: {v}"
        );
    }
    assert_eq!(d.status("f")["Total"], 0, "a refused call was stored");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a refused callback was connected to"
    );
    // Allowed by config, the same callback is accepted.
    d.restart_with("[webhooks]\nallow_private = [\"127.0.0.0/8\"]\n");
    let (status, v) = call_with(&d, "f", &[format!("X-Callback-Url: {url}")], "x");
    assert_eq!(status, 202, "{v}");
    d.finish();
}

#[test]
fn a_receiver_that_never_answers_does_not_delay_another() {
    let pki = Pki::new();
    let secrets = tempfile::tempdir().expect("temp dir");
    let secret = secrets.path().join("secret");
    std::fs::write(&secret, "").expect("secret");
    let hanging = Receiver::start(&pki, "hang", 0, &secret);
    let fine = Receiver::start(&pki, "200", 0, &secret);
    let d = Daemon::start_with(&config(&pki));
    create_hooked(&d, "slow", &["--webhook", &hanging.url("never")], &secret);
    // More than the per-receiver bound (4), all held by the silent one.
    let stuck: Vec<String> = (0..6)
        .map(|i| d.call("slow", format!("{i}").as_bytes()))
        .collect();
    wait_for("the silent receiver to hold its bound", 60, &d, || {
        hanging.deliveries().len() >= 4
    });
    let started = Instant::now();
    let (status, v) = call_with(
        &d,
        "slow",
        &[format!("X-Callback-Url: {}", fine.url("ok"))],
        "quick",
    );
    assert_eq!(status, 202, "{v}");
    let id = v["CallId"].as_str().expect("call id").to_string();
    wait_for("the other receiver's delivery", 20, &d, || {
        webhook_of(&d, &id)["State"] == "DELIVERED"
    });
    // Well within the silent receiver's 30 s response timeout.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fine.deliveries().len(), 1);
    assert_eq!(fine.deliveries()[0]["verified"], true);
    assert_eq!(
        hanging.deliveries().len(),
        4,
        "more than max_per_host at once"
    );
    for id in &stuck {
        assert_eq!(webhook_of(&d, id)["State"], "PENDING");
    }
    drop(hanging);
    d.finish();
}
