//! Completion webhook deliveries on sled: `webhooks` (call id → `Delivery`)
//! and `webhook_due` (`due_ms_be call_id` → URL, the pending ones soonest
//! first). The first write of a delivery is the end's own transaction
//! (`calls.rs`, `store_delivery`); every later change here moves its due
//! entry in the same transaction as the record.

use super::directory::done_key;
use super::*;
use crate::model::Delivery;

/// Writes `d` over `old` (the record as it was, if any), moving its due
/// entry with it.
pub(super) fn store_delivery(
    t: &[TransactionalTree],
    old: Option<&Delivery>,
    d: &Delivery,
) -> TxResult<()> {
    if let Some(due) = old.and_then(Delivery::due_ms) {
        t[WEBHOOK_DUE].remove(done_key(due, &d.call_id))?;
    }
    if let Some(due) = d.due_ms() {
        t[WEBHOOK_DUE].insert(done_key(due, &d.call_id), d.url.as_bytes())?;
    }
    t[WEBHOOKS].insert(d.call_id.as_bytes(), enc(d)?)?;
    Ok(())
}

/// Removes call `id`'s delivery and due entry, if any (retention, purge).
pub(super) fn drop_delivery(t: &[TransactionalTree], id: &CallId) -> TxResult<()> {
    if let Some(v) = t[WEBHOOKS].remove(id.as_bytes())? {
        let d: Delivery = dec(&v)?;
        if let Some(due) = d.due_ms() {
            t[WEBHOOK_DUE].remove(done_key(due, id))?;
        }
    }
    Ok(())
}

impl Inner {
    pub(super) fn due_webhooks(&self, now_ms: u64, limit: usize) -> Result<Vec<(CallId, String)>> {
        let end = done_key(now_ms.saturating_add(1), &CallId::from_bytes([0; 16]));
        let mut out = Vec::new();
        for kv in self.tree(WEBHOOK_DUE).range(..end).take(limit) {
            let (k, url) = kv?;
            let id = call_id(&k[8..])?;
            out.push((id, String::from_utf8_lossy(&url).into_owned()));
        }
        Ok(out)
    }

    pub(super) fn claim_webhook(
        &self,
        id: &CallId,
        holder: &str,
        now_ms: u64,
        until_ms: u64,
        fx: &mut Effects,
    ) -> Result<Option<Delivery>> {
        let claimed = self.tx(|t| {
            let Some(v) = t[WEBHOOKS].get(id.as_bytes())? else {
                return Ok(None);
            };
            let old: Delivery = dec(&v)?;
            if old.due_ms().is_none_or(|due| due > now_ms) {
                return Ok(None);
            }
            let mut d = old.clone();
            d.lease = Some(crate::model::Lease {
                holder: holder.to_string(),
                until_ms,
            });
            store_delivery(t, Some(&old), &d)?;
            Ok(Some(d))
        })?;
        fx.committed |= claimed.is_some();
        Ok(claimed)
    }

    pub(super) fn webhook_attempted(
        &self,
        d: &Delivery,
        holder: &str,
        fx: &mut Effects,
    ) -> Result<()> {
        let seq = self.next_seq()?;
        let over = self.tx(|t| {
            let Some(v) = t[WEBHOOKS].get(d.call_id.as_bytes())? else {
                return abort(StoreError::NotFound(format!(
                    "webhook of call {}",
                    d.call_id
                )));
            };
            let old: Delivery = dec(&v)?;
            if old.lease.as_ref().is_none_or(|l| l.holder != holder) {
                return abort(StoreError::Conflict(format!(
                    "the webhook of call {} is no longer this node's to record",
                    d.call_id
                )));
            }
            store_delivery(t, Some(&old), d)?;
            if d.due_ms().is_some() {
                return Ok(false);
            }
            let function = d.fn_key();
            let mut stats = tx_stats(&t[STATS], &function)?;
            log_event(&t[LOGS], &mut stats, &function, &d.event(), seq)?;
            t[STATS].insert(function.store_key().as_str(), enc(&stats)?)?;
            Ok(stats.log_bytes > self.config.log_budget)
        })?;
        fx.committed = true;
        if over {
            fx.evict_logs.push(d.fn_key());
        }
        Ok(())
    }

    pub(super) fn redeliver_webhook(
        &self,
        id: &CallId,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Result<Delivery> {
        let d = self.tx(|t| {
            let Some(v) = t[WEBHOOKS].get(id.as_bytes())? else {
                return abort(StoreError::NotFound(format!("webhook of call {id}")));
            };
            let old: Delivery = dec(&v)?;
            let mut d = old.clone();
            d.restart(now_ms);
            store_delivery(t, Some(&old), &d)?;
            Ok(d)
        })?;
        fx.committed = true;
        Ok(d)
    }
}
