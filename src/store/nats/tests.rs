//! The NATS backend against a real `nats-server` (JetStream, one server,
//! scripts/deps installs it), for what needs no daemon around it.

use super::*;
use crate::model::{FunctionSpec, Secret};
use std::process::{Child, Command, Stdio};

/// A `nats-server -js` on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(dir: tempfile::TempDir) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path().join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/deps installs it)");
        Server {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn function() -> Function {
    Function {
        name: Name::parse("f").unwrap(),
        owner: Name::parse("alice").unwrap(),
        spec: FunctionSpec {
            image: "img".into(),
            command: vec![],
            env: vec![],
            timeout_ms: None,
            memory_bytes: None,
            cpus: None,
            runtime: None,
        },
        secret: Secret::new(),
        created_ms: 0,
        updated_ms: 0,
    }
}

/// Two updates from one read: the second is refused rather than writing
/// back the secret the first (a `--refresh`) replaced.
#[tokio::test]
async fn an_update_from_a_stale_read_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node");
    std::fs::create_dir(&node).unwrap();
    let server = Server::start(dir);
    let store = NatsStore::open(
        &node,
        StoreConfig {
            inline_max_bytes: 4,
            min_free_bytes: 0,
            output_budget: 1 << 20,
            log_budget: 1 << 20,
        },
        NatsConfig {
            servers: vec![format!("nats://127.0.0.1:{}", server.port)],
            credentials: None,
            ca: None,
            replicas: 1,
            max_message_bytes: 1024,
        },
    )
    .await
    .unwrap();
    let f = function();
    store.create_function(&f).await.unwrap();
    let read = store.get_function(&f.key()).await.unwrap().unwrap();
    let mut refreshed = read.clone();
    refreshed.secret = Secret::new();
    refreshed.updated_ms = 1;
    let mut slow = read.clone();
    slow.spec.image = "img2".into();
    slow.updated_ms = 1;
    store.update_function(&read, &refreshed).await.unwrap();
    match store.update_function(&read, &slow).await {
        Err(StoreError::Conflict(m)) => assert_eq!(m, "function f changed meanwhile; try again"),
        other => panic!("{other:?}"),
    }
    let now = store.get_function(&f.key()).await.unwrap().unwrap();
    assert_eq!(now, refreshed);
    let old = store
        .function_by_secret(read.secret.as_str())
        .await
        .unwrap();
    assert_eq!(old, None);
    let mut again = now.clone();
    again.spec.image = "img2".into();
    store.update_function(&now, &again).await.unwrap();
    assert_eq!(store.get_function(&f.key()).await.unwrap(), Some(again));
    drop(store);
    drop(server);
}
