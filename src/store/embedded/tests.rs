use super::*;
use crate::model::{OutputState, Secret};

fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

/// Alice's function `n`: the test functions are hers.
fn key(n: &str) -> FnKey {
    FnKey::new(name("alice"), name(n))
}

fn config() -> StoreConfig {
    StoreConfig {
        inline_max_bytes: 4,
        min_free_bytes: 0,
        ballast_bytes: 0,
        output_budget: u64::MAX,
        log_budget: u64::MAX,
    }
}

/// sled's background thread may hold the lock file for a moment after drop.
fn reopen(dir: &Path, config: StoreConfig) -> SledStore {
    for _ in 0..50 {
        if let Ok(s) = SledStore::open(dir, config.clone()) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    SledStore::open(dir, config).unwrap()
}

fn function(n: &str) -> Function {
    Function::for_test("alice", n)
}

async fn setup(config: StoreConfig) -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), config).unwrap();
    store.create_function(&function("f")).await.unwrap();
    (dir, store)
}

async fn accept(store: &SledStore, payload: &[u8]) -> Call {
    let call = Call::new(name("f"), name("alice"), 0, payload, vec![]);
    store
        .accept(call, Bytes::copy_from_slice(payload))
        .await
        .unwrap()
}

async fn run(store: &SledStore, call: &Call) -> Bytes {
    match store.start(&call.id).await.unwrap() {
        Started::Running(_, payload) => payload,
        Started::Skipped => panic!("call {} did not start", call.id),
    }
}

fn ok(stdout: &[u8]) -> Outcome {
    Outcome {
        image_digest: None,
        state: CallState::Finished,
        exit_code: Some(0),
        message: None,
        stdout: Bytes::copy_from_slice(stdout),
        stderr: Bytes::new(),
    }
}

fn blob_count(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("hf-blobs")).unwrap().count()
}

#[tokio::test]
async fn queue_is_fifo_per_owner_and_counts_follow() {
    let (_d, store) = setup(config()).await;
    let a = accept(&store, b"1").await;
    let b = accept(&store, b"2").await;
    assert!(a.seq < b.seq, "the store assigns FIFO sequence numbers");
    assert_eq!(store.queued_owners().await.unwrap(), vec![name("alice")]);
    assert_eq!(store.queue_head(&name("alice")).await.unwrap(), Some(a.id));
    assert_eq!(&run(&store, &a).await[..], b"1");
    assert_eq!(store.queue_head(&name("alice")).await.unwrap(), Some(b.id));
    assert!(
        matches!(store.start(&a.id).await.unwrap(), Started::Skipped),
        "a running call cannot start again"
    );
    store.requeue(&a.id).await.unwrap();
    assert_eq!(store.queue_head(&name("alice")).await.unwrap(), Some(a.id));
    run(&store, &a).await;
    assert_eq!(store.running_calls().await.unwrap().len(), 1);
    store.finish(&a.id, ok(b"out")).await.unwrap();
    let s = store.stats(&key("f")).await.unwrap();
    assert_eq!(
        (s.total, s.pending, s.running, s.finished, s.failed),
        (2, 1, 0, 1, 0)
    );
    assert_eq!(s.output_bytes, 3);
    assert_eq!(store.live_calls(&key("f")).await.unwrap().len(), 1);
    match store.take_output(&a.id).await.unwrap() {
        Some(OutputLookup::Output(_, out)) => assert_eq!(&out[..], b"out"),
        other => panic!("{other:?}"),
    }
    match store.take_output(&a.id).await.unwrap() {
        Some(OutputLookup::NoOutput(c)) => assert_eq!(c.output, OutputState::Fetched),
        other => panic!("{other:?}"),
    }
    assert!(store.take_output(&CallId::new()).await.unwrap().is_none());
    assert_eq!(store.stats(&key("f")).await.unwrap().output_bytes, 0);
    let kinds: Vec<_> = store
        .events(&key("f"), None, Some(&a.id), None)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::Call,
            EventKind::Pending,
            EventKind::Running,
            EventKind::Running,
            EventKind::Finished
        ]
    );
}

