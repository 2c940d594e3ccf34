//! Disk (issue 20, point 4): a call writes at most `[container] disk_bytes`,
//! and not to the host's disk, cold or warm; a daemon whose data dir's
//! filesystem fills up lives on, starts again on it, serves reads, refuses
//! writes with 507 saying by how much the disk is short, and recovers
//! once space is freed. Real binary, real Engine; the full disk is a small
//! tmpfs the test mounts.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1024 * 1024;
/// The cap the first test sets: a quarter of what its function tries.
const CAP: u64 = 16 * MIB;

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(out.status.success(), "docker {args:?}: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// Free bytes of the filesystem holding `path` (statvfs, as `df` counts).
fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(path)
        .output()
        .expect("stat");
    let text = stdout(&out);
    let mut n = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().expect("stat -f number"));
    n.next().expect("blocks") * n.next().expect("block size")
}

/// Bytes under `dir` on the host (`du`), 0 if it is not there.
fn du(dir: &str) -> u64 {
    let out = Command::new("du").args(["-sb", dir]).output().expect("du");
    stdout(&out)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What the function of the first test does: tries to write 256 MiB to
/// /tmp and 256 MiB to /, says it is done in /dev/shm (the only other
/// writable place), waits until the test lets it go, and exits with the
/// first failure.
const WRITER: &str = "cat >/dev/null; \
    dd if=/dev/zero of=/tmp/fill bs=1048576 count=256; t=$?; \
    dd if=/dev/zero of=/fill bs=1048576 count=256; r=$?; \
    echo tmp=$t root=$r size=$(wc -c </tmp/fill); touch /dev/shm/written; \
    i=0; while [ ! -e /dev/shm/go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; \
    [ $t -ne 0 ] && exit $t; exit $r";

/// Runs one call of `writer` (whose container is `container(call)` once it
/// runs): checks, while its writes are held, that the host's disk did not
/// take them (the container's writable layer on the host, and the free
/// space of the Engine's data root), then lets it end and checks it FAILED
/// saying why.
/// Returns the call's id and its container's.
fn write_past_the_cap(
    d: &Daemon,
    container_of: impl Fn(&str) -> Option<String>,
) -> (String, String) {
    let root = docker(&["info", "-f", "{{.DockerRootDir}}"]);
    let before = free_bytes(Path::new(&root));
    let id = d.call("writer", b"");
    let mut cid = String::new();
    d.wait_until(120, "the writer's container to have written", || {
        let Some(c) = container_of(&id) else {
            return false;
        };
        cid = c;
        Command::new("docker")
            .args(["exec", &cid, "test", "-e", "/dev/shm/written"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let after = free_bytes(Path::new(&root));
    let upper = docker(&["inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", &cid]);
    let layer = du(&upper);
    eprintln!(
        "writer {id}: host free {before} -> {after} bytes; writable layer {upper}: {layer} bytes"
    );
    // Its writable layer holds no more than the cap: here the root is
    // read-only and /tmp is memory, so next to nothing.
    assert!(
        layer <= CAP,
        "the call wrote {layer} bytes to the host's disk"
    );
    // The host's free space: other work on this machine may write too, so
    // the bound is loose, but an uncapped call (512 MiB) exceeds it.
    assert!(
        before.saturating_sub(after) < CAP + 200 * MIB,
        "the host's disk lost {} bytes during the call",
        before.saturating_sub(after)
    );
    docker(&["exec", &cid, "touch", "/dev/shm/go"]);
    d.wait_until(60, "the writer's call to end", || {
        d.call_record(&id).1["State"] == "FAILED"
    });
    let (_, call) = d.call_record(&id);
    let out = d.cli(&["func", "logs", "--callid", &id, "writer"]);
    let logs = stdout(&out);
    assert!(
        logs.contains("No space left on device") && logs.contains("Read-only file system"),
        "the call's stderr must say why its writes failed: {logs}"
    );
    assert!(
        logs.contains(&format!("tmp=1 root=1 size={CAP}")),
        "/tmp must take exactly the cap: {logs}"
    );
    assert_eq!(call["ExitCode"], 1, "{call}");
    (id, cid)
}

#[test]
fn a_call_writes_at_most_its_disk_cap_cold_and_warm_and_not_to_the_host() {
    // auto: this Engine's storage driver (fuse-overlayfs) has no size
    // option, so the daemon falls back to a read-only root and a tmpfs.
    let d = Daemon::start_with(&format!(
        "\n[container]\nnetwork_mode = \"none\"\nfirewall = false\ndisk_bytes = {CAP}\n[pool]\nper_function = 1"
    ));
    d.create("writer", &[IMAGE, "sh", "-c", WRITER]);

    // Cold: the first call of a function (the pool warms it afterwards).
    write_past_the_cap(&d, |id| {
        d.ps(&["--filter", &format!("label=io.hyperfuncd.call={id}")])
            .into_iter()
            .next()
    });
    let log = d.log();
    assert!(
        log.contains("call containers get a read-only root and a tmpfs /tmp"),
        "the fallback must be logged:\n{log}"
    );

    // Warm: a pool container, made with the init bind-mounted read-only.
    let pool = "label=io.hyperfuncd.pool=writer";
    let mut warm = String::new();
    d.wait_until(60, "a warm container", || {
        match d
            .ps(&["--filter", pool, "--filter", "name=hyperfuncd-pool-"])
            .first()
        {
            Some(w) => {
                warm = w.clone();
                true
            }
            None => false,
        }
    });
    let host = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.ReadonlyRootfs}} {{json .HostConfig.Tmpfs}} {{range .Mounts}}{{.Type}} {{.Destination}} rw={{.RW}};{{end}}",
        &warm,
    ]);
    assert_eq!(
        host,
        format!(r#"true {{"/tmp":"size={CAP}"}} bind /.hyperfuncd-init rw=false;"#)
    );
    let (_, cid) = write_past_the_cap(&d, |id| {
        let name = format!("hyperfuncd-{id}");
        let named = docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("name={name}"),
        ]);
        (!named.is_empty()).then_some(named)
    });
    // It was the warm container, renamed after its call.
    assert!(cid.starts_with(&warm), "{cid} is not the warm {warm}");
    // Removing the function drops its pool's refill too.
    d.ok(&["func", "rm", "writer"]);
    d.finish();
}

