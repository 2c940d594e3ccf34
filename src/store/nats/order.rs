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

impl Inner {
    /// Returns once every call of `call.owner` queued before `call` has its
    /// container or has ended (or after `TURN_WAIT`, with a warning).
    pub(super) async fn await_turn(&self, call: &Call) -> Result<()> {
        let deadline = Instant::now() + TURN_WAIT;
        let mut notices = self.changed.subscribe();
        loop {
            let Some(blocker) = self.earlier_without_container(call).await? else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                tracing::warn!(
                    call = %call.id,
                    waiting_for = %blocker,
                    "an earlier call of the owner still has no container; creating this one anyway"
                );
                return Ok(());
            }
            // A notice for the owner (a call created, started or ended
            // anywhere), or the poll, whichever comes first.
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
        }
    }

    /// The first call of the owner queued before `call` whose container
    /// does not exist yet, if any.
    async fn earlier_without_container(&self, call: &Call) -> Result<Option<CallId>> {
        let subject = format!("hfq.{}", call.owner);
        let mut from = 1;
        for _ in 0..MAX_PREDECESSORS {
            let Some((seq, id)) = self.next_queued(&subject, from).await? else {
                return Ok(None);
            };
            if seq >= call.seq {
                return Ok(None);
            }
            from = seq + 1;
            match id {
                Some(id) if id != call.id && !self.has_container(&id).await? => {
                    return Ok(Some(id))
                }
                _ => {}
            }
        }
        Ok(None)
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

    /// True once `id` has its container, has ended, or runs on a lost node.
    async fn has_container(&self, id: &CallId) -> Result<bool> {
        if lock(&self.held).get(id).is_some_and(|h| h.created) {
            return Ok(true);
        }
        let Some(call) = self.bucket.get::<Call>(&call_key(id)).await?.1 else {
            // Its accept is still storing the record.
            return Ok(false);
        };
        match call.state {
            CallState::Pending => Ok(false),
            CallState::Finished | CallState::Failed => Ok(true),
            CallState::Running => match self.bucket.get::<String>(&running_key(id)).await?.1 {
                // Ended between the two reads.
                None => Ok(true),
                Some(claim) if claim.ends_with(CREATED) => Ok(true),
                Some(claim) => Ok(!self.node_alive(claim_node(&claim)).await?),
            },
        }
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
