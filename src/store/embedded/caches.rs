//! The per-function output and log caches: byte-budgeted, oldest evicted
//! first. Byte counts live in the same transactions as the bytes they
//! count, so they survive restarts exactly. An evicted or fetched output's
//! file is deleted only once the transaction that dropped it is durable.

use super::codec::{key_seq, seq_prefix};
use super::*;
use crate::model::OutputState;

impl Inner {
    /// Evicts the oldest outputs of `function` until it holds at most
    /// `target` bytes. The caller holds the function's evict lock.
    pub(super) fn evict_outputs_to(
        &self,
        function: &FnKey,
        target: u64,
        fx: &mut Effects,
    ) -> Result<()> {
        let prefix = seq_prefix(function.store_key().as_str());
        while self.stats(function)?.output_bytes > target {
            let Some(kv) = self.tree(OUTPUT_INDEX).scan_prefix(&prefix).next() else {
                break;
            };
            let (key, id) = kv?;
            let evicted = self.tx(|t| {
                t[OUTPUT_INDEX].remove(&key)?;
                let marker = match t[OUTPUTS].remove(&id)? {
                    Some(v) => Some(Marker::decode(&v).or_else(abort)?),
                    None => None,
                };
                if let Some(v) = t[CALLS].get(&id)? {
                    let mut call: Call = dec(&v)?;
                    call.output = OutputState::Evicted;
                    t[CALLS].insert(&id, enc(&call)?)?;
                }
                let mut stats = tx_stats(&t[STATS], function)?;
                stats.output_bytes = stats
                    .output_bytes
                    .saturating_sub(marker.as_ref().map_or(0, Marker::len));
                t[STATS].insert(function.store_key().as_str(), enc(&stats)?)?;
                Ok(marker)
            })?;
            fx.committed = true;
            crate::crash_point!("evict-committed");
            if let Some(Marker::File(_)) = evicted {
                fx.deletes
                    .push(self.blobs.path(Kind::Output, &call_id(&id)?));
            }
        }
        Ok(())
    }

    pub(super) fn take_output(
        &self,
        id: &CallId,
        fx: &mut Effects,
    ) -> Result<Option<OutputLookup>> {
        let Some(call) = get::<Call>(self.tree(CALLS), id.as_bytes())? else {
            return Ok(None);
        };
        if call.state != CallState::Finished || call.output != OutputState::Stored {
            return Ok(Some(OutputLookup::NoOutput(call)));
        }
        // One fetch at a time per function, so the bytes read here are the
        // ones the transaction hands out (eviction takes the same lock).
        let evict_lock = self.evict_lock(&call.fn_key());
        let _guard = lock(&evict_lock);
        let bytes = match self.tree(OUTPUTS).get(id.as_bytes())? {
            Some(v) => self.blobs.read(Kind::Output, id, Marker::decode(&v)?)?,
            None => {
                // Evicted between the first read and the lock.
                return match get::<Call>(self.tree(CALLS), id.as_bytes())? {
                    Some(c) => Ok(Some(OutputLookup::NoOutput(c))),
                    None => Ok(None),
                };
            }
        };
        let taken = self.tx(|t| {
            let mut call: Call = tx_get(&t[CALLS], id.as_bytes(), "call")?;
            let Some(v) = t[OUTPUTS].remove(id.as_bytes())? else {
                return Ok((call, None));
            };
            let marker = Marker::decode(&v).or_else(abort)?;
            t[OUTPUT_INDEX].remove(seq_key(fk(&call).as_str(), call.seq))?;
            call.output = OutputState::Fetched;
            t[CALLS].insert(id.as_bytes(), enc(&call)?)?;
            let mut stats = tx_stats(&t[STATS], &call.fn_key())?;
            stats.output_bytes = stats.output_bytes.saturating_sub(marker.len());
            t[STATS].insert(fk(&call).as_str(), enc(&stats)?)?;
            Ok((call, Some(marker)))
        })?;
        match taken {
            (call, Some(marker)) => {
                fx.committed = true;
                crate::crash_point!("fetch-committed");
                if let Marker::File(_) = marker {
                    fx.deletes.push(self.blobs.path(Kind::Output, id));
                }
                Ok(Some(OutputLookup::Output(call, Bytes::from(bytes))))
            }
            (call, None) => Ok(Some(OutputLookup::NoOutput(call))),
        }
    }

    pub(super) fn logs_over_budget(&self, function: &FnKey) -> Result<bool> {
        Ok(self.stats(function)?.log_bytes > self.config.log_budget)
    }

    /// Evicts `function`'s oldest events until its log is within budget.
    /// One evictor per function runs at a time (`SledStore::evict_logs_later`).
    pub(super) fn evict_logs(&self, function: &FnKey) -> Result<()> {
        let prefix = seq_prefix(function.store_key().as_str());
        while self.logs_over_budget(function)? {
            let Some(kv) = self.tree(LOGS).scan_prefix(&prefix).next() else {
                break;
            };
            let (key, _) = kv?;
            self.tx(|t| {
                let Some(old) = t[LOGS].remove(&key)? else {
                    return Ok(());
                };
                let mut stats = tx_stats(&t[STATS], function)?;
                stats.log_bytes = stats.log_bytes.saturating_sub(old.len() as u64);
                t[STATS].insert(function.store_key().as_str(), enc(&stats)?)?;
                Ok(())
            })?;
        }
        Ok(())
    }

    pub(super) fn events(
        &self,
        function: &FnKey,
        after: Option<u64>,
        call: Option<&CallId>,
        tail: Option<usize>,
    ) -> Result<Vec<(u64, Event)>> {
        let tree = self.tree(LOGS);
        let start = seq_key(
            function.store_key().as_str(),
            after.map_or(0, |a| a.saturating_add(1)),
        );
        let end = seq_key(function.store_key().as_str(), u64::MAX);
        let wanted = |ev: &Event| call.is_none_or(|c| *c == ev.call_id);
        let mut out = Vec::new();
        match tail {
            // The newest n: read backwards and stop early.
            Some(n) => {
                for kv in tree.range(start..=end).rev() {
                    if out.len() >= n {
                        break;
                    }
                    let (k, v) = kv?;
                    let ev: Event = decode(&v)?;
                    if wanted(&ev) {
                        out.push((key_seq(&k), ev));
                    }
                }
                out.reverse();
            }
            None => {
                for kv in tree.range(start..=end) {
                    let (k, v) = kv?;
                    let ev: Event = decode(&v)?;
                    if wanted(&ev) {
                        out.push((key_seq(&k), ev));
                    }
                }
            }
        }
        Ok(out)
    }

    pub(super) fn last_event_seq(&self, function: &FnKey) -> Result<Option<u64>> {
        let start = seq_key(function.store_key().as_str(), 0);
        let end = seq_key(function.store_key().as_str(), u64::MAX);
        match self.tree(LOGS).range(start..=end).next_back() {
            Some(kv) => Ok(Some(key_seq(&kv?.0))),
            None => Ok(None),
        }
    }
}
