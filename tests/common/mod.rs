//! Test helpers shared by every integration test: the real `hyperfuncd` binary
//! started on a private data dir and port, the CLI run against it, curl, and
//! the Docker Engine itself (the test image, the label checks).
#![allow(dead_code)]

pub mod nats;
pub mod scope;
pub mod watchdog;

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
    watchdog::arm();
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
    /// Extra environment of the `serve` process (e.g. `FAILPOINTS`).
    env: Vec<(String, String)>,
    /// The data dir: `dir/data` unless the test gives its own (a tmpfs).
    data: PathBuf,
    /// RLIMIT_NOFILE (soft and hard) of the `serve` process, if set.
    nofile: Option<u64>,
    /// The address it listens on (port 0 at first): 127.0.0.1 unless a
    /// test needs it reachable from elsewhere.
    listen_host: String,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with("")
    }

    /// Starts with extra TOML appended to the test config (sections allowed).
    pub fn start_with(extra_config: &str) -> Daemon {
        Daemon::launch(extra_config, &[], None)
    }

    /// Starts with extra config and extra environment variables for the
    /// `serve` process, e.g. `[("FAILPOINTS", "accept-committed=return")]`.
    pub fn start_with_env(extra_config: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::launch(extra_config, env, None)
    }

    /// Starts with its data dir at `data_dir` (e.g. a small tmpfs); the
    /// config and the daemon log stay in a private temporary dir.
    pub fn start_on(data_dir: &Path, extra_config: &str) -> Daemon {
        Daemon::launch(extra_config, &[], Some(data_dir.to_path_buf()))
    }

    /// Starts with extra config and the file descriptor limit (ulimit -n)
    /// of the `serve` process set to `nofile`.
    pub fn start_with_nofile(extra_config: &str, nofile: u64) -> Daemon {
        Daemon::launch_with(extra_config, &[], None, Some(nofile))
    }

    /// Starts listening on every address (`0.0.0.0`), so the daemon's port
    /// is on the host's other addresses too (the firewall test's namespace).
    pub fn start_on_all_addresses(extra_config: &str) -> Daemon {
        Daemon::launch_full(extra_config, &[], None, None, "0.0.0.0")
    }

    fn launch(extra_config: &str, env: &[(&str, &str)], data: Option<PathBuf>) -> Daemon {
        Daemon::launch_with(extra_config, env, data, None)
    }

    fn launch_with(
        extra_config: &str,
        env: &[(&str, &str)],
        data: Option<PathBuf>,
        nofile: Option<u64>,
    ) -> Daemon {
        Daemon::launch_full(extra_config, env, data, nofile, "127.0.0.1")
    }

    fn launch_full(
        extra_config: &str,
        env: &[(&str, &str)],
        data: Option<PathBuf>,
        nofile: Option<u64>,
        listen_host: &str,
    ) -> Daemon {
        test_image();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon {
            data: data.unwrap_or_else(|| dir.path().join("data")),
            dir,
            child: None,
            endpoint: String::new(),
            instance: String::new(),
            extra_config: extra_config.to_string(),
            env: Vec::new(),
            nofile,
            listen_host: listen_host.to_string(),
        };
        d.set_env(env);
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
        self.data.clone()
    }

    /// The environment of the next `serve` process started (replaces the
    /// previous one; `&[]` starts it with none).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    pub fn profile(&self) -> PathBuf {
        self.data_dir().join("admin-profile.toml")
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir().join("tls/cert.pem")
    }

    fn spawn(&mut self) {
        watchdog::arm();
        let config = self.dir.path().join("config.toml");
        // Keep the port across restarts so call URLs stay valid.
        let listen = match self.endpoint.rsplit(':').next() {
            Some(port) if !self.endpoint.is_empty() => format!("{}:{port}", self.listen_host),
            _ => format!("{}:0", self.listen_host),
        };
        let (top, sections) = split_top(&self.extra_config);
        let has_container = sections.contains("[container]");
        // The warm pool is on by default; only the tests about it want its
        // containers among those they count.
        let has_pool = sections.contains("[pool]");
        let text = format!(
            "listen = \"{listen}\"\ndata_dir = \"{}\"\n{top}\n{}{}{sections}\n",
            self.data_dir().display(),
            if has_container {
                ""
            } else {
                "[container]\nnetwork_mode = \"none\"\n"
            },
            if has_pool {
                ""
            } else {
                "[pool]\nper_function = 0\n"
            },
        );
        std::fs::write(&config, text).expect("write config");
        let mut serve = Command::new(BIN);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit(2) is async-signal-safe and touches only the child.
            unsafe {
                serve.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = serve
            .args(["serve", "--config"])
            .arg(&config)
            .env("HYPERFUNCD_LOG", "info,hyperfuncd=debug")
            // Failpoints only where a test sets them, never inherited.
            .env_remove("FAILPOINTS")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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

    /// A TLS connection to the daemon, trusting its CA, handshake done.
    pub fn tls_connect(
        &self,
    ) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        self.tls_connect_from(None)
            .expect("TLS handshake with the daemon")
    }

    /// A TCP connection to the daemon from `source` (a loopback address such
    /// as `127.0.0.7`, so a test can be several clients), or the default.
    pub fn tcp_connect_from(&self, source: Option<&str>) -> std::io::Result<std::net::TcpStream> {
        let target: std::net::SocketAddr = self.addr().parse().expect("daemon address");
        let Some(source) = source else {
            return std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10));
        };
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let src: std::net::SocketAddr = format!("{source}:0").parse().expect("source address");
        sock.bind(&src.into())?;
        sock.connect_timeout(&target.into(), Duration::from_secs(10))?;
        Ok(sock.into())
    }

    /// `tls_connect` from `source` (see `tcp_connect_from`); an error if the
    /// connection or the handshake fails (within 10 s).
    pub fn tls_connect_from(
        &self,
        source: Option<&str>,
    ) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
        let pem = std::fs::read(self.ca()).expect("CA");
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(cert.expect("CA PEM")).expect("CA cert");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
        let conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
        let tcp = self.tcp_connect_from(source)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        tls.sock.set_read_timeout(None)?;
        Ok(tls)
    }

    /// `127.0.0.1:PORT` of the daemon.
    pub fn addr(&self) -> String {
        self.endpoint
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The `serve` process's pid, for signals a test sends itself (SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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
            .env_remove("FAILPOINTS")
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

    /// What `hyperfuncd ARGS` (split on spaces) wrote on a pseudo-terminal:
    /// script(1) gives the CLI one and records what it wrote there.
    pub fn on_a_terminal(&self, args: &str) -> String {
        let out = Command::new("script")
            .args(["-qfec", &format!("{BIN} {args}"), "/dev/null"])
            .env("HYPERFUNC_PROFILE", self.profile())
            .env("HOME", self.dir.path())
            .env("TERM", "xterm")
            .env_remove("HYPERFUNC_ENDPOINT")
            .env_remove("HYPERFUNC_KEY")
            .env_remove("HYPERFUNC_CA")
            .stdin(Stdio::null())
            .output()
            .expect("script(1) from util-linux");
        assert!(out.status.success(), "{args}: {}", stderr(&out));
        stdout(&out)
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

    /// The counters of `function`, whoever owns it (names are per user: a
    /// tenant's function is found by its name when only one user has it).
    pub fn status(&self, function: &str) -> serde_json::Value {
        let q = self.owner_query(function);
        let (code, v) = self.api(&format!("/v1/functions/{function}/status{q}"));
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
                if a == "start" || a == "die" || a == "create" {
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
            } else if a == "die" {
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
    /// Runs in the caller's network namespace (one the test made, `NetNs`)
    /// with its iptables rules and a bridge, instead of an empty namespace
    /// of its own without them.
    here: bool,
    /// Its storage driver: `vfs`, or `btrfs` on a loop-mounted btrfs
    /// (`start_on_btrfs`), whose per-container quotas take `--storage-opt size`.
    driver: &'static str,
}

impl PrivateEngine {
    pub fn start() -> PrivateEngine {
        PrivateEngine::start_with_config("{}")
    }

    /// Starts one with `daemon_json` as its daemon.json (e.g. `runtimes`).
    pub fn start_with_config(daemon_json: &str) -> PrivateEngine {
        PrivateEngine::launch(daemon_json, false)
    }

    /// Starts one in the calling thread's network namespace, which must be
    /// one the test made (`NetNs::enter`), with the Engine's iptables rules
    /// and bridges there, as an Engine on a host has them.
    pub fn start_in(ns: &NetNs) -> PrivateEngine {
        assert!(ns.is_current(), "not in the test's network namespace");
        PrivateEngine::launch("{}", true)
    }

    /// Starts one whose data root is a 1 GiB btrfs loop-mounted for it (Debian's
    /// `btrfs-progs`), with the `btrfs` storage driver: one that takes
    /// `--storage-opt size` (overlay2 would need xfs project quotas, which
    /// this kernel lacks). Unmounted on drop with the rest.
    pub fn start_on_btrfs() -> PrivateEngine {
        PrivateEngine::launch_full("{}", false, "btrfs")
    }

    fn launch(daemon_json: &str, here: bool) -> PrivateEngine {
        PrivateEngine::launch_full(daemon_json, here, "vfs")
    }

    fn launch_full(daemon_json: &str, here: bool, driver: &'static str) -> PrivateEngine {
        test_image();
        let dir = PathBuf::from(format!("/tmp/hyperfuncd-engine-{}", std::process::id()));
        unmount_below(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("engine dir");
        std::fs::write(dir.join("daemon.json"), daemon_json).expect("daemon.json");
        let mut e = PrivateEngine {
            host: format!("unix://{}/docker.sock", dir.display()),
            dir,
            child: None,
            here,
            driver,
        };
        if driver == "btrfs" {
            require_root("a btrfs data root");
            let (image, data) = (e.dir.join("btrfs.img"), e.dir.join("data"));
            std::fs::create_dir_all(&data).expect("data root");
            let run = |cmd: &mut Command| {
                let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
                assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
            };
            run(Command::new("truncate").args(["-s", "1G"]).arg(&image));
            run(Command::new("mkfs.btrfs").arg("-q").arg(&image));
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&data));
        }
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
        // `here`: the test's namespace, where its iptables rules are the
        // test's too.
        let mut dockerd = if self.here {
            Command::new("dockerd")
        } else {
            let mut c = Command::new("unshare");
            c.args(["--net", "--", "dockerd"]);
            c
        };
        let iptables = if self.here { "true" } else { "false" };
        let child = dockerd
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
                &format!("--iptables={iptables}"),
                "--ip6tables=false",
            ])
            .args(["--storage-driver", self.driver])
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

    /// The docker CLI against this engine; panics unless it succeeds.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .args(["-H", &self.host])
            .args(args)
            .output()
            .expect("docker CLI");
        assert!(
            out.status.success(),
            "docker {args:?} on the private engine: {}",
            stderr(&out)
        );
        stdout(&out)
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
        unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Detaches every mount at or below `dir`, deepest first: dockerd leaves
/// its `--data-root` bind-mounted on itself, and removing the directory
/// would otherwise leave it behind.
fn unmount_below(dir: &std::path::Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    // Field 5 is the mount point; octal escapes do not occur in our paths.
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: umount2 on a NUL-terminated path we own; failure is ignored.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// Posts `payloads` to a call URL over one keep-alive connection per worker;
/// returns (payload index, call id) for every 202. A 429 is sent again
/// after its `Retry-After` (at most 5 s). Stops at the first connection
/// error (e.g. the daemon was killed) or when `stop` is set.
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
                    let resp = loop {
                        let Ok(resp) = client.post(&url).body(payloads[i].clone()).send().await
                        else {
                            stop.store(true, Ordering::SeqCst);
                            return acked;
                        };
                        // Over the URL's rate (or the owner's queue budget):
                        // a well-behaved client waits as told and sends again.
                        if resp.status().as_u16() != 429 || stop.load(Ordering::SeqCst) {
                            break resp;
                        }
                        let wait = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                            .unwrap_or(1)
                            .min(5);
                        tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
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
    /// Stops with SIGTERM (a clean stop) and starts again on the same port.
    pub fn restart_clean(&mut self) {
        self.stop();
        self.spawn();
    }

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

    /// `?owner=USER` for the one user owning a function `name`, if it is
    /// not the admin: what lets the admin address a tenant's function.
    pub fn owner_query(&self, name: &str) -> String {
        let (_, all) = self.api("/v1/functions");
        let owners: Vec<String> = all
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|f| f["Name"] == name)
                    .filter_map(|f| f["Owner"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        match owners.as_slice() {
            [one] if one != "admin" => format!("?owner={one}"),
            _ => String::new(),
        }
    }

    /// A function's record as `func inspect` shows it.
    /// A tenant's function is found as `owner_query` finds it.
    pub fn inspect(&self, name: &str) -> serde_json::Value {
        let target = match self.owner_query(name).strip_prefix("?owner=") {
            Some(owner) => format!("{owner}/{name}"),
            None => name.to_string(),
        };
        serde_json::from_str(&self.ok(&["func", "inspect", &target])).expect("inspect JSON")
    }
}

impl Daemon {
    /// Restarts (kill -9) with a new environment for `serve`; `&[]` drops
    /// the previous one (e.g. the failpoints).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.set_env(env);
        self.restart();
    }

    /// Waits up to `secs` for the daemon to exit by itself (e.g. a failpoint
    /// made it kill itself) and returns how it ended.
    pub fn wait_dead(&mut self, secs: u64) -> std::process::ExitStatus {
        self.wait_dead_within(secs).unwrap_or_else(|| {
            panic!(
                "hyperfuncd was still alive after {secs} s; daemon log:\n{}",
                self.log()
            )
        })
    }

    /// How the daemon ended if it exits by itself within `secs`; `None`
    /// if it still runs then.
    pub fn wait_dead_within(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let child = self.child.as_mut().expect("the daemon is not running");
            if let Some(status) = child.try_wait().expect("wait for hyperfuncd") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the kill -9 a `return` failpoint performs: the daemon died of
    /// SIGKILL by itself and its log names the failpoint.
    pub fn wait_failpoint(&mut self, name: &str, secs: u64) {
        use std::os::unix::process::ExitStatusExt;
        let status = self.wait_dead(secs);
        let log = self.log();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "failpoint {name}: hyperfuncd ended with {status}, not SIGKILL; log:\n{log}"
        );
        assert!(
            log.contains(&format!("failpoint {name} reached")),
            "hyperfuncd died, but its log does not say failpoint {name} was reached:\n{log}"
        );
    }

    /// `func create` as the user holding `key`; returns the call URL.
    pub fn create_as(&self, key: &str, name: &str, args: &[&str]) -> String {
        let mut all = vec!["func", "create", "--name", name];
        all.extend_from_slice(args);
        let out = self.cli_as(key, &all, None);
        assert!(out.status.success(), "{all:?}: {}", stderr(&out));
        let text = stdout(&out);
        let prefix = format!("{name} is created with the address of ");
        text.trim()
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("unexpected create output {text:?}"))
            .to_string()
    }

    /// A call's record from the management API: (status, JSON).
    pub fn call_record(&self, id: &str) -> (u16, serde_json::Value) {
        self.api(&format!("/v1/calls/{id}"))
    }

    /// `GET /v1/calls/ID/output` as admin: (status, raw body). A 200 takes
    /// the output away.
    pub fn output(&self, id: &str) -> (u16, Vec<u8>) {
        let auth = format!("Authorization: Bearer {}", self.admin_key());
        self.curl(&[
            "-H",
            &auth,
            &format!("{}/v1/calls/{id}/output", self.endpoint),
        ])
    }

    /// `GET /healthz`: (status, JSON).
    pub fn health(&self) -> (u16, serde_json::Value) {
        let (code, body) = self.curl(&[&format!("{}/healthz", self.endpoint)]);
        (
            code,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }
}

impl EngineEvents {
    /// Per call id: its function and how many times a container of it started.
    pub fn start_counts(&self) -> std::collections::HashMap<String, (String, usize)> {
        let mut counts = std::collections::HashMap::new();
        for (a, c, f) in self.all() {
            if a == "start" {
                counts.entry(c).or_insert((f, 0)).1 += 1;
            }
        }
        counts
    }
}

/// Random bytes (binary: NULs, newlines, anything), so that payloads are
/// unique and any mix-up between calls shows.
pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut b = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

/// `n` random payloads of varied sizes from 0 B to 64 KiB: one in ten empty,
/// two tiny (1-64 B), three up to 4 KiB, four from 4 KiB to 64 KiB.
pub fn mixed_payloads(n: usize) -> Vec<Vec<u8>> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|i| {
            let len = match i % 10 {
                0 => 0,
                1 | 2 => rng.gen_range(1..=64),
                3..=5 => rng.gen_range(65..=4096),
                _ => rng.gen_range(4097..=65536),
            };
            random_bytes(len)
        })
        .collect()
}

/// `n` random payloads with lengths in `sizes`.
pub fn sized_payloads(n: usize, sizes: std::ops::RangeInclusive<usize>) -> Vec<Vec<u8>> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| random_bytes(rng.gen_range(sizes.clone())))
        .collect()
}