/// The ballast's file in a data dir.
fn ballast(data: &Path) -> std::path::PathBuf {
    data.join("db/hf-ballast")
}

/// What a daemon on a full disk must do: answer reads (healthz, function
/// list, status, logs, an output), refuse writes with 507 and a message that
/// says by how much the disk is short, and say so on /healthz.
fn serves_reads_and_refuses_writes(d: &Daemon, url: &str, output_of: &str, payload: &[u8]) {
    let (code, health) = d.health();
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["Status"], "unavailable", "{health}");
    let why = health["Store"].as_str().unwrap_or("");
    assert!(
        why.starts_with("writes refused: the data dir's filesystem is full:")
            && why.contains("free")
            && why.contains("under the"),
        "/healthz must say why writes are refused: {health}"
    );
    assert_eq!(health["Engine"], "up", "{health}");

    // Reads.
    let ls = d.ok(&["func", "ls"]);
    assert!(ls.contains("cat"), "{ls}");
    let status = d.status("cat");
    assert!(status["Finished"].as_u64() >= Some(1), "{status}");
    let logs = d.ok(&["func", "logs", "cat"]);
    assert!(logs.contains("[FINISHED]"), "{logs}");
    let (code, out) = d.output(output_of);
    assert_eq!(
        (code, out.as_slice()),
        (200, payload),
        "the output kept before the disk filled"
    );
    let (code, body) = d.curl(&[&url.replace("/call/", "/status/")]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));

    // Writes: a call (data plane and CLI), a function, a user.
    let total = d.status("cat")["Total"].clone();
    let (code, body) = d.curl(&["-X", "POST", "--data-binary", "no room", url]);
    assert_eq!(code, 507, "{}", String::from_utf8_lossy(&body));
    let err: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(err["error"]["code"], "insufficient_storage", "{err}");
    let msg = err["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("no space left to store the call: the data dir's filesystem is full:")
            && msg.contains("short of"),
        "{msg}"
    );
    assert_eq!(d.status("cat")["Total"], total, "a refused call was stored");
    let out = d.cli(&["func", "create", "--name", "more", IMAGE, "cat"]);
    assert_cli_error(&out, "no space left to store the function");
    let out = d.cli(&["user", "add", "carol"]);
    assert_cli_error(&out, "no space left to store the user");
}

