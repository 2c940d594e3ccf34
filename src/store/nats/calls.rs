//! Calls on JetStream: accept (queue message, then record), the claim of a
//! queue head, the state changes (each one atomic batch with the counters
//! and indexes, compare-and-set on the call's revision), outputs, logs,
//! retention, and the reaping of calls whose node was lost.

use super::*;
use crate::model::{EventKind, OutputState};
use serde::{Deserialize, Serialize};

/// How often, and how long apart, a node taking a queue message looks again
/// for a record its accept is still storing (see `examine`).
const RECORD_LOOKS: usize = 10;
const RECORD_LOOK_EVERY: Duration = Duration::from_millis(20);
/// The header that names a queue message's call.
pub(super) const CALL_HEADER: &str = "Hf-Call";
/// The header that names a queue message's function (for a tombstone).
const FUNCTION_HEADER: &str = "Hf-Function";
/// Why a call whose record lost the race to its tombstone was not accepted.
const NOT_ACCEPTED: &str = "not accepted: the cluster did not store the call in time";

pub fn call_key(id: &CallId) -> String {
    format!("c.{id}")
}
fn live_key(function: &FnKey, id: &CallId) -> String {
    format!("l.{}.{}.{id}", function.owner, function.name)
}
/// The subject of a call's output in its function's output stream.
pub(super) fn output_subject(function: &FnKey, id: impl std::fmt::Display) -> String {
    format!("hfo.{}.{}.{id}", function.owner, function.name)
}
/// The subject of a call's events in its function's log stream.
pub(super) fn log_subject(function: &FnKey, id: impl std::fmt::Display) -> String {
    format!("hfl.{}.{}.{id}", function.owner, function.name)
}
pub(super) fn running_key(id: &CallId) -> String {
    format!("r.{id}")
}
fn done_key(id: &CallId) -> String {
    format!("d.{id}")
}
/// A call's idempotency key: `i.OWNER.NAME.SHA256HEX` -> the call and the
/// digest of its body (`IdempotencyRecord`).
fn idem_key(function: &FnKey, idem: &Idempotency) -> String {
    format!(
        "i.{}.{}.{}",
        function.owner,
        function.name,
        idem.key.hashed()
    )
}
/// The idempotency key a call was accepted under, so its removal takes it.
fn idem_of_key(id: &CallId) -> String {
    format!("ik.{id}")
}
/// Shard `shard` of an owner's queued counts.
pub(super) fn queued_key(owner: &Name, shard: usize) -> String {
    format!("q.{owner}.{shard}")
}
/// The shard of `call`'s owner's queued counts that counts it.
fn queued_key_of(call: &Call) -> String {
    queued_key(&call.owner, shard_of(&call.id))
}

/// An owner's PENDING calls and their payload bytes, what
/// `max_queued_bytes` is checked against, kept in `SHARDS` keys
/// (`q.OWNER.K`) like a function's counters: a call counts in the shard its
/// id picks, changed in the same atomic batches that move the call into
/// PENDING (accept, requeue) and out of it (start, an end from PENDING, a
/// purge), so the counts never drift from the records, and concurrent
/// accepts of one owner mostly write different keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Queued {
    pub calls: u64,
    pub bytes: u64,
}

impl Queued {
    /// These counts with a call of `len` bytes queued (`sign` 1) or not
    /// any more (-1).
    fn moved(read: Option<Queued>, len: u64, sign: i64) -> Queued {
        let mut q = read.unwrap_or_default();
        if sign > 0 {
            q.calls = q.calls.saturating_add(1);
            q.bytes = q.bytes.saturating_add(len);
        } else {
            // Saturating: a call queued before these counts existed (an
            // older release) was never added.
            q.calls = q.calls.saturating_sub(1);
            q.bytes = q.bytes.saturating_sub(len);
        }
        q
    }
}

/// The node of a `r.CALL` value ("NODE ATTEMPT").
pub(super) fn claim_node(claim: &str) -> &str {
    claim.split(' ').next().unwrap_or_default()
}

/// Adds one counter shard to a sum of them.
pub(super) fn add(sum: &mut FunctionStats, shard: &FunctionStats) {
    sum.total += shard.total;
    sum.pending += shard.pending;
    sum.running += shard.running;
    sum.finished += shard.finished;
    sum.failed += shard.failed;
}

fn count(stats: &mut FunctionStats, state: CallState, delta: i64) {
    let slot = match state {
        CallState::Pending => &mut stats.pending,
        CallState::Running => &mut stats.running,
        CallState::Finished => &mut stats.finished,
        CallState::Failed => &mut stats.failed,
    };
    *slot = slot.saturating_add_signed(delta);
}

/// Why `start` did not start a held call.
enum NotStarted {
    /// It has ended (cancelled meanwhile): its message goes.
    Ended,
    /// Another node runs it (its message came back here): let go of it.
    Elsewhere,
    /// It cannot run: it ends FAILED with this reason.
    Fail(String),
}

/// What the head of an owner's queue turned out to be.
enum Head {
    /// A PENDING call, now held by this node.
    Pending(CallId),
    /// Nothing to start now.
    Nothing,
    /// Dealt with (ended, or dropped): look at the next message.
    Next,
}

/// What a refused queue publish means. The queue stream at its bound
/// (discard new) or the servers out of storage refuse the message, which is
/// then not stored: `Full` (507, at once; the call is not retried). Anything
/// else is an outage, retried.
fn queue_refusal(e: &impl std::fmt::Display, queue_max_bytes: u64) -> StoreError {
    let text = e.to_string();
    if text.contains("maximum bytes exceeded") || text.contains("maximum messages exceeded") {
        StoreError::Full(format!(
            "the shared queue is full: its calls hold [store.nats] queue_max_bytes ({}); try again once calls have run",
            crate::model::human_bytes(queue_max_bytes)
        ))
    } else if text.contains("insufficient resources") {
        StoreError::Full("the NATS servers' JetStream storage is full".into())
    } else {
        unavailable("queueing the call", text)
    }
}

