//! A function's call history on JetStream, newest first. Each call has an
//! index key `h.OWNER.NAME.HOUR.CALL` (HOUR: its acceptance time in hours
//! since the epoch; value: its queue sequence), put in the batch that
//! stores the call's record and deleted with it (retention's `forget`, a
//! purge). A page walks the hours from the newest back, scanning one
//! hour's keys at a time (a subject-filtered read of the records stream,
//! not the function's whole history), orders them by sequence, and reads
//! the records (leader reads, as `/v1/calls/{id}` does), so both answers
//! agree. It examines at most `CALLS_SCAN_MAX` records and `HOURS_PER_PAGE`
//! hours, never an hour before the function was created, and stops with a
//! cursor where it stopped.

use super::calls::call_key;
use super::kv::{dec, Op};
use super::*;
use crate::store::{CallCursor, CallPage, CallQuery, CALLS_SCAN_MAX};
use futures_util::StreamExt;

const HOUR_MS: u64 = 3_600_000;
/// Most hours one page walks (each one scan), so a long quiet history
/// costs a few pages, not one unbounded request.
const HOURS_PER_PAGE: u64 = 48;
/// Records read at once.
const READS_IN_FLIGHT: usize = 32;

/// The index key of `call`.
pub(super) fn history_key(call: &Call) -> String {
    format!(
        "h.{}.{}.{}.{}",
        call.owner,
        call.function,
        call.created_ms / HOUR_MS,
        call.id
    )
}

/// The index entry `accept` puts with the record.
pub(super) fn history_put(call: &Call) -> Result<Op> {
    Ok(Op::Put(
        history_key(call),
        call.seq.to_string().into_bytes(),
        None,
    ))
}

/// A call's record as the leader has it (`None`: gone), with its entry's
/// sequence.
async fn read_call(bucket: &kv::Bucket, seq: u64, id: CallId) -> Result<(u64, Option<Call>)> {
    let key = call_key(&id);
    let call = match bucket.read(&key).await?.and_then(|r| r.value) {
        Some(v) => Some(dec::<Call>(&key, &v)?),
        None => None,
    };
    Ok((seq, call))
}

impl Inner {
    pub(super) async fn function_calls(
        &self,
        function: &FnKey,
        query: &CallQuery,
    ) -> Result<CallPage> {
        let mut page = CallPage::default();
        let Some(f) = self.function(function).await? else {
            return Ok(page);
        };
        let now_hour = crate::model::now_ms() / HOUR_MS;
        let mut hour = now_hour;
        if let Some(u) = query.until_ms {
            hour = hour.min(u / HOUR_MS);
        }
        // (hour, seq): only entries before it.
        let mut before = (u64::MAX, u64::MAX);
        if let Some(c) = query.before {
            hour = hour.min(c.at_ms / HOUR_MS);
            before = (c.at_ms / HOUR_MS, c.seq);
        }
        let mut lowest = f.created_ms / HOUR_MS;
        if let Some(s) = query.since_ms {
            lowest = lowest.max(s.saturating_sub(1000) / HOUR_MS);
        }
        let mut examined = 0;
        let mut walked = 0;
        while hour >= lowest {
            if walked == HOURS_PER_PAGE {
                page.next = Some(CallCursor {
                    at_ms: hour * HOUR_MS,
                    seq: u64::MAX,
                });
                return Ok(page);
            }
            walked += 1;
            let prefix = format!("h.{}.{}.{hour}.", function.owner, function.name);
            let mut entries: Vec<(u64, CallId)> = Vec::new();
            for (k, v) in self.bucket.scan(&prefix).await? {
                let seq: u64 = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("a malformed entry at {k}")))?;
                let Ok(id) = CallId::parse(&k[prefix.len()..]) else {
                    continue;
                };
                if (hour, seq) < before {
                    entries.push((seq, id));
                }
            }
            entries.sort_unstable_by(|a, b| b.cmp(a));
            entries.truncate(CALLS_SCAN_MAX - examined);
            let bucket = &self.bucket;
            let mut reads = futures_util::stream::iter(
                entries
                    .into_iter()
                    .map(|(seq, id)| read_call(bucket, seq, id)),
            )
            .buffered(READS_IN_FLIGHT);
            while let Some(read) = reads.next().await {
                let (seq, call) = read?;
                examined += 1;
                let at = CallCursor {
                    at_ms: hour * HOUR_MS,
                    seq,
                };
                // A record pruned since the scan is gone.
                if let Some(call) = call {
                    if query.past_since(call.created_ms) {
                        return Ok(page);
                    }
                    if query.keeps(&call) {
                        page.calls.push(call);
                    }
                }
                if page.calls.len() >= query.limit || examined >= CALLS_SCAN_MAX {
                    page.next = Some(at);
                    return Ok(page);
                }
            }
            if hour == 0 {
                break;
            }
            hour -= 1;
        }
        Ok(page)
    }

    /// Deletes whatever index entries of `function` are left (its purge).
    pub(super) async fn forget_history(&self, function: &FnKey) -> Result<()> {
        let prefix = format!("h.{}.{}.", function.owner, function.name);
        let keys: Vec<String> = self
            .bucket
            .scan(&prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for chunk in keys.chunks(64) {
            let ops = chunk.iter().map(|k| Op::Del(k.clone(), None)).collect();
            self.bucket.commit(ops).await.map_err(|e| match e {
                kv::Refused::Error(e) => e,
                kv::Refused::Moved => StoreError::Conflict(format!("function {function} changed")),
            })?;
        }
        Ok(())
    }
}
