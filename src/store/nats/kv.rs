//! The one key-value bucket that holds every record, and the two ways it is
//! written: a single compare-and-set, or an atomic batch (ADR-50) of puts
//! and deletes, each with an optional expected revision, all applied or
//! none.
//!
//! Keys (`BUCKET`):
//! - `u.USER` → User, `k.HEX` → user name (the key-hash index)
//! - `f.FUNCTION` → Function, `x.SECRET` → the same Function (the call
//!   URL index: a copy written and removed in the record's batches)
//! - `s.FUNCTION`, `s.FUNCTION.1` … `s.FUNCTION.15` → FunctionStats: the
//!   counters, in 16 shards so that concurrent calls of one function do
//!   not all compare-and-set one key; a call counts in the shard its id
//!   picks, every state it goes through (their sum is the function's
//!   counters). Shard 0 (`s.FUNCTION`) exists from the function's creation
//!   until the end of its purge: a stats key without a function record
//!   means a removal not yet purged
//! - `c.CALL` → Call
//! - `l.FUNCTION.CALL` → () while the call is live (PENDING or RUNNING)
//! - `r.CALL` → "NODE ATTEMPT" while the call is RUNNING on that node,
//!   "NODE ATTEMPT +" once its container exists (`order.rs`)
//! - `d.CALL` → (finished_ms, function) once the call has ended, for retention
//! - `q.USER.K` (K in 0..16) → the user's PENDING calls and their payload
//!   bytes (`calls::Queued`), in shards like the counters: what
//!   `max_queued_bytes` is checked against

use super::super::{Result, StoreError};
use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;

pub const BUCKET: &str = "hyperfuncd";
pub const BUCKET_STREAM: &str = "KV_hyperfuncd";

/// One write of a batch.
pub enum Op {
    /// Put `value` at `key`; with `Some(rev)`, only if the key's last
    /// revision is `rev` (0: the key has never been written).
    Put(String, Vec<u8>, Option<u64>),
    /// Delete `key` (a KV delete marker), with the same optional check.
    Del(String, Option<u64>),
}

/// Why a batch was not applied.
pub enum Refused {
    /// An expected revision did not match: re-read and try again.
    Moved,
    Error(StoreError),
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Refused::Error(e)
    }
}

pub fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("NATS: {what}: {e}"))
}

pub fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    bincode::serialize(v).map_err(|e| StoreError::Corrupt(format!("encoding a record: {e}")))
}

pub fn dec<T: DeserializeOwned>(key: &str, v: &[u8]) -> Result<T> {
    bincode::deserialize(v).map_err(|e| StoreError::Corrupt(format!("record {key}: {e}")))
}

/// A key's value and revision; `None` value: deleted (the revision is the
/// delete marker's, which a compare-and-set must name).
pub struct Read {
    pub revision: u64,
    pub value: Option<Bytes>,
}

#[derive(Clone)]
pub struct Bucket {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// The TTL every delete marker carries (`Nats-TTL`): with one revision
    /// per key, a deleted key then leaves no subject behind once it passes.
    pub marker_ttl: Duration,
}

impl Bucket {
    /// The key's last revision, if it was ever written, read from the
    /// bucket stream's leader.
    ///
    /// Not `kv.entry`: a KV bucket's stream allows direct gets, which any
    /// replica answers, a follower from what it has applied so far. Two
    /// reads in a row could then go back in time (a call seen FINISHED,
    /// then RUNNING from a lagging follower), and a read right after
    /// another node's write could miss it. The leader has every
    /// acknowledged write, so each read sees at least what was written
    /// before it began (issue 12: a finished call's output answered 410).
    pub async fn read(&self, key: &str) -> Result<Option<Read>> {
        self.read_in(BUCKET_STREAM, &format!("$KV.{BUCKET}.{key}"))
            .await
    }

    /// As `read`, for the key whose subject is `subject` in the KV stream
    /// `stream` (another bucket's).
    pub async fn read_in(&self, stream: &str, subject: &str) -> Result<Option<Read>> {
        // While a leader is being elected reads find no responder: wait.
        let deadline = std::time::Instant::now() + unavailable_for();
        loop {
            match self.read_once(stream, subject).await {
                Ok(r) => return Ok(r),
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "NATS read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(unavailable("reading a record", e)),
            }
        }
    }

