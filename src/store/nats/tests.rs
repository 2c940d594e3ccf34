//! The NATS backend against a real `nats-server` (JetStream, one server,
//! scripts/deps installs it), for what needs no daemon around it.

use super::*;
use crate::model::Secret;
use calls::Queued;
use std::process::{Child, Command, Stdio};

/// A `nats-server -js` on a free loopback port, killed on drop.
pub(super) struct Server {
    child: Child,
    pub(super) port: u16,
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

pub(super) fn function() -> Function {
    Function::for_test("alice", "f")
}

/// A user of `max_concurrency`, with a key hash made of `hash`.
fn quota_user(name: Name, hash: u8, max_concurrency: u32) -> User {
    User {
        name,
        key_hash: [hash; 32],
        max_concurrency,
        admin: false,
        created_ms: 0,
        limits: Default::default(),
    }
}

/// A server and one node's store on it.
pub(super) async fn open() -> (Server, NatsStore) {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node");
    std::fs::create_dir(&node).unwrap();
    let server = Server::start(dir);
    let store = open_on(&node, server.port).await.unwrap();
    (server, store)
}

/// One node's store on the server at `port`, its id kept in `node`.
pub(super) async fn open_on(node: &std::path::Path, port: u16) -> Result<NatsStore> {
    NatsStore::open(
        node,
        StoreConfig {
            inline_max_bytes: 4,
            min_free_bytes: 0,
            ballast_bytes: 0,
            output_budget: 1 << 20,
            log_budget: 1 << 20,
        },
        NatsConfig {
            servers: vec![format!("nats://127.0.0.1:{port}")],
            credentials: None,
            ca: None,
            replicas: 1,
            max_message_bytes: 1024,
            queue_max_bytes: 1 << 20,
            marker_ttl: Duration::from_secs(2),
        },
    )
    .await
}

/// A second process on the same node id (a copied data dir) is refused
/// while the first renews its lease; a renewal refused for its revision
/// (the key taken meanwhile) fences the first.
#[tokio::test]
async fn a_node_id_held_by_a_live_process_is_refused_and_a_lost_lease_fences() {
    let (server, store) = open().await;
    let node = store.inner.node.clone();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node-id"), &node).unwrap();
    match open_on(dir.path(), server.port).await {
        Err(StoreError::Config(m)) => {
            assert!(m.contains("another hyperfuncd process"), "{m}")
        }
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("a second process took a live node's lease"),
    }
    assert!(!store.inner.is_fenced());
    // Another writer moves the key: the next renewal is refused.
    store
        .inner
        .nodes
        .put(&node, bytes::Bytes::from_static(b"{}"))
        .await
        .unwrap();
    store.inner.beat().await;
    assert!(store.inner.is_fenced());
    let reason = tokio::time::timeout(std::time::Duration::from_secs(5), store.failed())
        .await
        .unwrap();
    assert!(reason.contains("fenced"), "{reason}");
}

/// Two updates from one read: the second is refused rather than writing
/// back the secret the first (a `--refresh`) replaced.
#[tokio::test]
async fn an_update_from_a_stale_read_is_a_conflict() {
    let (server, store) = open().await;
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
    let by_secret = |secret: String| {
        let store = &store;
        async move { store.function_by_secret(&secret).await.unwrap() }
    };
    assert_eq!(
        by_secret(refreshed.secret.as_str().to_string()).await,
        Some(refreshed.clone())
    );
    // The call URL's copy follows every update, not only a new secret.
    let mut again = now.clone();
    again.spec.image = "img2".into();
    store.update_function(&now, &again).await.unwrap();
    assert_eq!(
        store.get_function(&f.key()).await.unwrap(),
        Some(again.clone())
    );
    assert_eq!(
        by_secret(again.secret.as_str().to_string()).await,
        Some(again.clone())
    );
    // And goes with the record.
    store.remove_function(&f.key()).await.unwrap();
    assert_eq!(by_secret(again.secret.as_str().to_string()).await, None);
    drop(store);
    drop(server);
}

fn finished() -> Outcome {
    Outcome {
        image_digest: None,
        state: CallState::Finished,
        exit_code: Some(0),
        message: None,
        stdout: Bytes::from_static(b"ok"),
        stderr: Bytes::new(),
    }
}

/// Every counter shard of `f` as stored, and what the call records say
/// each one should hold.
async fn shards_and_records(
    store: &NatsStore,
    f: &FnKey,
) -> (Vec<FunctionStats>, Vec<FunctionStats>) {
    let stored: Vec<FunctionStats> = store
        .inner
        .stats_shards(f)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, s)| s.unwrap_or_default())
        .collect();
    let mut want = vec![FunctionStats::default(); SHARDS];
    for (k, v) in store.inner.bucket.scan("c.").await.unwrap() {
        let call: Call = dec(&k, &v).unwrap();
        let shard = &mut want[shard_of(&call.id)];
        shard.total += 1;
        match call.state {
            CallState::Pending => shard.pending += 1,
            CallState::Running => shard.running += 1,
            CallState::Finished => shard.finished += 1,
            CallState::Failed => shard.failed += 1,
        }
    }
    (stored, want)
}

