//! The front door (issue 13), probed as an attacker would against the real
//! binary: slow and idle clients, too many connections, request paths
//! spelled to slip past the router, limits and images a tenant should not
//! choose.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Short timeouts, so each probe is cut off within seconds.
const SHORT: &str =
    "[http]\nhandshake_timeout = \"2s\"\nheader_timeout = \"2s\"\nbody_timeout = \"2s\"\n";
const TIMEOUT: Duration = Duration::from_secs(2);
/// What the cut-off may take beyond the configured timeout (timer and
/// scheduling slack on a busy 2-core machine).
const SLACK: Duration = Duration::from_millis(2500);

/// Writes `bytes` one per second on `stream` until the server ends the
/// connection; returns how long that took and what the server said.
fn trickle(
    stream: &mut (impl Read + Write),
    bytes: &[u8],
    give_up: Duration,
) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let mut answer = Vec::new();
    for b in bytes.iter().cycle() {
        if start.elapsed() > give_up {
            break;
        }
        if stream
            .write_all(&[*b])
            .and_then(|_| stream.flush())
            .is_err()
        {
            break;
        }
        // The read timeout (set by the caller) paces the trickle at 1 byte/s.
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => break,
        }
        if !answer.is_empty() {
            // Read what follows, up to the close.
            let _ = stream.read_to_end(&mut answer);
            break;
        }
    }
    (start.elapsed(), answer)
}

#[test]
fn slow_headers_slow_bodies_and_idle_connections_are_cut_off() {
    let d = Daemon::start_with(SHORT);

    // Headers at 1 byte/s, after a completed TLS handshake.
    let mut tls = d.tls_connect();
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let (took, _) = trickle(&mut tls, head, Duration::from_secs(30));
    eprintln!("slow headers cut off after {took:?}");
    assert!(
        took <= TIMEOUT + SLACK,
        "a 1 byte/s header sender was still connected after {took:?}"
    );

    // A body at 1 byte/s: 408 with a JSON error, and nothing stored.
    let url = d.create("slowbody", &[IMAGE, "cat"]);
    let path = url.splitn(4, '/').nth(3).expect("call path");
    let mut tls = d.tls_connect();
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    let head = format!("POST /{path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
    tls.write_all(head.as_bytes()).expect("send head");
    let (took, answer) = trickle(&mut tls, b"x", Duration::from_secs(30));
    let answer = String::from_utf8_lossy(&answer);
    eprintln!("slow body cut off after {took:?}");
    assert!(
        took <= TIMEOUT + SLACK,
        "a 1 byte/s body held on for {took:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert_eq!(d.status("slowbody")["Total"], 0);

    // An idle keep-alive connection after one complete request.
    let mut tls = d.tls_connect();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut buf = [0u8; 4096];
    let n = tls.read(&mut buf).expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle = Instant::now();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    let took = idle.elapsed();
    eprintln!("idle keep-alive connection closed after {took:?}");
    assert!(
        took <= TIMEOUT + SLACK,
        "an idle keep-alive connection stayed open {took:?}"
    );

    d.ok(&["func", "rm", "slowbody"]);
    d.finish();
}

#[test]
fn idle_connections_beyond_the_fd_limit_do_not_keep_clients_out() {
    // 256 descriptors: the connection cap is half of them.
    let d = Daemon::start_with_nofile(SHORT, 256);
    // From five addresses: one address may hold 64 connections at most.
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|i| {
            d.tcp_connect_from(Some(&format!("127.0.0.{}", 60 + i % 5)))
                .expect("connect")
        })
        .collect();
    let start = Instant::now();
    let (code, body) = d.curl(&["--max-time", "30", &format!("{}/healthz", d.endpoint)]);
    let took = start.elapsed();
    eprintln!("a new client was answered after {took:?} behind 300 idle connections");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // At the cap the longest-idle connections give way; the new client is
    // answered long before their handshake timeout.
    assert!(
        took <= 2 * TIMEOUT + SLACK,
        "300 idle connections kept a new client out for {took:?}"
    );
    // The idle ones were dropped by the server, not by us.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut buf = [0u8; 16];
    assert!(
        matches!(first.read(&mut buf), Ok(0) | Err(_)),
        "an idle connection was kept"
    );
    drop(idle);
    let log = d.log();
    let failures = log.matches("accept failed").count();
    assert!(
        failures <= 1,
        "accept failed {failures} times under a low fd limit:\n{log}"
    );
    let cap_line = log
        .lines()
        .find(|l| l.contains("accepting connections"))
        .unwrap_or("");
    assert!(cap_line.contains("128"), "{cap_line}");
    d.finish();
}

/// Whether any file under `dir` contains `needle`.
fn found_in_files(dir: &std::path::Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            found_in_files(&path, needle)
        } else {
            std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        }
    })
}