/// What a test function does with its STDIN, for [`verdict`].
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Prints its STDIN back (`cat`): a FINISHED output is the call's payload.
    Echo,
    /// Prints these bytes whatever its STDIN.
    Prints(Vec<u8>),
    /// Never finishes: FAILED with a message containing one of these.
    Fails(Vec<String>),
}

/// What a test sent, for [`verdict`].
#[derive(Default)]
pub struct Ledger {
    pub functions: std::collections::HashMap<String, Behaviour>,
    /// Calls answered 202: call id -> (function, payload).
    pub acked: std::collections::HashMap<String, (String, Vec<u8>)>,
    /// (function, payload) sent without a 202 (the daemon died first, or it
    /// refused): such a call may exist, and then runs with these bytes.
    pub unacked: Vec<(String, Vec<u8>)>,
    /// Calls whose output a `get` may already have taken: 410 is fine.
    pub fetched: std::collections::HashSet<String>,
    /// The output cache may have rotated outputs out: 410 is fine for any call.
    pub evictable: bool,
    /// Functions that may have been removed: if one is gone, its calls are too.
    pub removable: std::collections::HashSet<String>,
}

impl Ledger {
    pub fn new(functions: &[(&str, Behaviour)]) -> Ledger {
        Ledger {
            functions: functions
                .iter()
                .map(|(f, b)| (f.to_string(), b.clone()))
                .collect(),
            ..Ledger::default()
        }
    }

