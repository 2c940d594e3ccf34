//! Completion webhook deliveries on JetStream: `w.CALL` → `Delivery`, and
//! `wd.CALL` → (due ms, URL) while it is pending, both written in the
//! atomic batch that ends the call (`calls.rs`) and moved together after.
//! A node takes a due delivery by putting its lease at the revision it
//! read (compare-and-set), so two nodes never send the same attempt while
//! leases hold; one whose lease ran out finds its record taken.

use super::*;
use crate::model::{Delivery, Lease};

pub(super) fn webhook_key(id: &CallId) -> String {
    format!("w.{id}")
}
pub(super) fn due_key(id: &CallId) -> String {
    format!("wd.{id}")
}

/// The writes that store `d` at revision `rev` (`None`: no check) and keep
/// its due entry with it.
pub(super) fn delivery_ops(d: &Delivery, rev: Option<u64>) -> Result<Vec<Op>> {
    let id = &d.call_id;
    let mut ops = vec![Op::Put(webhook_key(id), enc(d)?, rev)];
    match d.due_ms() {
        Some(due) => ops.push(Op::Put(due_key(id), enc(&(due, d.url.clone()))?, None)),
        None => ops.push(Op::Del(due_key(id), None)),
    }
    Ok(ops)
}

impl Inner {
    pub(super) async fn due_webhooks(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(CallId, String)>> {
        let mut due = Vec::new();
        for (k, v) in self.bucket.scan("wd.").await? {
            let (at, url): (u64, String) = dec(&k, &v)?;
            if at > now_ms {
                continue;
            }
            if let Ok(id) = CallId::parse(k.trim_start_matches("wd.")) {
                due.push((at, id, url));
            }
        }
        due.sort_by_key(|(at, _, _)| *at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|(_, id, url)| (id, url))
            .collect())
    }

    pub(super) async fn claim_webhook(
        &self,
        id: &CallId,
        holder: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<Delivery>> {
        let (rev, d) = self.bucket.get::<Delivery>(&webhook_key(id)).await?;
        let Some(mut d) = d else {
            return Ok(None);
        };
        if d.due_ms().is_none_or(|due| due > now_ms) {
            return Ok(None);
        }
        d.lease = Some(Lease {
            holder: holder.to_string(),
            until_ms,
        });
        match self.bucket.commit(delivery_ops(&d, Some(rev))?).await {
            Ok(()) => Ok(Some(d)),
            // Another node took it (or it moved): not ours this time.
            Err(Refused::Moved) => Ok(None),
            Err(Refused::Error(e)) => Err(e),
        }
    }

    pub(super) async fn webhook_attempted(&self, d: &Delivery, holder: &str) -> Result<()> {
        retry(|| async {
            let (rev, old) = self
                .bucket
                .get::<Delivery>(&webhook_key(&d.call_id))
                .await?;
            let Some(old) = old else {
                return Err(Refused::Error(StoreError::NotFound(format!(
                    "webhook of call {}",
                    d.call_id
                ))));
            };
            if old.lease.as_ref().is_none_or(|l| l.holder != holder) {
                return Err(Refused::Error(StoreError::Conflict(format!(
                    "the webhook of call {} is no longer this node's to record",
                    d.call_id
                ))));
            }
            self.bucket.commit(delivery_ops(d, Some(rev))?).await
        })
        .await?;
        if d.due_ms().is_none() {
            // The log is a cache, as for the call's own events.
            if let Ok(bytes) = enc(&d.event()) {
                let _ = self
                    .bucket
                    .client
                    .publish(calls::log_subject(&d.fn_key(), d.call_id), bytes.into())
                    .await;
            }
        }
        Ok(())
    }

    pub(super) async fn get_webhook(&self, id: &CallId) -> Result<Option<Delivery>> {
        Ok(self.bucket.get::<Delivery>(&webhook_key(id)).await?.1)
    }

    pub(super) async fn redeliver_webhook(&self, id: &CallId, now_ms: u64) -> Result<Delivery> {
        retry(|| async {
            let (rev, d) = self.bucket.get::<Delivery>(&webhook_key(id)).await?;
            let Some(mut d) = d else {
                return Err(Refused::Error(StoreError::NotFound(format!(
                    "webhook of call {id}"
                ))));
            };
            d.restart(now_ms);
            self.bucket.commit(delivery_ops(&d, Some(rev))?).await?;
            Ok(d)
        })
        .await
    }
}
