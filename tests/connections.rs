//! Exhaustion of the front door (issue 20), played as an attacker would
//! against the real binary, each probe bounded in time: connections that
//! never ask anything, many connections from one address, long requests
//! that fill the connection cap, slow uploads, key guessing. Test clients
//! bind loopback addresses of their own (127.0.0.x) to be many clients.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Timer and scheduling slack on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(3000);

/// Reads one HTTP/1.1 answer with a `Content-Length` body: status, head, body.
fn read_answer(tls: &mut Tls) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match tls.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return (0, String::from_utf8_lossy(&buf).into_owned(), Vec::new()),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = tls.read_exact(&mut body);
    (status, head, body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Whether the server has closed `sock` (without waiting).
fn closed_by_server(sock: &std::net::TcpStream) -> bool {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 1];
    let closed = match (&*sock).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    sock.set_nonblocking(false).expect("blocking");
    closed
}

#[test]
fn connections_that_never_ask_are_closed_and_cannot_lock_anyone_out() {
    let d = Daemon::start_with(
        "[http]\nhandshake_timeout = \"2s\"\nheader_timeout = \"4s\"\nmax_connections = 100\n",
    );
    let header_timeout = Duration::from_secs(4);

    // One connection: TLS handshake done, then nothing.
    let mut silent = d.tls_connect();
    silent
        .sock
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let _ = silent.read(&mut buf);
    let took = start.elapsed();
    eprintln!("a silent TLS connection was closed after {took:?}");
    assert!(
        took >= header_timeout - Duration::from_millis(500) && took <= header_timeout + SLACK,
        "a connection that sent nothing after its handshake was closed after {took:?}"
    );

    // 600 of them from ten addresses, six times the connection cap.
    let start = Instant::now();
    let mut held = Vec::new();
    let mut failed = 0;
    for i in 0..600 {
        let source = format!("127.0.0.{}", 2 + i % 10);
        match d.tls_connect_from(Some(&source)) {
            Ok(c) => held.push(c),
            Err(_) => failed += 1,
        }
    }
    eprintln!(
        "{} silent TLS connections made in {:?} ({failed} failed)",
        held.len(),
        start.elapsed()
    );
    assert!(
        held.len() >= 500,
        "only {} handshakes completed",
        held.len()
    );
    // A newcomer is answered at once: the silent ones give way.
    let start = Instant::now();
    let (code, body) = d.curl(&["--max-time", "30", &format!("{}/healthz", d.endpoint)]);
    let took = start.elapsed();
    eprintln!("a newcomer was answered after {took:?} behind 600 silent connections");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        took <= header_timeout + SLACK,
        "600 silent connections kept a newcomer out for {took:?}"
    );
    // So is the admin's CLI.
    d.ok(&["func", "ls"]);
    drop(held);

    // 70 connections from one address: the 64 of the per-address cap stay
    // (until their handshake times out), the rest are closed at once, and
    // another address is not affected.
    let flood: Vec<std::net::TcpStream> = (0..70)
        .map(|_| d.tcp_connect_from(Some("127.0.0.20")).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let closed = flood.iter().filter(|s| closed_by_server(s)).count();
    assert_eq!(
        closed, 6,
        "connections over the per-address cap of 64 closed"
    );
    let (code, _) = d.curl(&[
        "--interface",
        "127.0.0.21",
        "--max-time",
        "10",
        &format!("{}/healthz", d.endpoint),
    ]);
    assert_eq!(code, 200);
    drop(flood);
    let log = d.log();
    let lines = log
        .matches("refusing connections over the per-address cap")
        .count();
    assert!((1..=2).contains(&lines), "{lines} refusal lines:\n{log}");
    d.finish();
}