    /// Records what `submit_all` answered for `payloads` sent to `function`.
    pub fn record(&mut self, function: &str, payloads: &[Vec<u8>], acked: &[(usize, String)]) {
        let mut answered = vec![false; payloads.len()];
        for (i, id) in acked {
            answered[*i] = true;
            let prev = self
                .acked
                .insert(id.clone(), (function.to_string(), payloads[*i].clone()));
            assert!(prev.is_none(), "call id {id} was handed out twice");
        }
        for (i, p) in payloads.iter().enumerate() {
            if !answered[i] {
                self.unacked.push((function.to_string(), p.clone()));
            }
        }
    }

    /// Posts `payloads` to `url` (a call URL of `function`) with `workers`
    /// keep-alive connections until done or the daemon dies; returns how
    /// many were acknowledged.
    pub fn submit(
        &mut self,
        ca: &Path,
        function: &str,
        url: &str,
        payloads: Vec<Vec<u8>>,
        workers: usize,
    ) -> usize {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = submit_all(ca, url, payloads.clone(), workers, stop);
        self.record(function, &payloads, &acked);
        acked.len()
    }

    pub fn acked_of(&self, function: &str) -> usize {
        self.acked.values().filter(|(f, _)| f == function).count()
    }
}

/// What [`verdict`] saw.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Final state of every acknowledged call still known (FINISHED/FAILED).
    pub states: std::collections::HashMap<String, String>,
    pub finished: usize,
    pub failed: usize,
    /// FINISHED calls whose output answered 410 (fetched or rotated out).
    pub gone: usize,
    /// Calls that ran although they were never acknowledged.
    pub unacked_ran: usize,
}

