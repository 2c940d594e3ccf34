//! The promises of `Store::function_calls`, checked the same way on each
//! backend (`embedded/tests.rs`, `nats/tests.rs` call `check`).

use super::{CallCursor, CallQuery, Store};
use crate::model::{now_ms, Call, CallId, CallState, Function, Outcome};
use bytes::Bytes;
use std::time::{Duration, Instant};

const HOUR_MS: u64 = 3_600_000;

async fn page(store: &dyn Store, f: &Function, q: CallQuery) -> (Vec<CallId>, Option<CallCursor>) {
    let p = store.function_calls(&f.key(), &q).await.unwrap();
    (p.calls.iter().map(|c| c.id).collect(), p.next)
}

async fn accept(store: &dyn Store, f: &Function, created_ms: u64) -> CallId {
    let mut call = Call::new(f.name.clone(), f.owner.clone(), 0, b"x", Vec::new());
    call.created_ms = created_ms;
    store
        .accept(call, Bytes::from_static(b"x"))
        .await
        .unwrap()
        .id
}

/// Every page of `q` with `limit`, following the cursors.
async fn walk(store: &dyn Store, f: &Function, q: &CallQuery, limit: usize) -> Vec<CallId> {
    let mut all = Vec::new();
    let mut before = None;
    for _ in 0..100 {
        let (ids, next) = page(
            store,
            f,
            CallQuery {
                limit,
                before,
                ..q.clone()
            },
        )
        .await;
        assert!(ids.len() <= limit);
        all.extend(ids);
        match next {
            Some(n) => before = Some(n),
            None => return all,
        }
    }
    panic!("more than 100 pages");
}

/// `f` exists (created at least 4 hours ago), has no calls, and its owner
/// may queue 100. Leaves 71 calls: 10 accepted 3 hours ago, the 60 oldest
/// ended (every third FAILED), the 11 newest PENDING.
pub(crate) async fn check(store: &dyn Store, f: &Function) {
    let now = now_ms();
    let mut ids = Vec::new();
    for i in 0..70 {
        let at = if i < 10 { now - 3 * HOUR_MS + i } else { now };
        ids.push(accept(store, f, at).await);
    }
    // The 60 oldest run and end, in queue order.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ended = 0;
    while ended < 60 {
        assert!(Instant::now() < deadline, "the calls did not start");
        let Some(id) = store.queue_head(&f.owner).await.unwrap() else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        assert!(matches!(
            store.start(&id).await.unwrap(),
            super::Started::Running(..)
        ));
        let outcome = if ended % 3 == 0 {
            Outcome::failed("exit code 3")
        } else {
            Outcome {
                state: CallState::Finished,
                exit_code: Some(0),
                message: None,
                stdout: Bytes::from_static(b"ok"),
                stderr: Bytes::new(),
                image_digest: None,
            }
        };
        store.finish(&id, outcome).await.unwrap();
        ended += 1;
    }
    let newest_first: Vec<CallId> = ids.iter().rev().copied().collect();
    let all = CallQuery {
        limit: 500,
        ..Default::default()
    };
    assert_eq!(
        page(store, f, all.clone()).await,
        (newest_first.clone(), None)
    );

    // Pages of 25, with a call arriving between pages: the pages go on
    // where they stopped; the newcomer is only on a fresh first page.
    let (first, next) = page(
        store,
        f,
        CallQuery {
            limit: 25,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(first, newest_first[..25]);
    let newcomer = accept(store, f, now_ms()).await;
    let mut paged = first;
    let mut before = next;
    while let Some(b) = before {
        let (ids, next) = page(
            store,
            f,
            CallQuery {
                limit: 25,
                before: Some(b),
                ..Default::default()
            },
        )
        .await;
        assert!(!ids.contains(&newcomer));
        paged.extend(ids);
        before = next;
    }
    assert_eq!(paged, newest_first);
    assert_eq!(walk(store, f, &all, 7).await[0], newcomer);

    // States, one or several.
    let of = |states: Vec<CallState>| CallQuery {
        states,
        ..all.clone()
    };
    let pending = walk(store, f, &of(vec![CallState::Pending]), 4).await;
    let mut want = vec![newcomer];
    want.extend_from_slice(&newest_first[..10]);
    assert_eq!(pending, want);
    assert_eq!(
        walk(store, f, &of(vec![CallState::Failed]), 6).await.len(),
        20
    );
    assert_eq!(
        walk(
            store,
            f,
            &of(vec![CallState::Failed, CallState::Finished]),
            500
        )
        .await
        .len(),
        60
    );
    assert_eq!(
        walk(store, f, &of(vec![CallState::Running]), 5).await,
        vec![]
    );

    // Times: the 10 accepted 3 hours ago, and the rest.
    let older = CallQuery {
        until_ms: Some(now - 2 * HOUR_MS),
        ..all.clone()
    };
    assert_eq!(walk(store, f, &older, 3).await, newest_first[60..]);
    let recent = CallQuery {
        since_ms: Some(now - HOUR_MS),
        ..all.clone()
    };
    assert_eq!(walk(store, f, &recent, 500).await.len(), 61);
    let future = CallQuery {
        since_ms: Some(now + HOUR_MS),
        ..all.clone()
    };
    assert_eq!(walk(store, f, &future, 500).await, vec![]);

    // Retention takes the ended calls out of the history with their records.
    assert_eq!(store.prune(now_ms() + 1).await.unwrap(), 60);
    assert_eq!(walk(store, f, &all, 500).await, pending);
}