impl Inner {
    pub(super) async fn accept(
        &self,
        mut call: Call,
        payload: Bytes,
        budget: QueueBudget,
        idem: Option<&Idempotency>,
    ) -> Result<Accepted> {
        let function = call.fn_key();
        let shard = shard_key(&function, shard_of(&call.id));
        let qshard = queued_key_of(&call);
        // A key already stored answers its call: nothing is published. The
        // key's revision read here is what the record's batch expects, so
        // of two accepts racing under one key only one batch lands.
        let ikey = idem.map(|i| idem_key(&function, i));
        let mut idem_rev = None;
        if let (Some(key), Some(idem)) = (&ikey, idem) {
            let (rev, rec) = self.bucket.get::<IdempotencyRecord>(key).await?;
            if let Some(rec) = rec {
                if let Some(earlier) = self.earlier(&rec, idem).await? {
                    return Ok(earlier);
                }
            }
            idem_rev = Some(rev);
        }
        // The owner's consumer exists before its first message.
        let consumer = self.consumer(&call.owner).await?;
        // The owner's shard of queued counts, if the budget check read it.
        let mut queued_read = None;
        if budget.max_calls < u64::MAX || budget.max_bytes < u64::MAX {
            // The owner's queued calls, from their consumer: the messages
            // not yet handed to any node. It leaves out the heads nodes hold
            // before starting them (at most the quota). Their bytes, from
            // the queued counts, read at the same time. Both leave out what
            // other nodes accept between this look and the publish: the
            // bound overshoots by at most those (README "Budgets").
            let calls = async {
                if budget.max_calls == u64::MAX {
                    return Ok(0);
                }
                let mut c = consumer.clone();
                c.info()
                    .await
                    .map(|info| info.num_pending)
                    .map_err(|e| unavailable("reading a queue", e))
            };
            let bytes = async {
                if budget.max_bytes == u64::MAX {
                    return Ok(None);
                }
                self.queued_shards(&call.owner).await.map(Some)
            };
            let (calls, shards) = tokio::try_join!(calls, bytes)?;
            let mut bytes = 0;
            if let Some(shards) = shards {
                bytes = shards
                    .iter()
                    .map(|(_, q)| q.map_or(0, |q| q.bytes))
                    .fold(0u64, u64::saturating_add);
                queued_read = shards.get(shard_of(&call.id)).copied();
            }
            if let Some(e) =
                crate::store::over_queue(&call.owner, &budget, calls, bytes, call.stdin_len)
            {
                return Err(e);
            }
        }
        // The call id as message id: a retried publish is stored once.
        let publish = retry(|| async {
            let mut h = async_nats::HeaderMap::new();
            h.insert(CALL_HEADER, call.id.to_string().as_str());
            h.insert(FUNCTION_HEADER, call.function.as_str());
            h.insert("Nats-Msg-Id", call.id.to_string().as_str());
            self.bucket
                .js
                .publish_with_headers(format!("hfq.{}", call.owner), h, payload.clone())
                .await
                .map_err(|e| unavailable("queueing the call", e))?
                .await
                .map_err(|e| Refused::Error(queue_refusal(&e, self.queue_max_bytes)))
        });
        // The function's record and the call's counter shards are read
        // while the message is stored: round trips at once, not in a row.
        // The function is still checked before the record is written, which
        // is the point that decides (a removal after it is the same race as
        // a removal just after the accept).
        let owner_shard = async {
            match queued_read {
                Some(read) => Ok(read),
                None => self.bucket.get::<Queued>(&qshard).await,
            }
        };
        let (found, queued, first_read) = tokio::join!(self.function(&function), publish, async {
            tokio::try_join!(self.bucket.get::<FunctionStats>(&shard), owner_shard)
        });
        let ack = queued?;
        crate::crash_point!("nats-accept-queued");
        // The stream's sequence is the FIFO key, as sled's counter is.
        call.seq = ack.sequence;
        let missing = match found {
            Ok(Some(_)) => None,
            Ok(None) => Some(StoreError::NotFound(format!("function {}", call.function))),
            Err(e) => Some(e),
        };
        if let Some(e) = missing {
            // No record follows this message: it must not wait for one
            // (if this delete is lost, `examine` buries it as an orphan).
            let _ = self.queue.delete_message(call.seq).await;
            return Err(e);
        }
        // The record and a tombstone (`bury`) race for the call's key with
        // expected revision 0: exactly one of them is stored, whatever the
        // timing, so a dropped message never leaves an accepted call behind.
        // The first attempt writes without reading the key (a fresh id has
        // none); only a refused or unanswered attempt makes the next one
        // look at what is there.
        let mut first_read = Some(first_read);
        let stored = tokio::time::timeout(
            ACCEPT_WITHIN,
            retry(|| {
                let first_read = first_read.take();
                let first_idem_rev = idem_rev.take();
                let (call, shard, function, qshard) = (&call, &shard, &function, &qshard);
                let ikey = &ikey;
                async move {
                    let ((srev, stats), (qrev, queued)) = match first_read {
                        Some(read) => read?,
                        None => {
                            if let (_, Some(existing)) =
                                self.bucket.get::<Call>(&call_key(&call.id)).await?
                            {
                                if existing.state == CallState::Pending && existing.seq == call.seq
                                {
                                    // An earlier attempt was stored; only its
                                    // answer was lost.
                                    return Ok(None);
                                }
                                return Err(Refused::Error(StoreError::Unavailable(
                                    NOT_ACCEPTED.into(),
                                )));
                            }
                            tokio::try_join!(
                                self.bucket.get::<FunctionStats>(shard),
                                self.bucket.get::<Queued>(qshard)
                            )?
                        }
                    };
                    let mut stats = stats.unwrap_or_default();
                    stats.total += 1;
                    count(&mut stats, CallState::Pending, 1);
                    let queued = Queued::moved(queued, call.stdin_len, 1);
                    let mut ops = vec![
                        Op::Put(call_key(&call.id), enc(call)?, Some(0)),
                        Op::Put(live_key(function, &call.id), Vec::new(), None),
                        super::history::history_put(call)?,
                        Op::Put(shard.clone(), enc(&stats)?, Some(srev)),
                        Op::Put(qshard.clone(), enc(&queued)?, Some(qrev)),
                    ];
                    if let (Some(key), Some(idem)) = (ikey, idem) {
                        let irev = match first_idem_rev {
                            Some(rev) => rev,
                            None => match self.bucket.get::<IdempotencyRecord>(key).await? {
                                // Another accept under this key won.
                                (_, Some(rec)) if rec.call != *call.id.as_bytes() => {
                                    return Ok(Some(rec));
                                }
                                (rev, _) => rev,
                            },
                        };
                        let rec = IdempotencyRecord {
                            call: *call.id.as_bytes(),
                            digest: idem.digest,
                        };
                        ops.push(Op::Put(key.clone(), enc(&rec)?, Some(irev)));
                        ops.push(Op::Put(idem_of_key(&call.id), enc(key)?, None));
                    }
                    self.bucket.commit(ops).await.map(|()| None)
                }
            }),
        )
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable(NOT_ACCEPTED.into())));
        if let (Ok(Some(rec)), Some(idem)) = (&stored, idem) {
            // No record of this call was stored: its message must not run
            // (if this delete is lost, `examine` buries it as an orphan).
            let _ = self.queue.delete_message(call.seq).await;
            return match self.earlier(rec, idem).await? {
                Some(earlier) => Ok(earlier),
                None => Err(StoreError::Unavailable(format!(
                    "the call under idempotency key {} changed meanwhile; try again",
                    idem.key
                ))),
            };
        }
        if let Err(e) = stored {
            // Not accepted: its message must not run, and if its record was
            // stored after all (a write in flight), it must not wait forever.
            let _ = self.queue.delete_message(call.seq).await;
            if let Ok(false) = self
                .bury(&call.id, &call.function, &call.owner, call.seq)
                .await
            {
                let _ = self
                    .end(
                        &call.id,
                        Outcome::failed(NOT_ACCEPTED),
                        Some(CallState::Pending),
                    )
                    .await;
            }
            return Err(e);
        }
        self.log(&call, EventKind::Call).await;
        self.log(&call, EventKind::Pending).await;
        self.notify(&call.owner).await;
        Ok(Accepted::New(call))
    }

    /// The call a stored idempotency key names, if its record is still there.
    async fn earlier(
        &self,
        rec: &IdempotencyRecord,
        idem: &Idempotency,
    ) -> Result<Option<Accepted>> {
        let (_, call) = self.bucket.get::<Call>(&call_key(&rec.call_id())).await?;
        Ok(call.map(|call| Accepted::Earlier {
            call,
            same_body: rec.digest == idem.digest,
        }))
    }

    /// The deletes of the idempotency key `id` was accepted under, if any:
    /// they go in the batch that deletes its record.
    async fn idem_deletes(&self, id: &CallId) -> Result<Vec<Op>> {
        let of = idem_of_key(id);
        Ok(match self.bucket.get::<String>(&of).await? {
            (_, Some(key)) => vec![Op::Del(key, None), Op::Del(of, None)],
            (_, None) => Vec::new(),
        })
    }

    /// The oldest queued call of `owner` that this node may start, held
    /// (unacknowledged) until `start`, or given back after a tick.
    pub(super) async fn queue_head(&self, owner: &Name) -> Result<Option<CallId>> {
        if let Some(id) = lock(&self.heads).get(owner) {
            return Ok(Some(*id));
        }
        let consumer = self.consumer(owner).await?;
        for _ in 0..64 {
            let mut c = consumer.clone();
            let info = c
                .info()
                .await
                .map_err(|e| unavailable("reading a queue", e))?;
            let held_here = lock(&self.held)
                .values()
                .filter(|h| &h.owner == owner)
                .count();
            // At the quota the consumer hands out nothing new, but a message
            // out on another node (or a dead run of this one) may be due for
            // redelivery: a short pull finds it.
            let at_quota = info.num_ack_pending as i64 >= info.config.max_ack_pending;
            let wait = if !at_quota && info.num_pending > 0 {
                Duration::from_secs(1)
            } else if info.num_ack_pending > held_here {
                Duration::from_millis(20)
            } else {
                return Ok(None);
            };
            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(wait)
                .messages()
                .await
                .map_err(|e| unavailable("taking a queued call", e))?;
            let msg = match batch.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(unavailable("taking a queued call", e)),
                None => return Ok(None),
            };
            match self.examine(owner, msg).await? {
                Head::Pending(id) => return Ok(Some(id)),
                Head::Nothing => return Ok(None),
                Head::Next => continue,
            }
        }
        Ok(None)
    }

    /// Decides what to do with a message handed out by `owner`'s consumer.
    async fn examine(&self, owner: &Name, msg: jetstream::Message) -> Result<Head> {
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(CALL_HEADER))
            .and_then(|v| CallId::parse(v.as_str()).ok());
        let Some(id) = id else {
            tracing::warn!(subject = %msg.subject, "dropping a queue message without a call id");
            let _ = msg.ack().await;
            return Ok(Head::Next);
        };
        let (_, mut call) = self.bucket.get::<Call>(&call_key(&id)).await?;
        // Accept stores the message a few milliseconds before the record:
        // a node that takes a message that young looks again a few times
        // rather than give it back for a second, which left the call
        // waiting for the next poll (seen as 1-2.5 s sync calls at c=1).
        let young = msg
            .info()
            .map(|i| {
                let now = (crate::model::now_ms() / 1000) as i64;
                now.saturating_sub(i.published.unix_timestamp()) < 5
            })
            .unwrap_or(false);
        for _ in 0..RECORD_LOOKS {
            if call.is_some() || !young {
                break;
            }
            tokio::time::sleep(RECORD_LOOK_EVERY).await;
            call = self.bucket.get::<Call>(&call_key(&id)).await?.1;
        }
        let Some(call) = call else {
            let published = msg.info().map(|i| i.published.unix_timestamp()).ok();
            let now = (crate::model::now_ms() / 1000) as i64;
            let age = published.map_or(0, |p| now.saturating_sub(p).max(0) as u64);
            let function = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(FUNCTION_HEADER))
                .and_then(|v| Name::parse(v.as_str()).ok());
            if let (true, Some(function)) = (age > ORPHAN_AFTER.as_secs(), function) {
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
                if self.bury(&id, &function, owner, seq).await? {
                    // Its accept failed before answering: never accepted.
                    let _ = msg.ack().await;
                    return Ok(Head::Next);
                }
                // Its record was stored meanwhile: a call like any other.
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                return Ok(Head::Nothing);
            }
            // Its accept is still storing the record.
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return Ok(Head::Nothing);
        };
        match call.state {
            CallState::Pending => {
                lock(&self.held).insert(
                    id,
                    Held {
                        msg,
                        owner: owner.clone(),
                        since: Instant::now(),
                        running: false,
                        created: false,
                    },
                );
                lock(&self.heads).insert(owner.clone(), id);
                Ok(Head::Pending(id))
            }
            CallState::Running => {
                let claim = self.bucket.get::<String>(&running_key(&id)).await?.1;
                match claim.as_deref().map(claim_node) {
                    Some(n) if !self.node_lost(n).await? => {
                        // Its node still runs it (a progress ack was late).
                        let _ = msg
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                            .await;
                        Ok(Head::Nothing)
                    }
                    _ => {
                        self.lost(&id).await?;
                        let _ = msg.ack().await;
                        Ok(Head::Next)
                    }
                }
            }
            CallState::Finished | CallState::Failed => {
                let _ = msg.ack().await;
                Ok(Head::Next)
            }
        }
    }

    pub(super) async fn discard_head(&self, owner: &Name, id: &CallId) {
        {
            let mut heads = lock(&self.heads);
            if heads.get(owner) == Some(id) {
                heads.remove(owner);
            }
        }
        // Never both locks at once (`keep_alive` takes them one at a time too).
        let held = lock(&self.held).remove(id);
        if let Some(h) = held {
            let _ = h.msg.ack().await;
        }
    }

    /// PENDING → RUNNING on this node: a compare-and-set on the call's
    /// revision, so of two nodes holding the same call only one starts it.
    pub(super) async fn start(&self, id: &CallId) -> Result<Started> {
        if self.is_fenced() {
            // Its message goes back at the ack wait: another node starts it.
            return Err(unavailable("starting a call", "this node is fenced"));
        }
        // From here the message is this node's until the start resolves:
        // `keep_alive` keeps it (progress acks) instead of giving it back.
        let payload = {
            let mut held = lock(&self.held);
            match held.get_mut(id) {
                Some(h) if !h.running => {
                    h.running = true;
                    h.msg.payload.clone()
                }
                _ => return Err(StoreError::NotFound(format!("queued call {id}"))),
            }
        };
        // Names this attempt in `r.CALL`, so a retry recognises its own write.
        let claim = format!("{} {}", self.node, uuid::Uuid::new_v4().simple());
        let outcome = retry(|| async {
            crate::fault_point!("nats-start-commit");
            let (rev, call) = self.bucket.get::<Call>(&call_key(id)).await?;
            let Some(mut call) = call else {
                return Err(Refused::Error(StoreError::NotFound(format!("call {id}"))));
            };
            if call.state == CallState::Running
                && self
                    .bucket
                    .get::<String>(&running_key(id))
                    .await?
                    .1
                    .as_deref()
                    == Some(claim.as_str())
            {
                // This node's earlier attempt was stored; only its answer was
                // lost (this node holds the call's message, so no one else
                // could have started it).
                return Ok(Ok(call));
            }
            if call.state == CallState::Running {
                // Another node runs it: its message is not ours to remove.
                return Ok(Err(NotStarted::Elsewhere));
            }
            if call.state != CallState::Pending {
                return Ok(Err(NotStarted::Ended));
            }
            if self.function(&call.fn_key()).await?.is_none() {
                return Ok(Err(NotStarted::Fail(
                    "cancelled: the function was removed".to_string(),
                )));
            }
            if payload.len() as u64 != call.stdin_len {
                return Ok(Err(NotStarted::Fail(format!(
                    "the payload of call {id} is lost: {} bytes queued, {} accepted",
                    payload.len(),
                    call.stdin_len
                ))));
            }
            let shard = shard_key(&call.fn_key(), shard_of(id));
            let qshard = queued_key_of(&call);
            let ((srev, stats), (qrev, queued)) = tokio::try_join!(
                self.bucket.get::<FunctionStats>(&shard),
                self.bucket.get::<Queued>(&qshard)
            )?;
            let mut stats = stats.unwrap_or_default();
            call.transition(CallState::Running)
                .map_err(|e| Refused::Error(e.into()))?;
            count(&mut stats, CallState::Pending, -1);
            count(&mut stats, CallState::Running, 1);
            let queued = Queued::moved(queued, call.stdin_len, -1);
            self.bucket
                .commit(vec![
                    Op::Put(call_key(id), enc(&call)?, Some(rev)),
                    Op::Put(shard, enc(&stats)?, Some(srev)),
                    Op::Put(qshard, enc(&queued)?, Some(qrev)),
                    Op::Put(running_key(id), enc(&claim)?, None),
                ])
                .await?;
            Ok(Ok(call))
        })
        .await;
        let owner = lock(&self.held).get(id).map(|h| h.owner.clone());
        if let Some(owner) = &owner {
            lock(&self.heads).remove(owner);
        }
        match outcome {
            Ok(Ok(call)) => {
                if let Some(h) = lock(&self.held).get_mut(id) {
                    h.running = true;
                    h.since = Instant::now();
                }
                self.log(&call, EventKind::Running).await;
                self.notify(&call.owner).await;
                Ok(Started::Running(Box::new(call), payload))
            }
            Ok(Err(NotStarted::Elsewhere)) => {
                // Its own node holds it too; that node acks it at the end.
                lock(&self.held).remove(id);
                Ok(Started::Skipped)
            }
            Ok(Err(not)) => {
                if let NotStarted::Fail(why) = not {
                    tracing::warn!(call = %id, reason = %why, "call not started");
                    match self
                        .end(id, Outcome::failed(why), Some(CallState::Pending))
                        .await
                    {
                        Ok(_) | Err(StoreError::Transition(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                let held = lock(&self.held).remove(id);
                if let Some(h) = held {
                    let _ = h.msg.ack().await;
                }
                Ok(Started::Skipped)
            }
            Err(e) => {
                self.give_up(id, &e);
                // Give it back: another attempt (here or elsewhere) retries.
                let held = lock(&self.held).remove(id);
                if let Some(h) = held {
                    let _ = h.msg.ack_with(AckKind::Nak(None)).await;
                }
                Err(e)
            }
        }
    }

    /// RUNNING → PENDING: the Engine refused before any container existed.
    /// The message is handed out again (at once if this node holds it,
    /// otherwise once its ack wait ends).
    pub(super) async fn requeue(&self, id: &CallId) -> Result<()> {
        let call = retry(|| async {
            let (rev, call) = self.bucket.get::<Call>(&call_key(id)).await?;
            let Some(mut call) = call else {
                return Err(Refused::Error(StoreError::NotFound(format!("call {id}"))));
            };
            call.transition(CallState::Pending)
                .map_err(|e| Refused::Error(e.into()))?;
            let shard = shard_key(&call.fn_key(), shard_of(id));
            let qshard = queued_key_of(&call);
            let ((srev, stats), (qrev, queued)) = tokio::try_join!(
                self.bucket.get::<FunctionStats>(&shard),
                self.bucket.get::<Queued>(&qshard)
            )?;
            let mut stats = stats.unwrap_or_default();
            count(&mut stats, CallState::Running, -1);
            count(&mut stats, CallState::Pending, 1);
            let queued = Queued::moved(queued, call.stdin_len, 1);
            self.bucket
                .commit(vec![
                    Op::Put(call_key(id), enc(&call)?, Some(rev)),
                    Op::Put(shard, enc(&stats)?, Some(srev)),
                    Op::Put(qshard, enc(&queued)?, Some(qrev)),
                    Op::Del(running_key(id), None),
                ])
                .await?;
            Ok(call)
        })
        .await
        .inspect_err(|e| self.give_up(id, e))?;
        let held = lock(&self.held).remove(id);
        if let Some(h) = held {
            let _ = h.msg.ack_with(AckKind::Nak(None)).await;
        }
        self.notify(&call.owner).await;
        Ok(())
    }

    /// Ends a call from `from` (or from any live state): its output first
    /// (durable in the function's output stream), then the record, counters
    /// and indexes in one batch, then its queue message goes.
    pub(super) async fn end(
        &self,
        id: &CallId,
        outcome: Outcome,
        from: Option<CallState>,
    ) -> Result<Call> {
        // Every store error on the way is retried, then settled by a restart
        // (`give_up`): a call never stays RUNNING on a live node.
        let (_, call) = retry(|| async { Ok(self.bucket.get::<Call>(&call_key(id)).await?) })
            .await
            .inspect_err(|e| self.give_up(id, e))?;
        let Some(call) = call else {
            return Err(StoreError::NotFound(format!("call {id}")));
        };
        let len = outcome.stdout.len() as u64;
        let mut stored = false;
        if outcome.state == CallState::Finished
            && len <= self.config.output_budget
            && call.state == CallState::Running
        {
            retry(|| async {
                crate::fault_point!("nats-end-output");
                self.ensure_streams(&call.fn_key()).await?;
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", format!("out-{id}").as_str());
                self.bucket
                    .js
                    .publish_with_headers(
                        output_subject(&call.fn_key(), id),
                        h,
                        outcome.stdout.clone(),
                    )
                    .await
                    .map_err(|e| unavailable("storing the output", e))?
                    .await
                    .map_err(|e| {
                        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                            // Purged and made again by another node: look again.
                            lock(&self.streams).remove(&call.fn_key());
                        }
                        Refused::Error(unavailable("storing the output", e))
                    })
            })
            .await
            .inspect_err(|e| self.give_up(id, e))?;
            stored = true;
        }
        // A call's function never changes: its shard can be read beside it.
        let shard = shard_key(&call.fn_key(), shard_of(id));
        let ended = retry(|| async {
            crate::fault_point!("nats-end-commit");
            let key = call_key(id);
            let ((rev, call), (srev, stats)) = tokio::try_join!(
                self.bucket.get::<Call>(&key),
                self.bucket.get::<FunctionStats>(&shard)
            )?;
            let Some(mut call) = call else {
                return Err(Refused::Error(StoreError::NotFound(format!("call {id}"))));
            };
            let was = call.state;
            if was.is_done()
                && was == outcome.state
                && call.exit_code == outcome.exit_code
                && call.message == outcome.message
                && call.stdout_len == len
            {
                // An earlier attempt was stored; only its answer was lost.
                return Ok(call);
            }
            if from.is_some_and(|f| f != was) {
                return Err(Refused::Error(
                    crate::model::TransitionError {
                        id: *id,
                        from: was,
                        to: outcome.state,
                    }
                    .into(),
                ));
            }
            call.finish(&outcome)
                .map_err(|e| Refused::Error(e.into()))?;
            if call.state == CallState::Finished && !stored {
                call.output = OutputState::Evicted;
            }
            let mut stats = stats.unwrap_or_default();
            count(&mut stats, was, -1);
            count(&mut stats, call.state, 1);
            let done = (call.finished_ms.unwrap_or_default(), call.fn_key());
            let mut ops = vec![
                Op::Put(call_key(id), enc(&call)?, Some(rev)),
                Op::Put(shard.clone(), enc(&stats)?, Some(srev)),
                Op::Del(running_key(id), None),
                Op::Del(live_key(&call.fn_key(), id), None),
                Op::Put(done_key(id), enc(&done)?, None),
            ];
            // The delivery of its webhook, in the end's own batch.
            if let Some(d) = crate::model::Delivery::for_end(&call, &outcome.stdout) {
                ops.extend(super::webhooks::delivery_ops(&d, None)?);
            }
            if was == CallState::Pending {
                // Rare (a cancelled or unstartable queued call): read only then.
                let qshard = queued_key_of(&call);
                let (qrev, queued) = self.bucket.get::<Queued>(&qshard).await?;
                let queued = Queued::moved(queued, call.stdin_len, -1);
                ops.push(Op::Put(qshard, enc(&queued)?, Some(qrev)));
            }
            self.bucket.commit(ops).await?;
            Ok(call)
        })
        .await;
        let ended = match ended {
            Ok(call) => call,
            Err(e) => {
                if matches!(e, StoreError::Transition(_) | StoreError::NotFound(_)) {
                    self.let_go_if_ended(id).await;
                }
                self.give_up(id, &e);
                return Err(e);
            }
        };
        crate::crash_point!("nats-end-committed");
        let held = lock(&self.held).remove(id);
        match held {
            Some(h) => {
                lock(&self.heads).retain(|_, head| head != id);
                let _ = h.msg.ack().await;
            }
            None => {
                let _ = self.queue.delete_message(ended.seq).await;
            }
        }
        let kind = if ended.state == CallState::Finished {
            EventKind::Finished
        } else {
            EventKind::Failed
        };
        self.log(&ended, kind).await;
        self.notify(&ended.owner).await;
        Ok(ended)
    }

    /// Stores a FAILED tombstone at the key of a call whose accept gave up,
    /// if no record is there: true if it was stored (the accept can no
    /// longer store its record), false if the record won the race.
    async fn bury(&self, id: &CallId, function: &Name, owner: &Name, seq: u64) -> Result<bool> {
        let mut call = Call::new(function.clone(), owner.clone(), seq, &[], Vec::new());
        call.id = *id;
        call.finish(&Outcome::failed(NOT_ACCEPTED))?;
        let done = (call.finished_ms.unwrap_or_default(), call.fn_key());
        let ops = vec![
            Op::Put(call_key(id), enc(&call)?, Some(0)),
            Op::Put(done_key(id), enc(&done)?, None),
        ];
        match self.bucket.commit(ops).await {
            Ok(()) => Ok(true),
            Err(Refused::Moved) => Ok(false),
            Err(Refused::Error(e)) => Err(e),
        }
    }

    /// Drops this node's hold on a call that has ended elsewhere (e.g. it
    /// was reaped while this node was cut off) and removes its message, so
    /// its quota slot comes back.
    async fn let_go_if_ended(&self, id: &CallId) {
        let ended = match self.bucket.get::<Call>(&call_key(id)).await {
            Ok((_, None)) => true,
            Ok((_, Some(c))) => c.state.is_done(),
            Err(_) => false,
        };
        if !ended {
            return;
        }
        lock(&self.heads).retain(|_, head| head != id);
        let held = lock(&self.held).remove(id);
        if let Some(h) = held {
            let _ = h.msg.ack().await;
        }
    }

    /// A call RUNNING on a node that is gone ends FAILED, never runs again.
    pub(super) async fn lost(&self, id: &CallId) -> Result<()> {
        match self
            .end(id, Outcome::failed(NODE_LOST), Some(CallState::Running))
            .await
        {
            Ok(call) => {
                tracing::warn!(call = %id, function = %call.function, "{NODE_LOST}");
                Ok(())
            }
            // Ended meanwhile, by its node or another reaper.
            Err(StoreError::Transition(_) | StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Fails the calls RUNNING on nodes whose heartbeat expired.
    pub(super) async fn reap(&self) -> Result<()> {
        let mut alive: HashMap<String, bool> = HashMap::new();
        for (k, v) in self.bucket.scan("r.").await? {
            let node = claim_node(&dec::<String>(&k, &v)?).to_string();
            let ok = match alive.get(&node) {
                Some(ok) => *ok,
                None => {
                    let ok = !self.node_lost(&node).await?;
                    alive.insert(node.clone(), ok);
                    ok
                }
            };
            if ok {
                continue;
            }
            if let Ok(id) = CallId::parse(k.trim_start_matches("r.")) {
                tracing::info!(call = %id, node = %node, "the call's node stopped beating");
                self.lost(&id).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn cancel_queued(
        &self,
        function: &FnKey,
        message: &str,
        removed_only: bool,
    ) -> Result<usize> {
        let mut cancelled = 0;
        let live = self.live_calls(function).await?;
        // After the live calls: a record now means the name was re-created
        // (after a purge), and none of these is the removed function's to
        // cancel; a re-create after this read came after every call above.
        if removed_only && self.function(function).await?.is_some() {
            return Ok(0);
        }
        for call in live {
            if call.state != CallState::Pending {
                continue;
            }
            match self
                .end(&call.id, Outcome::failed(message), Some(CallState::Pending))
                .await
            {
                Ok(_) => cancelled += 1,
                Err(StoreError::Transition(_) | StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(cancelled)
    }

    pub(super) async fn take_output(&self, id: &CallId) -> Result<Option<OutputLookup>> {
        let (_, call) = self.bucket.get::<Call>(&call_key(id)).await?;
        let Some(call) = call else {
            return Ok(None);
        };
        if call.state != CallState::Finished || call.output != OutputState::Stored {
            return Ok(Some(OutputLookup::NoOutput(call)));
        }
        let stream = self
            .bucket
            .js
            .get_stream_no_info(Self::output_stream(&call.fn_key()))
            .await
            .map_err(|e| unavailable("reading an output", e))?;
        // Read from the stream's leader: a replica might not have it yet.
        let found = stream
            .get_last_raw_message_by_subject(&output_subject(&call.fn_key(), id))
            .await;
        let message = match found {
            Ok(m) => Some(m),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                None
            }
            Err(e) => return Err(unavailable("reading an output", e)),
        };
        // Whoever moves the record from Stored takes the output: one taker.
        let taken = retry(|| async {
            let (rev, call) = self.bucket.get::<Call>(&call_key(id)).await?;
            let Some(mut call) = call else {
                return Ok(None);
            };
            if call.output != OutputState::Stored {
                return Ok(Some((call, false)));
            }
            call.output = if message.is_some() {
                OutputState::Fetched
            } else {
                OutputState::Evicted
            };
            self.bucket
                .commit(vec![Op::Put(call_key(id), enc(&call)?, Some(rev))])
                .await?;
            Ok(Some((call, message.is_some())))
        })
        .await?;
        match (taken, message) {
            (None, _) => Ok(None),
            (Some((call, true)), Some(m)) => {
                let _ = stream.delete_message(m.sequence).await;
                Ok(Some(OutputLookup::Output(call, m.payload)))
            }
            (Some((call, _)), _) => Ok(Some(OutputLookup::NoOutput(call))),
        }
    }

    pub(super) async fn live_calls(&self, function: &FnKey) -> Result<Vec<Call>> {
        let mut out = Vec::new();
        let prefix = format!("l.{}.{}.", function.owner, function.name);
        for (k, _) in self.bucket.scan(&prefix).await? {
            let Some(id) = k.rsplit('.').next().and_then(|s| CallId::parse(s).ok()) else {
                continue;
            };
            if let (_, Some(call)) = self.bucket.get::<Call>(&call_key(&id)).await? {
                if !call.state.is_done() {
                    out.push(call);
                }
            }
        }
        out.sort_by_key(|c| c.seq);
        Ok(out)
    }

    /// The calls RUNNING on this node (after a restart: those its previous
    /// run left).
    pub(super) async fn running_calls(&self) -> Result<Vec<Call>> {
        let mut out = Vec::new();
        for (k, v) in self.bucket.scan("r.").await? {
            if claim_node(&dec::<String>(&k, &v)?) != self.node {
                continue;
            }
            let Ok(id) = CallId::parse(k.trim_start_matches("r.")) else {
                continue;
            };
            if let (_, Some(call)) = self.bucket.get::<Call>(&call_key(&id)).await? {
                if call.state == CallState::Running {
                    out.push(call);
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn prune(&self, before_ms: u64) -> Result<usize> {
        let mut pruned = 0;
        for (k, v) in self.bucket.scan("d.").await? {
            let (done, function): (u64, FnKey) = dec(&k, &v)?;
            if done >= before_ms {
                continue;
            }
            let Ok(id) = CallId::parse(k.trim_start_matches("d.")) else {
                continue;
            };
            self.forget(&id, &function).await?;
            pruned += 1;
        }
        Ok(pruned)
    }

    /// Deletes an ended call's record, index entries and any output it holds.
    async fn forget(&self, id: &CallId, function: &FnKey) -> Result<()> {
        // The history entry's key is the record's (its hour).
        let record = self.bucket.get::<Call>(&call_key(id)).await?.1;
        let history = record.as_ref().map(super::history::history_key);
        // Only a call accepted with a webhook can have a delivery.
        let hooked = record.as_ref().is_none_or(|c| c.webhook.is_some());
        if let Ok(s) = self
            .bucket
            .js
            .get_stream_no_info(Self::output_stream(function))
            .await
        {
            let _ = s.purge().filter(output_subject(function, id)).await;
        }
        let mut ops = vec![Op::Del(call_key(id), None), Op::Del(done_key(id), None)];
        ops.extend(history.map(|k| Op::Del(k, None)));
        ops.extend(self.idem_deletes(id).await?);
        if hooked {
            ops.push(Op::Del(super::webhooks::webhook_key(id), None));
            ops.push(Op::Del(super::webhooks::due_key(id), None));
        }
        self.bucket.commit(ops).await.map_err(|e| match e {
            Refused::Error(e) => e,
            Refused::Moved => StoreError::Conflict(format!("call {id} changed")),
        })
    }

    /// Deletes a removed function's calls, outputs, events and counters.
    pub(super) async fn purge_function(&self, name: &FnKey) -> Result<()> {
        if self.function(name).await?.is_some() {
            return Err(StoreError::Conflict(format!(
                "function {name} exists: remove it first"
            )));
        }
        let live = self.live_calls(name).await?;
        if let Some(c) = live.iter().find(|c| c.state == CallState::Running) {
            return Err(StoreError::Conflict(format!(
                "call {} of function {name} is still running",
                c.id
            )));
        }
        for c in live {
            // The message goes before the record, for good: a record is
            // deleted only once its call's message is gone, so nothing can
            // later find a message without a record and bury one (the
            // argument that lets delete markers expire, ARCHITECTURE.md).
            retry(|| async {
                match self.queue.delete_message(c.seq).await {
                    Ok(_) => Ok(()),
                    // Gone already (acknowledged, or an earlier attempt's).
                    Err(e)
                        if matches!(
                            e.kind(),
                            jetstream::stream::DeleteMessageErrorKind::JetStream(_)
                        ) && e.to_string().contains("no message found") =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(Refused::Error(unavailable(
                        "deleting a removed function's queued call",
                        e,
                    ))),
                }
            })
            .await?;
            // A PENDING call left by an interrupted removal leaves its
            // owner's queued counts with its record.
            retry(|| async {
                let (crev, call) = self.bucket.get::<Call>(&call_key(&c.id)).await?;
                let mut ops = vec![
                    Op::Del(call_key(&c.id), Some(crev)),
                    Op::Del(live_key(name, &c.id), None),
                    Op::Del(super::history::history_key(&c), None),
                ];
                ops.extend(self.idem_deletes(&c.id).await?);
                if let Some(call) = call.filter(|call| call.state == CallState::Pending) {
                    let qshard = queued_key_of(&call);
                    let (qrev, queued) = self.bucket.get::<Queued>(&qshard).await?;
                    let queued = Queued::moved(queued, call.stdin_len, -1);
                    ops.push(Op::Put(qshard, enc(&queued)?, Some(qrev)));
                }
                self.bucket.commit(ops).await
            })
            .await?;
        }
        // Again before each destructive step: a purge of this name that
        // finished meanwhile lets the name be created again, and a
        // re-created function's calls, streams and counters are its own.
        self.still_removed(name).await?;
        for (k, v) in self.bucket.scan("d.").await? {
            let (_, function): (u64, FnKey) = dec(&k, &v)?;
            if &function == name {
                if let Ok(id) = CallId::parse(k.trim_start_matches("d.")) {
                    self.forget(&id, name).await?;
                }
            }
        }
        self.forget_history(name).await?;
        self.still_removed(name).await?;
        lock(&self.streams).remove(name);
        for s in [Self::output_stream(name), Self::log_stream(name)] {
            match self.bucket.js.delete_stream(&s).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(unavailable("deleting a function's streams", e)),
            }
        }
        self.still_removed(name).await?;
        // Every counter shard in one batch, shard 0 last: it is the sign of
        // a removal not yet purged, so it goes with the last of them.
        let ops = (1..SHARDS)
            .chain([0])
            .map(|k| Op::Del(shard_key(name, k), None))
            .collect();
        self.bucket.commit(ops).await.map_err(|e| match e {
            Refused::Error(e) => e,
            Refused::Moved => StoreError::Conflict(format!("function {name} changed")),
        })
    }

    /// `Conflict` if `name` has a record (again): a purge must not go on.
    async fn still_removed(&self, name: &FnKey) -> Result<()> {
        match self.function(name).await? {
            Some(_) => Err(StoreError::Conflict(format!(
                "function {name} exists: remove it first"
            ))),
            None => Ok(()),
        }
    }

    /// Every shard of `owner`'s queued counts (revision, value), in shard
    /// order, in one request (`Bucket::last_values`: any replica answers,
    /// so the counts may miss the very latest writes).
    pub(super) async fn queued_shards(&self, owner: &Name) -> Result<Vec<(u64, Option<Queued>)>> {
        let mut shards = vec![(0, None); SHARDS];
        let prefix = format!("q.{owner}.");
        for (key, revision, value) in self
            .bucket
            .last_values(&format!("{prefix}*"), SHARDS)
            .await?
        {
            let Some(k) = key
                .strip_prefix(&prefix)
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|k| *k < SHARDS)
            else {
                continue;
            };
            let value = value.map(|v| dec::<Queued>(&key, &v)).transpose()?;
            shards[k] = (revision, value);
        }
        Ok(shards)
    }

    /// Every counter shard of `function` (revision, value), read at once,
    /// in shard order.
    pub(super) async fn stats_shards(
        &self,
        function: &FnKey,
    ) -> Result<Vec<(u64, Option<FunctionStats>)>> {
        futures_util::future::try_join_all(
            (0..SHARDS).map(|k| async move { self.bucket.get(&shard_key(function, k)).await }),
        )
        .await
    }

    /// Appends the call's event to its function's log (a cache: a lost
    /// event loses no call).
    async fn log(&self, call: &Call, kind: EventKind) {
        let Ok(bytes) = enc(&call.event(kind)) else {
            return;
        };
        let _ = self
            .bucket
            .client
            .publish(log_subject(&call.fn_key(), call.id), bytes.into())
            .await;
    }

    pub(super) async fn events(
        &self,
        function: &FnKey,
        after: Option<u64>,
        call: Option<&CallId>,
        tail: Option<usize>,
    ) -> Result<Vec<(u64, Event)>> {
        let stream_name = Self::log_stream(function);
        let (_, last) = self.stream_bytes(&stream_name).await?;
        let from = after.map_or(1, |a| a.saturating_add(1));
        if last == 0 || from > last {
            return Ok(Vec::new());
        }
        // Without a call filter every sequence is an event: start at the tail.
        let from = match (tail, call) {
            (Some(n), None) => from.max(last.saturating_sub(n as u64).saturating_add(1)),
            _ => from,
        };
        let stream = self
            .bucket
            .js
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|e| unavailable("reading a log", e))?;
        let filter = match call {
            Some(id) => log_subject(function, id),
            None => log_subject(function, "*"),
        };
        let deliver = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        };
        let mut out = Vec::new();
        for m in kv::read_all(&stream, filter, deliver, "reading a log").await? {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
            if let Ok(ev) = dec::<Event>(m.subject.as_str(), &m.payload) {
                out.push((seq, ev));
            }
        }
        if let Some(n) = tail {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        Ok(out)
    }
}