/// The one verdict after crashes: within `secs`, every call has ended; each
/// acknowledged call is FINISHED with exactly its own output (or 410 where
/// the ledger allows it) or FAILED with a reason; a call that ran without a
/// 202 ran with bytes that were sent; no call started twice; no function
/// holds more calls than were sent. Outputs are fetched (and so removed).
pub fn verdict(d: &Daemon, events: &EngineEvents, ledger: &Ledger, secs: u64) -> Verdict {
    use std::collections::{HashMap, HashSet};
    let mut live: Vec<&str> = Vec::new();
    for f in ledger.functions.keys() {
        let q = d.owner_query(f);
        let (code, v) = d.api(&format!("/v1/functions/{f}/status{q}"));
        match code {
            200 => live.push(f),
            404 if ledger.removable.contains(f) => {}
            _ => panic!("function {f}: {code} {v}"),
        }
    }
    let ended = |s: &serde_json::Value| {
        let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX);
        n("Pending") == 0 && n("Running") == 0 && n("Total") == n("Finished") + n("Failed")
    };
    d.wait_until(
        secs,
        "every call to end (none stuck PENDING or RUNNING)",
        || live.iter().all(|f| ended(&d.status(f))),
    );
    // docker events may trail the API by a moment.
    d.wait_until(30, "a die event for every container start", || {
        let all = events.all();
        all.iter().filter(|e| e.0 == "die").count() >= all.iter().filter(|e| e.0 == "start").count()
    });
    let starts = events.start_counts();
    for (id, (f, n)) in &starts {
        assert!(
            *n <= 1,
            "call {id} of {f} was started {n} times; daemon log:\n{}",
            d.log()
        );
    }

    let mut c = Checker {
        d,
        ledger,
        starts: &starts,
        seen: HashMap::new(),
        v: Verdict::default(),
    };
    // A removed function's calls go with it (a removal a crash interrupted
    // may finish in the background after the restart).
    let orphans: Vec<&String> = ledger
        .acked
        .iter()
        .filter(|(_, (f, _))| !live.contains(&f.as_str()))
        .map(|(id, _)| id)
        .collect();
    d.wait_until(60, "the removed functions' calls to be purged", || {
        orphans.iter().all(|id| d.call_record(id).0 == 404)
    });
    for (id, (f, payload)) in &ledger.acked {
        if !live.contains(&f.as_str()) {
            continue;
        }
        let (code, call) = d.call_record(id);
        assert_eq!(code, 200, "acknowledged call {id} of {f} was lost: {call}");
        assert_eq!(call["Function"], f.as_str(), "call {id}: {call}");
        let may_be_gone = ledger.evictable || ledger.fetched.contains(id);
        let state = c.check(id, &call, &[payload.as_slice()], may_be_gone);
        c.v.states.insert(id.clone(), state);
    }

    // Calls the Engine ran that no 202 announced: sent, but the daemon died
    // before answering. They must have run with bytes that were sent.
    let mut unacked: HashMap<&str, Vec<&[u8]>> = HashMap::new();
    for (f, p) in &ledger.unacked {
        unacked.entry(f.as_str()).or_default().push(p.as_slice());
    }
    let known: HashSet<&String> = ledger.acked.keys().collect();
    for (id, (f, _)) in &starts {
        if known.contains(id) || !live.contains(&f.as_str()) {
            continue;
        }
        let candidates = unacked.get(f.as_str()).cloned().unwrap_or_default();
        assert!(
            !candidates.is_empty(),
            "the Engine ran call {id} of {f}, which nobody sent"
        );
        let (code, call) = d.call_record(id);
        assert_eq!(
            code, 200,
            "the Engine ran call {id} of {f}, unknown to hyperfuncd: {call}"
        );
        c.check(id, &call, &candidates, ledger.evictable);
        c.v.unacked_ran += 1;
    }

    for f in &live {
        let total = d.status(f)["Total"].as_u64().unwrap_or(0) as usize;
        let acked = ledger.acked_of(f);
        let sent = acked + unacked.get(f).map_or(0, Vec::len);
        assert!(
            (acked..=sent).contains(&total),
            "function {f} holds {total} calls: {acked} were acknowledged, {sent} sent"
        );
    }
    let v = c.v;
    eprintln!(
        "verdict: {} acknowledged, {} finished ({} outputs gone), {} failed, {} ran without a 202",
        ledger.acked.len(),
        v.finished,
        v.gone,
        v.failed,
        v.unacked_ran
    );
    v
}