#[test]
fn the_admin_key_never_reaches_a_container_or_the_database() {
    let mut d = Daemon::start();
    let url = d.create("env", &[IMAGE, "env"]);
    let key = d.admin_key();
    let auth = format!("Authorization: Bearer {key}");
    // Every spelling of a /v1 route: the canonical one and its percent-encoded
    // twins are the management API (the key is removed once it has
    // authenticated); the others are refused before anything routes on them.
    for (path, expect) in [
        ("/v1/functions/env/call?sync=1", 200),
        ("/%761/functions/env/call?sync=1", 200),
        ("/v%31/functions/%65nv/call?sync=1", 200),
        ("//v1/functions/env/call?sync=1", 400),
        ("/v1//functions/env/call?sync=1", 400),
        ("/v1/./functions/env/call?sync=1", 400),
        ("/x/../v1/functions/env/call?sync=1", 400),
        ("/v1/functions/env/%2e%2e/env/call?sync=1", 400),
    ] {
        let (code, body) = d.curl(&[
            "--path-as-is",
            "-H",
            &auth,
            "--data-binary",
            "",
            &format!("{}{path}", d.endpoint),
        ]);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(code, expect, "{path}: {text}");
        assert!(!text.contains(&key), "{path} showed the key: {text}");
        if code == 200 {
            assert!(text.contains("REQUEST_METHOD=POST"), "{path}: {text}");
            assert!(!text.contains("HTTP_AUTHORIZATION"), "{path}: {text}");
        } else {
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
            assert_eq!(v["error"]["code"], "bad_request", "{path}: {text}");
        }
    }
    // The key sent to the capability URL by mistake is dropped too; any
    // other Authorization is the function's business and is passed on.
    let (code, body) = d.curl(&["-H", &auth, "--data-binary", "", &format!("{url}/sync")]);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 200, "{text}");
    assert!(
        !text.contains(&key) && !text.contains("HTTP_AUTHORIZATION"),
        "{text}"
    );
    // ... in any spelling: as a Basic password or user name (base64).
    for user in [format!("someone:{key}"), format!("{key}:")] {
        let (code, body) = d.curl(&["-u", &user, "--data-binary", "", &format!("{url}/sync")]);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(code, 200, "{text}");
        assert!(!text.contains("HTTP_AUTHORIZATION"), "{user}: {text}");
    }
    let basic = "Basic aHlwZXJmdW5jZDpjYW5hcnk=";
    // The payload's first bytes stay in the call record, so the search
    // below can show that it finds what is there.
    let payload = "payload-canary-3b9d";
    let (code, body) = d.curl(&[
        "-H",
        &format!("Authorization: {basic}"),
        "--data-binary",
        payload,
        &format!("{url}/sync"),
    ]);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 200, "{text}");
    assert!(
        text.lines()
            .any(|l| l == format!("HTTP_AUTHORIZATION={basic}")),
        "{text}"
    );

    // Nothing on disk holds the key, while the call records do hold the
    // payload's first bytes (the search would find it). The request
    // variables are dropped once a call ends (`Call::transition`).
    d.stop();
    let db = d.data_dir().join("db");
    assert!(
        found_in_files(&db, payload.as_bytes()),
        "the search finds nothing"
    );
    assert!(
        !found_in_files(&db, key.as_bytes()),
        "the admin key is stored in clear under {}",
        db.display()
    );
    d.finish();
}