/// Inline accepts submitted together share the commit thread's round and
/// flush; one refused (its function is gone) must not undo the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_accept_leaves_its_round_stored() {
    let (dir, store) = setup(config()).await;
    let attempts = (0..64u8).map(|i| {
        let f = if i % 8 == 3 { "gone" } else { "f" };
        let call = Call::new(name(f), name("alice"), 0, &[i], vec![]);
        store.accept(call, Bytes::from(vec![i]))
    });
    let results = futures_util::future::join_all(attempts).await;
    let mut stored = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(call) if i % 8 != 3 => stored.push((call, i as u8)),
            Err(StoreError::NotFound(_)) if i % 8 == 3 => {}
            other => panic!("accept {i}: {other:?}"),
        }
    }
    assert_eq!(stored.len(), 56);
    drop(store);
    let store = reopen(dir.path(), config());
    let s = store.stats(&key("f")).await.unwrap();
    assert_eq!((s.total, s.pending), (56, 56));
    // Each call has its own payload, and the queue follows the seqs.
    stored.sort_by_key(|(c, _)| c.seq);
    for (call, byte) in &stored {
        assert_eq!(
            store.queue_head(&name("alice")).await.unwrap(),
            Some(call.id)
        );
        assert_eq!(&run(&store, call).await[..], &[*byte]);
    }
}

#[tokio::test]
async fn output_cache_evicts_oldest_within_budget() {
    let (_d, store) = setup(StoreConfig {
        output_budget: 250,
        ..config()
    })
    .await;
    let mut ids = vec![];
    for _ in 0..5 {
        let c = accept(&store, b"").await;
        run(&store, &c).await;
        store.finish(&c.id, ok(&[7u8; 100])).await.unwrap();
        ids.push(c.id);
    }
    assert_eq!(store.stats(&key("f")).await.unwrap().output_bytes, 200);
    for id in &ids[..3] {
        assert_eq!(
            store.get_call(id).await.unwrap().unwrap().output,
            OutputState::Evicted
        );
    }
    assert!(matches!(
        store.take_output(&ids[4]).await.unwrap(),
        Some(OutputLookup::Output(..))
    ));
}

#[tokio::test]
async fn large_blobs_are_files_that_follow_their_markers() {
    let (dir, store) = setup(config()).await;
    let small = accept(&store, b"abc").await;
    assert_eq!(blob_count(dir.path()), 0, "a small payload is inline");
    let c = accept(&store, b"payload").await;
    assert_eq!(blob_count(dir.path()), 1);
    assert_eq!(&run(&store, &c).await[..], b"payload");
    store.finish(&c.id, ok(b"output")).await.unwrap();
    assert_eq!(
        blob_count(dir.path()),
        1,
        "payload file gone, output file there"
    );
    assert!(
        matches!(store.take_output(&c.id).await.unwrap(), Some(OutputLookup::Output(_, o)) if &o[..] == b"output")
    );
    assert_eq!(
        blob_count(dir.path()),
        0,
        "a fetched output gives its file back"
    );

    // A payload file that is lost fails its call; it never runs with other bytes.
    let lost = accept(&store, b"12345678").await;
    std::fs::write(store.inner.blobs.path(Kind::Payload, &lost.id), b"1234").unwrap();
    assert_eq!(
        store.queue_head(&name("alice")).await.unwrap(),
        Some(small.id)
    );
    run(&store, &small).await;
    assert!(matches!(
        store.start(&lost.id).await.unwrap(),
        Started::Skipped
    ));
    let failed = store.get_call(&lost.id).await.unwrap().unwrap();
    assert_eq!(failed.state, CallState::Failed);
    assert!(
        failed
            .message
            .as_deref()
            .unwrap_or("")
            .contains("4 of 8 bytes"),
        "{failed:?}"
    );

    // A file whose transaction never committed is an orphan.
    store
        .inner
        .blobs
        .write(Kind::Output, &CallId::new(), b"x")
        .unwrap();
    drop(store);
    reopen(dir.path(), config());
    assert_eq!(blob_count(dir.path()), 0, "orphans are collected on open");
}