/// Checks one ended call for [`verdict`].
struct Checker<'a> {
    d: &'a Daemon,
    ledger: &'a Ledger,
    starts: &'a std::collections::HashMap<String, (String, usize)>,
    /// Outputs seen, to catch one call's bytes coming back as another's.
    seen: std::collections::HashMap<Vec<u8>, String>,
    v: Verdict,
}

impl Checker<'_> {
    /// `candidates`: the payloads this call may have been sent. Returns its state.
    fn check(
        &mut self,
        id: &str,
        call: &serde_json::Value,
        candidates: &[&[u8]],
        may_be_gone: bool,
    ) -> String {
        let f = call["Function"].as_str().unwrap_or("?").to_string();
        let behaviour = self
            .ledger
            .functions
            .get(&f)
            .unwrap_or_else(|| panic!("call {id} of an unexpected function: {call}"));
        let stdin = call["StdinBytes"].as_u64();
        assert!(
            candidates.iter().any(|p| Some(p.len() as u64) == stdin),
            "call {id} of {f} stored a STDIN of {stdin:?} bytes, not what was sent: {call}"
        );
        let started = self.starts.get(id).map_or(0, |(_, n)| *n);
        let state = call["State"].as_str().unwrap_or("").to_string();
        match state.as_str() {
            "FINISHED" => {
                assert!(
                    !matches!(behaviour, Behaviour::Fails(_)),
                    "call {id} of {f} cannot finish: {call}"
                );
                assert_eq!(
                    started, 1,
                    "FINISHED call {id} of {f}: the Engine saw {started} starts"
                );
                let (code, body) = self.d.output(id);
                match code {
                    200 => {
                        let own = match behaviour {
                            Behaviour::Prints(b) => body == *b,
                            _ => candidates.contains(&body.as_slice()),
                        };
                        assert!(
                            own,
                            "call {id} of {f}: an output of {} bytes that is not its own (STDIN {stdin:?} bytes): {call}",
                            body.len()
                        );
                        if matches!(behaviour, Behaviour::Echo) && body.len() >= 16 {
                            if let Some(other) = self.seen.insert(body, id.to_string()) {
                                panic!("calls {other} and {id} returned the same bytes");
                            }
                        }
                    }
                    410 if may_be_gone => self.v.gone += 1,
                    _ => panic!(
                        "FINISHED call {id} of {f}: its output answered {code} {}",
                        String::from_utf8_lossy(&body)
                    ),
                }
                self.v.finished += 1;
            }
            "FAILED" => {
                let msg = call["Message"].as_str().unwrap_or("");
                assert!(
                    !msg.trim().is_empty(),
                    "call {id} of {f} FAILED without a reason: {call}"
                );
                if let Behaviour::Fails(reasons) = behaviour {
                    assert!(
                        reasons.iter().any(|r| msg.contains(r.as_str())),
                        "call {id} of {f} FAILED with {msg:?}, expected one of {reasons:?}"
                    );
                }
                let (code, body) = self.d.output(id);
                assert_eq!(
                    code,
                    500,
                    "output of the FAILED call {id}: {}",
                    String::from_utf8_lossy(&body)
                );
                self.v.failed += 1;
            }
            other => panic!("call {id} of {f} is {other:?} after every call ended: {call}"),
        }
        state
    }
}