#[test]
fn limits_outside_the_ceilings_or_nonsensical_are_refused_at_create_and_update() {
    let d = Daemon::start_with(
        "[limits]\nmax_memory_bytes = 268435456\nmax_cpus = 1.0\nmax_timeout = \"1m\"\n\
         [container]\nnetwork_mode = \"none\"\nmemory_bytes = 134217728\n",
    );
    let key = d.add_user("tenant", 2);
    let create = |extra: &str| {
        common::scope::send_as(
            &d,
            &key,
            "POST",
            "/v1/functions",
            &format!(
                "{{\"Name\":\"lim\",\"Image\":\"{IMAGE}\",\"Command\":[\"sleep\",\"3\"]{extra}}}"
            ),
        )
    };
    for extra in [
        ",\"Memory\":18446744073709551615",
        ",\"Memory\":536870912",
        ",\"Memory\":4096",
        ",\"Cpus\":1024",
        ",\"Cpus\":2",
        ",\"Cpus\":1e-9",
        ",\"Cpus\":0",
        ",\"Timeout\":\"2m\"",
        ",\"Timeout\":\"99999999999999999s\"",
    ] {
        let (code, v) = create(extra);
        assert_eq!(code, 400, "{extra}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{extra}: {v}");
        assert!(v["error"]["message"].is_string(), "{extra}: {v}");
    }
    let (code, v) = create(",\"Memory\":67108864,\"Cpus\":0.5");
    assert_eq!(code, 201, "{v}");
    // No timeout asked: the ceiling's.
    assert_eq!(v["Timeout"], "1m", "{v}");
    for patch in [
        "{\"Cpus\":1e-9}",
        "{\"Memory\":18446744073709551615}",
        "{\"Timeout\":\"1h\"}",
    ] {
        let (code, v) = common::scope::send_as(&d, &key, "PATCH", "/v1/functions/lim", patch);
        assert_eq!(code, 400, "{patch}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{patch}: {v}");
    }

    // What the container gets: the memory as asked, and no swap beyond it.
    let out = d.cli_as(&key, &["func", "call", "lim"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out)
        .trim()
        .trim_start_matches("CallId: ")
        .to_string();
    let mut limits = String::new();
    d.wait_until(30, "the call's container", || {
        let out = std::process::Command::new("docker")
            .args([
                "ps",
                "-q",
                "--filter",
                &format!("label=io.hyperfuncd.call={id}"),
            ])
            .output()
            .expect("docker ps");
        let cid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if cid.is_empty() {
            return false;
        }
        let out = std::process::Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}} {{.HostConfig.NanoCpus}} \
                 {{.HostConfig.CpuShares}} {{.HostConfig.ReadonlyRootfs}}",
                &cid,
            ])
            .output()
            .expect("docker inspect");
        limits = String::from_utf8_lossy(&out.stdout).trim().to_string();
        !limits.is_empty()
    });
    // And the defaults: a CPU share below other containers' 1024, a
    // read-only root (this Engine's driver has no --storage-opt, so the
    // disk cap is a tmpfs /tmp).
    assert_eq!(limits, "67108864 67108864 500000000 512 true");
    let out = d.cli_as(&key, &["func", "get", "--wait", &id], None);
    assert!(out.status.success(), "{}", stderr(&out));
    d.ok(&["func", "rm", "tenant/lim"]);
    d.finish();
}

/// A loopback "registry" that answers every request with a 404 carrying
/// `canary`, and counts the connections it got.
fn canary_server(canary: &'static str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = format!("<html>{canary}</html>");
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    (port, hits)
}

