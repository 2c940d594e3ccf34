//! A function's call history, newest first, from the `fn_calls` index
//! (`owner\0name\0seq` → call id, seq big-endian): a reverse range scan
//! from the cursor's sequence, so a page reads only the entries it
//! examines (at most `CALLS_SCAN_MAX`), never the function's whole
//! history. Entries go with their records (retention, purge).

use super::codec::{key_seq, seq_key, seq_prefix};
use super::{call_id, get, Inner, CALLS, FN_CALLS};
use crate::model::{Call, FnKey};
use crate::store::{CallCursor, CallPage, CallQuery, Result, CALLS_SCAN_MAX};

impl Inner {
    pub(super) fn function_calls(&self, function: &FnKey, query: &CallQuery) -> Result<CallPage> {
        let prefix = function.store_key();
        let start = seq_prefix(&prefix);
        // Exclusive: the cursor names the last entry already examined.
        let end = match query.before {
            Some(c) => seq_key(&prefix, c.seq),
            None => seq_key(&prefix, u64::MAX),
        };
        let mut page = CallPage::default();
        let mut examined = 0;
        for kv in self.tree(FN_CALLS).range(start..end).rev() {
            let (k, id) = kv?;
            let seq = key_seq(&k);
            examined += 1;
            // A record pruned between the index read and this one is gone.
            if let Some(call) = get::<Call>(self.tree(CALLS), call_id(&id)?.as_bytes())? {
                if query.past_since(call.created_ms) {
                    return Ok(page);
                }
                let at_ms = call.created_ms;
                if query.keeps(&call) {
                    page.calls.push(call);
                }
                if page.calls.len() >= query.limit || examined >= CALLS_SCAN_MAX {
                    page.next = Some(CallCursor { at_ms, seq });
                    return Ok(page);
                }
            } else if examined >= CALLS_SCAN_MAX {
                page.next = Some(CallCursor { at_ms: 0, seq });
                return Ok(page);
            }
        }
        Ok(page)
    }
}