    async fn read_once(
        &self,
        stream: &str,
        subject: &str,
    ) -> std::result::Result<Option<Read>, String> {
        let stream = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| e.to_string())?;
        // A message get (not a direct get) is answered by the leader only.
        let message = match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(e.to_string()),
        };
        // A put has no operation header (or `PUT`); a delete, a purge or a
        // server's marker leaves no value.
        let put = message
            .headers
            .get("KV-Operation")
            .is_none_or(|v| v.as_str() == "PUT")
            && message.headers.get("Nats-Marker-Reason").is_none();
        Ok(Some(Read {
            revision: message.sequence,
            value: put.then_some(message.payload),
        }))
    }

    /// The last revision and value (`None`: deleted) of every key matching
    /// `pattern` (`*` stands for one token, as in `q.alice.*`), at most
    /// `max` of them, in one request: a batch direct get (`multi_last`,
    /// NATS 2.11+), where `read` would take one request per key. Any
    /// replica of the bucket may answer, from what it has applied so far,
    /// so this is for estimates (a budget check) only: a revision it gives
    /// may be stale, which a compare-and-set then finds out.
    pub async fn last_values(
        &self,
        pattern: &str,
        max: usize,
    ) -> Result<Vec<(String, u64, Option<Bytes>)>> {
        let deadline = std::time::Instant::now() + unavailable_for();
        loop {
            match self.last_values_once(pattern, max).await {
                Ok(v) => return Ok(v),
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "NATS batch read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(unavailable("reading records", e)),
            }
        }
    }

    async fn last_values_once(
        &self,
        pattern: &str,
        max: usize,
    ) -> std::result::Result<Vec<(String, u64, Option<Bytes>)>, String> {
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        let request = serde_json::json!({
            "multi_last": [format!("$KV.{BUCKET}.{pattern}")],
            "batch": max,
        });
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{BUCKET_STREAM}"),
                inbox,
                request.to_string().into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let prefix = format!("$KV.{BUCKET}.");
        let until = tokio::time::Instant::now() + BATCH_READ_WITHIN;
        let mut out = Vec::new();
        loop {
            let m = match tokio::time::timeout_at(until, answers.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err("the answer ended early".into()),
                Err(_) => return Err("no complete answer in time".into()),
            };
            match m.status.map(|s| s.as_u16()) {
                None | Some(200) => {}
                // The end of the batch; or no key matches.
                Some(204) | Some(404) => break,
                Some(code) => {
                    return Err(format!(
                        "status {code}: {}",
                        m.description.unwrap_or_default()
                    ))
                }
            }
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let (Some(subject), Some(seq)) = (header("Nats-Subject"), header("Nats-Sequence"))
            else {
                return Err("an answer without its subject or sequence".into());
            };
            let key = subject
                .strip_prefix(&prefix)
                .unwrap_or(&subject)
                .to_string();
            let revision = seq.parse().map_err(|_| format!("a sequence {seq:?}"))?;
            let put = header("KV-Operation").is_none_or(|v| v == "PUT")
                && header("Nats-Marker-Reason").is_none();
            out.push((key, revision, put.then_some(m.payload)));
            if out.len() > max {
                return Err(format!("more than {max} keys match {pattern}"));
            }
        }
        let _ = answers.unsubscribe().await;
        Ok(out)
    }

    /// The key's record and revision (0 if it never existed or was deleted
    /// and its marker is gone).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<(u64, Option<T>)> {
        match self.read(key).await? {
            None => Ok((0, None)),
            Some(Read {
                revision,
                value: None,
            }) => Ok((revision, None)),
            Some(Read {
                revision,
                value: Some(v),
            }) => Ok((revision, Some(dec(key, &v)?))),
        }
    }

    /// Applies `ops` atomically: all of them or none.
    pub async fn commit(&self, ops: Vec<Op>) -> std::result::Result<(), Refused> {
        let n = ops.len();
        let batch = uuid::Uuid::new_v4().simple().to_string();
        for (i, op) in ops.into_iter().enumerate() {
            let mut h = HeaderMap::new();
            let (key, value, expect) = match op {
                Op::Put(k, v, e) => (k, v, e),
                Op::Del(k, e) => {
                    h.insert("KV-Operation", "DEL");
                    let ttl = format!("{}s", self.marker_ttl.as_secs().max(1));
                    h.insert("Nats-TTL", ttl.as_str());
                    (k, Vec::new(), e)
                }
            };
            if let Some(rev) = expect {
                h.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    rev.to_string().as_str(),
                );
            }
            let subject = format!("$KV.{BUCKET}.{key}");
            if n > 1 {
                h.insert("Nats-Batch-Id", batch.as_str());
                h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            }
            if i + 1 < n {
                // Checked by the server when the commit arrives.
                self.client
                    .publish_with_headers(subject, h, value.into())
                    .await
                    .map_err(|e| unavailable("writing", e))?;
                continue;
            }
            if n > 1 {
                h.insert("Nats-Batch-Commit", "1");
            }
            let ack = self
                .js
                .publish_with_headers(subject, h, value.into())
                .await
                .map_err(|e| unavailable("writing", e))?;
            return match ack.await {
                Ok(_) => Ok(()),
                Err(e) if lost_race(&e) => Err(Refused::Moved),
                Err(e) => Err(Refused::Error(unavailable("writing", e))),
            };
        }
        Ok(())
    }

    /// Every live key under `prefix` (e.g. `l.FUNCTION.`) with its value,
    /// in the order they were last written.
    pub async fn scan(&self, prefix: &str) -> Result<Vec<(String, Bytes)>> {
        let deadline = std::time::Instant::now() + unavailable_for();
        loop {
            match self.scan_once(prefix).await {
                Ok(v) => return Ok(v),
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "NATS scan failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn scan_once(&self, prefix: &str) -> Result<Vec<(String, Bytes)>> {
        let stream = self
            .js
            .get_stream_no_info(BUCKET_STREAM)
            .await
            .map_err(|e| unavailable("scanning", e))?;
        let messages = read_all(
            &stream,
            format!("$KV.{BUCKET}.{prefix}>"),
            consumer::DeliverPolicy::LastPerSubject,
            "scanning",
        )
        .await?;
        let skip = format!("$KV.{BUCKET}.");
        Ok(messages
            .into_iter()
            .filter(|m| {
                // Deleted keys leave a marker: skip it.
                m.headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_none_or(|v| v.as_str() == "PUT")
            })
            .map(|m| {
                let key = m.subject.as_str().strip_prefix(&skip).unwrap_or_default();
                (key.to_string(), m.payload.clone())
            })
            .collect())
    }
}

/// Whether a write was refused because an expected revision did not hold:
/// the key has moved on (10071), or, on a replicated stream, another write
/// to the same key was still being replicated (10164, "wrong last
/// sequence" without a number), which the server cannot compare against
/// and so refuses. Both are refused before anything of the batch is
/// proposed: nothing was applied, and the caller re-reads and tries again.
/// (10164 taken for an outage cost each such race a 250 ms wait: with
/// every accept of a function writing one counters key, most of them.)
pub(super) fn lost_race(e: &jetstream::context::PublishError) -> bool {
    e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|s| {
                s.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            })
}

