//! Idempotency keys on the sled store: one call per key, in the accept's
//! own write, whatever the payload's path (inline or file), and gone with
//! the call. And the re-create race: a stale cancel or purge leaves a
//! function created again alone.

use super::*;
use crate::model::IdempotencyKey;

fn name(s: &str) -> Name {
    Name::parse(s).expect("test name")
}

fn function(owner: &str, n: &str) -> Function {
    Function::for_test(owner, n)
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

async fn setup() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path(), config()).expect("open");
    for (o, n) in [("alice", "f"), ("alice", "g"), ("bob", "f")] {
        store
            .create_function(&function(o, n))
            .await
            .expect("create");
    }
    (dir, store)
}

async fn submit(
    store: &SledStore,
    owner: &str,
    f: &str,
    key: &str,
    payload: &[u8],
    budget: QueueBudget,
) -> Result<Accepted> {
    let call = Call::new(name(f), name(owner), 0, payload, vec![]);
    let idem = Idempotency::new(IdempotencyKey::parse(key).expect("key"), payload);
    store
        .accept_idempotent(call, Bytes::copy_from_slice(payload), budget, idem)
        .await
}

fn new_call(a: Result<Accepted>) -> Call {
    match a {
        Ok(Accepted::New(c)) => c,
        other => panic!("expected a new call, got {other:?}"),
    }
}

fn earlier(a: Result<Accepted>) -> (Call, bool) {
    match a {
        Ok(Accepted::Earlier { call, same_body }) => (call, same_body),
        other => panic!("expected the earlier call, got {other:?}"),
    }
}

#[tokio::test]
async fn a_key_names_one_call_per_owner_and_function() {
    let (_d, store) = setup().await;
    let all = QueueBudget::UNLIMITED;
    // Inline (≤ 4 bytes) and file payloads.
    for payload in [&b"abc"[..], &b"a file payload"[..]] {
        let k = format!("k-{}", payload.len());
        let first = new_call(submit(&store, "alice", "f", &k, payload, all).await);
        let files = std::fs::read_dir(store.inner.blobs.dir())
            .map(|d| d.count())
            .ok();
        let (again, same) = earlier(submit(&store, "alice", "f", &k, payload, all).await);
        assert_eq!((again.id, same), (first.id, true));
        // The resubmission left no file behind.
        assert_eq!(
            std::fs::read_dir(store.inner.blobs.dir())
                .map(|d| d.count())
                .ok(),
            files
        );
        let (other, same) = earlier(submit(&store, "alice", "f", &k, b"xyz", all).await);
        assert_eq!((other.id, same), (first.id, false));
        // Another function, another owner: other scopes, new calls.
        let g = new_call(submit(&store, "alice", "g", &k, payload, all).await);
        let b = new_call(submit(&store, "bob", "f", &k, payload, all).await);
        assert!(g.id != first.id && b.id != first.id);
    }
    let stats = store.stats(&FnKey::new(name("alice"), name("f"))).await;
    assert_eq!(stats.expect("stats").total, 2, "one call per key");
}

