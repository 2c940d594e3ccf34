//! VM-like isolation (DESIGN 4): calls under gVisor (`runsc`), cold and warm,
//! on a private dockerd that registers it; the shared Engine is never
//! reconfigured. gVisor is seen from inside the container: its `dmesg` starts
//! with "Starting gVisor" and its kernel is not the host's.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Says on STDERR which kernel answers (the call record keeps its first 255
/// bytes: the kernel's release, then the first line of its log, which
/// gVisor's is "Starting gVisor..."), then echoes the payload.
const PROBE: &str = "echo kernel=$(uname -r) >&2; dmesg 2>&1 | head -n 1 >&2; exec cat";

/// The Debian package's binary (`scripts/deps` installs it).
fn runsc() -> &'static str {
    ["/usr/bin/runsc", "/usr/sbin/runsc", "/usr/local/bin/runsc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("runsc is not installed (scripts/deps installs Debian's runsc)")
}

/// The private dockerd's daemon.json: runsc registered. That dockerd runs in
/// its own network namespace (`unshare --net`), where runsc refuses to start
/// a sandbox with networking ("cannot run with network enabled in root
/// network namespace"); call containers have network mode `none` anyway.
fn daemon_json() -> String {
    format!(
        r#"{{"runtimes": {{"runsc": {{"path": "{}", "runtimeArgs": ["--network=none"]}}}}}}"#,
        runsc()
    )
}

/// hyperfuncd on `engine`, with runsc as the default runtime.
fn daemon_on(engine: &PrivateEngine, extra: &str) -> Daemon {
    Daemon::start_with(&format!(
        "[docker]\nsocket = \"{}\"\n[container]\nnetwork_mode = \"none\"\nruntime = \"runsc\"\n{extra}",
        engine.host
    ))
}

fn inspect(d: &Daemon, name: &str) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["func", "inspect", name])).expect("inspect JSON")
}

/// Waits for the call to end; returns its record.
fn ended(d: &Daemon, id: &str) -> serde_json::Value {
    d.wait_until(120, "the call to end", || {
        let (_, c) = d.call_record(id);
        c["State"] == "FINISHED" || c["State"] == "FAILED"
    });
    d.call_record(id).1
}

/// Runs a call of `function` with `payload`; checks it finished with the
/// payload byte-exact on STDOUT and returns its STDERR (the probe's lines).
fn probe(d: &Daemon, function: &str, payload: &[u8]) -> String {
    let id = d.call(function, payload);
    let call = ended(d, &id);
    assert_eq!(call["State"], "FINISHED", "{call}\n{}", d.log());
    let (code, out) = d.output(&id);
    assert_eq!(code, 200);
    assert!(
        out == payload,
        "{function}: output differs from the payload ({} bytes, {} expected)",
        out.len(),
        payload.len()
    );
    call["ShortStderr"].as_str().unwrap_or_default().to_string()
}

fn host_kernel() -> String {
    let out = Command::new("uname").arg("-r").output().expect("uname");
    stdout(&out).trim().to_string()
}

/// Ids of `instance`'s idle warm containers of `function` on `engine`.
fn warm(engine: &PrivateEngine, instance: &str, function: &str) -> Vec<String> {
    engine
        .docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=io.hyperfuncd.instance={instance}"),
            "--filter",
            &format!("label=io.hyperfuncd.pool={function}"),
            "--filter",
            "name=hyperfuncd-pool-",
        ])
        .lines()
        .map(str::to_string)
        .collect()
}

fn container_runtime(engine: &PrivateEngine, id: &str) -> String {
    engine
        .docker(&["inspect", "-f", "{{.HostConfig.Runtime}}", id])
        .trim()
        .to_string()
}

/// Stops `d` and checks it left no container on `engine`.
fn stop_clean(mut d: Daemon, engine: &PrivateEngine) {
    d.stop();
    let left = engine.containers(&d.instance);
    assert!(left.is_empty(), "containers left: {left:?}");
}