#[test]
fn a_daemon_on_a_full_disk_lives_restarts_serves_reads_and_recovers() {
    const RESERVE: u64 = 4 * MIB;
    const BALLAST: u64 = 8 * MIB;
    require_root("a_daemon_on_a_full_disk_lives_restarts_serves_reads_and_recovers");
    // Declared before the daemon, so it is unmounted after the daemon stopped.
    let disk = Tmpfs::mount(48);
    let data = disk.path().join("data");
    let mut d = Daemon::start_on(
        &data,
        &format!("[store]\nmin_free_bytes = {RESERVE}\nballast_bytes = {BALLAST}"),
    );
    d.wait_until(30, "the ballast to be set aside", || {
        std::fs::metadata(ballast(&data)).is_ok_and(|m| m.len() == BALLAST)
    });
    let url = d.create("cat", &[IMAGE, "cat"]);
    let kept = d.call("cat", b"kept for later");
    let fetched = d.call("cat", b"x");
    d.wait_until(60, "the calls to finish", || {
        d.status("cat")["Finished"] == 2
    });
    assert_eq!(d.output(&fetched).0, 200);

    // 1. The disk fills while the daemon runs: it stays up, gives the
    // ballast back to its database, and refuses writes.
    let fill = disk.fill("fill", 0);
    d.wait_until(30, "the ballast to be released", || {
        !ballast(&data).exists()
    });
    d.wait_until(30, "/healthz to say the disk refuses writes", || {
        d.health().0 == 503
    });
    serves_reads_and_refuses_writes(&d, &url, &kept, b"kept for later");
    let (code, _) = d.output(&kept);
    assert_eq!(code, 410, "a fetched output is gone");
    let kept = call_after_space(&d, &disk, &fill, &url);

    // 2. A start on a full disk: sled must write to open (it zeroes the
    // rest of its log segment, then writes a snapshot), which the ballast
    // makes room for.
    d.stop();
    let fill = disk.fill("fill", 0);
    assert_eq!(disk.free_bytes(), 0, "the disk is not full");
    d.restart();
    assert!(!ballast(&data).exists());
    assert!(
        d.log().contains("released the ballast"),
        "the start must say it released the ballast:\n{}",
        d.log()
    );
    serves_reads_and_refuses_writes(&d, &url, &kept, b"after the space came back");

    // 3. Space comes back: writes are taken again and the ballast is made again.
    let last = call_after_space(&d, &disk, &fill, &url);
    let (code, out) = d.output(&last);
    assert_eq!(
        (code, out.as_slice()),
        (200, &b"after the space came back"[..])
    );
    assert!(ballast(&data).exists());
    d.finish();
}

/// Removes `fill`, waits until the daemon takes writes and has its ballast
/// again, and makes a call that finishes; returns its id.
fn call_after_space(d: &Daemon, disk: &Tmpfs, fill: &Path, url: &str) -> String {
    std::fs::remove_file(fill).expect("remove the fill");
    d.wait_until(30, "/healthz to recover", || {
        let (code, h) = d.health();
        code == 200 && h["Store"] == "ok"
    });
    d.wait_until(30, "the ballast to be made again", || {
        ballast(&d.data_dir()).exists()
    });
    let (code, body) = d.curl(&["--data-binary", "after the space came back", url]);
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let id = v["CallId"].as_str().expect("CallId").to_string();
    d.wait_until(60, "the call after the space came back to finish", || {
        d.call_record(&id).1["State"] == "FINISHED"
    });
    assert!(disk.free_bytes() > 0);
    id
}

