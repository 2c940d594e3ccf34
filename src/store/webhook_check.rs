//! The promises of the webhook delivery methods, checked the same way on
//! each backend (`embedded/tests.rs`, `nats/tests.rs` on a real
//! nats-server call `check`): the delivery is there as soon as the end is,
//! only for the ends its target wants; one holder at a time; an attempt
//! recorded by a holder that lost its lease is refused; the settled event
//! reaches the log; redelivery; retention takes it with its call.

use super::{Started, Store, StoreError};
use crate::model::{
    now_ms, Attempt, Call, CallId, CallState, CallWebhook, DeliveryState, EventKind, Function,
    Outcome, RetryRule, WebhookOn,
};
use bytes::Bytes;
use std::time::Duration;

const URL: &str = "https://hooks.example.com/in";
const RULE: RetryRule = RetryRule {
    min_backoff: Duration::from_secs(10),
    max_backoff: Duration::from_secs(60),
    retry_for: Duration::from_secs(3600),
};

async fn accept(store: &dyn Store, f: &Function, on: Option<WebhookOn>) -> CallId {
    let mut call = Call::new(f.name.clone(), f.owner.clone(), 0, b"in", Vec::new());
    call.webhook = on.map(|on| CallWebhook {
        url: URL.into(),
        on,
    });
    store
        .accept(call, Bytes::from_static(b"in"))
        .await
        .unwrap()
        .id
}

async fn run_to(store: &dyn Store, f: &Function, id: &CallId, state: CallState) {
    // A shared store starts only the queue head it handed out.
    assert_eq!(store.queue_head(&f.owner).await.unwrap(), Some(*id));
    assert!(matches!(
        store.start(id).await.unwrap(),
        Started::Running(..)
    ));
    let mut end = Outcome::failed("boom");
    if state == CallState::Finished {
        end.state = CallState::Finished;
        end.message = None;
        end.exit_code = Some(0);
        end.stdout = Bytes::from_static(b"out");
    }
    store.finish(id, end).await.unwrap();
}

async fn due(store: &dyn Store, at: u64) -> Vec<CallId> {
    store
        .due_webhooks(at, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, url)| {
            assert_eq!(url, URL);
            id
        })
        .collect()
}

/// `f` exists with no calls, and its owner may queue a few.
pub(crate) async fn check(store: &dyn Store, f: &Function) {
    let finished_only = WebhookOn {
        finished: true,
        failed: false,
    };
    // A FINISHED end: its delivery is stored with it, due at once.
    let id = accept(store, f, Some(finished_only)).await;
    assert!(store.get_webhook(&id).await.unwrap().is_none());
    run_to(store, f, &id, CallState::Finished).await;
    let d = store.get_webhook(&id).await.unwrap().expect("delivery");
    assert_eq!(
        (d.state, d.attempts, d.call_state),
        (DeliveryState::Pending, 0, CallState::Finished)
    );
    let envelope: crate::model::Envelope = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(
        (envelope.state.as_str(), envelope.output.as_str()),
        ("FINISHED", "b3V0")
    );
    // Not for an end the target does not want, nor without a target.
    let failed = accept(store, f, Some(finished_only)).await;
    run_to(store, f, &failed, CallState::Failed).await;
    let plain = accept(store, f, None).await;
    run_to(store, f, &plain, CallState::Finished).await;
    // A cancelled call's end counts too.
    let cancelled = accept(store, f, Some(WebhookOn::ALL)).await;
    assert_eq!(store.cancel_queued(&f.key(), "cancelled").await.unwrap(), 1);
    let c = store
        .get_webhook(&cancelled)
        .await
        .unwrap()
        .expect("delivery");
    assert_eq!(c.call_state, CallState::Failed);
    for none in [&failed, &plain] {
        assert!(store.get_webhook(none).await.unwrap().is_none());
    }
    let now = now_ms();
    let mut pending = due(store, now).await;
    pending.sort();
    let mut want = vec![id, cancelled];
    want.sort();
    assert_eq!(pending, want);

    // One holder at a time.
    let a = store
        .claim_webhook(&id, "a", now, now + 60_000)
        .await
        .unwrap()
        .expect("claimed");
    assert!(store
        .claim_webhook(&id, "b", now, now + 60_000)
        .await
        .unwrap()
        .is_none());
    assert_eq!(due(store, now).await, vec![cancelled]);
    let mut theirs = a.clone();
    theirs.record(&Attempt::Delivered(200), &RULE, now, 0.0);
    assert!(matches!(
        store.webhook_attempted(&theirs, "b").await,
        Err(StoreError::Conflict(_))
    ));
    // A retry, recorded by its holder: due again after the back-off.
    let mut d = a;
    d.record(
        &Attempt::Retry {
            status: Some(503),
            error: "answered 503".into(),
            retry_after: None,
        },
        &RULE,
        now,
        0.0,
    );
    store.webhook_attempted(&d, "a").await.unwrap();
    let stored = store.get_webhook(&id).await.unwrap().expect("delivery");
    assert_eq!(
        (stored.attempts, stored.last_status, stored.lease.clone()),
        (1, Some(503), None)
    );
    assert!(!due(store, now).await.contains(&id));
    let next = stored.next_ms;
    assert!(due(store, next).await.contains(&id));
    // A lease that ran out is another holder's to take; the first then
    // cannot record.
    let late = store
        .claim_webhook(&id, "a", next, next + 10)
        .await
        .unwrap()
        .expect("claimed");
    let b = store
        .claim_webhook(&id, "b", next + 11, next + 60_000)
        .await
        .unwrap()
        .expect("taken over");
    let mut lost = late;
    lost.record(&Attempt::Delivered(200), &RULE, next, 0.0);
    assert!(store.webhook_attempted(&lost, "a").await.is_err());
    let mut d = b;
    d.record(&Attempt::Delivered(204), &RULE, next + 12, 0.0);
    store.webhook_attempted(&d, "b").await.unwrap();
    let stored = store.get_webhook(&id).await.unwrap().expect("delivery");
    assert_eq!(
        (stored.state, stored.attempts),
        (DeliveryState::Delivered, 2)
    );
    assert!(!due(store, u64::MAX / 2).await.contains(&id));
    // Its settled event reaches the function's log (NATS: a moment later).
    let mut found = false;
    for _ in 0..50 {
        let events = store.events(&f.key(), None, Some(&id), None).await.unwrap();
        if let Some((_, e)) = events.iter().find(|(_, e)| e.kind == EventKind::Webhook) {
            assert_eq!(e.message, "delivered 204 after 2 attempts");
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found, "no WEBHOOK event");

    // Sent again on demand, with a new window.
    let again = store.redeliver_webhook(&id, now_ms()).await.unwrap();
    assert_eq!(again.state, DeliveryState::Pending);
    assert!(due(store, now_ms()).await.contains(&id));
    assert!(matches!(
        store.redeliver_webhook(&plain, now_ms()).await,
        Err(StoreError::NotFound(_))
    ));

    // Retention takes the deliveries with their calls.
    assert_eq!(store.prune(now_ms() + 60_000).await.unwrap(), 4);
    for gone in [&id, &cancelled] {
        assert!(store.get_webhook(gone).await.unwrap().is_none());
    }
    assert!(due(store, u64::MAX / 2).await.is_empty());
}