#[test]
fn images_from_registries_not_allowed_are_refused_before_the_engine_is_asked() {
    use std::sync::atomic::Ordering;
    const CANARY: &str = "loopback-canary-7c1e";
    let (refused_port, refused_hits) = canary_server(CANARY);
    let (listed_port, listed_hits) = canary_server(CANARY);
    let d = Daemon::start_with(&format!(
        "[images]\nregistries = [\"docker.io\", \"127.0.0.1:{listed_port}\"]\n"
    ));
    let tenant = d.add_user("tenant", 2);
    let admin = d.admin_key();
    let probe = format!("127.0.0.1:{refused_port}/probe/x:latest");
    for key in [&tenant, &admin] {
        for image in [
            probe.as_str(),
            "localhost:22/x",
            "10.0.0.1/x",
            "ghcr.io/o/x",
        ] {
            let (code, v) = common::scope::send_as(
                &d,
                key,
                "POST",
                "/v1/functions",
                &format!("{{\"Name\":\"img\",\"Image\":\"{image}\"}}"),
            );
            assert_eq!(code, 400, "{image}: {v}");
            assert_eq!(v["error"]["code"], "image_not_allowed", "{image}: {v}");
        }
    }
    // An invalid reference is a 400 too, not a 500 from the Engine.
    let (code, v) = common::scope::send_as(
        &d,
        &tenant,
        "POST",
        "/v1/functions",
        "{\"Name\":\"img\",\"Image\":\"UPPER/X\"}",
    );
    assert_eq!(
        (code, &v["error"]["code"]),
        (400, &"bad_request".into()),
        "{v}"
    );
    // Updates are checked the same way.
    d.create_as(&tenant, "img", &[IMAGE, "true"]);
    let (code, v) = common::scope::send_as(
        &d,
        &tenant,
        "PATCH",
        "/v1/functions/img",
        &format!("{{\"Image\":\"{probe}\"}}"),
    );
    assert_eq!(
        (code, &v["error"]["code"]),
        (400, &"image_not_allowed".into()),
        "{v}"
    );
    assert_eq!(
        refused_hits.load(Ordering::SeqCst),
        0,
        "the Engine was made to connect to a refused registry"
    );

    // A listed registry is asked; its answer is summarised, never echoed.
    let image = format!("127.0.0.1:{listed_port}/probe/x:latest");
    let (code, v) = common::scope::send_as(
        &d,
        &tenant,
        "POST",
        "/v1/functions",
        &format!("{{\"Name\":\"pulled\",\"Image\":\"{image}\"}}"),
    );
    let text = v.to_string();
    eprintln!("pull from a listed loopback registry: {code} {text}");
    assert_eq!(code, 400, "{text}");
    assert!(
        listed_hits.load(Ordering::SeqCst) > 0,
        "the Engine never asked it"
    );
    assert!(
        !text.contains(CANARY),
        "the registry's answer was echoed: {text}"
    );
    let message = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&image) && message.contains("could not be pulled"),
        "{message}"
    );
    d.ok(&["func", "rm", "tenant/img"]);
    d.finish();
}

#[test]
fn the_cli_checks_names_and_ids_before_building_a_url_and_the_bearer_scheme_is_case_insensitive() {
    let d = Daemon::start();
    d.add_user("bob", 1);
    d.create("keep", &[IMAGE, "true"]);
    for args in [
        &["func", "rm", "../users/bob"][..],
        &["func", "rm", "keep", "../users/bob"],
        &["func", "inspect", "../users/bob"],
        &["func", "status", "../users/bob"],
        &["func", "update", "../users/bob", "--refresh"],
        &["user", "rm", "../functions/keep"],
    ] {
        assert_cli_error(&d.cli(args), "invalid name");
    }
    assert_cli_error(&d.cli(&["func", "get", "../../users/bob"]), "not found");
    assert_cli_error(
        &d.cli(&["func", "logs", "keep", "--callid", "x&tail=1"]),
        "not a call id",
    );
    // Nothing was removed on the way.
    assert!(d.ok(&["user", "ls"]).contains("bob"));
    assert!(d.ok(&["func", "ls"]).contains("keep"));

    for scheme in ["bearer", "BEARER", "Bearer"] {
        let (code, body) = d.curl(&[
            "-H",
            &format!("Authorization: {scheme} {}", d.admin_key()),
            &format!("{}/v1/functions", d.endpoint),
        ]);
        assert_eq!(code, 200, "{scheme}: {}", String::from_utf8_lossy(&body));
    }
    d.ok(&["func", "rm", "keep"]);
    d.finish();
}