/// What the function of the storage-opt test does: tries to write 256 MiB
/// to its root, says it is done, waits until the test lets it go, and
/// exits with the write's status.
const ROOT_WRITER: &str = "cat >/dev/null; \
    dd if=/dev/zero of=/fill bs=1048576 count=256; r=$?; \
    echo root=$r size=$(wc -c </fill); touch /dev/shm/written; \
    i=0; while [ ! -e /dev/shm/go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; \
    exit $r";

#[test]
fn on_an_engine_whose_driver_has_quotas_auto_caps_the_writable_layer_cold_and_warm() {
    let engine = PrivateEngine::start_on_btrfs();
    let data_root = engine.dir.join("data");
    let mut d = Daemon::start_with(&format!(
        "\n[docker]\nsocket = \"{}\"\n[container]\nnetwork_mode = \"none\"\nfirewall = false\ndisk_bytes = {CAP}\n[pool]\nper_function = 1",
        engine.host
    ));
    d.create("writer", &[IMAGE, "sh", "-c", ROOT_WRITER]);
    let on_engine = |args: &[&str]| -> (bool, String) {
        let out = Command::new("docker")
            .args(["-H", &engine.host])
            .args(args)
            .output()
            .expect("docker CLI");
        (out.status.success(), stdout(&out).trim().to_string())
    };
    let run = |warm: Option<&str>| {
        let before = free_bytes(&data_root);
        let id = d.call("writer", b"");
        let name = format!("hyperfuncd-{id}");
        let mut cid = String::new();
        d.wait_until(120, "the writer's container to have written", || {
            let (_, c) = on_engine(&["ps", "-q", "--filter", &format!("name={name}")]);
            cid = c;
            !cid.is_empty() && on_engine(&["exec", &cid, "test", "-e", "/dev/shm/written"]).0
        });
        if let Some(w) = warm {
            assert!(
                w.starts_with(&cid) || cid.starts_with(w),
                "{cid} is not the warm {w}"
            );
        }
        let host = on_engine(&[
            "inspect",
            "-f",
            "{{.HostConfig.ReadonlyRootfs}} {{json .HostConfig.StorageOpt}} {{json .HostConfig.Tmpfs}} {{len .Mounts}}",
            &cid,
        ])
        .1;
        assert_eq!(host, format!(r#"false {{"size":"{CAP}"}} null 0"#));
        let _ = Command::new("sync").status();
        let after = free_bytes(&data_root);
        eprintln!("writer {id}: engine data root free {before} -> {after} bytes");
        assert!(
            before.saturating_sub(after) < CAP + 32 * MIB,
            "the Engine's disk lost {} bytes to a call capped at {CAP}",
            before.saturating_sub(after)
        );
        assert!(on_engine(&["exec", &cid, "touch", "/dev/shm/go"]).0);
        d.wait_until(60, "the writer's call to end", || {
            d.call_record(&id).1["State"] == "FAILED"
        });
        let (_, call) = d.call_record(&id);
        let err = call["ShortStderr"].as_str().unwrap_or("");
        assert!(err.contains("Disk quota exceeded"), "{call}");
        let out = d.ok(&["func", "logs", "--callid", &id, "writer"]);
        let size: u64 = out
            .split("size=")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no size in {out}"));
        assert!((CAP / 2..=CAP).contains(&size), "wrote {size} bytes: {out}");
    };
    run(None);
    assert!(
        d.log()
            .contains("call containers get a writable layer of [container] disk_bytes"),
        "{}",
        d.log()
    );
    let mut warm = String::new();
    d.wait_until(60, "a warm container", || {
        let (_, w) = on_engine(&["ps", "-q", "--filter", "label=io.hyperfuncd.pool=writer"]);
        warm = w;
        !warm.is_empty()
    });
    run(Some(&warm));
    d.ok(&["func", "rm", "writer"]);
    d.stop();
    assert_eq!(engine.containers(&d.instance), Vec::<String>::new());
}