#[tokio::test]
async fn log_cache_stays_within_budget() {
    let (_d, store) = setup(StoreConfig {
        log_budget: 2000,
        ..config()
    })
    .await;
    for _ in 0..50 {
        accept(&store, b"x").await;
    }
    // Eviction runs in the background, off the intake path.
    let mut s = store.stats(&key("f")).await.unwrap();
    for _ in 0..100 {
        if s.log_bytes <= 2000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        s = store.stats(&key("f")).await.unwrap();
    }
    assert!(s.log_bytes <= 2000 && s.log_bytes > 1000, "{s:?}");
    let events = store.events(&key("f"), None, None, None).await.unwrap();
    let bytes: usize = events.iter().map(|(_, e)| encode(e).unwrap().len()).sum();
    assert_eq!(bytes as u64, s.log_bytes);
}

#[tokio::test]
async fn cancel_leaves_started_calls_to_the_scheduler() {
    let (_d, store) = setup(config()).await;
    let a = accept(&store, b"").await;
    let b = accept(&store, b"").await;
    run(&store, &a).await;
    assert_eq!(
        store.cancel_queued(&key("f"), "cancelled").await.unwrap(),
        1
    );
    assert_eq!(
        store.get_call(&a.id).await.unwrap().unwrap().state,
        CallState::Running
    );
    assert_eq!(
        store.get_call(&b.id).await.unwrap().unwrap().state,
        CallState::Failed
    );
    assert_eq!(store.queue_head(&name("alice")).await.unwrap(), None);

    // Removal: no new calls, then the purge waits for the running one.
    store.remove_function(&key("f")).await.unwrap();
    let refused = store
        .accept(
            Call::new(name("f"), name("alice"), 0, b"", vec![]),
            Bytes::new(),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "{refused:?}"
    );
    assert!(store.purge_function(&key("f")).await.is_err());
    assert_eq!(store.unpurged_functions().await.unwrap(), vec![key("f")]);
    assert!(
        store.create_function(&function("f")).await.is_err(),
        "a name is free again only after the purge"
    );
    store.finish(&a.id, ok(b"")).await.unwrap();
    store.purge_function(&key("f")).await.unwrap();
    assert!(store.get_call(&a.id).await.unwrap().is_none());
    assert!(store.unpurged_functions().await.unwrap().is_empty());
    store.create_function(&function("f")).await.unwrap();
}

#[tokio::test]
async fn retention_prunes_ended_calls() {
    let (_d, store) = setup(config()).await;
    let a = accept(&store, b"").await;
    let b = accept(&store, b"").await;
    run(&store, &a).await;
    store.finish(&a.id, ok(b"out-a-file")).await.unwrap();
    assert_eq!(store.prune(0).await.unwrap(), 0);
    let later = crate::model::now_ms() + 1;
    assert_eq!(store.prune(later).await.unwrap(), 1);
    assert!(store.get_call(&a.id).await.unwrap().is_none());
    assert!(store.take_output(&a.id).await.unwrap().is_none());
    assert_eq!(store.stats(&key("f")).await.unwrap().output_bytes, 0);
    assert!(
        store.get_call(&b.id).await.unwrap().is_some(),
        "live calls stay"
    );
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id;
    {
        let store = SledStore::open(dir.path(), config()).unwrap();
        store.create_function(&function("f")).await.unwrap();
        id = accept(&store, b"payload").await.id;
        let inst = store.instance_id().await.unwrap();
        assert_eq!(store.instance_id().await.unwrap(), inst);
    }
    let store = reopen(dir.path(), config());
    assert_eq!(store.queue_head(&name("alice")).await.unwrap(), Some(id));
    assert_eq!(store.stats(&key("f")).await.unwrap().pending, 1);
    let tail = store.events(&key("f"), None, None, Some(1)).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].1.kind, EventKind::Pending);
    assert_eq!(
        store.last_event_seq(&key("f")).await.unwrap(),
        Some(tail[0].0)
    );
    assert_eq!(
        &run(&store, &store.get_call(&id).await.unwrap().unwrap()).await[..],
        b"payload"
    );
}