/// A network namespace of the test's own, entered by the calling thread
/// only (`unshare(CLONE_NEWNET)` acts on one thread): every process it
/// starts, every socket it opens lives there, with a loopback of its own;
/// the thread returns to the namespace it came from on drop, and the
/// namespace goes with the last process in it. Nothing done in it (routes,
/// iptables rules, listeners) reaches this machine's own network.
pub struct NetNs {
    /// The thread's namespace before, to return to.
    before: std::fs::File,
}

impl NetNs {
    pub fn enter() -> NetNs {
        require_root("a network namespace");
        let before = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        // SAFETY: unshare(2) with CLONE_NEWNET changes only this thread's
        // network namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let ns = NetNs { before };
        assert!(ns.is_current());
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Whether the calling thread is in this namespace (not the one it left).
    pub fn is_current(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let here = std::fs::metadata("/proc/thread-self/ns/net").expect("netns");
        let before = self.before.metadata().expect("netns");
        (here.dev(), here.ino()) != (before.dev(), before.ino())
    }

    /// `ip ARGS` in this namespace; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> String {
        self.run("ip", args)
    }

    /// `iptables -S [CHAIN]` (the filter table's rules) in this namespace.
    pub fn iptables_rules(&self) -> String {
        self.run("iptables", &["-w", "-S"])
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        assert!(self.is_current(), "not in the test's network namespace");
        let out = Command::new(program).args(args).output().expect(program);
        assert!(out.status.success(), "{program} {args:?}: {}", stderr(&out));
        stdout(&out)
    }