/// Every shard of `owner`'s queued counts as stored, and what the call
/// records say each one should hold (their PENDING calls and bytes).
async fn queued_and_records(store: &NatsStore, owner: &Name) -> (Vec<Queued>, Vec<Queued>) {
    let stored: Vec<Queued> = store
        .inner
        .queued_shards(owner)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, q)| q.unwrap_or_default())
        .collect();
    let mut want = vec![Queued::default(); SHARDS];
    for (k, v) in store.inner.bucket.scan("c.").await.unwrap() {
        let call: Call = dec(&k, &v).unwrap();
        if &call.owner == owner && call.state == CallState::Pending {
            let shard = &mut want[shard_of(&call.id)];
            shard.calls += 1;
            shard.bytes += call.stdin_len;
        }
    }
    (stored, want)
}

/// Accepts, starts, requeues and ends of one function's calls, all at
/// once from many tasks, land in the calls' own counter shards: every
/// shard ends equal to what its calls' records say (a shard that had gone
/// below zero would have been clamped and differ), the sum is what
/// `stats` reports, and a purge leaves no shard behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_stay_exact_over_shards_under_concurrent_changes_and_a_purge_removes_them_all() {
    const RUN: usize = 48;
    const CANCELLED: usize = 12;
    let (server, store) = open().await;
    let store = Arc::new(store);
    let f = function();
    let key = f.key();
    store
        .create_user(&quota_user(f.owner.clone(), 7, 8))
        .await
        .unwrap();
    store.create_function(&f).await.unwrap();

    let accept = |store: Arc<NatsStore>, f: Function| async move {
        let call = Call::new(f.name.clone(), f.owner.clone(), 0, b"x", Vec::new());
        store
            .accept(call, Bytes::from_static(b"x"))
            .await
            .unwrap()
            .id
    };
    let accepts: Vec<_> = (0..RUN)
        .map(|_| tokio::spawn(accept(Arc::clone(&store), f.clone())))
        .collect();
    // Starts as the calls come in; each started call ends (or, once for
    // every fifth, goes back to the queue) on a task of its own.
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut requeued = HashSet::new();
    let mut enders = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended.load(std::sync::atomic::Ordering::SeqCst) < RUN {
        assert!(Instant::now() < deadline, "the calls did not all end");
        let Some(id) = store.queue_head(&f.owner).await.unwrap() else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Started::Running(call, _) = store.start(&id).await.unwrap() else {
            panic!("call {id} was not started");
        };
        let again = requeued.len() < RUN / 5 && requeued.insert(call.id);
        let (store, ended) = (Arc::clone(&store), Arc::clone(&ended));
        enders.push(tokio::spawn(async move {
            if again {
                store.requeue(&call.id).await.unwrap();
                return;
            }
            let outcome = if call.id.as_bytes()[0] % 2 == 0 {
                finished()
            } else {
                Outcome::failed("exit 1")
            };
            store.finish(&call.id, outcome).await.unwrap();
            ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    for t in accepts {
        t.await.unwrap();
    }
    for t in enders {
        t.await.unwrap();
    }
    let (stored, want) = shards_and_records(&store, &key).await;
    assert_eq!(stored, want);
    assert!(
        want.iter().filter(|s| s.total > 0).count() > 1,
        "the calls fell in one shard"
    );
    assert_eq!(
        queued_and_records(&store, &f.owner).await.0,
        vec![Queued::default(); SHARDS],
        "the owner's queued counts are back to nothing"
    );

    // Calls left queued are counted, by `stats` and `queue_len`, until
    // they are cancelled.
    let queued = futures_util::future::join_all(
        (0..CANCELLED).map(|_| accept(Arc::clone(&store), f.clone())),
    )
    .await;
    let stats = store.stats(&key).await.unwrap();
    assert_eq!(
        (stats.total, stats.pending, stats.running),
        ((RUN + CANCELLED) as u64, CANCELLED as u64, 0)
    );
    assert_eq!(store.queue_len().await.unwrap(), CANCELLED as u64);
    let (stored, want) = queued_and_records(&store, &f.owner).await;
    assert_eq!(stored, want);
    assert_eq!(want.iter().map(|q| q.bytes).sum::<u64>(), CANCELLED as u64);
    assert_eq!(
        store.cancel_queued(&key, "cancelled").await.unwrap(),
        queued.len()
    );
    let (stored, want) = shards_and_records(&store, &key).await;
    assert_eq!(stored, want);
    assert_eq!(
        queued_and_records(&store, &f.owner).await.0,
        vec![Queued::default(); SHARDS]
    );
    let stats = store.stats(&key).await.unwrap();
    let mut sum = FunctionStats::default();
    for s in &want {
        calls::add(&mut sum, s);
    }
    assert_eq!(
        (
            stats.total,
            stats.pending,
            stats.running,
            stats.finished,
            stats.failed
        ),
        (sum.total, 0, 0, sum.finished, sum.failed)
    );
    assert_eq!(sum.finished + sum.failed, (RUN + CANCELLED) as u64);
    assert_eq!(store.queue_len().await.unwrap(), 0);

    // The purge removes every shard; until then the function counts as
    // not purged, and its name cannot be taken again.
    store.remove_function(&key).await.unwrap();
    assert_eq!(store.unpurged_functions().await.unwrap(), vec![key.clone()]);
    match store.create_function(&f).await {
        Err(StoreError::Conflict(m)) => assert!(m.contains("still being removed"), "{m}"),
        other => panic!("{other:?}"),
    }
    store.purge_function(&key).await.unwrap();
    assert_eq!(store.inner.bucket.scan("s.").await.unwrap(), Vec::new());
    assert_eq!(store.unpurged_functions().await.unwrap(), Vec::new());
    store.create_function(&f).await.unwrap();
    assert_eq!(store.stats(&key).await.unwrap(), FunctionStats::default());
    drop(store);
    drop(server);
}

/// `max_queued_bytes` on NATS: a call whose payload would take its owner's
/// queued bytes past the budget is refused and nothing is stored; the
/// bytes come back as calls start, return as they are requeued, and go
/// with a cancel or a purge; removing the user removes their counts.
#[tokio::test]
async fn a_users_queued_bytes_are_counted_and_their_budget_holds() {
    let (server, store) = open().await;
    let f = function();
    let key = f.key();
    let owner = f.owner.clone();
    store
        .create_user(&quota_user(owner.clone(), 7, 4))
        .await
        .unwrap();
    store.create_function(&f).await.unwrap();
    let budget = QueueBudget {
        max_calls: u64::MAX,
        max_bytes: 10,
    };
    let accept = |payload: &'static [u8]| {
        let call = Call::new(f.name.clone(), owner.clone(), 0, payload, Vec::new());
        let store = &store;
        async move {
            store
                .accept_within(call, Bytes::from_static(payload), budget)
                .await
        }
    };
    let queued_bytes = || async {
        let (stored, want) = queued_and_records(&store, &owner).await;
        assert_eq!(stored, want);
        want.iter().map(|q| q.bytes).sum::<u64>()
    };
    let refused = |r: Result<Call>| match r {
        Err(StoreError::OverBudget(m)) => assert!(m.contains("max_queued_bytes 10 bytes"), "{m}"),
        other => panic!("{other:?}"),
    };
    let first = accept(b"1234").await.unwrap();
    accept(b"5678").await.unwrap();
    refused(accept(b"abc").await);
    assert_eq!(store.stats(&key).await.unwrap().total, 2, "nothing stored");
    accept(b"ab").await.unwrap();
    assert_eq!(queued_bytes().await, 10);
    // A start gives its bytes back, a requeue takes them again.
    let head = store.queue_head(&owner).await.unwrap();
    assert_eq!(head, Some(first.id));
    assert!(matches!(
        store.start(&first.id).await.unwrap(),
        Started::Running(..)
    ));
    assert_eq!(queued_bytes().await, 6);
    accept(b"wxyz").await.unwrap();
    store.requeue(&first.id).await.unwrap();
    assert_eq!(queued_bytes().await, 14);
    refused(accept(b"a").await);
    // A cancel empties it.
    assert_eq!(store.cancel_queued(&key, "cancelled").await.unwrap(), 4);
    assert_eq!(queued_bytes().await, 0);
    accept(b"0123456789").await.unwrap();
    refused(accept(b"a").await);
    // A queued call left by an interrupted removal goes with the purge.
    store.remove_function(&key).await.unwrap();
    store.purge_function(&key).await.unwrap();
    assert_eq!(queued_bytes().await, 0);
    store.delete_user(&owner).await.unwrap();
    assert_eq!(store.inner.bucket.scan("q.").await.unwrap(), Vec::new());
    drop(store);
    drop(server);
}

/// A shard written after its function's purge (a late write) is found by
/// `unpurged_functions`, keeps the name from being taken again with its
/// counts, and goes with the next purge.
#[tokio::test]
async fn a_shard_left_without_its_function_is_found_and_purged() {
    let (server, store) = open().await;
    let f = function();
    let key = f.key();
    let stray = FunctionStats {
        total: 1,
        pending: 1,
        ..FunctionStats::default()
    };
    let shard = shard_key(&key, 3);
    assert_eq!(shard, "s.alice.f.3");
    if store
        .inner
        .bucket
        .commit(vec![Op::Put(shard, enc(&stray).unwrap(), None)])
        .await
        .is_err()
    {
        panic!("writing a shard failed");
    }
    assert_eq!(store.unpurged_functions().await.unwrap(), vec![key.clone()]);
    assert!(matches!(
        store.create_function(&f).await,
        Err(StoreError::Conflict(_))
    ));
    store.purge_function(&key).await.unwrap();
    assert_eq!(store.unpurged_functions().await.unwrap(), Vec::new());
    store.create_function(&f).await.unwrap();
    assert_eq!(store.stats(&key).await.unwrap(), FunctionStats::default());
    drop(store);
    drop(server);
}

/// A compare-and-set refused because another write to the key was still
/// being replicated (10164, clustered streams only) is a lost race to
/// retry at once, like a revision that moved on (10071); anything else is
/// not.
#[test]
fn a_write_refused_for_one_in_flight_is_a_lost_race() {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    let answer = |code: u64, text: &str| {
        let e: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400,
            "err_code": code,
            "description": text
        }))
        .unwrap();
        PublishError::with_source(PublishErrorKind::Other, e)
    };
    assert!(kv::lost_race(&answer(10164, "wrong last sequence")));
    assert!(kv::lost_race(&PublishError::new(
        PublishErrorKind::WrongLastSequence
    )));
    assert!(!kv::lost_race(&answer(
        10060,
        "expected stream does not match"
    )));
    assert!(!kv::lost_race(&PublishError::new(
        PublishErrorKind::TimedOut
    )));
}

