//! Test helpers shared by every integration test: the real `hyperfuncd` binary
//! started on a private data dir and port, the CLI run against it, curl, and
//! the Docker Engine itself (the test image, the label checks).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const IMAGE: &str = "hyperfuncd-test/busybox:latest";
pub const BIN: &str = env!("CARGO_BIN_EXE_hyperfuncd");

/// Builds the test image once per test process: `FROM scratch` plus the static
/// busybox of Debian's busybox-static (no registry is reachable).
pub fn test_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is not installed (apt-get install busybox-static)");
        let ctx = tempfile::tempdir().expect("tempdir");
        std::fs::copy(busybox, ctx.path().join("busybox")).expect("copy busybox");
        std::fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\n",
        )
        .expect("write Dockerfile");
        let out = Command::new("docker")
            .args(["build", "-q", "-t", IMAGE])
            .arg(ctx.path())
            .output()
            .expect("docker CLI missing");
        assert!(
            out.status.success(),
            "cannot build the test image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    IMAGE
}

/// A running `hyperfuncd serve` on its own data dir and port.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub endpoint: String,
    pub instance: String,
    extra_config: String,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with("")
    }

    /// Starts with extra TOML appended to the test config (sections allowed).
    pub fn start_with(extra_config: &str) -> Daemon {
        test_image();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon {
            dir,
            child: None,
            endpoint: String::new(),
            instance: String::new(),
            extra_config: extra_config.to_string(),
        };
        d.spawn();
        let health = d.curl_json(&["-s", &format!("{}/healthz", d.endpoint)]);
        assert_eq!(
            health["Engine"],
            "up",
            "the Docker Engine must answer for these tests: {health}\n{}",
            d.log()
        );
        d
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn profile(&self) -> PathBuf {
        self.data_dir().join("admin-profile.toml")
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir().join("tls/cert.pem")
    }

    fn spawn(&mut self) {
        let config = self.dir.path().join("config.toml");
        // Keep the port across restarts so call URLs stay valid.
        let listen = match self.endpoint.rsplit(':').next() {
            Some(port) if !self.endpoint.is_empty() => format!("127.0.0.1:{port}"),
            _ => "127.0.0.1:0".to_string(),
        };
        let (top, sections) = split_top(&self.extra_config);
        let has_container = sections.contains("[container]");
        let text = format!(
            "listen = \"{listen}\"\ndata_dir = \"{}\"\n{top}\n{}{sections}\n",
            self.data_dir().display(),
            if has_container {
                ""
            } else {
                "[container]\nnetwork_mode = \"none\"\n"
            },
        );
        std::fs::write(&config, text).expect("write config");
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("HYPERFUNCD_LOG", "info,hyperfuncd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("daemon.log"))
                    .expect("daemon log"),
            ))
            .spawn()
            .expect("start hyperfuncd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("hyperfuncd did not start; log:\n{}", self.log()));
        // "hyperfuncd listening on https://127.0.0.1:PORT; admin profile written to ..."
        let url = line
            .split_whitespace()
            .nth(3)
            .expect("listening line")
            .trim_end_matches(';')
            .to_string();
        self.endpoint = url;
        self.child = Some(child);
        let health = self.curl_json(&["-s", &format!("{}/healthz", self.endpoint)]);
        self.instance = health["Instance"].as_str().expect("instance").to_string();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// kill -9: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("hyperfuncd did not stop on SIGTERM within 20 s");
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Runs the CLI against this daemon with its admin profile.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.run_cli(args, stdin, None)
    }

    /// The CLI with this daemon's admin profile, and `key` (via the env,
    /// which overrides the profile) if given.
    fn run_cli(&self, args: &[&str], stdin: Option<&[u8]>, key: Option<&str>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("HYPERFUNC_PROFILE", self.profile())
            .env("HOME", self.dir.path())
            .env_remove("HYPERFUNC_ENDPOINT")
            .env_remove("HYPERFUNC_KEY")
            .env_remove("HYPERFUNC_CA")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        if let Some(k) = key {
            cmd.env("HYPERFUNC_KEY", k);
        }
        let mut child = cmd.spawn().expect("run hyperfuncd CLI");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            let input = input.to_vec();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        child.wait_with_output().expect("CLI output")
    }

    /// Runs the CLI and returns stdout, failing the test on a non-zero exit.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "hyperfuncd {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `func call` with a payload; returns the call id.
    pub fn call(&self, name: &str, payload: &[u8]) -> String {
        let out = self.cli_stdin(&["func", "call", name], Some(payload));
        assert!(
            out.status.success(),
            "call failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .strip_prefix("CallId: ")
            .unwrap_or_else(|| panic!("unexpected call output {text:?}"))
            .to_string()
    }

    /// `func create`; returns the call URL.
    pub fn create(&self, name: &str, args: &[&str]) -> String {
        let mut all = vec!["func", "create", "--name", name];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        let prefix = format!("{name} is created with the address of ");
        out.trim()
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("unexpected create output {out:?}"))
            .to_string()
    }

    /// curl with this daemon's CA; returns (status, body).
    pub fn curl(&self, args: &[&str]) -> (u16, Vec<u8>) {
        let out = Command::new("curl")
            .arg("--cacert")
            .arg(self.ca())
            .args(["-s", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl missing");
        let mut body = out.stdout;
        let pos = body.iter().rposition(|&b| b == b'\n').expect("status line");
        let code = String::from_utf8_lossy(&body[pos + 1..])
            .parse()
            .expect("status");
        body.truncate(pos);
        (code, body)
    }

    pub fn curl_json(&self, args: &[&str]) -> serde_json::Value {
        let (_, body) = self.curl(args);
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body)))
    }

    /// Containers of this daemon that exist on the Engine right now.
    pub fn containers(&self, running_only: bool) -> Vec<String> {
        self.ps(if running_only { &[] } else { &["-a"] })
    }

    /// Ids of this daemon's containers that `docker ps` lists with `args`.
    pub fn ps(&self, args: &[&str]) -> Vec<String> {
        let filter = format!("label=io.hyperfuncd.instance={}", self.instance);
        let out = Command::new("docker")
            .args(["ps", "-q", "--filter", filter.as_str()])
            .args(args)
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits until `f` holds, up to `secs`.
    pub fn wait_until(&self, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}; daemon log:\n{}", self.log());
    }

    /// Stops the daemon and checks it left no container behind.
    pub fn finish(mut self) {
        self.wait_until(30, "this daemon's containers to be removed", || {
            self.containers(false).is_empty()
        });
        self.stop();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // A failed test must not leave containers on the shared Engine.
        if !self.instance.is_empty() {
            let ids = self.containers(false);
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

/// Splits extra config into top-level keys and `[section]` tables, since
/// top-level keys must come before the first table.
fn split_top(extra: &str) -> (String, String) {
    match extra
        .find("\n[")
        .or_else(|| extra.starts_with('[').then_some(0))
    {
        Some(i) => (extra[..i].to_string(), extra[i..].to_string()),
        None => (extra.to_string(), String::new()),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a CLI failure with a single `error:` line.
pub fn assert_cli_error(o: &Output, contains: &str) {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line expected: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    assert!(
        lines[0].contains(contains),
        "{err:?} should mention {contains:?}"
    );
}

impl Daemon {
    /// Adds a user (as admin) and returns its key, parsed the way the README
    /// tells scripts to: the last line of stdout.
    pub fn add_user(&self, name: &str, max_concurrency: u32) -> String {
        let out = self.ok(&[
            "user",
            "add",
            name,
            "--max-concurrency",
            &max_concurrency.to_string(),
        ]);
        out.lines().last().expect("key line").trim().to_string()
    }

    /// Runs the CLI as the user holding `key` (the env overrides the profile's key).
    pub fn cli_as(&self, key: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.run_cli(args, stdin, Some(key))
    }

    pub fn admin_key(&self) -> String {
        let profile = std::fs::read_to_string(self.profile()).expect("profile");
        profile
            .lines()
            .find_map(|l| l.strip_prefix("key = "))
            .expect("key in profile")
            .trim_matches('"')
            .to_string()
    }

    /// GET a management API path as admin; returns (status, JSON or null).
    pub fn api(&self, path: &str) -> (u16, serde_json::Value) {
        let auth = format!("Authorization: Bearer {}", self.admin_key());
        let (code, body) = self.curl(&["-H", &auth, &format!("{}{path}", self.endpoint)]);
        (
            code,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    pub fn status(&self, function: &str) -> serde_json::Value {
        let (code, v) = self.api(&format!("/v1/functions/{function}/status"));
        assert_eq!(code, 200, "status of {function}: {v}");
        v
    }
}

/// `docker events` for one daemon's containers, recorded in order. Observes
/// the Engine itself, not hyperfuncd's own counters; it keeps recording
/// while hyperfuncd is killed and restarted.
pub struct EngineEvents {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
}

impl EngineEvents {
    pub fn start(instance: &str, docker_host: Option<&str>) -> EngineEvents {
        let mut cmd = Command::new("docker");
        if let Some(h) = docker_host {
            cmd.args(["-H", h]);
        }
        let mut child = cmd
            .args(["events", "--filter", &format!("label=io.hyperfuncd.instance={instance}")])
            .args(["--filter", "event=start", "--filter", "event=die", "--filter", "event=destroy", "--filter", "event=create"])
            .args([
                "--format",
                "{{.Action}} {{index .Actor.Attributes \"io.hyperfuncd.call\"}} {{index .Actor.Attributes \"io.hyperfuncd.function\"}} {{.TimeNano}} {{.Actor.ID}}",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker events");
        let stdout = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut p = line.split_whitespace().map(str::to_string);
                let (Some(a), Some(c), Some(f)) = (p.next(), p.next(), p.next()) else {
                    continue;
                };
                eprintln!("engine event: {line}");
                if a == "start" || a == "die" {
                    sink.lock().unwrap().push((a, c, f));
                }
            }
        });
        // docker events only reports what happens after it has subscribed.
        std::thread::sleep(Duration::from_millis(500));
        EngineEvents { child, lines }
    }

    /// (action, call id, function) in Engine order.
    pub fn all(&self) -> Vec<(String, String, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// Call ids in the order their containers started.
    pub fn starts(&self, function: &str) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|(a, _, f)| a == "start" && f == function)
            .map(|(_, c, _)| c)
            .collect()
    }

    /// The most containers of `function` running at once.
    pub fn max_running(&self, function: &str) -> usize {
        let mut running = std::collections::HashSet::new();
        let mut max = 0;
        for (a, c, f) in self.all() {
            if f != function {
                continue;
            }
            if a == "start" {
                running.insert(c);
            } else {
                running.remove(&c);
            }
            max = max.max(running.len());
        }
        max
    }
}

impl Drop for EngineEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private dockerd on its own socket and data root, for Engine-fault tests:
/// the shared Engine is never stopped.
pub struct PrivateEngine {
    pub dir: PathBuf,
    pub host: String,
    child: Option<Child>,
}

impl PrivateEngine {
    pub fn start() -> PrivateEngine {
        test_image();
        let dir = PathBuf::from(format!("/tmp/hyperfuncd-engine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("engine dir");
        std::fs::write(dir.join("daemon.json"), "{}").expect("daemon.json");
        let mut e = PrivateEngine {
            host: format!("unix://{}/docker.sock", dir.display()),
            dir,
            child: None,
        };
        e.up();
        let save = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker save {IMAGE} | docker -H {} load -q",
                e.host
            ))
            .output()
            .expect("docker save | load");
        assert!(
            save.status.success(),
            "cannot load the test image: {}",
            stderr(&save)
        );
        e
    }

    /// Starts dockerd (again) on the same data root.
    pub fn up(&mut self) {
        let d = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .expect("dockerd log");
        // Its own network namespace: a dockerd started with --bridge=none
        // deletes the host's docker0, which would break the shared Engine.
        let child = Command::new("unshare")
            .args(["--net", "--", "dockerd"])
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args([
                "-H",
                &self.host,
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
            ])
            .args(["--storage-driver", "vfs"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("unshare or dockerd missing");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if Command::new("docker")
                .args(["-H", &self.host, "info"])
                .output()
                .is_ok_and(|o| o.status.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "private dockerd did not start: {}",
            std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
        );
    }

    /// kill -9 of the private dockerd only.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Running containers of `instance` on this engine.
    pub fn running(&self, instance: &str) -> usize {
        let out = Command::new("docker")
            .args([
                "-H",
                &self.host,
                "ps",
                "-q",
                "--filter",
                &format!("label=io.hyperfuncd.instance={instance}"),
            ])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Containers of `instance` on this engine.
    pub fn containers(&self, instance: &str) -> Vec<String> {
        let out = Command::new("docker")
            .args([
                "-H",
                &self.host,
                "ps",
                "-aq",
                "--filter",
                &format!("label=io.hyperfuncd.instance={instance}"),
            ])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "docker -H {h} rm -f $(docker -H {h} ps -aq) 2>/dev/null",
                    h = self.host
                ))
                .output();
            if let Some(c) = &self.child {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGTERM);
                }
            }
            if let Some(mut c) = self.child.take() {
                let _ = c.wait();
            }
        }
        // Whatever outlived it (containerd, shims) names the private dir.
        let _ = Command::new("pkill")
            .args(["-9", "-f", &self.dir.display().to_string()])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Posts `payloads` to a call URL over one keep-alive connection per worker;
/// returns (payload index, call id) for every 202. Stops at the first
/// connection error (e.g. the daemon was killed) or when `stop` is set.
pub fn submit_all(
    ca: &Path,
    url: &str,
    payloads: Vec<Vec<u8>>,
    workers: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(usize, String)> {
    use std::sync::atomic::Ordering;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pem = std::fs::read(ca).expect("CA");
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA pem"))
        .build()
        .expect("client");
    let payloads = std::sync::Arc::new(payloads);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (client, payloads, next, stop, url) = (
                client.clone(),
                payloads.clone(),
                next.clone(),
                stop.clone(),
                url.to_string(),
            );
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= payloads.len() || stop.load(Ordering::SeqCst) {
                        return acked;
                    }
                    let Ok(resp) = client.post(&url).body(payloads[i].clone()).send().await else {
                        stop.store(true, Ordering::SeqCst);
                        return acked;
                    };
                    if resp.status().as_u16() != 202 {
                        continue;
                    }
                    let Ok(v) = resp.json::<serde_json::Value>().await else {
                        continue;
                    };
                    if let Some(id) = v["CallId"].as_str() {
                        acked.push((i, id.to_string()));
                    }
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    })
}

impl Daemon {
    /// Restarts (kill -9) with different extra config.
    pub fn restart_with(&mut self, extra_config: &str) {
        self.extra_config = extra_config.to_string();
        self.restart();
    }

    /// (current, peak) resident memory of the daemon in KiB, from /proc.
    pub fn rss_kib(&self) -> (u64, u64) {
        let pid = self.child.as_ref().expect("daemon running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// A function's record as `func inspect` shows it.
    pub fn inspect(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["func", "inspect", name])).expect("inspect JSON")
    }
}
