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
            .env("HYPERFUNCD_LOG", "info")
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
        assert_eq!(
            health["Engine"], "up",
            "the Docker Engine must answer for these tests"
        );
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
        let filter = format!("label=io.hyperfuncd.instance={}", self.instance);
        let mut args = vec!["ps", "-q", "--filter", filter.as_str()];
        if !running_only {
            args.push("-a");
        }
        let out = Command::new("docker")
            .args(&args)
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