#[test]
fn long_requests_leave_room_for_management_and_end_after_max_wait() {
    let d = Daemon::start_with(
        "[http]\nmax_connections = 20\nreserved_connections = 4\nmax_wait = \"4s\"\n",
    );
    let max_wait = Duration::from_secs(4);
    let url = d.create("slow", &[IMAGE, "sh", "-c", "sleep 7; echo done"]);
    let logs_path = url
        .replacen("/call/", "/logs/", 1)
        .splitn(4, '/')
        .nth(3)
        .expect("path")
        .to_string();

    // Anonymous follows up to the connection cap: the long-request cap
    // (20 - 4) takes 16, the rest are told to come back.
    let mut follows = Vec::new();
    let mut busy = 0;
    let opened = Instant::now();
    for i in 0..20 {
        let mut tls = d
            .tls_connect_from(Some(&format!("127.0.0.{}", 30 + i % 5)))
            .expect("connect");
        tls.write_all(format!("GET /{logs_path}?follow=1 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .expect("request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if head.starts_with("HTTP/1.1 200") {
            assert!(header(&head, "hyperfuncd-log-seq").is_some(), "{head}");
            follows.push(tls);
        } else {
            assert!(head.starts_with("HTTP/1.1 503"), "{head}");
            assert_eq!(header(&head, "retry-after"), Some("5"), "{head}");
            busy += 1;
        }
    }
    assert_eq!((follows.len(), busy), (16, 4));
    // Management and health still get through.
    let (code, _) = d.curl(&["--max-time", "10", &format!("{}/healthz", d.endpoint)]);
    assert_eq!(code, 200);
    d.ok(&["func", "ls"]);
    // The follows end by themselves after max_wait (the chunked body's
    // last chunk; the connection itself stays for the next request).
    for f in &mut follows {
        f.sock
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        while !rest.ends_with(b"0\r\n\r\n") {
            match f.read(&mut buf) {
                Ok(n) if n > 0 => rest.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
    }
    let took = opened.elapsed();
    eprintln!("16 follows ended after {took:?}");
    assert!(
        took >= max_wait && took <= max_wait + 2 * SLACK,
        "follows lasted {took:?}"
    );
    drop(follows);

    // The CLI's follow goes on across the server's ends: a call that
    // finishes two max_waits later is seen, and no line twice.
    let mut cli = std::process::Command::new(BIN)
        .args(["func", "logs", "--follow", "slow"])
        .env("HYPERFUNC_PROFILE", d.profile())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("func logs --follow");
    let out = cli.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // A sync call past max_wait: answered 201 with the call id (running).
    let start = Instant::now();
    let (code, body) = d.curl(&["--max-time", "30", "-X", "POST", &format!("{url}/sync")]);
    let took = start.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!((code, v["State"].as_str()), (201, Some("RUNNING")), "{v}");
    assert!(took >= max_wait && took <= max_wait + SLACK, "{took:?}");
    let id = v["CallId"].as_str().expect("CallId").to_string();
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !seen.iter().any(|l| l.contains("[FINISHED]")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("--follow showed no FINISHED event; saw {seen:?}"),
        }
    }
    let _ = cli.kill();
    let _ = cli.wait();
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a line shown twice: {seen:?}");
    assert!(seen.iter().all(|l| l.contains(&id)), "{seen:?}");
    assert_eq!(
        seen.iter().filter(|l| l.contains("[CALL]")).count(),
        1,
        "{seen:?}"
    );
    // The output is still there for the client that waits on.
    let wait_url = format!("{}/{id}/wait", url.replacen("/call/", "/output/", 1));
    let (code, out) = d.curl(&["--max-time", "30", &wait_url]);
    assert_eq!((code, out.as_slice()), (200, &b"done\n"[..]));
    d.ok(&["func", "rm", "slow"]);
    d.finish();
}

#[test]
fn slow_uploads_cost_disk_not_memory_and_a_whole_body_is_byte_exact() {
    let d = Daemon::start();
    let url = d.create("upload", &[IMAGE, "cat"]);
    let path = url.splitn(4, '/').nth(3).expect("path").to_string();
    std::thread::sleep(Duration::from_millis(500));
    let (before, _) = d.rss_kib();
    const BODY: usize = 5 * 1024 * 1024;
    let chunk = vec![b'x'; 64 * 1024];
    let start = Instant::now();
    let mut held = Vec::new();
    for i in 0..200 {
        let mut tls = d
            .tls_connect_from(Some(&format!("127.0.0.{}", 40 + i % 4)))
            .expect("connect");
        tls.write_all(
            format!("POST /{path} HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n")
                .as_bytes(),
        )
        .expect("head");
        let mut left = BODY - 1;
        while left > 0 {
            let n = left.min(chunk.len());
            tls.write_all(&chunk[..n]).expect("body");
            left -= n;
        }
        tls.flush().expect("flush");
        held.push(tls);
    }
    // Give the daemon time to take in the last bytes.
    std::thread::sleep(Duration::from_secs(2));
    let (during, peak) = d.rss_kib();
    eprintln!(
        "200 uploads of 5 MiB - 1 byte in {:?}: RSS {} MiB before, {} MiB with them held, peak {} MiB",
        start.elapsed(),
        before / 1024,
        during / 1024,
        peak / 1024
    );
    // README: bodies in flight hold at most [http] body_memory_bytes (64 MiB).
    let bound_kib = before + 64 * 1024 + 96 * 1024;
    assert!(
        peak <= bound_kib,
        "RSS peaked at {} MiB with 200 slow uploads (bound {} MiB)",
        peak / 1024,
        bound_kib / 1024
    );
    drop(held);
    d.wait_until(10, "the unfinished uploads are dropped", || {
        std::fs::read_dir(d.data_dir().join("spool"))
            .map(|r| r.count() == 0)
            .unwrap_or(true)
    });
    assert_eq!(
        d.status("upload")["Total"],
        0,
        "an unfinished upload was stored"
    );

    // A whole 5 MiB body goes through the spool byte-exact.
    let payload = random_bytes(BODY);
    let file = d.data_dir().join("payload.bin");
    std::fs::write(&file, &payload).expect("payload");
    let (code, out) = d.curl(&[
        "--max-time",
        "60",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{url}/sync"),
    ]);
    assert_eq!(code, 200);
    assert!(out == payload, "the 5 MiB output differs from its input");
    std::fs::remove_file(&file).expect("rm payload");
    d.ok(&["func", "rm", "upload"]);
    d.finish();
}

#[test]
fn failed_authentication_is_limited_per_address_and_logged_in_summary() {
    let d = Daemon::start_with("[http]\nauth_failures_per_minute = 5\n");
    let admin = d.admin_key();
    let mut tls = d.tls_connect_from(Some("127.0.0.50")).expect("connect");
    let ask = |tls: &mut Tls, key: &str| {
        tls.write_all(
            format!("GET /v1/functions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n")
                .as_bytes(),
        )
        .expect("request");
        read_answer(tls)
    };
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..20 {
        let (status, head, _) = ask(&mut tls, &format!("hfk_guess{i}"));
        if status == 429 {
            retry_after = header(&head, "retry-after").map(str::to_string);
        }
        statuses.push(status);
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let secs: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    // While blocked, that address is not let in even with a good key...
    let (status, _, _) = ask(&mut tls, &admin);
    assert_eq!(status, 429);
    // ...and every other address is.
    d.ok(&["func", "ls"]);
    let log = d.log();
    let lines = log.matches("authentication failed").count();
    assert!(
        (1..=2).contains(&lines),
        "20 failures logged in {lines} lines:\n{log}"
    );
    d.finish();
}