#[tokio::test]
async fn a_full_disk_refuses_intake_and_stores_nothing() {
    // The function is made while there is room; the reserve then says the
    // disk is full.
    let (d, store) = setup(config()).await;
    drop(store);
    let store = reopen(
        d.path(),
        StoreConfig {
            min_free_bytes: u64::MAX / 2,
            ..config()
        },
    );
    let refused = store.create_function(&function("g")).await;
    assert!(matches!(refused, Err(StoreError::Full(_))), "{refused:?}");
    let refused = store
        .accept(
            Call::new(name("f"), name("alice"), 0, b"x", vec![]),
            Bytes::from_static(b"x"),
        )
        .await;
    assert!(matches!(refused, Err(StoreError::Full(_))), "{refused:?}");
    assert_eq!(store.stats(&key("f")).await.unwrap().total, 0);
    assert!(store.health().await.is_err());
}

/// Users are served from memory: a rotated key stops working at once, and
/// the cache matches the database after a reopen.
#[tokio::test]
async fn users_and_their_keys_follow_each_change() {
    let (dir, store) = setup(config()).await;
    let user = |key: [u8; 32], quota| User {
        name: name("bob"),
        key_hash: key,
        max_concurrency: quota,
        admin: false,
        created_ms: 0,
        limits: Default::default(),
    };
    store.create_user(&user([1; 32], 2)).await.unwrap();
    assert!(matches!(
        store.create_user(&user([3; 32], 2)).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.user_by_key_hash(&[3; 32]).await.unwrap().is_none());
    store.update_user(&user([2; 32], 5)).await.unwrap();
    assert!(store.user_by_key_hash(&[1; 32]).await.unwrap().is_none());
    let got = store.user_by_key_hash(&[2; 32]).await.unwrap().unwrap();
    assert_eq!((got.name.as_str(), got.max_concurrency), ("bob", 5));
    drop(store);
    let store = reopen(dir.path(), config());
    assert_eq!(
        store
            .get_user(&name("bob"))
            .await
            .unwrap()
            .unwrap()
            .max_concurrency,
        5
    );
    assert!(store.user_by_key_hash(&[2; 32]).await.unwrap().is_some());
    store.delete_user(&name("bob")).await.unwrap();
    assert!(store.user_by_key_hash(&[2; 32]).await.unwrap().is_none());
    assert!(store.list_users().await.unwrap().is_empty());
}

/// Two updates from one read: the second is refused rather than writing
/// back the secret the first (a `--refresh`) replaced, and the refused
/// one changed nothing, on disk either.
#[tokio::test]
async fn an_update_from_a_stale_read_is_a_conflict() {
    let (dir, store) = setup(config()).await;
    let read = store.get_function(&key("f")).await.unwrap().unwrap();
    let mut refreshed = read.clone();
    refreshed.secret = Secret::new();
    refreshed.updated_ms = 1;
    let mut slow = read.clone();
    slow.spec.image = "img2".into();
    slow.updated_ms = 1;
    store.update_function(&read, &refreshed).await.unwrap();
    let refused = store.update_function(&read, &slow).await;
    match refused {
        Err(StoreError::Conflict(m)) => {
            assert_eq!(m, "function f changed meanwhile; try again")
        }
        other => panic!("{other:?}"),
    }
    drop(store);
    let store = reopen(dir.path(), config());
    let now = store.get_function(&key("f")).await.unwrap().unwrap();
    assert_eq!(now, refreshed);
    assert!(store
        .function_by_secret(read.secret.as_str())
        .await
        .unwrap()
        .is_none());
    // From a fresh read the same change goes through.
    let mut again = now.clone();
    again.spec.image = "img2".into();
    store.update_function(&now, &again).await.unwrap();
    // A removed function is not found, whatever was read.
    store.remove_function(&key("f")).await.unwrap();
    assert!(matches!(
        store.update_function(&again, &again).await,
        Err(StoreError::NotFound(_))
    ));
}

/// A staged write cut short by a crash is finished on open from its
/// intent record, and a write whose intent is gone is left alone.
#[tokio::test]
async fn an_interrupted_staged_write_is_finished_on_open() {
    let (dir, store) = setup(config()).await;
    let first = accept(&store, b"1").await;
    // Record what an accept writes, as its intent, then apply only the
    // first two writes: the state a kill -9 mid-apply can leave on disk.
    let mut call = Call::new(name("f"), name("alice"), 0, b"2", vec![]);
    let inner = &store.inner;
    let seqs = inner.accept_ids(&mut call, 1).unwrap();
    let marker = Marker::Inline(b"2".to_vec());
    let writes =
        inner.record(|t| inner.accept_tx(t, &call, &marker, seqs, &QueueBudget::UNLIMITED, None));
    let (_, writes) = writes.unwrap();
    assert!(writes.len() > 2);
    inner.apply_partly(&writes, 2).unwrap();
    inner.db.flush().unwrap();
    drop(store);
    let store = reopen(dir.path(), config());
    let s = store.stats(&key("f")).await.unwrap();
    assert_eq!((s.total, s.pending), (2, 2), "the accept was finished");
    assert_eq!(&run(&store, &first).await[..], b"1");
    let second = store.queue_head(&name("alice")).await.unwrap().unwrap();
    assert_eq!(second, call.id);
    drop(store);
    let store = reopen(dir.path(), config());
    let s = store.stats(&key("f")).await.unwrap();
    assert_eq!(
        (s.total, s.pending, s.running),
        (2, 1, 1),
        "replayed once only"
    );
}

/// The queue budget is checked in the write that queues: of many accepts at
/// once, exactly the budget's worth pass, and the ones refused store
/// nothing. A start, an end and a requeue move the count with the queue,
/// and a reopen finds it as it was.
#[tokio::test]
async fn queue_budgets_hold_exactly_under_concurrent_accepts() {
    let (dir, store) = setup(config()).await;
    let store = Arc::new(store);
    let budget = QueueBudget {
        max_calls: 5,
        max_bytes: 1000,
    };
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let store = Arc::clone(&store);
        // Inline (≤ 4 bytes) and file payloads both.
        let payload = vec![i; if i % 2 == 0 { 3 } else { 9 }];
        tasks.push(tokio::spawn(async move {
            let call = Call::new(name("f"), name("alice"), 0, &payload, vec![]);
            store
                .accept_within(call, Bytes::from(payload), budget)
                .await
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(c) => accepted.push(c),
            Err(StoreError::OverBudget(m)) => assert!(m.contains("max_queued 5"), "{m}"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(accepted.len(), 5);
    let stats = store.stats(&key("f")).await.unwrap();
    assert_eq!((stats.total, stats.pending), (5, 5));
    let queued = |s: &SledStore| get::<QueueUse>(s.inner.tree(QUEUED), "alice").unwrap();
    let bytes: u64 = accepted.iter().map(|c| c.stdin_len).sum();
    assert_eq!(queued(&store), Some(QueueUse { calls: 5, bytes }));

    // Bytes: 1000 allowed, so a call that would pass them is refused.
    let big = vec![1u8; 1000];
    let call = Call::new(name("f"), name("alice"), 0, &big, vec![]);
    let budget = QueueBudget {
        max_calls: 100,
        max_bytes: 1000,
    };
    match store.accept_within(call, Bytes::from(big), budget).await {
        Err(StoreError::OverBudget(m)) => assert!(m.contains("max_queued_bytes"), "{m}"),
        other => panic!("{other:?}"),
    }

    // A start frees a place; a requeue takes it back; an end frees it.
    run(&store, &accepted[0]).await;
    store.requeue(&accepted[0].id).await.unwrap();
    assert_eq!(queued(&store).unwrap().calls, 5);
    run(&store, &accepted[0]).await;
    let outcome = Outcome {
        image_digest: None,
        state: CallState::Finished,
        exit_code: Some(0),
        message: None,
        stdout: Bytes::new(),
        stderr: Bytes::new(),
    };
    store.finish(&accepted[0].id, outcome).await.unwrap();
    assert_eq!(
        queued(&store).unwrap(),
        QueueUse {
            calls: 4,
            bytes: bytes - accepted[0].stdin_len
        }
    );
    store
        .cancel_queued(&key("f"), "cancelled: test")
        .await
        .unwrap();
    assert_eq!(queued(&store).unwrap(), QueueUse::default());
    drop(store);
    let store = reopen(dir.path(), config());
    assert_eq!(queued(&store).unwrap(), QueueUse::default());
}

/// A database of schema 4 (users without budgets, no `queued` tree) opens
/// with its users following the defaults and its queue counted.
#[tokio::test]
async fn schema_4_users_and_queues_migrate_to_5() {
    let (dir, store) = setup(config()).await;
    let calls = [
        accept(&store, b"ab").await,
        accept(&store, b"abcdefgh").await,
    ];
    drop(store);
    {
        let db = reopen_db(dir.path());
        let old = crate::model::UserV1 {
            name: name("bob"),
            key_hash: [9; 32],
            max_concurrency: 3,
            admin: false,
            created_ms: 5,
        };
        #[derive(Serialize)]
        struct Shape<'a>(&'a Name, [u8; 32], u32, bool, u64);
        let bytes = encode(&Shape(&old.name, old.key_hash, 3, false, 5)).unwrap();
        db.open_tree("users").unwrap().insert("bob", bytes).unwrap();
        db.open_tree("queued").unwrap().clear().unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema", encode(&4u64).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path(), config());
    let bob = store.get_user(&name("bob")).await.unwrap().unwrap();
    assert_eq!(bob.max_concurrency, 3);
    assert_eq!(bob.limits, crate::model::UserLimits::default());
    assert_eq!(
        get::<QueueUse>(store.inner.tree(QUEUED), "alice").unwrap(),
        Some(QueueUse {
            calls: 2,
            bytes: calls.iter().map(|c| c.stdin_len).sum()
        })
    );
    let schema: u64 = get(store.inner.tree(META), "schema").unwrap().unwrap();
    assert_eq!(schema, SCHEMA);
}

/// A database of schema 5 (users without `reserved`) opens with its users'
/// budgets kept and their reservations following the defaults.
#[tokio::test]
async fn schema_5_users_migrate_to_6() {
    let (dir, store) = setup(config()).await;
    drop(store);
    {
        let db = reopen_db(dir.path());
        #[derive(Serialize)]
        struct Shape<'a>(
            &'a Name,
            [u8; 32],
            u32,
            bool,
            u64,
            (Option<u64>, Option<u64>, Option<u32>, Option<u32>),
        );
        let bytes = encode(&Shape(
            &name("bob"),
            [9; 32],
            3,
            true,
            5,
            (Some(7), None, Some(2), None),
        ))
        .unwrap();
        db.open_tree("users").unwrap().insert("bob", bytes).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema", encode(&5u64).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path(), config());
    let bob = store.get_user(&name("bob")).await.unwrap().unwrap();
    assert_eq!(
        (bob.max_concurrency, bob.admin, bob.created_ms),
        (3, true, 5)
    );
    assert_eq!(
        bob.limits,
        crate::model::UserLimits {
            max_queued: Some(7),
            max_functions: Some(2),
            ..Default::default()
        }
    );
    let stored: User = get(store.inner.tree(USERS), "bob").unwrap().unwrap();
    assert_eq!(stored, bob, "rewritten in today's shape");
    let schema: u64 = get(store.inner.tree(META), "schema").unwrap().unwrap();
    assert_eq!(schema, SCHEMA);
}

fn reopen_db(dir: &Path) -> sled::Db {
    for _ in 0..50 {
        if let Ok(db) = sled::open(dir) {
            return db;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    sled::open(dir).unwrap()
}

/// Registry logins are kept per user and host, replaced by a new login to
/// the same host, survive a reopen, and go with their user: a new user of
/// the same name starts with none. Names are prefixes of each other here
/// (`bo`, `bob`), so the keys' NUL is what keeps them apart.
#[tokio::test]
async fn registry_logins_per_user_and_host_go_with_their_user() {
    let (dir, store) = setup(config()).await;
    let login = |host: &str, pw: &str| crate::model::RegistryLogin {
        host: host.into(),
        username: "ci".into(),
        password: pw.into(),
        created_ms: 0,
    };
    let user = |n: &str, key: [u8; 32]| User {
        name: name(n),
        key_hash: key,
        max_concurrency: 1,
        admin: false,
        created_ms: 0,
        limits: Default::default(),
    };
    store.create_user(&user("bob", [1; 32])).await.unwrap();
    store.create_user(&user("bo", [2; 32])).await.unwrap();
    let (bob, bo) = (name("bob"), name("bo"));
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
    let hosts = |v: Vec<crate::model::RegistryLogin>| {
        v.into_iter()
            .map(|l| (l.host, l.password))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        hosts(store.registry_logins(&bob).await.unwrap()),
        [
            ("a.example.com".to_string(), "x".to_string()),
            ("r.example.com:5000".to_string(), "two".to_string())
        ]
    );
    drop(store);
    let store = reopen(dir.path(), config());
    assert_eq!(store.registry_logins(&bob).await.unwrap().len(), 2);
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
}

#[tokio::test]
async fn a_functions_history_pages_newest_first_and_goes_with_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), config()).unwrap();
    let mut f = function("f");
    f.created_ms = crate::model::now_ms() - 5 * 3_600_000;
    store.create_function(&f).await.unwrap();
    crate::store::history_check::check(&store, &f).await;
    // A purge takes the rest of the index.
    store.remove_function(&f.key()).await.unwrap();
    store.cancel_queued(&f.key(), "removed").await.unwrap();
    store.purge_function(&f.key()).await.unwrap();
    assert_eq!(store.inner.tree(FN_CALLS).len(), 0);
}

#[tokio::test]
async fn pulled_images_are_kept_per_instance_and_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), config()).unwrap();
    crate::store::contract::pulled_images(&store).await;
    drop(store);
    let store = SledStore::open(dir.path(), config()).unwrap();
    assert_eq!(
        store
            .pulled_images("node-1")
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect::<Vec<_>>(),
        ["sha256:2222"]
    );
}

#[tokio::test]
async fn webhook_deliveries_keep_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), config()).unwrap();
    let f = function("hooked");
    store.create_function(&f).await.unwrap();
    crate::store::webhook_check::check(&store, &f).await;
    assert_eq!(store.inner.tree(WEBHOOKS).len(), 0);
    assert_eq!(store.inner.tree(WEBHOOK_DUE).len(), 0);
    // A delivery pending at a crash is due after the reopen.
    let mut call = Call::new(f.name.clone(), f.owner.clone(), 0, b"x", Vec::new());
    call.webhook = Some(crate::model::CallWebhook {
        url: "https://hooks.example.com/in".into(),
        on: crate::model::WebhookOn::ALL,
    });
    let id = store
        .accept(call, Bytes::from_static(b"x"))
        .await
        .unwrap()
        .id;
    store.cancel_queued(&f.key(), "cancelled").await.unwrap();
    drop(store);
    let store = SledStore::open(dir.path(), config()).unwrap();
    let due = store
        .due_webhooks(crate::model::now_ms(), 10)
        .await
        .unwrap();
    assert_eq!(due.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![id]);
    // A purge takes it with the call.
    store.remove_function(&f.key()).await.unwrap();
    store.purge_function(&f.key()).await.unwrap();
    assert!(store.get_webhook(&id).await.unwrap().is_none());
    assert_eq!(store.inner.tree(WEBHOOK_DUE).len(), 0);
}