#[test]
fn calls_run_under_gvisor_cold_and_warm_and_runc_stays_available() {
    let engine = PrivateEngine::start_with_config(&daemon_json());
    let host = host_kernel();
    // Large enough to go through a payload file, with every byte value.
    let payload = random_bytes(100 * 1024);

    // Cold: no pool.
    let d = daemon_on(&engine, "");
    d.create("gv", &[IMAGE, "sh", "-c", PROBE]);
    d.create("plain", &["--runtime", "runc", IMAGE, "sh", "-c", PROBE]);
    // The effective runtime, also when it is the config's default.
    assert_eq!(inspect(&d, "gv")["Runtime"], "runsc");
    assert_eq!(inspect(&d, "plain")["Runtime"], "runc");

    let seen = probe(&d, "gv", &payload);
    assert!(
        seen.contains("Starting gVisor"),
        "cold: not gVisor: {seen:?}"
    );
    assert!(!seen.contains(&format!("kernel={host}")), "{seen:?}");
    let seen = probe(&d, "plain", &payload);
    assert!(!seen.contains("gVisor"), "runc: gVisor after all: {seen:?}");
    assert!(seen.contains(&format!("kernel={host}")), "runc: {seen:?}");

    // The hardening of DESIGN 4 holds under runsc: the Engine's own view of
    // a running call container.
    d.create("held", &["--memory", "64m", IMAGE, "sleep", "60"]);
    let id = d.call("held", b"");
    let name = format!("hyperfuncd-{id}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let hc = loop {
        let out = Command::new("docker")
            .args(["-H", &engine.host, "inspect", "-f", "{{json .}}", &name])
            .output()
            .expect("docker inspect");
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
            if v["State"]["Running"] == true {
                break v["HostConfig"].clone();
            }
        }
        assert!(Instant::now() < deadline, "the call's container never ran");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(hc["Runtime"], "runsc", "{hc}");
    assert_eq!(hc["SecurityOpt"], serde_json::json!(["no-new-privileges"]));
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(hc["Memory"], 64 << 20);
    assert_eq!(hc["MemorySwap"], 64 << 20);
    assert!(hc["PidsLimit"].as_i64().is_some_and(|p| p > 0), "{hc}");
    assert_eq!(hc["LogConfig"]["Type"], "none");
    assert_eq!(hc["NetworkMode"], "none");
    d.ok(&["func", "rm", "--force", "held"]);
    d.wait_until(60, "the killed call's container to be removed", || {
        engine.containers(&d.instance).is_empty()
    });
    stop_clean(d, &engine);

    // Warm: each pool container is made under its function's runtime and
    // serves a call of that runtime only.
    let d = daemon_on(&engine, "[pool]\nper_function = 1");
    d.create("gv", &[IMAGE, "sh", "-c", PROBE]);
    d.create("plain", &["--runtime", "runc", IMAGE, "sh", "-c", PROBE]);
    // The pool warms a function once it has been called: one cold call each.
    probe(&d, "gv", &payload);
    probe(&d, "plain", &payload);
    d.wait_until(120, "a warm container per function", || {
        warm(&engine, &d.instance, "gv").len() == 1
            && warm(&engine, &d.instance, "plain").len() == 1
    });
    let gv = warm(&engine, &d.instance, "gv").remove(0);
    assert_eq!(container_runtime(&engine, &gv), "runsc");
    assert_eq!(
        container_runtime(&engine, &warm(&engine, &d.instance, "plain")[0]),
        "runc"
    );
    let events = EngineEvents::start(&d.instance, Some(&engine.host));
    let seen = probe(&d, "gv", &payload);
    assert!(
        seen.contains("Starting gVisor"),
        "warm: not gVisor: {seen:?}"
    );
    // It was the warm container: it is gone, and no call container of gv
    // was started for the call (refills carry no call label).
    d.wait_until(30, "the used warm container to be removed", || {
        !engine.docker(&["ps", "-aq", "--no-trunc"]).contains(&gv)
    });
    assert!(
        events.starts("gv").iter().all(String::is_empty),
        "a cold container served the warm call: {:?}",
        events.all()
    );
    let seen = probe(&d, "plain", &payload);
    assert!(!seen.contains("gVisor"), "warm runc: {seen:?}");
    assert!(
        seen.contains(&format!("kernel={host}")),
        "warm runc: {seen:?}"
    );

    // A runtime change: the old runtime's warm containers serve no call.
    d.wait_until(120, "gv's pool to be refilled", || {
        warm(&engine, &d.instance, "gv").len() == 1
    });
    let old = warm(&engine, &d.instance, "gv").remove(0);
    let out = d.ok(&["func", "update", "gv", "--runtime", "runc"]);
    assert!(out.starts_with("gv is updated"), "{out}");
    assert_eq!(inspect(&d, "gv")["Runtime"], "runc");
    d.wait_until(120, "gv's pool to be remade under runc", || {
        let now = warm(&engine, &d.instance, "gv");
        now.len() == 1 && now[0] != old && container_runtime(&engine, &now[0]) == "runc"
    });
    let seen = probe(&d, "gv", &payload);
    assert!(!seen.contains("gVisor"), "after the update: {seen:?}");
    // And back to the default: runsc again.
    d.ok(&["func", "update", "gv", "--runtime", "default"]);
    assert_eq!(inspect(&d, "gv")["Runtime"], "runsc");
    let seen = probe(&d, "gv", &payload);
    assert!(
        seen.contains("Starting gVisor"),
        "back to default: {seen:?}"
    );
    drop(events);
    stop_clean(d, &engine);
}

/// A runtime the Engine has not registered is refused at create, at update
/// and at start, with the runtimes the Engine has. On the shared Engine:
/// nothing here registers or runs anything.
#[test]
fn unknown_runtimes_are_refused_with_the_engines_list() {
    let d = Daemon::start();
    let out = d.cli(&[
        "func",
        "create",
        "--name",
        "nope",
        "--runtime",
        "nosuch",
        IMAGE,
        "cat",
    ]);
    assert_cli_error(&out, "OCI runtime \"nosuch\" is not registered");
    assert!(stderr(&out).contains("runc"), "the list: {}", stderr(&out));
    let out = d.cli(&[
        "func",
        "create",
        "--name",
        "nope",
        "--runtime",
        "../x",
        IMAGE,
        "cat",
    ]);
    assert_cli_error(&out, "invalid runtime name");
    let (code, _) = d.api("/v1/functions/nope");
    assert_eq!(code, 404, "nothing was stored");

    d.create("ok", &[IMAGE, "cat"]);
    // No runtime anywhere: the Engine's default.
    assert_eq!(inspect(&d, "ok")["Runtime"], "runc");
    let out = d.cli(&["func", "update", "ok", "--runtime", "nosuch"]);
    assert_cli_error(&out, "(it has: ");
    assert_eq!(inspect(&d, "ok")["Runtime"], "runc");
    d.finish();

    // At start: the config's default must be registered.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[container]\nruntime = \"nosuch\"\n",
            dir.path().join("data").display()
        ),
    )
    .expect("config");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hyperfuncd serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started with an unregistered runtime");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    assert_cli_error(
        &out,
        "[container] runtime: OCI runtime \"nosuch\" is not registered",
    );
    assert!(stderr(&out).contains("runc"), "{}", stderr(&out));
}