/// Every message of `stream` on `filter` from `deliver`, read through a
/// short-lived consumer that is removed afterwards.
pub async fn read_all(
    stream: &jetstream::stream::Stream<()>,
    filter: String,
    deliver: consumer::DeliverPolicy,
    what: &str,
) -> Result<Vec<jetstream::Message>> {
    let mut consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: filter,
            deliver_policy: deliver,
            ack_policy: consumer::AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(what, e))?;
    let name = consumer.cached_info().name.clone();
    let mut left = consumer
        .info()
        .await
        .map_err(|e| unavailable(what, e))?
        .num_pending;
    let mut out = Vec::new();
    while left > 0 {
        let mut batch = consumer
            .batch()
            .max_messages(left.min(1000) as usize)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| unavailable(what, e))?;
        let mut got = 0;
        while let Some(m) = batch.next().await {
            out.push(m.map_err(|e| unavailable(what, e))?);
            got += 1;
        }
        if got == 0 {
            break;
        }
        left = left.saturating_sub(got);
    }
    let _ = stream.delete_consumer(&name).await;
    Ok(out)
}

/// How long one batch read (`last_values`) may take to answer whole.
const BATCH_READ_WITHIN: Duration = Duration::from_secs(5);

/// How long a write keeps retrying while the cluster cannot answer (a
/// server lost, leaders being elected) before the error reaches the caller.
const UNAVAILABLE_FOR: Duration = Duration::from_secs(60);

/// `UNAVAILABLE_FOR`; the failpoint tests shorten it (`HYPERFUNCD_TEST_RETRY_SECS`)
/// so that a fault injected for good reaches its give-up in seconds.
fn unavailable_for() -> Duration {
    #[cfg(feature = "failpoints")]
    if let Some(s) = std::env::var("HYPERFUNCD_TEST_RETRY_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Duration::from_secs(s);
    }
    UNAVAILABLE_FOR
}

/// Retries `attempt` while a compare-and-set finds the record moved, and
/// while the cluster is unavailable (for up to `UNAVAILABLE_FOR`). A write
/// whose answer was lost may have been applied: each attempt must
/// recognise its own earlier write (see the callers).
pub async fn retry<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, Refused>>,
{
    let deadline = std::time::Instant::now() + unavailable_for();
    let mut backoff = Duration::from_millis(1);
    let mut moved = 0;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(Refused::Error(StoreError::Unavailable(m)))
                if std::time::Instant::now() < deadline =>
            {
                tracing::debug!(error = %m, "NATS unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(Refused::Error(e)) => return Err(e),
            Err(Refused::Moved) => {
                moved += 1;
                if moved > 200 {
                    return Err(StoreError::Unavailable(
                        "NATS: a record kept changing under 200 attempts to update it".into(),
                    ));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
        }
    }
}