/// Registry logins on NATS: per user and host (a host's `:` is hex in the
/// key), replaced by a new login, removed one by one and with their user;
/// prefix-named users (`bo`, `bob`) are kept apart by the key's dot.
#[tokio::test]
async fn registry_logins_per_user_and_host_go_with_their_user() {
    let (server, store) = open().await;
    let login = |host: &str, pw: &str| RegistryLogin {
        host: host.into(),
        username: "ci".into(),
        password: pw.into(),
        created_ms: 0,
    };
    let user = |n: &str, key: [u8; 32]| User {
        name: Name::parse(n).unwrap(),
        key_hash: key,
        max_concurrency: 1,
        admin: false,
        created_ms: 0,
        limits: Default::default(),
    };
    store.create_user(&user("bob", [1; 32])).await.unwrap();
    store.create_user(&user("bo", [2; 32])).await.unwrap();
    let (bob, bo) = (Name::parse("bob").unwrap(), Name::parse("bo").unwrap());
    store
        .put_registry_login(&bob, &login("r.example.com:5000", "one"))
        .await
        .unwrap();
    store
        .put_registry_login(&bob, &login("r.example.com:5000", "two"))
        .await
        .unwrap();
    store
        .put_registry_login(&bob, &login("a.example.com", "x"))
        .await
        .unwrap();
    store
        .put_registry_login(&bo, &login("b.example.com", "y"))
        .await
        .unwrap();
    let got: Vec<(String, String)> = store
        .registry_logins(&bob)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.host, l.password))
        .collect();
    assert_eq!(
        got,
        [
            ("a.example.com".to_string(), "x".to_string()),
            ("r.example.com:5000".to_string(), "two".to_string())
        ]
    );
    assert!(store
        .delete_registry_login(&bob, "a.example.com")
        .await
        .unwrap());
    assert!(!store
        .delete_registry_login(&bob, "a.example.com")
        .await
        .unwrap());
    store.delete_user(&bob).await.unwrap();
    store.create_user(&user("bob", [3; 32])).await.unwrap();
    assert!(store.registry_logins(&bob).await.unwrap().is_empty());
    assert_eq!(store.registry_logins(&bo).await.unwrap().len(), 1);
    assert!(!store
        .is_private_registry("r.example.com:5000")
        .await
        .unwrap());
    store
        .mark_private_registry("r.example.com:5000")
        .await
        .unwrap();
    store
        .mark_private_registry("r.example.com:5000")
        .await
        .unwrap();
    assert!(store
        .is_private_registry("r.example.com:5000")
        .await
        .unwrap());
    assert!(!store.is_private_registry("r.example.com").await.unwrap());
    drop(server);
}

