//! Idempotency keys on the NATS store: one call per key across nodes (the
//! key's compare-and-set in the record's batch decides), gone with the call.
//! And the re-create race: a stale cancel or purge leaves a function
//! created again alone.

use super::tests::{function, open, open_on};
use super::*;
use crate::model::IdempotencyKey;

fn name(s: &str) -> Name {
    Name::parse(s).expect("test name")
}

async fn submit(store: &NatsStore, f: &str, key: &str, payload: &[u8]) -> Result<Accepted> {
    let call = Call::new(name(f), name("alice"), 0, payload, vec![]);
    let idem = Idempotency::new(IdempotencyKey::parse(key).expect("key"), payload);
    store
        .accept_idempotent(
            call,
            Bytes::copy_from_slice(payload),
            QueueBudget::UNLIMITED,
            idem,
        )
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
async fn a_key_names_one_call_and_goes_with_it() {
    let (_server, store) = open().await;
    let f = function();
    let mut g = function();
    g.name = name("g");
    g.secret = crate::model::Secret::new();
    store.create_function(&f).await.expect("create f");
    store.create_function(&g).await.expect("create g");
    let first = new_call(submit(&store, "f", "k", b"abc").await);
    let (again, same) = earlier(submit(&store, "f", "k", b"abc").await);
    assert_eq!((again.id, same), (first.id, true));
    let (other, same) = earlier(submit(&store, "f", "k", b"xyz").await);
    assert_eq!((other.id, same), (first.id, false));
    let in_g = new_call(submit(&store, "g", "k", b"abc").await);
    assert!(in_g.id != first.id, "another function, another scope");
    assert_eq!(store.stats(&f.key()).await.expect("stats").total, 1);
    // Retention takes the key with the record.
    store
        .inner
        .end(
            &first.id,
            Outcome::failed("ended"),
            Some(CallState::Pending),
        )
        .await
        .expect("end");
    let pruned = store
        .prune(crate::model::now_ms() + 1)
        .await
        .expect("prune");
    assert!(pruned >= 1);
    let fresh = new_call(submit(&store, "f", "k", b"abc").await);
    assert!(fresh.id != first.id);
    // A purge takes the keys of the function's calls, queued ones too.
    store.remove_function(&g.key()).await.expect("remove g");
    store.purge_function(&g.key()).await.expect("purge g");
    let mut left = Vec::new();
    for prefix in ["i.", "ik."] {
        for (k, _) in store.inner.bucket.scan(prefix).await.expect("scan") {
            left.push(k);
        }
    }
    left.sort();
    assert_eq!(
        left,
        vec![
            format!(
                "i.alice.f.{}",
                IdempotencyKey::parse("k").expect("key").hashed()
            ),
            format!("ik.{}", fresh.id),
        ],
        "only the key of f's live call is left"
    );
}

#[tokio::test]
async fn two_nodes_racing_under_one_key_store_one_call() {
    let (server, a) = open().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let b = open_on(dir.path(), server.port).await.expect("second node");
    a.create_function(&function()).await.expect("create");
    let (a, b) = (Arc::new(a), Arc::new(b));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            submit(&store, "f", "race", b"abc").await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut new = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(Accepted::New(c)) => {
                new += 1;
                ids.insert(c.id);
            }
            Ok(Accepted::Earlier { call, same_body }) => {
                assert!(same_body);
                ids.insert(call.id);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((new, ids.len()), (1, 1));
    let stats = a.stats(&function().key()).await.expect("stats");
    assert_eq!((stats.total, stats.pending), (1, 1));
    assert_eq!(a.queue_len().await.expect("queue"), 1, "one message queued");
}

/// The re-create race: a cancel (or purge) from a stale list of removed
/// functions finds the name created again and leaves its calls alone.
#[tokio::test]
async fn a_re_created_function_is_neither_cancelled_nor_purged() {
    let (_server, store) = open().await;
    let f = function();
    store.create_function(&f).await.expect("create");
    store.remove_function(&f.key()).await.expect("remove");
    store.purge_function(&f.key()).await.expect("purge");
    let mut again = function();
    again.secret = crate::model::Secret::new();
    store.create_function(&again).await.expect("create again");
    let call = Call::new(name("f"), name("alice"), 0, b"new", vec![]);
    let call = store
        .accept(call, Bytes::from_static(b"new"))
        .await
        .expect("accept");
    assert_eq!(
        store
            .cancel_removed(&f.key(), "cancelled")
            .await
            .expect("cancel"),
        0
    );
    assert!(matches!(
        store.purge_function(&f.key()).await,
        Err(StoreError::Conflict(_))
    ));
    let kept = store.get_call(&call.id).await.expect("get");
    assert_eq!(kept.map(|c| c.state), Some(CallState::Pending));
}