#[tokio::test]
async fn a_resubmission_is_answered_over_budget_and_in_any_state() {
    let (_d, store) = setup().await;
    let one = QueueBudget {
        max_calls: 1,
        max_bytes: 1000,
    };
    let first = new_call(submit(&store, "alice", "f", "k", b"ab", one).await);
    // The queue is full: a new call is refused, the resubmission is not.
    match submit(&store, "alice", "f", "other", b"ab", one).await {
        Err(StoreError::OverBudget(_)) => {}
        other => panic!("expected over budget, got {other:?}"),
    }
    assert_eq!(
        earlier(submit(&store, "alice", "f", "k", b"ab", one).await)
            .0
            .id,
        first.id
    );
    let queued = get::<QueueUse>(store.inner.tree(QUEUED), "alice").expect("queued");
    assert_eq!(
        queued,
        Some(QueueUse { calls: 1, bytes: 2 }),
        "counted once"
    );
    // Running, then ended: still the same call.
    assert!(matches!(
        store.start(&first.id).await,
        Ok(Started::Running(..))
    ));
    let (c, _) = earlier(submit(&store, "alice", "f", "k", b"ab", one).await);
    assert_eq!((c.id, c.state), (first.id, CallState::Running));
    let done = Outcome {
        state: CallState::Finished,
        exit_code: Some(0),
        message: None,
        stdout: Bytes::from_static(b"out"),
        stderr: Bytes::new(),
        image_digest: None,
    };
    store.finish(&first.id, done).await.expect("finish");
    let (c, _) = earlier(submit(&store, "alice", "f", "k", b"ab", one).await);
    assert_eq!((c.id, c.state), (first.id, CallState::Finished));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_under_one_key_store_one_call() {
    let (_d, store) = setup().await;
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..20usize {
        let store = Arc::clone(&store);
        // An inline payload under one key, a file payload under another.
        let (key, payload): (&str, &[u8]) = if i % 2 == 0 {
            ("inline", b"abc")
        } else {
            ("file", b"a file payload")
        };
        tasks.push(tokio::spawn(async move {
            let a = submit(&store, "alice", "f", key, payload, QueueBudget::UNLIMITED).await;
            (key, a)
        }));
    }
    let mut ids: HashMap<&str, HashSet<CallId>> = HashMap::new();
    let mut new: HashMap<&str, usize> = HashMap::new();
    for t in tasks {
        let (key, a) = t.await.expect("task");
        match a {
            Ok(Accepted::New(c)) => {
                *new.entry(key).or_default() += 1;
                ids.entry(key).or_default().insert(c.id);
            }
            Ok(Accepted::Earlier { call, same_body }) => {
                assert!(same_body);
                ids.entry(key).or_default().insert(call.id);
            }
            Err(e) => panic!("{e}"),
        }
    }
    for key in ["inline", "file"] {
        assert_eq!((new[key], ids[key].len()), (1, 1), "{key}");
    }
    let stats = store.stats(&FnKey::new(name("alice"), name("f"))).await;
    assert_eq!(stats.expect("stats").total, 2);
}

#[tokio::test]
async fn the_key_survives_a_reopen_and_goes_with_its_call() {
    let (d, store) = setup().await;
    let all = QueueBudget::UNLIMITED;
    let inline = new_call(submit(&store, "alice", "f", "a", b"ab", all).await);
    let file = new_call(submit(&store, "alice", "f", "b", b"a file payload", all).await);
    drop(store);
    let mut store = None;
    for _ in 0..50 {
        if let Ok(s) = SledStore::open(d.path(), config()) {
            store = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let store = store.expect("reopen");
    assert_eq!(
        earlier(submit(&store, "alice", "f", "a", b"ab", all).await)
            .0
            .id,
        inline.id
    );
    // Retention: the ended call's key goes with its record.
    store
        .finish(&inline.id, Outcome::failed("ended"))
        .await
        .expect("end");
    assert_eq!(
        store
            .prune(crate::model::now_ms() + 1)
            .await
            .expect("prune"),
        1
    );
    let fresh = new_call(submit(&store, "alice", "f", "a", b"ab", all).await);
    assert!(fresh.id != inline.id);
    // A purge takes every key of the function.
    let f = FnKey::new(name("alice"), name("f"));
    store.remove_function(&f).await.expect("remove");
    store.purge_function(&f).await.expect("purge");
    assert!(
        store.inner.tree(IDEM).is_empty(),
        "keys left after the purge"
    );
    assert!(store.inner.tree(IDEM_CALLS).is_empty());
    let _ = file;
}

/// The re-create race: a cancel (or purge) from a stale list of removed
/// functions finds the name created again and leaves its calls alone.
#[tokio::test]
async fn a_re_created_function_is_neither_cancelled_nor_purged() {
    let (_d, store) = setup().await;
    let f = FnKey::new(name("alice"), name("f"));
    store.remove_function(&f).await.expect("remove");
    store.purge_function(&f).await.expect("purge");
    store
        .create_function(&function("alice", "f"))
        .await
        .expect("create again");
    let call = Call::new(name("f"), name("alice"), 0, b"new", vec![]);
    let call = store
        .accept(call, Bytes::from_static(b"new"))
        .await
        .expect("accept");
    assert_eq!(
        store.cancel_removed(&f, "cancelled").await.expect("cancel"),
        0
    );
    assert!(matches!(
        store.purge_function(&f).await,
        Err(StoreError::Conflict(_))
    ));
    let kept = store.get_call(&call.id).await.expect("get");
    assert_eq!(kept.map(|c| c.state), Some(CallState::Pending));
}