/// The keys the records bucket holds a message for now: values, and
/// delete markers not yet expired.
async fn record_keys(store: &NatsStore) -> Vec<String> {
    use futures_util::TryStreamExt;
    let stream = store
        .inner
        .bucket
        .js
        .get_stream(kv::BUCKET_STREAM)
        .await
        .unwrap();
    let prefix = format!("$KV.{}.", kv::BUCKET);
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut keys: Vec<String> = subjects
        .into_iter()
        .map(|(s, _)| s.trim_start_matches(&prefix).to_string())
        .collect();
    keys.sort();
    keys
}

/// Delete markers expire: a function removed and purged with a queued
/// call, and a finished call pruned, leave no key of theirs in the records
/// bucket once the markers' TTL (2 s here) has passed, where their delete
/// markers used to stay for good; the deleted keys read as absent. Only
/// the owner's own keys (user, key hash, queued counts) stay.
#[tokio::test]
async fn deleted_keys_leave_no_subject_behind_once_their_markers_expire() {
    let (server, store) = open().await;
    let f = function();
    let key = f.key();
    store
        .create_user(&quota_user(f.owner.clone(), 9, 1))
        .await
        .unwrap();
    store.create_function(&f).await.unwrap();
    let call =
        |body: &'static [u8]| Call::new(f.name.clone(), f.owner.clone(), 0, body, Vec::new());
    let ran = store
        .accept(call(b"a"), Bytes::from_static(b"a"))
        .await
        .unwrap();
    let queued = store
        .accept(call(b"b"), Bytes::from_static(b"b"))
        .await
        .unwrap();
    let head = store.queue_head(&f.owner).await.unwrap().expect("a head");
    assert_eq!(head, ran.id);
    assert!(matches!(
        store.start(&head).await.unwrap(),
        Started::Running(..)
    ));
    store.finish(&head, finished()).await.unwrap();
    let owners = ["u.", "k.", "q."];
    let theirs = |keys: &[String]| -> Vec<String> {
        keys.iter()
            .filter(|k| !owners.iter().any(|p| k.starts_with(p)))
            .cloned()
            .collect()
    };
    assert!(!theirs(&record_keys(&store).await).is_empty());
    // Pruned (ended before now + 1 s), then the function and its queued call.
    assert!(store.prune(crate::model::now_ms() + 1000).await.unwrap() >= 1);
    store.remove_function(&key).await.unwrap();
    store.cancel_queued(&key, "cancelled").await.unwrap();
    store.purge_function(&key).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = theirs(&record_keys(&store).await);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "keys left after their markers' TTL: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for id in [ran.id, queued.id] {
        let (rev, record) = store
            .inner
            .bucket
            .get::<Call>(&calls::call_key(&id))
            .await
            .unwrap();
        assert_eq!(
            (rev, record.map(|c| c.id)),
            (0, None),
            "call {id} is gone, not revived"
        );
    }
    drop(store);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_functions_history_pages_newest_first_over_hours_and_goes_with_retention() {
    let (server, store) = open().await;
    let mut f = function();
    f.created_ms = crate::model::now_ms() - 5 * 3_600_000;
    store
        .create_user(&quota_user(f.owner.clone(), 7, 100))
        .await
        .unwrap();
    store.create_function(&f).await.unwrap();
    crate::store::history_check::check(&store, &f).await;
    // A purge takes the rest of the index.
    store.remove_function(&f.key()).await.unwrap();
    store.cancel_queued(&f.key(), "removed").await.unwrap();
    store.purge_function(&f.key()).await.unwrap();
    assert_eq!(store.inner.bucket.scan("h.").await.unwrap(), Vec::new());
    drop(store);
    drop(server);
}