/// Sends `request` raw over TLS and reads the answer up to the close.
fn raw_exchange(d: &Daemon, request: &[u8]) -> String {
    let mut tls = d.tls_connect();
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    tls.write_all(request).expect("send");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The body of a raw HTTP/1.1 answer.
fn body_of(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[test]
fn refusals_are_json_405_names_the_allowed_methods_and_hyper_answers_only_what_it_cannot_parse() {
    let d = Daemon::start_with(SHORT);
    let json_code = |answer: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(body_of(answer))
            .unwrap_or_else(|e| panic!("not a JSON error ({e}): {answer}"));
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    };

    // A known path, a wrong method: 405, Allow, JSON.
    let a = raw_exchange(
        &d,
        b"PUT /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 405"), "{a}");
    assert!(a.to_ascii_lowercase().contains("\r\nallow: get\r\n"), "{a}");
    assert_eq!(json_code(&a), "method_not_allowed");
    let key = d.admin_key();
    let (code, body) = d.curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Authorization: Bearer {key}"),
        &format!("{}/v1/functions/x", d.endpoint),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // Over the API's limits, under hyper's: the API answers, in JSON.
    let long = format!(
        "GET /healthz?{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(9000)
    );
    let a = raw_exchange(&d, long.as_bytes());
    assert!(a.starts_with("HTTP/1.1 414"), "{}", &a[..a.len().min(200)]);
    assert_eq!(json_code(&a), "uri_too_long");
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let a = raw_exchange(&d, many.as_bytes());
    assert!(a.starts_with("HTTP/1.1 431"), "{a}");
    assert_eq!(json_code(&a), "headers_too_large");

    // What hyper cannot parse it refuses itself, before any hook of ours:
    // the status alone, an empty body, and the connection closed.
    let a = raw_exchange(
        &d,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    assert_eq!(body_of(&a), "", "{a}");

    // And the daemon is none the worse for any of it.
    let (code, _) = d.curl(&[&format!("{}/healthz", d.endpoint)]);
    assert_eq!(code, 200);
    d.finish();
}

/// `docker ARGS`, asserting success; its trimmed stdout.
fn docker_ok(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(out.status.success(), "docker {args:?}: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// Removes, when dropped, what a test made on the Engine itself: containers
/// first, then the networks they were on.
struct EngineLeftovers {
    containers: Vec<String>,
    networks: Vec<String>,
}

impl Drop for EngineLeftovers {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", c])
                .output();
        }
        for n in &self.networks {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm", n])
                .output();
        }
    }
}

#[test]
fn calls_run_on_a_network_hyperfuncd_makes_where_they_cannot_reach_other_containers() {
    test_image();
    // A private name, so the test can watch the network being made and
    // remove it after; the default `hyperfuncd` is made the same way.
    let net = format!("hyperfuncd-test-net-{}", std::process::id());
    let server = format!("hyperfuncd-test-peer-{}", std::process::id());
    let mut leftovers = EngineLeftovers {
        containers: Vec::new(),
        networks: Vec::new(),
    };
    let absent = std::process::Command::new("docker")
        .args(["network", "inspect", &net])
        .output()
        .expect("docker CLI");
    assert!(!absent.status.success(), "{net} exists before the test");
    // No firewall: its rules would go into this machine's own iptables
    // (tests/firewall.rs checks it in a namespace of its own).
    let d = Daemon::start_with(&format!(
        "[container]\nnetwork_mode = \"{net}\"\nfirewall = false\n"
    ));
    leftovers.networks.push(net.clone());
    let made: serde_json::Value =
        serde_json::from_str(&docker_ok(&["network", "inspect", &net])).expect("inspect JSON");
    let made = &made[0];
    assert_eq!(made["Driver"], "bridge", "{made}");
    assert_eq!(
        made["Options"]["com.docker.network.bridge.enable_icc"], "false",
        "{made}"
    );
    assert!(
        made["Labels"]["io.hyperfuncd.network"].is_string(),
        "{made}"
    );

    // Removed behind the daemon's back (`docker network prune` does it when
    // no call runs): the next call makes it again instead of failing.
    docker_ok(&["network", "rm", &net]);
    let echo = d.create("echo", &[IMAGE, "cat"]);
    let (code, body) = d.curl(&["--data-binary", "still here", &format!("{echo}/sync")]);
    assert_eq!(
        (code, String::from_utf8_lossy(&body).as_ref()),
        (200, "still here")
    );
    let remade: serde_json::Value =
        serde_json::from_str(&docker_ok(&["network", "inspect", &net])).expect("inspect JSON");
    assert_eq!(
        remade[0]["Options"]["com.docker.network.bridge.enable_icc"], "false",
        "{remade}"
    );
    let subnet = remade[0]["IPAM"]["Config"][0]["Subnet"]
        .as_str()
        .expect("subnet")
        .to_string();

    // Another container on the same network, serving HTTP: the host reaches
    // it, a call does not.
    leftovers.containers.push(server.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &server,
        "--network",
        &net,
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/bin",
    ]);
    let ip = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &server,
    ]);
    let peer = format!("http://{ip}:8080/");
    // (nc in the call, not wget: the static busybox's wget crashes.)
    let from_host = std::process::Command::new("curl")
        .args([
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &peer,
        ])
        .output()
        .expect("curl");
    assert_ne!(
        stdout(&from_host),
        "000",
        "the peer does not answer the host: {}",
        stderr(&from_host)
    );

    let script =
        format!("ip -4 -o addr show eth0; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 8080 2>&1; echo nc=$?");
    let url = d.create("probe", &[IMAGE, "sh", "-c", &script]);
    let (code, body) = d.curl(&["--data-binary", "", &format!("{url}/sync")]);
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{text}");
    // On the network: an address of its subnet (Docker hands out /16s).
    let prefix: String = subnet.split('.').take(2).collect::<Vec<_>>().join(".");
    assert!(
        text.contains(&format!("inet {prefix}.")),
        "not on {net} ({subnet}): {text}"
    );
    // Dropped, not refused: the peer is there, the bridge keeps the call out.
    assert!(
        text.contains("nc=1") && !text.contains("HTTP/1") && !text.contains("refused"),
        "the call reached the peer: {text}"
    );
    d.ok(&["func", "rm", "probe"]);
    d.ok(&["func", "rm", "echo"]);
    d.finish();
    drop(leftovers);
    let gone = std::process::Command::new("docker")
        .args(["network", "inspect", &net])
        .output()
        .expect("docker CLI");
    assert!(!gone.status.success(), "{net} is left behind");
}

