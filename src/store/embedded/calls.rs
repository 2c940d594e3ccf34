//! Calls and the per-user queues: accept, start, requeue, finish, cancel,
//! and retention of ended calls. Each state change is one transaction (an
//! inline accept: one staged write, `stage.rs`) that also moves the call's
//! queue entry, its live/done index entries, the function's counters and
//! its log.

use super::codec::{key_prefix, seq_prefix};
use super::directory::done_key;
use super::*;
use crate::model::{IdempotencyRecord, OutputState};
use crate::store::over_queue;

/// What an accept's write did.
pub(super) enum AcceptTx {
    /// The call is stored; true when the log went over budget.
    Stored(bool),
    /// The key names an earlier call: nothing was stored.
    Earlier(Box<Accepted>),
}

/// The `idempotency` key of `idem` for `function`: `owner\0name\0KEY`.
pub(super) fn idem_key(function: &FnKey, idem: &Idempotency) -> Vec<u8> {
    let mut k = seq_prefix(&function.store_key());
    k.extend_from_slice(idem.key.as_str().as_bytes());
    k
}

impl Inner {
    /// Indexes a call by its state (migration from schema 1).
    pub(super) fn index_call(&self, w: &WriteGuard, call: &Call) -> Result<()> {
        match call.finished_ms {
            Some(done) if call.state.is_done() => {
                w.tree(DONE).insert(done_key(done, &call.id), &[])?;
            }
            _ => {
                w.tree(LIVE)
                    .insert(seq_key(fk(call).as_str(), call.seq), call.id.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Accepts a call. An inline payload is a staged write on the commit
    /// thread; a file is written and fsynced here, on a blocking thread,
    /// before its own transaction. Under an idempotency key, a key already
    /// stored answers its call and nothing is written.
    pub(super) fn accept(
        &self,
        mut call: Call,
        payload: &[u8],
        budget: QueueBudget,
        idem: Option<&Idempotency>,
        fx: &mut Effects,
    ) -> Result<Accepted> {
        // A look before the space check and the file: a resubmission costs
        // no disk and is answered on a full one. The write below decides.
        if let Some(idem) = idem {
            let key = idem_key(&call.fn_key(), idem);
            if let Some(earlier) = self.earlier(self.tree(IDEM).get(&key)?, idem)? {
                return Ok(self.found_earlier(earlier, fx));
            }
        }
        let seqs = self.accept_ids(&mut call, payload.len())?;
        if payload.len() as u64 <= self.config.inline_max_bytes {
            let marker = Marker::Inline(payload.to_vec());
            let done = self.staged(|t| self.accept_tx(t, &call, &marker, seqs, &budget, idem))?;
            return Ok(self.accepted(call, done, fx));
        }
        // Before the file is written, so a refusal costs no disk; the
        // transaction below checks again, and that check decides.
        let used: QueueUse = get(self.tree(QUEUED), call.owner.as_str())?.unwrap_or_default();
        if let Some(e) = over_queue(
            &call.owner,
            &budget,
            used.calls,
            used.bytes,
            payload.len() as u64,
        ) {
            return Err(e);
        }
        self.blobs
            .write(Kind::Payload, &call.id, payload)
            .map_err(|e| io_full(e, "the payload"))?;
        crate::crash_point!("accept-payload-written");
        let marker = Marker::File(payload.len() as u64);
        let done = match self.tx(|t| self.accept_tx(t, &call, &marker, seqs, &budget, idem)) {
            Ok(AcceptTx::Stored(over)) => AcceptTx::Stored(over),
            Ok(earlier) => {
                self.blobs.remove_uncommitted(Kind::Payload, &call.id);
                earlier
            }
            Err(e) => {
                self.blobs.remove_uncommitted(Kind::Payload, &call.id);
                return Err(e);
            }
        };
        Ok(self.accepted(call, done, fx))
    }

    fn accepted(&self, call: Call, done: AcceptTx, fx: &mut Effects) -> Accepted {
        let over = match done {
            AcceptTx::Stored(over) => over,
            AcceptTx::Earlier(earlier) => return self.found_earlier(*earlier, fx),
        };
        fx.committed = true;
        crate::crash_point!("accept-committed");
        if over {
            fx.evict_logs.push(call.fn_key());
        }
        Accepted::New(call)
    }

    /// An earlier call under the key. It may be the write of an accept
    /// still waiting for its flush: the answer waits for the next one too,
    /// so no client hears of a call that is not durable.
    fn found_earlier(&self, earlier: Accepted, fx: &mut Effects) -> Accepted {
        fx.committed = true;
        earlier
    }

    /// The earlier call a stored key names, if it is still there.
    fn earlier(&self, stored: Option<sled::IVec>, idem: &Idempotency) -> Result<Option<Accepted>> {
        let Some(v) = stored else { return Ok(None) };
        let rec: IdempotencyRecord = decode(&v)?;
        Ok(
            get::<Call>(self.tree(CALLS), rec.call)?.map(|call| Accepted::Earlier {
                call,
                same_body: rec.digest == idem.digest,
            }),
        )
    }

    /// Checks the space for a payload of `len` bytes and numbers the call
    /// and its two events.
    pub(super) fn accept_ids(&self, call: &mut Call, len: usize) -> Result<(u64, u64)> {
        self.check_space(len as u64, "the call")?;
        call.seq = self.next_seq()?;
        Ok((self.next_seq()?, self.next_seq()?))
    }

    /// Stores an accepted call: its record, payload marker, queue and index
    /// entries, counters, events and idempotency key. Aborts, storing
    /// nothing, when the owner's queue is at `budget`: every write of
    /// `queued` holds `Inner::writing`, so this read is exact. A key already
    /// stored stores nothing (before the budget: a resubmission is not a
    /// new call).
    pub(super) fn accept_tx(
        &self,
        t: &[impl Kv],
        call: &Call,
        marker: &Marker,
        (call_seq, pending_seq): (u64, u64),
        budget: &QueueBudget,
        idem: Option<&Idempotency>,
    ) -> TxResult<AcceptTx> {
        if t[FUNCTIONS].get(fk(call).as_str())?.is_none() {
            return abort(StoreError::NotFound(format!("function {}", call.function)));
        }
        let idem_key = idem.map(|i| idem_key(&call.fn_key(), i));
        if let (Some(key), Some(idem)) = (&idem_key, idem) {
            if let Some(v) = t[IDEM].get(key)? {
                let rec: IdempotencyRecord = dec(&v)?;
                // A key outlives no call (both go in one write), so the
                // record is there; were it not, the key is free again.
                if let Some(c) = t[CALLS].get(rec.call)? {
                    return Ok(AcceptTx::Earlier(Box::new(Accepted::Earlier {
                        call: dec(&c)?,
                        same_body: rec.digest == idem.digest,
                    })));
                }
            }
        }
        let used = queue_add(&t[QUEUED], &call.owner, 1, payload_len(call))?;
        if let Some(e) = over_queue(&call.owner, budget, used.calls, used.bytes, call.stdin_len) {
            return abort(e);
        }
        let id = call.id.as_bytes();
        t[CALLS].insert(id, enc(call)?)?;
        t[PAYLOADS].insert(id, marker.encode())?;
        t[QUEUE].insert(seq_key(call.owner.as_str(), call.seq), id)?;
        t[FN_CALLS].insert(seq_key(fk(call).as_str(), call.seq), id)?;
        t[LIVE].insert(seq_key(fk(call).as_str(), call.seq), id)?;
        let mut stats = tx_stats(&t[STATS], &call.fn_key())?;
        stats.total += 1;
        stats.count(CallState::Pending, 1);
        log(&t[LOGS], &mut stats, call, EventKind::Call, call_seq)?;
        log(&t[LOGS], &mut stats, call, EventKind::Pending, pending_seq)?;
        t[STATS].insert(fk(call).as_str(), enc(&stats)?)?;
        if let (Some(key), Some(idem)) = (idem_key, idem) {
            let rec = IdempotencyRecord {
                call: *call.id.as_bytes(),
                digest: idem.digest,
            };
            t[IDEM].insert(&key, enc(&rec)?)?;
            t[IDEM_CALLS].insert(id, key)?;
        }
        Ok(AcceptTx::Stored(stats.log_bytes > self.config.log_budget))
    }

    pub(super) fn queue_head(&self, owner: &Name) -> Result<Option<CallId>> {
        match self
            .tree(QUEUE)
            .scan_prefix(seq_prefix(owner.as_str()))
            .next()
        {
            None => Ok(None),
            Some(kv) => Ok(Some(call_id(&kv?.1)?)),
        }
    }

    pub(super) fn queued_owners(&self) -> Result<Vec<Name>> {
        let mut owners: Vec<Name> = Vec::new();
        let queue = self.tree(QUEUE);
        // One seek per owner, not one step per queued call.
        let mut from: Vec<u8> = Vec::new();
        while let Some(kv) = queue.range(from.clone()..).next() {
            let (k, _) = kv?;
            let owner = key_prefix(&k).to_vec();
            if let Ok(n) = Name::parse(&String::from_utf8_lossy(&owner)) {
                owners.push(n);
            }
            // The first key after every `owner\0...`.
            from = owner;
            from.push(1);
        }
        Ok(owners)
    }

    pub(super) fn discard_queued(&self, owner: &Name, id: &CallId, fx: &mut Effects) -> Result<()> {
        let w = self.write_lock();
        for kv in w.tree(QUEUE).scan_prefix(seq_prefix(owner.as_str())) {
            let (k, v) = kv?;
            if v.as_ref() == id.as_bytes() {
                w.tree(QUEUE).remove(k)?;
                fx.committed = true;
                break;
            }
        }
        // The call is gone, and its length with it: count the owner's
        // queue again (a rare repair, not a hot path).
        self.recount_queue(&w, owner)
    }

    /// Sets `owner`'s `queued` entry from their queue entries.
    pub(super) fn recount_queue(&self, w: &WriteGuard, owner: &Name) -> Result<()> {
        let mut used = QueueUse::default();
        for kv in self.tree(QUEUE).scan_prefix(seq_prefix(owner.as_str())) {
            let (_, id) = kv?;
            if let Some(call) = get::<Call>(self.tree(CALLS), &id)? {
                used.calls += 1;
                used.bytes += call.stdin_len;
            }
        }
        w.tree(QUEUED).insert(owner.as_str(), encode(&used)?)?;
        Ok(())
    }

    pub(super) fn start(&self, id: &CallId, fx: &mut Effects) -> Result<Started> {
        let Some(call) = get::<Call>(self.tree(CALLS), id.as_bytes())? else {
            return Err(StoreError::NotFound(format!("call {id}")));
        };
        if call.state != CallState::Pending {
            // Ended meanwhile (cancelled); its queue entry went with it.
            return Ok(Started::Skipped);
        }
        let why_not = if self.tree(FUNCTIONS).get(fk(&call).as_str())?.is_none() {
            Some("cancelled: the function was removed".to_string())
        } else {
            None
        };
        // A file payload is read (and checked) before the transaction: once
        // RUNNING, the call must get exactly its bytes.
        let payload = match (&why_not, self.tree(PAYLOADS).get(id.as_bytes())?) {
            (Some(_), _) => Ok(Vec::new()),
            (None, Some(v)) => self.blobs.read(Kind::Payload, id, Marker::decode(&v)?),
            (None, None) => Err(StoreError::Corrupt(format!(
                "the payload of call {id} is lost: no record of it"
            ))),
        };
        let payload = match (why_not, payload) {
            (None, Ok(p)) => p,
            (Some(why), _) | (None, Err(StoreError::Corrupt(why))) => {
                tracing::warn!(call = %id, reason = %why, "call not started");
                self.end(id, Outcome::failed(why), Some(CallState::Pending), fx)?;
                return Ok(Started::Skipped);
            }
            (None, Err(e)) => return Err(e),
        };
        let seq = self.next_seq()?;
        let started = self.tx(|t| {
            let mut call: Call = tx_get(&t[CALLS], id.as_bytes(), "call")?;
            if call.state != CallState::Pending || t[FUNCTIONS].get(fk(&call).as_str())?.is_none() {
                return Ok(None);
            }
            if let Err(e) = call.transition(CallState::Running) {
                return abort(e);
            }
            t[QUEUE].remove(seq_key(call.owner.as_str(), call.seq))?;
            queue_add(&t[QUEUED], &call.owner, -1, -payload_len(&call))?;
            t[CALLS].insert(id.as_bytes(), enc(&call)?)?;
            let mut stats = tx_stats(&t[STATS], &call.fn_key())?;
            stats.count(CallState::Pending, -1);
            stats.count(CallState::Running, 1);
            log(&t[LOGS], &mut stats, &call, EventKind::Running, seq)?;
            t[STATS].insert(fk(&call).as_str(), enc(&stats)?)?;
            Ok(Some((call, stats.log_bytes > self.config.log_budget)))
        })?;
        let Some((call, over)) = started else {
            // Cancelled or removed between the reads above and the transaction.
            return Ok(Started::Skipped);
        };
        fx.committed = true;
        if over {
            fx.evict_logs.push(call.fn_key());
        }
        Ok(Started::Running(Box::new(call), Bytes::from(payload)))
    }

    pub(super) fn requeue(&self, id: &CallId, fx: &mut Effects) -> Result<()> {
        self.tx(|t| {
            let mut call: Call = tx_get(&t[CALLS], id.as_bytes(), "call")?;
            if let Err(e) = call.transition(CallState::Pending) {
                return abort(e);
            }
            t[QUEUE].insert(seq_key(call.owner.as_str(), call.seq), id.as_bytes())?;
            queue_add(&t[QUEUED], &call.owner, 1, payload_len(&call))?;
            t[CALLS].insert(id.as_bytes(), enc(&call)?)?;
            let mut stats = tx_stats(&t[STATS], &call.fn_key())?;
            stats.count(CallState::Running, -1);
            stats.count(CallState::Pending, 1);
            t[STATS].insert(fk(&call).as_str(), enc(&stats)?)?;
            Ok(())
        })?;
        fx.committed = true;
        Ok(())
    }

    /// Ends a RUNNING call. A FINISHED call's STDOUT goes to the output
    /// cache, after the oldest outputs made room for it; if the disk cannot
    /// take it, the call ends FAILED saying so.
    pub(super) fn finish(&self, id: &CallId, outcome: Outcome, fx: &mut Effects) -> Result<Call> {
        self.end(id, outcome, None, fx)
    }

    /// Moves a call to its end: from `from`, or from whatever state it is
    /// in if `None`. Aborts with a transition error if it has moved since.
    fn end(
        &self,
        id: &CallId,
        mut outcome: Outcome,
        from: Option<CallState>,
        fx: &mut Effects,
    ) -> Result<Call> {
        let Some(call) = get::<Call>(self.tree(CALLS), id.as_bytes())? else {
            return Err(StoreError::NotFound(format!("call {id}")));
        };
        let from = from.unwrap_or(call.state);
        let function = call.fn_key();
        let len = outcome.stdout.len() as u64;
        let budget = self.config.output_budget;
        // Only a FINISHED call's output can be fetched, so only it is kept;
        // one larger than the whole budget is rotated out at once.
        let mut keep = outcome.state == CallState::Finished && len <= budget;
        if keep {
            if let Err(StoreError::Full(why)) = self.check_space(len, "the output") {
                tracing::warn!(call = %id, reason = %why, "output not stored");
                outcome = Outcome {
                    state: CallState::Failed,
                    message: Some(format!("no space left to store the output ({} bytes)", len)),
                    ..outcome
                };
                keep = false;
            }
        }
        // Per function: room is made before the insert, so the cache never
        // holds more than its budget, even for a moment.
        let evict_lock = self.evict_lock(&function);
        let _guard = lock(&evict_lock);
        let marker = if keep {
            self.evict_outputs_to(&function, budget - len, fx)?;
            if len > self.config.inline_max_bytes {
                // Transient errors were tried again (`blobs.rs`); what is
                // left is this call's end, never a call left RUNNING.
                match self.blobs.write(Kind::Output, id, &outcome.stdout) {
                    Ok(()) => Some(Marker::File(len)),
                    Err(e) => {
                        let why = match io_full(e, "the output") {
                            StoreError::Full(_) => {
                                format!("no space left to store the output ({len} bytes)")
                            }
                            other => format!("cannot store the output ({len} bytes): {other}"),
                        };
                        tracing::warn!(call = %id, reason = %why, "output not stored");
                        outcome = Outcome {
                            state: CallState::Failed,
                            message: Some(why),
                            ..outcome
                        };
                        None
                    }
                }
            } else {
                Some(Marker::Inline(outcome.stdout.to_vec()))
            }
        } else {
            None
        };
        let seq = self.next_seq()?;
        let ended = self.tx(|t| {
            let mut call: Call = tx_get(&t[CALLS], id.as_bytes(), "call")?;
            let was = call.state;
            if was != from {
                return abort(crate::model::TransitionError {
                    id: *id,
                    from: was,
                    to: outcome.state,
                });
            }
            if let Err(e) = call.finish(&outcome) {
                return abort(e);
            }
            let key = seq_key(fk(&call).as_str(), call.seq);
            if was == CallState::Pending {
                t[QUEUE].remove(seq_key(call.owner.as_str(), call.seq))?;
                queue_add(&t[QUEUED], &call.owner, -1, -payload_len(&call))?;
            }
            let payload = t[PAYLOADS].remove(id.as_bytes())?;
            t[LIVE].remove(key.clone())?;
            if let Some(done) = call.finished_ms {
                t[DONE].insert(done_key(done, id), &[])?;
            }
            let mut stats = tx_stats(&t[STATS], &call.fn_key())?;
            match &marker {
                Some(m) => {
                    t[OUTPUTS].insert(id.as_bytes(), m.encode())?;
                    t[OUTPUT_INDEX].insert(key, id.as_bytes())?;
                    stats.output_bytes += len;
                }
                None if call.state == CallState::Finished => call.output = OutputState::Evicted,
                None => {}
            }
            t[CALLS].insert(id.as_bytes(), enc(&call)?)?;
            // The delivery of its webhook, in the end's own commit.
            if let Some(d) = crate::model::Delivery::for_end(&call, &outcome.stdout) {
                super::webhooks::store_delivery(t, None, &d)?;
            }
            stats.count(was, -1);
            stats.count(call.state, 1);
            let kind = if call.state == CallState::Finished {
                EventKind::Finished
            } else {
                EventKind::Failed
            };
            log(&t[LOGS], &mut stats, &call, kind, seq)?;
            t[STATS].insert(fk(&call).as_str(), enc(&stats)?)?;
            Ok((call, payload, stats.log_bytes > self.config.log_budget))
        });
        let (call, payload, over) = match ended {
            Ok(e) => e,
            Err(e) => {
                if let Some(Marker::File(_)) = marker {
                    self.blobs.remove_uncommitted(Kind::Output, id);
                }
                return Err(e);
            }
        };
        fx.committed = true;
        crate::crash_point!("finish-committed");
        if let Some(v) = payload {
            if let Marker::File(_) = Marker::decode(&v)? {
                fx.deletes.push(self.blobs.path(Kind::Payload, id));
            }
        }
        if over {
            fx.evict_logs.push(call.fn_key());
        }
        Ok(call)
    }

    pub(super) fn cancel_queued(
        &self,
        function: &FnKey,
        message: &str,
        removed_only: bool,
        fx: &mut Effects,
    ) -> Result<usize> {
        let mut cancelled = 0;
        let live = self.live_calls(Some(function))?;
        // After the live calls: a record here means the name was re-created
        // (after a purge), and none of these is the removed function's to
        // cancel; a re-create after this look came after every call above.
        if removed_only
            && self
                .tree(FUNCTIONS)
                .get(function.store_key().as_str())?
                .is_some()
        {
            return Ok(0);
        }
        for call in live {
            if call.state != CallState::Pending {
                continue;
            }
            match self.end(
                &call.id,
                Outcome::failed(message),
                Some(CallState::Pending),
                fx,
            ) {
                Ok(_) => cancelled += 1,
                // Started or ended meanwhile: the scheduler cancels it.
                Err(StoreError::Transition(_) | StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(cancelled)
    }

    /// Calls that have not ended, of `function` or of all, oldest first per function.
    pub(super) fn live_calls(&self, function: Option<&FnKey>) -> Result<Vec<Call>> {
        let live = self.tree(LIVE);
        let iter = match function {
            Some(f) => live.scan_prefix(seq_prefix(&f.store_key())),
            None => live.iter(),
        };
        let mut out = Vec::new();
        for kv in iter {
            let (_, id) = kv?;
            if let Some(call) = get::<Call>(self.tree(CALLS), &id)? {
                if !call.state.is_done() {
                    out.push(call);
                }
            }
        }
        Ok(out)
    }

    /// Deletes calls that ended before `before_ms`, in batches.
    pub(super) fn prune(&self, before_ms: u64, fx: &mut Effects) -> Result<usize> {
        let end = done_key(before_ms, &CallId::from_bytes([0; 16]));
        let mut pruned = 0;
        for kv in self.tree(DONE).range(..end) {
            let (k, _) = kv?;
            let id = call_id(&k[8..])?;
            let Some(call) = get::<Call>(self.tree(CALLS), id.as_bytes())? else {
                self.write_lock().tree(DONE).remove(&k)?;
                continue;
            };
            let output = self.tx(|t| {
                let key = seq_key(fk(&call).as_str(), call.seq);
                t[DONE].remove(&k)?;
                t[CALLS].remove(id.as_bytes())?;
                t[FN_CALLS].remove(key.clone())?;
                if let Some(idem) = t[IDEM_CALLS].remove(id.as_bytes())? {
                    t[IDEM].remove(idem)?;
                }
                super::webhooks::drop_delivery(t, &id)?;
                let Some(v) = t[OUTPUTS].remove(id.as_bytes())? else {
                    return Ok(None);
                };
                let marker = Marker::decode(&v).or_else(abort)?;
                t[OUTPUT_INDEX].remove(key)?;
                let mut stats = tx_stats(&t[STATS], &call.fn_key())?;
                stats.output_bytes = stats.output_bytes.saturating_sub(marker.len());
                t[STATS].insert(fk(&call).as_str(), enc(&stats)?)?;
                Ok(Some(marker))
            })?;
            fx.committed = true;
            if let Some(Marker::File(_)) = output {
                fx.deletes.push(self.blobs.path(Kind::Output, &id));
            }
            pruned += 1;
        }
        Ok(pruned)
    }
}

/// A file write that failed for lack of space (bytes or inodes, or a
/// quota) is `Full`; one that failed for a reason that may pass, after its
/// retries, is `Unavailable`; any other I/O error is a failure of the
/// store. In every case nothing was stored.
fn io_full(e: std::io::Error, what: &str) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        StoreError::Full(format!("no space left to store {what}: {e}"))
    } else if super::blobs::transient(&e) && e.raw_os_error() != Some(libc::EIO) {
        StoreError::Unavailable(format!(
            "cannot write {what} now (nothing was stored; try again): {e}"
        ))
    } else {
        StoreError::Failed(format!("cannot write {what}: {e}"))
    }
}