#[tokio::test]
async fn pulled_images_are_kept_per_instance() {
    let (server, store) = open().await;
    crate::store::contract::pulled_images(&store).await;
    drop(store);
    drop(server);
}

/// Waiting for one's turn reads each earlier call's queue message once
/// (a message get answers with the body), then only their records: a call
/// behind two calls without containers, waiting 2 s (eight polls), makes
/// two message gets, and none more once they have their containers.
#[tokio::test]
async fn a_call_waiting_for_its_turn_reads_each_earlier_message_once() {
    let (server, store) = open().await;
    let f = function();
    store
        .create_user(&quota_user(f.owner.clone(), 5, 3))
        .await
        .unwrap();
    store.create_function(&f).await.unwrap();
    let body = Bytes::from(vec![b'p'; 512]);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let call = Call::new(f.name.clone(), f.owner.clone(), 0, &body, Vec::new());
        ids.push(store.accept(call, body.clone()).await.unwrap().id);
    }
    for want in &ids {
        let head = store.queue_head(&f.owner).await.unwrap().expect("a head");
        assert_eq!(&head, want);
        assert!(matches!(
            store.start(&head).await.unwrap(),
            Started::Running(..)
        ));
    }
    let last = store
        .get_call(&ids[2])
        .await
        .unwrap()
        .expect("the third call");
    let gets = || {
        store
            .inner
            .turns
            .gets
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = gets();
    let waited = tokio::time::timeout(Duration::from_secs(2), store.await_turn(&last)).await;
    assert!(waited.is_err(), "two earlier calls have no container yet");
    assert_eq!(gets() - before, 2, "one message get per earlier call");
    store.created(&ids[0]).await;
    store.created(&ids[1]).await;
    tokio::time::timeout(Duration::from_secs(5), store.await_turn(&last))
        .await
        .expect("its turn, once the earlier calls have their containers")
        .unwrap();
    assert_eq!(gets() - before, 2, "what was seen is not read again");
    drop(store);
    drop(server);
}

