//! Containers in submission order across nodes. Each node creates the
//! containers of the calls it starts in the order it started them (the
//! scheduler's `start_chain`), and the owner's consumer hands calls out in
//! queue order; but with a quota above 1 an owner has calls out on several
//! nodes at once, and a node that took a later call could create its
//! container first. So before a call's container is created, `await_turn`
//! waits until every earlier call of the owner still in the queue stream
//! has its container (`created` marked its `r.CALL`), has ended, or runs on
//! a node that is gone (the reaper fails it): the single-host rule,
//! cluster-wide.
//!
//! Finding the earlier calls reads their queue messages (a message get
//! answers with the body), so each is read once per node, never per look:
//! the owner's messages below a call's sequence can only go (a new message
//! always gets a higher sequence), so what a walk of the owner's subject
//! found below a sequence stays true, less what has left (`Seen`), and
//! every later look reads only the earlier calls' small records.

use super::calls::{call_key, claim_node, running_key};
use super::*;
use async_nats::jetstream::response::Response;
use base64::Engine as _;

/// How long a call waits for its predecessors before it goes anyway: an
/// earlier call held by a node at its host cap, or one whose accept died
/// before storing its record, must not hold the owner's queue for good.
const TURN_WAIT: Duration = Duration::from_secs(30);
/// How often the predecessors are looked at again when no notice came.
const TURN_POLL: Duration = Duration::from_millis(250);
/// Appended to `r.CALL` ("NODE ATTEMPT") once the call's container exists.
const CREATED: &str = " +";
/// Earlier calls looked at per check, at most (an owner has at most its
/// quota out, so this is never reached in practice).
const MAX_PREDECESSORS: usize = 1024;

/// `STREAM.MSG.GET`'s answer: the message (only what is read here).
#[derive(serde::Deserialize)]
struct MsgGet {
    message: QueuedMsg,
}

#[derive(serde::Deserialize)]
struct QueuedMsg {
    seq: u64,
    /// The headers block, base64.
    #[serde(default)]
    hdrs: Option<String>,
}

/// The call a queue message's headers name (`Hf-Call`).
fn call_of(hdrs: Option<&str>) -> Option<CallId> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(hdrs?)
        .ok()?;
    let text = std::str::from_utf8(&raw).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == super::calls::CALL_HEADER)
            .then(|| CallId::parse(v.trim()).ok())
            .flatten()
    })
}

/// Per blocking call: when a call of this node first found it without a
/// container. `TURN_WAIT` counts from then for every call behind it, so
/// calls queued behind one stuck call do not each wait it out in turn.
/// Per owner's queue subject: the messages seen there (`Seen`).
#[derive(Default)]
pub(super) struct Turns {
    blocked_since: Mutex<HashMap<CallId, Instant>>,
    seen: Mutex<HashMap<String, Seen>>,
    /// Queue messages read (message gets) for turns, for the tests.
    pub(super) gets: std::sync::atomic::AtomicU64,
}

/// What this node knows of one owner's queue subject: every message with a
/// sequence below `until` that was there when it looked is in `calls`
/// (unless it has since stopped holding anyone up), with its call.
struct Seen {
    until: u64,
    calls: std::collections::BTreeMap<u64, CallId>,
    used: Instant,
}

impl Turns {
    /// True while `blocker` may still hold calls up.
    fn still_waiting(&self, blocker: &CallId, waiter: &CallId) -> bool {
        let mut since = lock(&self.blocked_since);
        // Old entries: their calls have long gone one way or another.
        since.retain(|_, t| t.elapsed() < 10 * TURN_WAIT);
        let first = *since.entry(*blocker).or_insert_with(Instant::now);
        if first.elapsed() < TURN_WAIT {
            return true;
        }
        tracing::warn!(
            call = %waiter,
            waiting_for = %blocker,
            "an earlier call of the owner still has no container after 30 s; creating this one anyway"
        );
        false
    }
}