#[test]
fn a_read_only_root_leaves_only_a_bounded_tmp_writable() {
    let d = Daemon::start_with(
        "[container]\nnetwork_mode = \"none\"\nread_only_root = true\ntmp_bytes = 8388608\ncpu_shares = 256\n",
    );
    // Root refused; /tmp takes 4 MiB but not 16, and runs nothing.
    let script = "touch /probe 2>&1; echo root=$?; \
        dd if=/dev/zero of=/tmp/small bs=1048576 count=4 2>/dev/null; echo small=$?; \
        dd if=/dev/zero of=/tmp/big bs=1048576 count=16 2>&1; echo big=$?; \
        grep ' /tmp ' /proc/mounts; \
        rm /tmp/big /tmp/small; cp /bin/busybox /tmp/sh && /tmp/sh true 2>&1; echo exec=$?; \
        sleep 2";
    let url = d.create("ro", &[IMAGE, "sh", "-c", script]);
    let call = std::thread::spawn({
        let d_url = format!("{url}/sync");
        let ca = d.ca();
        move || {
            std::process::Command::new("curl")
                .arg("--cacert")
                .arg(ca)
                .args(["-s", "--data-binary", "", &d_url])
                .output()
                .expect("curl")
        }
    });
    let mut host = String::new();
    d.wait_until(30, "the call's container", || {
        let Some(cid) = d.containers(true).into_iter().next() else {
            return false;
        };
        host = docker_ok(&[
            "inspect",
            "-f",
            "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CpuShares}} {{json .HostConfig.Tmpfs}} \
             {{.HostConfig.Memory}} {{.HostConfig.MemorySwap}}",
            &cid,
        ]);
        true
    });
    assert_eq!(
        host,
        r#"true 256 {"/tmp":"size=8388608"} 536870912 536870912"#
    );
    let out = call.join().expect("curl thread");
    let text = stdout(&out);
    assert!(text.contains("Read-only file system"), "{text}");
    assert!(text.contains("root=1"), "{text}");
    assert!(text.contains("small=0"), "{text}");
    assert!(
        text.contains("No space left on device") && text.contains("big=1"),
        "{text}"
    );
    let mount = text
        .lines()
        .find(|l| l.contains(" /tmp "))
        .unwrap_or_else(|| panic!("no /tmp mount: {text}"));
    assert!(
        mount.contains("tmpfs") && mount.contains("noexec") && mount.contains("size=8192k"),
        "{mount}"
    );
    assert!(
        text.contains("Permission denied") && text.contains("exec=126"),
        "ran a program from /tmp: {text}"
    );
    d.ok(&["func", "rm", "ro"]);
    d.finish();
}