/// The owners a poll looks at are those with a message in their queue
/// (queued, or out on a node), not every user: an idle user costs nothing.
#[tokio::test]
async fn queued_owners_are_those_with_messages_not_every_user() {
    let (server, store) = open().await;
    let f = function();
    for (name, hash) in [("alice", 1u8), ("idle", 2)] {
        store
            .create_user(&quota_user(Name::parse(name).unwrap(), hash, 1))
            .await
            .unwrap();
    }
    store.create_function(&f).await.unwrap();
    assert_eq!(store.queued_owners().await.unwrap(), Vec::<Name>::new());
    let call = Call::new(f.name.clone(), f.owner.clone(), 0, b"x", Vec::new());
    let id = store
        .accept(call, Bytes::from_static(b"x"))
        .await
        .unwrap()
        .id;
    assert_eq!(store.queued_owners().await.unwrap(), vec![f.owner.clone()]);
    assert_eq!(store.queue_head(&f.owner).await.unwrap(), Some(id));
    assert!(matches!(
        store.start(&id).await.unwrap(),
        Started::Running(..)
    ));
    // Out on this node: still looked at (a redelivery may come due).
    assert_eq!(store.queued_owners().await.unwrap(), vec![f.owner.clone()]);
    store.finish(&id, finished()).await.unwrap();
    // The end's acknowledgement reaches the server a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !store.queued_owners().await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the ended call left its queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(store);
    drop(server);
}

#[tokio::test]
async fn webhook_deliveries_keep_the_store_contract() {
    let (server, store) = open().await;
    let f = function();
    store
        .create_user(&quota_user(f.owner.clone(), 7, 100))
        .await
        .unwrap();
    store.create_function(&f).await.unwrap();
    crate::store::webhook_check::check(&store, &f).await;
    assert_eq!(store.inner.bucket.scan("w.").await.unwrap(), Vec::new());
    assert_eq!(store.inner.bucket.scan("wd.").await.unwrap(), Vec::new());
    drop(store);
    drop(server);
}