    /// Puts `addr` (CIDR) on a new interface `name` of this namespace: one
    /// end of a veth pair (this kernel may lack the dummy driver; an
    /// address of either is the host's own all the same).
    pub fn add_address(&self, name: &str, addr: &str) {
        let peer = format!("{name}p");
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        self.ip(&["addr", "add", addr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
        self.ip(&["link", "set", &peer, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: setns(2) on a namespace descriptor this struct owns,
        // for this thread only.
        unsafe {
            libc::setns(self.before.as_raw_fd(), libc::CLONE_NEWNET);
        }
    }
}

/// Fails the test, with the reason, unless it runs as root: a test that
/// passes because it could not run is a defect.
pub fn require_root(what: &str) {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what} needs root (it mounts a tmpfs); run the tests as root, as CI does"
    );
}

/// A tmpfs of a fixed size mounted on a private dir; unmounted on drop (also
/// when the test panics) — drop it after the daemon that uses it.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size_mib: u64) -> Tmpfs {
        Tmpfs::mount_with(&format!("size={size_mib}m"))
    }

    /// A tmpfs of `size_mib` MiB that holds at most `inodes` files and
    /// directories.
    pub fn mount_with_inodes(size_mib: u64, inodes: u64) -> Tmpfs {
        Tmpfs::mount_with(&format!("size={size_mib}m,nr_inodes={inodes}"))
    }

    fn mount_with(options: &str) -> Tmpfs {
        require_root("a tmpfs");
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount missing");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs: {}",
            stderr(&out)
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes an unprivileged writer could still allocate there.
    pub fn free_bytes(&self) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: statvfs(3) writes into the zeroed struct we own; the path is NUL-terminated.
        let st = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(path.as_ptr(), &mut st), 0, "statvfs");
            st
        };
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Allocates the file `name` so that about `leave` bytes stay free.
    pub fn fill(&self, name: &str, leave: u64) -> PathBuf {
        let file = self.path().join(name);
        let len = self.free_bytes().saturating_sub(leave);
        let out = Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(&file)
            .output()
            .expect("fallocate missing");
        assert!(out.status.success(), "fallocate: {}", stderr(&out));
        file
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            Command::new("umount")
                .args(if lazy { &["-l"][..] } else { &[][..] })
                .arg(self.dir.path())
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}