/// Paths under `dir` (itself included) that their group or others can use,
/// but the warm pool's init (0555: public, it is in the binary, and run by
/// any container user), which must not be writable.
fn not_private(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut open = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    let init = dir.join("hyperfuncd-init");
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).expect("stat");
        if p == init {
            assert_eq!(meta.permissions().mode() & 0o777, 0o555, "{}", p.display());
            continue;
        }
        if meta.permissions().mode() & 0o077 != 0 && !meta.file_type().is_symlink() {
            open.push(format!(
                "{} {:o}",
                p.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).expect("read_dir") {
                todo.push(e.expect("entry").path());
            }
        }
    }
    open
}

/// Whether the certificate in `cert` is still valid `days` from now.
fn valid_in(cert: &std::path::Path, days: u64) -> bool {
    std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-checkend",
            &(days * 86_400).to_string(),
            "-in",
        ])
        .arg(cert)
        .output()
        .expect("openssl")
        .status
        .success()
}

#[test]
fn the_data_dir_is_private_a_readable_key_is_refused_and_the_certificate_lasts_a_year() {
    use std::os::unix::fs::PermissionsExt;
    // Payloads above 16 bytes are blob files of their own.
    let mut d = Daemon::start_with("[store]\ninline_max_bytes = 16\n");
    let url = d.create("echo", &[IMAGE, "cat"]);
    let payload = "a payload that is a file of its own";
    let (code, body) = d.curl(&["--data-binary", payload, &format!("{url}/sync")]);
    assert_eq!(
        (code, String::from_utf8_lossy(&body).as_ref()),
        (200, payload)
    );
    d.call("echo", payload.as_bytes());
    let data = d.data_dir();
    let blobs = std::fs::read_dir(data.join("db/hf-blobs"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert!(blobs > 0, "no blob file to check");
    assert_eq!(not_private(&data), Vec::<String>::new());
    let cert = d.ca();
    assert!(valid_in(&cert, 360) && !valid_in(&cert, 370), "not a year");

    // An older data dir, opened up, and a certificate with 10 days left.
    d.stop();
    let set = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    set(&data, 0o755);
    set(&data.join("db"), 0o755);
    set(&data.join("admin-profile.toml"), 0o644);
    let key = data.join("tls/key.pem");
    let key_before = std::fs::read(&key).expect("key");
    let short = std::process::Command::new("openssl")
        .args(["req", "-x509", "-days", "10", "-subj", "/CN=short", "-key"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(short.status.success(), "{}", stderr(&short));
    assert!(!valid_in(&cert, 30));
    d.restart();
    assert_eq!(not_private(&data), Vec::<String>::new());
    assert!(valid_in(&cert, 360), "not renewed:\n{}", d.log());
    assert_eq!(std::fs::read(&key).expect("key"), key_before);
    assert!(d.log().contains("renewed the self-signed TLS certificate"));
    // The renewed certificate serves, and clients that trust it as CA connect.
    let (code, _) = d.curl(&["--data-binary", "x", &format!("{url}/sync")]);
    assert_eq!(code, 200);

    // A configured key its group can read: refused at start, saying the fix.
    let dir = tempfile::tempdir().expect("tempdir");
    let (own_cert, own_key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::copy(&cert, &own_cert).expect("copy cert");
    std::fs::copy(&key, &own_key).expect("copy key");
    set(&own_key, 0o640);
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [container]\nnetwork_mode = \"none\"\n",
            dir.path().join("data").display(),
            own_cert.display(),
            own_key.display()
        ),
    )
    .expect("write config");
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("hyperfuncd");
    assert!(!out.status.success());
    assert!(!dir.path().join("data").exists(), "made a data dir first");
    assert!(
        stderr(&out).contains(&format!("chmod 600 {}", own_key.display())),
        "{}",
        stderr(&out)
    );
    d.ok(&["func", "rm", "echo"]);
    d.finish();
}