impl Inner {
    /// Returns once every call of `call.owner` queued before `call` has its
    /// container or has ended, or runs on a lost node, or has held calls up
    /// for `TURN_WAIT` (then with a warning).
    pub(super) async fn await_turn(&self, call: &Call) -> Result<()> {
        // The owner's consumer counts the calls out (delivered, or given
        // back and due again): this one alone means none before it.
        let consumer = self.consumer(&call.owner).await?;
        let out = retry(|| async {
            let mut c = consumer.clone();
            c.info()
                .await
                .map(|i| i.num_ack_pending)
                .map_err(|e| Refused::Error(unavailable("reading a queue", e)))
        })
        .await?;
        if out <= 1 {
            return Ok(());
        }
        let mut notices = self.changed.subscribe();
        let subject = format!("hfq.{}", call.owner);
        // The earlier calls, found once; a look only reads their records.
        // One found ready stays ready (a container made, or an end, is not
        // taken back; a requeued call comes back with a later sequence).
        let mut earlier: std::collections::VecDeque<(u64, CallId)> = self
            .predecessors(&subject, call.seq)
            .await?
            .into_iter()
            .filter(|(_, id)| *id != call.id)
            .collect();
        loop {
            while let Some(&(seq, blocker)) = earlier.front() {
                if self.has_container(&blocker).await? {
                    // It holds no one up any more.
                    lock(&self.turns.blocked_since).remove(&blocker);
                    self.forget_seen(&subject, seq);
                    earlier.pop_front();
                } else if !self.turns.still_waiting(&blocker, &call.id) {
                    earlier.pop_front();
                } else {
                    break;
                }
            }
            if earlier.is_empty() {
                return Ok(());
            }
            // A notice for the owner (a call created, started or ended
            // anywhere), or the poll, whichever comes first; notices that
            // piled up meanwhile make one look, not one each.
            let _ = tokio::time::timeout(TURN_POLL, async {
                loop {
                    match notices.recv().await {
                        Ok(owner) if owner == call.owner => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            })
            .await;
            while notices.try_recv().is_ok() {}
        }
    }

    /// The messages on `subject` below sequence `below`, oldest first, with
    /// their calls: from what this node has seen, reading only the
    /// messages it has not (the walk goes on from where the last one
    /// stopped).
    async fn predecessors(&self, subject: &str, below: u64) -> Result<Vec<(u64, CallId)>> {
        let from = {
            let mut seen = lock(&self.turns.seen);
            // Subjects nobody waited on for a while: their calls are over.
            seen.retain(|_, s| s.used.elapsed() < 10 * TURN_WAIT);
            seen.get(subject).map_or(1, |s| s.until)
        };
        let mut learned = Vec::new();
        let mut next = from;
        for _ in 0..MAX_PREDECESSORS {
            if next >= below {
                break;
            }
            self.turns
                .gets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match self.next_queued(subject, next).await? {
                Some((seq, id)) if seq < below => {
                    if let Some(id) = id {
                        learned.push((seq, id));
                    }
                    next = seq + 1;
                }
                // Nothing more below `below`: none can come (new messages
                // get higher sequences).
                _ => {
                    next = below;
                    break;
                }
            }
        }
        let mut seen = lock(&self.turns.seen);
        let entry = seen.entry(subject.to_string()).or_insert_with(|| Seen {
            until: 1,
            calls: Default::default(),
            used: Instant::now(),
        });
        entry.calls.extend(learned);
        entry.until = entry.until.max(next);
        entry.used = Instant::now();
        Ok(entry
            .calls
            .range(..below)
            .map(|(seq, id)| (*seq, *id))
            .collect())
    }

    /// `seq` on `subject` holds no one up any more.
    fn forget_seen(&self, subject: &str, seq: u64) {
        if let Some(s) = lock(&self.turns.seen).get_mut(subject) {
            s.calls.remove(&seq);
        }
    }

    /// The first message on `subject` at or after `from`: its sequence and
    /// call. Asked of the stream's leader (a message get), so no message
    /// stored before this call began is missed.
    async fn next_queued(&self, subject: &str, from: u64) -> Result<Option<(u64, Option<CallId>)>> {
        let request = serde_json::json!({ "seq": from, "next_by_subj": subject });
        retry(|| async {
            let answer: Response<MsgGet> = self
                .bucket
                .js
                .request(format!("STREAM.MSG.GET.{QUEUE_STREAM}"), &request)
                .await
                .map_err(|e| Refused::Error(unavailable("reading a queue", e)))?;
            match answer {
                Response::Ok(m) => Ok(Some((m.message.seq, call_of(m.message.hdrs.as_deref())))),
                Response::Err { error }
                    if error.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND =>
                {
                    Ok(None)
                }
                Response::Err { error } => {
                    Err(Refused::Error(unavailable("reading a queue", error)))
                }
            }
        })
        .await
    }

    /// True once `id` has its container, has ended (or its record is
    /// gone: pruned, purged), or runs on a lost node.
    async fn has_container(&self, id: &CallId) -> Result<bool> {
        if lock(&self.held).get(id).is_some_and(|h| h.created) {
            return Ok(true);
        }
        // Twice at most: a call RUNNING without a claim was either ended or
        // requeued between the two reads; the record read again says which.
        for _ in 0..2 {
            let (rev, call) = self.bucket.get::<Call>(&call_key(id)).await?;
            let Some(call) = call else {
                // Never written: its accept is still storing the record.
                // Deleted: the call is long over.
                return Ok(rev != 0);
            };
            match call.state {
                CallState::Pending => return Ok(false),
                CallState::Finished | CallState::Failed => return Ok(true),
                CallState::Running => match self.bucket.get::<String>(&running_key(id)).await?.1 {
                    None => continue,
                    Some(claim) if claim.ends_with(CREATED) => return Ok(true),
                    Some(claim) => return self.node_lost(claim_node(&claim)).await,
                },
            }
        }
        Ok(false)
    }

    /// Marks `id`'s container as made (its `r.CALL`, compare-and-set, so an
    /// end or a reap in between is never undone) and tells the other nodes.
    pub(super) async fn created(&self, id: &CallId) {
        let owner = match lock(&self.held).get_mut(id) {
            Some(h) => {
                h.created = true;
                h.owner.clone()
            }
            None => return,
        };
        let marked = retry(|| async {
            let (rev, claim) = self.bucket.get::<String>(&running_key(id)).await?;
            match claim {
                Some(c) if claim_node(&c) == self.node && !c.ends_with(CREATED) => {
                    self.bucket
                        .commit(vec![Op::Put(
                            running_key(id),
                            enc(&format!("{c}{CREATED}"))?,
                            Some(rev),
                        )])
                        .await
                }
                _ => Ok(()),
            }
        })
        .await;
        if let Err(e) = marked {
            // Its successors on other nodes wait for its end instead.
            tracing::warn!(call = %id, error = %e, "could not mark the call's container as created");
        }
        self.notify(&owner).await;
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn the_call_header_is_read_from_a_message_get_answer() {
        let id = CallId::new();
        let block =
            format!("NATS/1.0\r\nHf-Function: f\r\nHf-Call: {id}\r\nNats-Msg-Id: {id}\r\n\r\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(block);
        assert_eq!(call_of(Some(&b64)), Some(id));
        assert_eq!(call_of(None), None);
        assert_eq!(call_of(Some("not base64!")), None);
        let other =
            base64::engine::general_purpose::STANDARD.encode("NATS/1.0\r\nHf-Call: x\r\n\r\n");
        assert_eq!(call_of(Some(&other)), None);
    }
}
