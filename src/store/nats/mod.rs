//! The shared store: NATS JetStream, so several hyperfuncd nodes, each with
//! its own Docker Engine, serve one set of users, functions, queues and
//! caches. Every node runs this module against the same JetStream cluster.
//!
//! Where things live:
//! - records: one KV bucket (`kv.rs`), written by compare-and-set on a
//!   record's revision, several keys at once in atomic batches;
//! - the per-user FIFO queues: the work-queue stream `HFQ`, subject
//!   `hfq.USER`, one message per accepted call carrying its payload; per
//!   user a durable pull consumer with `max_ack_pending` = the user's
//!   quota, so at most that many of the user's calls are out across the
//!   cluster, handed out in order. A message stays unacknowledged while its
//!   call runs (kept alive by progress acks) and is acknowledged once the
//!   call's end is stored;
//! - outputs and logs: per function the streams `HFO_OWNER_NAME` and
//!   `HFL_OWNER_NAME` (subjects `hfo.OWNER.NAME.CALL`, `hfl.OWNER.NAME.CALL`;
//!   `_` is in no name, so a stream name is unambiguous), bounded by the
//!   budgets (`max_bytes`, discard old);
//! - node liveness: the bucket `hyperfuncd-nodes`, one key per node, the
//!   node's lease: taken and renewed every `HEARTBEAT` by compare-and-set
//!   (on a connection of its own), gone `NODE_TTL` after the last renewal.
//!
//! The rules of the single-host store hold cluster-wide: a call is
//! accepted (202) once its message and its record are stored with the
//! stream's replicas; RUNNING is a compare-and-set on the call's record,
//! taken before any container exists, so no call starts twice; a node
//! whose lease lapses fences itself (kills its containers, exits) before
//! any other may reap it; a call RUNNING on a node whose lease has been
//! gone for `REAP_GRACE` ends FAILED "node lost while the call was
//! running" (`reap`), and one that never reached RUNNING is
//! handed to another node by the consumer's redelivery.

mod calls;
mod history;
#[cfg(test)]
mod idem_tests;
mod kv;
mod order;
#[cfg(test)]
mod tests;
mod webhooks;

use super::{
    changed_meanwhile, Accepted, FunctionStats, OutputLookup, Result, Started, Store, StoreConfig,
    StoreError,
};
use crate::model::{
    Call, CallId, CallState, Event, FnKey, Function, Idempotency, IdempotencyRecord, Name, Outcome,
    PulledImage, QueueBudget, RegistryLogin, User,
};
use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use kv::{dec, enc, retry, unavailable, Bucket, Op, Refused};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How to reach the JetStream cluster (`[store.nats]`).
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub servers: Vec<String>,
    /// A `.creds` file (JWT + NKey seed), if the servers require one.
    pub credentials: Option<PathBuf>,
    /// CA certificate(s) to verify the servers' TLS certificates; with it
    /// the connection requires TLS.
    pub ca: Option<PathBuf>,
    /// Replicas of every stream and bucket (3 in a three-server cluster).
    pub replicas: usize,
    /// The largest message the store must carry (a payload or an output):
    /// the servers' `max_payload` must allow it.
    pub max_message_bytes: u64,
    /// The queue stream's `max_bytes` (discard new): past it, accepts are
    /// refused as `Full`.
    pub queue_max_bytes: u64,
    /// How long a delete marker of the records bucket lives
    /// (`MARKER_TTL`; shorter only in tests).
    pub marker_ttl: Duration,
}

/// How long a deleted record key keeps its delete marker: long after
/// anything could still write the key expecting it absent
/// (ARCHITECTURE.md, "delete markers expire").
pub const MARKER_TTL: Duration = Duration::from_secs(24 * 3600);

impl NatsConfig {
    /// What the shared store needs to know of the daemon's configuration.
    pub fn from_config(config: &crate::config::Config) -> NatsConfig {
        NatsConfig {
            servers: config.store.nats.servers.clone(),
            credentials: config.store.nats.credentials.clone(),
            ca: config.store.nats.ca.clone(),
            replicas: config.store.nats.replicas,
            max_message_bytes: config
                .limits
                .max_stdin_bytes
                .max(config.limits.max_stdout_bytes),
            queue_max_bytes: config.store.nats.queue_max_bytes,
            marker_ttl: MARKER_TTL,
        }
    }
}

const QUEUE_STREAM: &str = "HFQ";
const NODES_BUCKET: &str = "hyperfuncd-nodes";
/// How often a node refreshes its liveness key.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a heartbeat key lives after its last renewal (the bucket's
/// max age): the lease.
const NODE_TTL: Duration = Duration::from_secs(40);
/// A node whose lease has not been renewed for this long (measured from
/// the sending of its last renewal that succeeded) fences itself: it stops
/// taking work, kills its containers and exits for its supervisor to
/// restart it into recovery. Below `NODE_TTL`, so it falls before the key
/// can even expire. Twice the worst failover measured when one server of
/// three is frozen (SIGSTOP: its streams' leaders are elected again
/// elsewhere, writes wait ~13 s on 2 loaded cores), so one frozen server
/// fences no node.
const FENCE_AFTER: Duration = Duration::from_secs(30);
/// How often the fence is checked, apart from the heartbeat.
const FENCE_CHECK: Duration = Duration::from_millis(500);
/// A reaper fails another node's calls only once it has seen that node's
/// lease gone for this long, its own lease renewed all along: after a
/// store outage every node gets this long to renew before any reaping,
/// and a node paused past its fence gets this long, beyond the key's
/// expiry, to wake up and kill its own containers. The earliest reap is
/// `NODE_TTL + REAP_GRACE` after the node's last renewal.
const REAP_GRACE: Duration = Duration::from_secs(20);
/// A renewal that takes longer than this counts as failed.
const RENEW_WITHIN: Duration = Duration::from_secs(2);
/// At start, a lease held by another process must go unrenewed this long
/// before this process takes it over (a crashed predecessor's); renewed
/// meanwhile, it is a live clone's, and this process is refused.
const TAKEOVER_AFTER: Duration = Duration::from_secs(7);
/// NATS pings this often; two unanswered pings close the connection and
/// reconnect (async-nats's default is 60 s: minutes on a dead server).
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// A queue message not acknowledged for this long is handed out again
/// (to any node); progress acks keep a running call's message. Past a
/// failover (see `FENCE_AFTER`), in which no progress ack gets through.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// How often held messages get a progress ack, dead nodes are looked for,
/// and unstarted heads are given back.
const TICK: Duration = Duration::from_secs(4);
/// A queue message whose call record is still missing after this long
/// belongs to an accept that crashed before answering: dropped.
const ORPHAN_AFTER: Duration = Duration::from_secs(30);
/// How long an accept may take to store its record after its message.
const ACCEPT_WITHIN: Duration = Duration::from_secs(15);
/// Room for headers beside a message's bytes.
const HEADROOM: u64 = 64 * 1024;
/// The reason a call running on a lost node ends with.
pub const NODE_LOST: &str = "node lost while the call was running";

/// A queue message this node holds: the head it is about to start, or the
/// message of a call it runs.
struct Held {
    msg: jetstream::Message,
    owner: Name,
    since: Instant,
    running: bool,
    /// Its container exists (`order.rs`).
    created: bool,
}

pub struct NatsStore {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Inner {
    bucket: Bucket,
    nodes: async_nats::jetstream::kv::Store,
    queue: stream::Stream,
    node: String,
    config: StoreConfig,
    replicas: usize,
    /// The queue stream's bound (`[store.nats] queue_max_bytes`), for the
    /// message that refuses a call past it.
    queue_max_bytes: u64,
    consumers: Mutex<HashMap<Name, consumer::PullConsumer>>,
    held: Mutex<HashMap<CallId, Held>>,
    /// Per owner: the held head not yet started.
    heads: Mutex<HashMap<Name, CallId>>,
    remote: Mutex<Option<mpsc::UnboundedReceiver<Name>>>,
    /// Owners named by change notices, for `await_turn` (`order.rs`).
    changed: tokio::sync::broadcast::Sender<Name>,
    /// Calls that held others up, and since when (`order.rs`).
    turns: order::Turns,
    /// Functions whose output and log streams this node has made sure of.
    streams: Mutex<HashSet<FnKey>>,
    /// Set when a call's state change could not be settled (see `give_up`)
    /// or the lease lapsed (`fence`).
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// This process's hold on the node's heartbeat key.
    lease: Mutex<Lease>,
    /// Per other node: since when this node has seen its lease gone
    /// (`node_lost`); cleared whenever this node's own renewal fails.
    absent: Mutex<HashMap<String, Instant>>,
    /// The connection the lease is renewed on, reconnected when a renewal
    /// times out (a server that stopped answering but keeps the socket).
    lease_client: async_nats::Client,
    /// When the lease's connection was last made to reconnect: a new
    /// connection gets `RECONNECT_SETTLE` to come through a failover
    /// before it is dropped again (dropped every 2 s, it never did).
    reconnected: Mutex<Option<Instant>>,
    /// The lease lapsed: no call starts here any more.
    fenced: std::sync::atomic::AtomicBool,
}

/// How long a reconnected lease connection is left to work before a
/// timed-out renewal makes it reconnect again: a JetStream failover (one
/// server of three frozen) takes ~13 s, and renewals on a connection
/// reconnected every 2 s kept timing out for all of the 30 s a server was
/// frozen, fencing the node.
const RECONNECT_SETTLE: Duration = Duration::from_secs(10);

/// The node's heartbeat key as this process holds it: written only by
/// compare-and-set on `revision`, so a second process (a clone) or a
/// renewal after the key expired fails instead of overwriting.
struct Lease {
    /// Names this process in the key's value.
    nonce: String,
    /// The key's revision after this process's last write.
    revision: u64,
    /// When the last renewal that succeeded was sent.
    renewed: Instant,
}

/// A heartbeat key's value.
#[derive(serde::Serialize, serde::Deserialize)]
struct Beat {
    ms: u64,
    nonce: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for NatsStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl NatsStore {
    /// Connects, creates what is missing (bucket, streams), and starts the
    /// heartbeat. `dir` keeps this node's id, so a restarted node finds
    /// its own calls.
    pub async fn open(dir: &Path, config: StoreConfig, nats: NatsConfig) -> Result<NatsStore> {
        let node = node_id(dir)?;
        let servers: Vec<async_nats::ServerAddr> = nats
            .servers
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| StoreError::Config(format!("[store.nats] servers: {s}: {e}")))
            })
            .collect::<Result<_>>()?;
        // A cluster starting beside us may take a moment to answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = connect(&node, "", &servers, &nats, deadline).await?;
        let max_payload = client.server_info().max_payload as u64;
        if max_payload < nats.max_message_bytes + HEADROOM {
            return Err(StoreError::Config(format!(
                "the NATS servers' max_payload is {max_payload} bytes, but hyperfuncd must store payloads and outputs of up to {} bytes: set max_payload to at least {} in every server's config",
                nats.max_message_bytes,
                nats.max_message_bytes + HEADROOM
            )));
        }
        let js = jetstream::new(client.clone());
        let replicas = nats.replicas.max(1);
        // A cluster that has just started may still be electing its leaders.
        // The records bucket is read and written through its stream (kv.rs).
        let (_, _, queue) = loop {
            match open_streams(&js, replicas, nats.queue_max_bytes).await {
                Ok(v) => break v,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream not ready yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        // Heartbeats on a connection of their own: a queue read or an output
        // publish of several MiB must not delay the lease's renewal.
        let lease_client = connect(&node, " lease", &servers, &nats, deadline).await?;
        let nodes = loop {
            match jetstream::new(lease_client.clone())
                .get_key_value(NODES_BUCKET)
                .await
            {
                Ok(b) => break b,
                Err(e) if Instant::now() > deadline => {
                    return Err(unavailable("opening the nodes bucket", e))
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            bucket: Bucket {
                client,
                js,
                marker_ttl: nats.marker_ttl,
            },
            nodes,
            lease: Mutex::new(Lease {
                nonce: uuid::Uuid::new_v4().simple().to_string(),
                revision: 0,
                renewed: Instant::now(),
            }),
            absent: Mutex::new(HashMap::new()),
            lease_client,
            reconnected: Mutex::new(None),
            fenced: std::sync::atomic::AtomicBool::new(false),
            queue,
            node,
            config,
            replicas,
            queue_max_bytes: nats.queue_max_bytes,
            consumers: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            heads: Mutex::new(HashMap::new()),
            remote: Mutex::new(Some(rx)),
            changed: tokio::sync::broadcast::channel(256).0,
            turns: order::Turns::default(),
            streams: Mutex::new(HashSet::new()),
            fatal: tokio::sync::watch::channel(None).0,
        });
        // The lease, or a clear refusal if another process holds it.
        inner.acquire(deadline).await?;
        let mut changes = inner
            .bucket
            .client
            .subscribe("hf.changed.*")
            .await
            .map_err(|e| unavailable("subscribing", e))?;
        let tasks = vec![
            tokio::spawn({
                let inner = Arc::clone(&inner);
                async move {
                    let mut tick = tokio::time::interval(HEARTBEAT);
                    loop {
                        tick.tick().await;
                        inner.beat().await;
                    }
                }
            }),
            // Apart from the heartbeat, which may hang on a dead connection:
            // the fence must fall on time whatever the store does.
            tokio::spawn({
                let inner = Arc::clone(&inner);
                async move {
                    let mut tick = tokio::time::interval(FENCE_CHECK);
                    loop {
                        tick.tick().await;
                        inner.check_lease();
                    }
                }
            }),
            tokio::spawn({
                let inner = Arc::clone(&inner);
                async move {
                    let mut tick = tokio::time::interval(TICK);
                    loop {
                        tick.tick().await;
                        inner.keep_alive().await;
                    }
                }
            }),
            // Apart from the progress acks: a long reap must not let this
            // node's messages lapse.
            tokio::spawn({
                let inner = Arc::clone(&inner);
                async move {
                    let mut tick = tokio::time::interval(TICK);
                    loop {
                        tick.tick().await;
                        if let Err(e) = inner.reap().await {
                            tracing::warn!(error = %e, "looking for lost nodes failed");
                        }
                    }
                }
            }),
            tokio::spawn({
                let changed = inner.changed.clone();
                async move {
                    while let Some(m) = changes.next().await {
                        let owner = m.subject.as_str().rsplit('.').next().unwrap_or_default();
                        if let Ok(owner) = Name::parse(owner) {
                            // No receiver is waiting for its turn: nothing to tell.
                            let _ = changed.send(owner.clone());
                            if tx.send(owner).is_err() {
                                break;
                            }
                        }
                    }
                }
            }),
        ];
        tracing::info!(node = %inner.node, replicas, "connected to NATS JetStream");
        Ok(NatsStore { inner, tasks })
    }
}

/// One connection to the cluster, retried until `deadline` unless the
/// servers refuse it for good. Pings every `PING_INTERVAL`, so a frozen or
/// unreachable server is left for another within seconds.
async fn connect(
    node: &str,
    purpose: &str,
    servers: &[async_nats::ServerAddr],
    nats: &NatsConfig,
    deadline: Instant,
) -> Result<async_nats::Client> {
    loop {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("hyperfuncd {node}{purpose}"))
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(PING_INTERVAL);
        if let Some(creds) = &nats.credentials {
            options = options.credentials_file(creds).await.map_err(|e| {
                StoreError::Config(format!(
                    "[store.nats] credentials: {}: {e}",
                    creds.display()
                ))
            })?;
        }
        if let Some(ca) = &nats.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match options.connect(servers.to_vec()).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                // Retrying cannot mend the config: say what to fix, now.
                if let Some(why) = refused(&e, nats) {
                    return Err(unavailable("connecting", why));
                }
                if Instant::now() > deadline {
                    return Err(unavailable("connecting", e));
                }
                tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The node's id, kept in `dir/node-id`: a restarted node is the same node.
fn node_id(dir: &Path) -> Result<String> {
    let path = dir.join("node-id");
    let failed = |e: std::io::Error| StoreError::Failed(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(s) if Name::parse(s.trim()).is_ok() => return Ok(s.trim().to_string()),
        Ok(_) => {
            return Err(StoreError::Corrupt(format!(
                "{} does not hold a node id",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    std::fs::create_dir_all(dir).map_err(failed)?;
    let id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let tmp = dir.join("node-id.tmp");
    std::fs::write(&tmp, &id).map_err(failed)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(failed)?;
    std::fs::rename(&tmp, &path).map_err(failed)?;
    Ok(id)
}

/// What the servers' refusal of a connection means for `[store.nats]`, if
/// it is one that no retry will change: an untrusted certificate, TLS
/// required by one side only, or credentials missing or not accepted.
fn refused(e: &async_nats::ConnectError, nats: &NatsConfig) -> Option<String> {
    use async_nats::ConnectErrorKind as Kind;
    let creds = match &nats.credentials {
        Some(c) => format!("[store.nats] credentials ({})", c.display()),
        None => "[store.nats] credentials (none set)".to_string(),
    };
    let ca = match &nats.ca {
        Some(c) => format!("[store.nats] ca ({})", c.display()),
        None => "[store.nats] ca (none set)".to_string(),
    };
    match e.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => Some(format!(
            "the server refused this node ({e}): {creds} must be a .creds file of a user the servers accept"
        )),
        Kind::Tls => Some(format!(
            "TLS setup failed ({e}): check {ca}: a readable PEM, set exactly when the servers have tls {{ ... }}"
        )),
        _ => {
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let inner = s
                    .downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|i| i.downcast_ref::<rustls::Error>());
                if let Some(rustls::Error::InvalidCertificate(c)) = inner {
                    return Some(format!(
                        "the server's TLS certificate is not trusted ({c:?}): {ca} must name the PEM of the CA that signed the servers' certificates"
                    ));
                }
                source = s.source();
            }
            None
        }
    }
}

/// Brings the nodes bucket made by an earlier release (a shorter lease)
/// to `NODE_TTL`: a key must not expire before its node fences.
async fn lease_ttl(js: &jetstream::Context) -> Result<()> {
    let name = format!("KV_{NODES_BUCKET}");
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| unavailable("reading the nodes bucket", e))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| unavailable("reading the nodes bucket", e))?
        .config
        .clone();
    if config.max_age != NODE_TTL {
        config.max_age = NODE_TTL;
        js.update_stream(config)
            .await
            .map_err(|e| unavailable("updating the nodes bucket's lease time", e))?;
    }
    Ok(())
}

/// The records bucket, the nodes bucket and the queue stream, made if missing.
async fn open_streams(
    js: &jetstream::Context,
    replicas: usize,
    queue_max_bytes: u64,
) -> Result<(jetstream::kv::Store, jetstream::kv::Store, stream::Stream)> {
    let kv = open_bucket(js, replicas).await?;
    let nodes = match js.get_key_value(NODES_BUCKET).await {
        Ok(b) => {
            lease_ttl(js).await?;
            b
        }
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: NODES_BUCKET.into(),
                history: 1,
                max_age: NODE_TTL,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("creating the nodes bucket", e))?,
    };
    // Bounded, and full means refused: discard-old would silently drop
    // acknowledged calls. A stream made before the bound (or with another
    // one) is brought to this node's setting.
    let max_bytes = i64::try_from(queue_max_bytes).unwrap_or(i64::MAX);
    let mut queue = js
        .get_or_create_stream(stream::Config {
            name: QUEUE_STREAM.into(),
            subjects: vec!["hfq.*".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_bytes,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("creating the queue stream", e))?;
    let info = queue
        .info()
        .await
        .map_err(|e| unavailable("reading the queue stream", e))?;
    if info.config.max_bytes != max_bytes || info.config.discard != stream::DiscardPolicy::New {
        let mut config = info.config.clone();
        config.max_bytes = max_bytes;
        config.discard = stream::DiscardPolicy::New;
        js.update_stream(config)
            .await
            .map_err(|e| unavailable("bounding the queue stream", e))?;
        tracing::info!(
            max_bytes = queue_max_bytes,
            "the shared queue stream is bounded by [store.nats] queue_max_bytes"
        );
    }
    Ok((kv, nodes, queue))
}

async fn open_bucket(js: &jetstream::Context, replicas: usize) -> Result<jetstream::kv::Store> {
    let kv = match js.get_key_value(kv::BUCKET).await {
        Ok(b) => b,
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: kv::BUCKET.into(),
                history: 1,
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("creating the records bucket", e))?,
    };
    // Multi-key writes are atomic batches, which the stream must allow.
    let mut stream = js
        .get_stream(kv::BUCKET_STREAM)
        .await
        .map_err(|e| unavailable("opening the records bucket", e))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| unavailable("opening the records bucket", e))?
        .config
        .clone();
    // Delete markers carry a TTL (`Bucket::commit`), which the stream must
    // allow, so a deleted key leaves nothing behind for good.
    if !config.allow_atomic_publish || !config.allow_message_ttl {
        config.allow_atomic_publish = true;
        config.allow_message_ttl = true;
        js.update_stream(config).await.map_err(|e| {
            unavailable(
                "allowing atomic batches and marker TTLs on the records bucket",
                e,
            )
        })?;
    }
    Ok(kv)
}

/// A user's record and its revision, in today's shape whichever release
/// wrote it (`dec_user`).
async fn get_user_record(bucket: &kv::Bucket, name: &Name) -> Result<(u64, Option<User>)> {
    let key = user_key(name);
    match bucket.read(&key).await? {
        None => Ok((0, None)),
        Some(kv::Read {
            revision,
            value: None,
        }) => Ok((revision, None)),
        Some(kv::Read {
            revision,
            value: Some(v),
        }) => Ok((revision, Some(dec_user(&key, &v)?))),
    }
}

/// A user record; one written before users had budgets (`UserV1`) or
/// reservations (`UserV2`), each too short for the shapes after it,
/// follows the defaults for what it lacks until it is next written.
fn dec_user(key: &str, v: &[u8]) -> Result<User> {
    dec::<User>(key, v).or_else(|e| {
        if let Ok(old) = dec::<crate::model::UserV2>(key, v) {
            return Ok(old.into());
        }
        match dec::<crate::model::UserV1>(key, v) {
            Ok(old) => Ok(old.into()),
            Err(_) => Err(e),
        }
    })
}

fn user_key(name: &Name) -> String {
    format!("u.{name}")
}
/// `g.OWNER.HEXHOST`: a host holds `:`, which no KV key may, so it is hex.
fn login_key(owner: &Name, host: &str) -> String {
    format!("g.{owner}.{}", hex::encode(host))
}
/// `img.HEXINSTANCE.HEXID`: an image id holds `:`, which no KV key may.
fn pulled_key(instance: &str, id: &str) -> String {
    format!("img.{}.{}", hex::encode(instance), hex::encode(id))
}
fn hash_key(hash: &[u8; 32]) -> String {
    format!("k.{}", hex::encode(hash))
}
fn function_key(key: &FnKey) -> String {
    format!("f.{}.{}", key.owner, key.name)
}
/// How many keys a function's counters are spread over. Part of the stored
/// layout: a call's shard follows from its id (`shard_of`), so changing
/// this would move live calls' counts to other keys.
const SHARDS: usize = 16;
/// Shard 0 of a function's counters, also the sign that it has counters:
/// it exists from `create_function` until the last step of its purge (a
/// stats key without a function record is a removal not yet purged).
fn stats_key(key: &FnKey) -> String {
    format!("s.{}.{}", key.owner, key.name)
}
/// Counter shard `shard` of a function: `s.OWNER.NAME` for 0,
/// `s.OWNER.NAME.K` for the others.
fn shard_key(key: &FnKey, shard: usize) -> String {
    match shard {
        0 => stats_key(key),
        k => format!("s.{}.{}.{k}", key.owner, key.name),
    }
}
/// The shard that counts every state of call `id`: fixed by the id, so
/// each transition of one call moves counts within one key (and a shard
/// never counts an end whose accept it did not count).
fn shard_of(id: &CallId) -> usize {
    usize::from(id.as_bytes()[15]) % SHARDS
}
/// The function of a `s.` key (without the `s.`), whichever its shard.
fn parse_stats_key(rest: &str) -> Option<FnKey> {
    let mut parts = rest.splitn(3, '.');
    let key = FnKey::new(
        Name::parse(parts.next()?).ok()?,
        Name::parse(parts.next()?).ok()?,
    );
    match parts.next() {
        None => Some(key),
        Some(k) => k
            .parse::<usize>()
            .ok()
            .filter(|k| (1..SHARDS).contains(k))
            .map(|_| key),
    }
}
/// The secret index: `x.SECRET` -> a copy of the function's record,
/// written (and removed) in the same batch as the record, so the data
/// plane finds a function in one read and the copy is never behind.
fn secret_key(secret: &str) -> String {
    format!("x.{secret}")
}
/// Only a secret of the shape this store makes (a hyphenated v4 UUID) may
/// become part of a key: anything else is no function's.
fn secret_shaped(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-')
}

impl Inner {
    fn beat_value(&self, nonce: &str) -> Result<Bytes> {
        Ok(enc(&Beat {
            ms: crate::model::now_ms(),
            nonce: nonce.to_string(),
        })?
        .into())
    }

    /// Takes the node's lease at start. A key written by another process is
    /// watched for `TAKEOVER_AFTER`: renewed meanwhile, a live process
    /// (a copy of this data dir, or this daemon started twice) runs as
    /// this node, and this one is refused; left alone, it was a crashed
    /// predecessor's, taken over by compare-and-set on its revision.
    async fn acquire(&self, deadline: Instant) -> Result<()> {
        let nonce = lock(&self.lease).nonce.clone();
        let clone = |why: &str| {
            StoreError::Config(format!(
                "another hyperfuncd process is running as node {} ({why}): a copy of this data directory (a cloned VM, a restored backup) must not run beside the original; give the copy its own node id by removing its node-id file",
                self.node
            ))
        };
        loop {
            let seen = match self.nodes.entry(&self.node).await {
                Ok(e) => e.filter(|e| e.operation == jetstream::kv::Operation::Put),
                Err(e) if Instant::now() > deadline => {
                    return Err(unavailable("reading the node's lease", e))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream not ready yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            let sent = Instant::now();
            let value = self.beat_value(&nonce)?;
            let taken = match &seen {
                None => self.nodes.create(&self.node, value).await.map_err(|e| {
                    if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists {
                        clone("it took the lease as this one started")
                    } else {
                        unavailable("taking the node's lease", e)
                    }
                }),
                Some(held) => {
                    tracing::warn!(
                        node = %self.node,
                        "this node's lease is held; waiting {}s to see whether its holder is alive",
                        TAKEOVER_AFTER.as_secs()
                    );
                    let watch_until = Instant::now() + TAKEOVER_AFTER;
                    while Instant::now() < watch_until {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(Some(now)) = self.nodes.entry(&self.node).await {
                            if now.revision != held.revision
                                && now.operation == jetstream::kv::Operation::Put
                            {
                                return Err(clone("its lease was renewed while this one waited"));
                            }
                        }
                    }
                    let sent = Instant::now();
                    let value = self.beat_value(&nonce)?;
                    match self.nodes.update(&self.node, value, held.revision).await {
                        Ok(rev) => {
                            let mut lease = lock(&self.lease);
                            lease.revision = rev;
                            lease.renewed = sent;
                            return Ok(());
                        }
                        Err(e) if e.kind() == jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                            // Expired while watched (a predecessor whose
                            // last renewal was near the lease's end, as after
                            // a store outage): taken afresh; written by
                            // another process: a clone.
                            match self.nodes.entry(&self.node).await {
                                Ok(None) => continue,
                                Ok(Some(e)) if e.operation != jetstream::kv::Operation::Put => {
                                    continue
                                }
                                _ => Err(clone("it took the lease as this one started")),
                            }
                        }
                        Err(e) => Err(unavailable("taking the node's lease", e)),
                    }
                }
            };
            match taken {
                Ok(rev) => {
                    let mut lease = lock(&self.lease);
                    lease.revision = rev;
                    lease.renewed = sent;
                    return Ok(());
                }
                Err(e @ StoreError::Config(_)) => return Err(e),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream not ready yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Renews the lease by compare-and-set. A renewal refused for its
    /// revision means the key expired or another process wrote it: this
    /// process no longer holds the node, and fences itself.
    async fn beat(&self) {
        if self.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let (nonce, revision) = {
            let lease = lock(&self.lease);
            (lease.nonce.clone(), lease.revision)
        };
        let sent = Instant::now();
        let value = match self.beat_value(&nonce) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "NATS heartbeat failed");
                return;
            }
        };
        let renewed =
            tokio::time::timeout(RENEW_WITHIN, self.nodes.update(&self.node, value, revision))
                .await;
        match renewed {
            Ok(Ok(rev)) => {
                let mut lease = lock(&self.lease);
                lease.revision = rev;
                lease.renewed = sent;
            }
            Ok(Err(e)) if e.kind() == jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                self.own_lost_renewal(&nonce).await;
            }
            Ok(Err(e)) => {
                lock(&self.absent).clear();
                tracing::warn!(error = %e, "NATS heartbeat failed");
            }
            Err(_) => {
                lock(&self.absent).clear();
                let settled = {
                    let mut last = lock(&self.reconnected);
                    let settled = last.is_none_or(|t| t.elapsed() > RECONNECT_SETTLE);
                    if settled {
                        *last = Some(Instant::now());
                    }
                    settled
                };
                if settled {
                    tracing::warn!("NATS heartbeat timed out; reconnecting its connection");
                    // Not awaited here: the reconnect itself waits on a server.
                    let client = self.lease_client.clone();
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(RENEW_WITHIN * 5, client.force_reconnect()).await;
                    });
                } else {
                    tracing::warn!("NATS heartbeat timed out; its connection was just made again");
                }
            }
        }
        self.check_lease();
    }

    /// A renewal refused for its revision: either an earlier renewal whose
    /// answer was lost (a timeout through a failover) was applied after
    /// all, and the key holds this process's own nonce at a newer
    /// revision, which this process takes up (its `renewed` time stays
    /// that of the last renewal it saw succeed); or the key expired or
    /// another process wrote it, and this node fences.
    async fn own_lost_renewal(&self, nonce: &str) {
        let entry = tokio::time::timeout(RENEW_WITHIN, self.nodes.entry(&self.node)).await;
        match entry {
            Ok(Ok(Some(e))) if e.operation == jetstream::kv::Operation::Put => {
                match dec::<Beat>(&self.node, &e.value) {
                    Ok(b) if b.nonce == nonce => {
                        tracing::info!(
                            "NATS heartbeat: an earlier renewal's answer was lost; it was stored"
                        );
                        lock(&self.lease).revision = e.revision;
                    }
                    _ => self.fence("this node's lease was taken by another process"),
                }
            }
            Ok(Ok(_)) => self.fence("this node's lease expired"),
            // Unknown: the next beat asks again (and the fence's clock runs).
            Ok(Err(e)) => tracing::warn!(error = %e, "NATS heartbeat: reading the lease failed"),
            Err(_) => tracing::warn!("NATS heartbeat: reading the lease timed out"),
        }
    }

    /// Fences this node once its lease has gone `FENCE_AFTER` without a
    /// renewal: a reaper elsewhere may act `NODE_TTL + REAP_GRACE` after
    /// the last one, and by then this node's containers must be dead.
    fn check_lease(&self) {
        let since = lock(&self.lease).renewed.elapsed();
        if since > FENCE_AFTER {
            self.fence(&format!(
                "this node's lease was not renewed for {}s",
                since.as_secs()
            ));
        }
    }

    /// Stops this node: no call starts here any more, and `failed`
    /// resolves, so `serve` kills this node's containers and exits for
    /// its supervisor to restart it into recovery.
    fn fence(&self, why: &str) {
        if self.fenced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        tracing::error!(node = %self.node, reason = %why, "fenced: stopping this node's calls before another node may reap them");
        self.fatal.send_replace(Some(format!("fenced: {why}")));
    }

    fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A call's state change still failed after every retry: it may or may
    /// not be stored, and only a restart's recovery (which reads the store
    /// and the Engine afresh) can settle the call. `failed` then resolves,
    /// and `serve` exits for its supervisor to restart it.
    fn give_up(&self, id: &CallId, e: &StoreError) {
        if let StoreError::Unavailable(m) = e {
            tracing::error!(call = %id, error = %m, "a call's state change could not be stored");
            self.fatal.send_replace(Some(format!(
                "the state of call {id} could not be stored: {m}"
            )));
        }
    }

    /// Whether `node`'s calls may be reaped: its lease has been gone for
    /// `REAP_GRACE` by this node's watch, while this node's own lease was
    /// renewed all along (a node cut off from the store reaps nothing).
    async fn node_lost(&self, node: &str) -> Result<bool> {
        if node == self.node {
            return Ok(false);
        }
        if lock(&self.lease).renewed.elapsed() > HEARTBEAT * 2 + RENEW_WITHIN {
            lock(&self.absent).clear();
            return Ok(false);
        }
        // From the stream's leader, as every record read (kv.rs): a lagging
        // replica must not declare a live node lost. An expired heartbeat
        // is gone from the stream (the bucket's max age).
        let heartbeat = self
            .bucket
            .read_in(
                &format!("KV_{NODES_BUCKET}"),
                &format!("$KV.{NODES_BUCKET}.{node}"),
            )
            .await?;
        let mut absent = lock(&self.absent);
        if heartbeat.is_some_and(|r| r.value.is_some()) {
            absent.remove(node);
            return Ok(false);
        }
        let since = *absent.entry(node.to_string()).or_insert_with(Instant::now);
        Ok(since.elapsed() > REAP_GRACE)
    }

    /// Tells every node that `owner`'s calls changed (queued, started, ended).
    async fn notify(&self, owner: &Name) {
        let _ = self
            .bucket
            .client
            .publish(format!("hf.changed.{owner}"), Bytes::new())
            .await;
    }

    /// Progress acks for the messages this node holds; heads not started
    /// within a tick are given back so another node may take them.
    async fn keep_alive(&self) {
        let mut back = Vec::new();
        let msgs: Vec<jetstream::Message> = {
            let mut held = lock(&self.held);
            let mut heads = lock(&self.heads);
            let stale: Vec<CallId> = held
                .iter()
                .filter(|(_, h)| !h.running && h.since.elapsed() > TICK)
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                if let Some(h) = held.remove(&id) {
                    heads.remove(&h.owner);
                    back.push(h.msg);
                }
            }
            held.values().map(|h| h.msg.clone()).collect()
        };
        for m in back {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
        for m in msgs {
            let _ = m.ack_with(AckKind::Progress).await;
        }
    }

    async fn consumer(&self, owner: &Name) -> Result<consumer::PullConsumer> {
        if let Some(c) = lock(&self.consumers).get(owner) {
            return Ok(c.clone());
        }
        let quota = match get_user_record(&self.bucket, owner).await?.1 {
            Some(u) => u.max_concurrency,
            None => 1,
        };
        let c = self.ensure_consumer(owner, quota).await?;
        lock(&self.consumers).insert(owner.clone(), c.clone());
        Ok(c)
    }

    /// Creates or updates `owner`'s queue consumer with `quota` calls out
    /// at once, waiting out a cluster that is still electing its leaders.
    async fn ensure_consumer(&self, owner: &Name, quota: u32) -> Result<consumer::PullConsumer> {
        retry(|| async {
            self.ensure_consumer_once(owner, quota)
                .await
                .map_err(Refused::Error)
        })
        .await
    }

    async fn ensure_consumer_once(
        &self,
        owner: &Name,
        quota: u32,
    ) -> Result<consumer::PullConsumer> {
        let name = format!("q-{owner}");
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: format!("hfq.{owner}"),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: i64::from(quota.max(1)),
            max_deliver: -1,
            num_replicas: self.replicas,
            ..Default::default()
        };
        let c = match self
            .queue
            .get_consumer::<consumer::pull::Config>(&name)
            .await
        {
            Ok(mut c) => {
                let current = c
                    .info()
                    .await
                    .map_err(|e| unavailable("reading a queue consumer", e))?
                    .config
                    .max_ack_pending;
                if current != config.max_ack_pending {
                    self.queue
                        .update_consumer(config)
                        .await
                        .map_err(|e| unavailable("updating a queue consumer", e))?
                } else {
                    c
                }
            }
            Err(_) => self
                .queue
                .create_consumer(config)
                .await
                .map_err(|e| unavailable("creating a queue consumer", e))?,
        };
        Ok(c)
    }

    /// A function's record, retried while the cluster is unavailable.
    async fn function(&self, key: &FnKey) -> Result<Option<Function>> {
        retry(|| async { Ok(self.bucket.get(&function_key(key)).await?.1) }).await
    }

    fn output_stream(key: &FnKey) -> String {
        format!("HFO_{}", key.token())
    }
    fn log_stream(key: &FnKey) -> String {
        format!("HFL_{}", key.token())
    }

    /// The function's output and log streams, bounded by the budgets.
    async fn ensure_streams(&self, name: &FnKey) -> Result<()> {
        retry(|| async { self.ensure_streams_once(name).await.map_err(Refused::Error) }).await
    }

    async fn ensure_streams_once(&self, name: &FnKey) -> Result<()> {
        if lock(&self.streams).contains(name) {
            return Ok(());
        }
        for (stream_name, subject, budget) in [
            (
                Self::output_stream(name),
                calls::output_subject(name, "*"),
                self.config.output_budget,
            ),
            (
                Self::log_stream(name),
                calls::log_subject(name, "*"),
                self.config.log_budget,
            ),
        ] {
            self.bucket
                .js
                .get_or_create_stream(stream::Config {
                    name: stream_name,
                    subjects: vec![subject],
                    max_bytes: budget.min(i64::MAX as u64) as i64,
                    discard: stream::DiscardPolicy::Old,
                    storage: stream::StorageType::File,
                    num_replicas: self.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable("creating a function's streams", e))?;
        }
        lock(&self.streams).insert(name.clone());
        Ok(())
    }

    async fn stream_bytes(&self, name: &str) -> Result<(u64, u64)> {
        match self.bucket.js.get_stream(name).await {
            Ok(mut s) => {
                let info = s
                    .info()
                    .await
                    .map_err(|e| unavailable("reading a stream", e))?;
                Ok((info.state.bytes, info.state.last_sequence))
            }
            Err(_) => Ok((0, 0)),
        }
    }
}

#[async_trait]
impl Store for NatsStore {
    async fn instance_id(&self) -> Result<String> {
        Ok(self.inner.node.clone())
    }

    async fn health(&self) -> std::result::Result<(), String> {
        match self.inner.bucket.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            s => Err(format!("NATS is not reachable ({s:?})")),
        }
    }

    async fn failed(&self) -> String {
        // The connection reconnects on its own; only a state change whose
        // outcome is unknown after every retry needs the restart's recovery.
        let mut rx = self.inner.fatal.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    async fn size_on_disk(&self) -> u64 {
        match self.inner.bucket.js.query_account().await {
            Ok(a) => a.storage,
            Err(_) => 0,
        }
    }

    fn remote_changes(&self) -> Option<mpsc::UnboundedReceiver<Name>> {
        lock(&self.inner.remote).take()
    }

    fn shared(&self) -> bool {
        true
    }

    // ---- users ----
    async fn create_user(&self, user: &User) -> Result<()> {
        let i = &self.inner;
        retry(|| async {
            let (rev, old) = get_user_record(&i.bucket, &user.name).await?;
            if old.is_some() {
                return Err(Refused::Error(StoreError::Conflict(format!(
                    "user {} already exists",
                    user.name
                ))));
            }
            i.bucket
                .commit(vec![
                    Op::Put(user_key(&user.name), enc(user)?, Some(rev)),
                    Op::Put(hash_key(&user.key_hash), enc(&user.name)?, None),
                ])
                .await
        })
        .await?;
        let c = i.ensure_consumer(&user.name, user.max_concurrency).await?;
        lock(&i.consumers).insert(user.name.clone(), c);
        Ok(())
    }

    async fn update_user(&self, user: &User) -> Result<()> {
        let i = &self.inner;
        retry(|| async {
            let (rev, old) = get_user_record(&i.bucket, &user.name).await?;
            let Some(old) = old else {
                return Err(Refused::Error(StoreError::NotFound(format!(
                    "user {}",
                    user.name
                ))));
            };
            let mut ops = vec![Op::Put(user_key(&user.name), enc(user)?, Some(rev))];
            if old.key_hash != user.key_hash {
                ops.push(Op::Del(hash_key(&old.key_hash), None));
            }
            ops.push(Op::Put(hash_key(&user.key_hash), enc(&user.name)?, None));
            i.bucket.commit(ops).await
        })
        .await?;
        let c = i.ensure_consumer(&user.name, user.max_concurrency).await?;
        lock(&i.consumers).insert(user.name.clone(), c);
        Ok(())
    }

    async fn get_user(&self, name: &Name) -> Result<Option<User>> {
        Ok(get_user_record(&self.inner.bucket, name).await?.1)
    }

    async fn user_by_key_hash(&self, hash: &[u8; 32]) -> Result<Option<User>> {
        let Some(name) = self.inner.bucket.get::<Name>(&hash_key(hash)).await?.1 else {
            return Ok(None);
        };
        // The index may lag a rotation by one write: trust the record.
        Ok(self.get_user(&name).await?.filter(|u| &u.key_hash == hash))
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        let mut users: Vec<User> = self
            .inner
            .bucket
            .scan("u.")
            .await?
            .iter()
            .map(|(k, v)| dec_user(k, v))
            .collect::<Result<_>>()?;
        users.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(users)
    }

    async fn put_registry_login(&self, owner: &Name, login: &RegistryLogin) -> Result<()> {
        let key = login_key(owner, &login.host);
        let value = enc(login)?;
        retry(|| async {
            self.inner
                .bucket
                .commit(vec![Op::Put(key.clone(), value.clone(), None)])
                .await
        })
        .await
    }

    async fn registry_logins(&self, owner: &Name) -> Result<Vec<RegistryLogin>> {
        let mut logins: Vec<RegistryLogin> = self
            .inner
            .bucket
            .scan(&format!("g.{owner}."))
            .await?
            .iter()
            .map(|(k, v)| dec(k, v))
            .collect::<Result<_>>()?;
        logins.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(logins)
    }

    async fn mark_private_registry(&self, host: &str) -> Result<()> {
        let key = format!("p.{}", hex::encode(host));
        retry(|| async {
            self.inner
                .bucket
                .commit(vec![Op::Put(key.clone(), enc(&())?, None)])
                .await
        })
        .await
    }

    async fn put_pulled_image(&self, image: &PulledImage) -> Result<()> {
        let key = pulled_key(&image.instance, &image.id);
        retry(|| async {
            self.inner
                .bucket
                .commit(vec![Op::Put(key.clone(), enc(image)?, None)])
                .await
        })
        .await
    }

    async fn pulled_images(&self, instance: &str) -> Result<Vec<PulledImage>> {
        self.inner
            .bucket
            .scan(&format!("img.{}.", hex::encode(instance)))
            .await?
            .iter()
            .map(|(k, v)| dec(k, v))
            .collect()
    }

    async fn delete_pulled_image(&self, instance: &str, id: &str) -> Result<()> {
        let key = pulled_key(instance, id);
        retry(|| async {
            self.inner
                .bucket
                .commit(vec![Op::Del(key.clone(), None)])
                .await
        })
        .await
    }

    async fn is_private_registry(&self, host: &str) -> Result<bool> {
        let key = format!("p.{}", hex::encode(host));
        Ok(self
            .inner
            .bucket
            .read(&key)
            .await?
            .is_some_and(|r| r.value.is_some()))
    }

    async fn delete_registry_login(&self, owner: &Name, host: &str) -> Result<bool> {
        let key = login_key(owner, host);
        if self
            .inner
            .bucket
            .read(&key)
            .await?
            .is_none_or(|r| r.value.is_none())
        {
            return Ok(false);
        }
        retry(|| async {
            self.inner
                .bucket
                .commit(vec![Op::Del(key.clone(), None)])
                .await
        })
        .await?;
        Ok(true)
    }

    async fn delete_user(&self, name: &Name) -> Result<()> {
        let owns = self.list_functions(Some(name)).await?;
        if let Some(f) = owns.first() {
            return Err(StoreError::Conflict(format!(
                "user {name} still owns {} function(s), e.g. {}: remove them first",
                owns.len(),
                f.name
            )));
        }
        let i = &self.inner;
        retry(|| async {
            let (rev, old) = get_user_record(&i.bucket, name).await?;
            let Some(old) = old else {
                return Err(Refused::Error(StoreError::NotFound(format!("user {name}"))));
            };
            // Their queued counts go too (zero: they own no function, so
            // no call), so a later user of the name starts afresh.
            let mut ops = vec![
                Op::Del(user_key(name), Some(rev)),
                Op::Del(hash_key(&old.key_hash), None),
            ];
            ops.extend((0..SHARDS).map(|k| Op::Del(calls::queued_key(name, k), None)));
            i.bucket.commit(ops).await
        })
        .await?;
        // A new user of the same name must not inherit these logins.
        for login in self.registry_logins(name).await? {
            self.delete_registry_login(name, &login.host).await?;
        }
        lock(&i.consumers).remove(name);
        let _ = i.queue.delete_consumer(&format!("q-{name}")).await;
        Ok(())
    }

    // ---- functions ----
    async fn create_function(&self, f: &Function) -> Result<()> {
        let i = &self.inner;
        let key = f.key();
        retry(|| async {
            let (rev, old) = i.bucket.get::<Function>(&function_key(&key)).await?;
            if old.is_some() {
                return Err(Refused::Error(StoreError::Conflict(format!(
                    "function {} already exists",
                    f.name
                ))));
            }
            // Any shard left (a purge not finished, or a late write after
            // it) belongs to the removed function: its counts must not be
            // added to the new one's.
            let shards = i.stats_shards(&key).await?;
            if shards.iter().any(|(_, s)| s.is_some()) {
                return Err(Refused::Error(StoreError::Conflict(format!(
                    "function {} is still being removed; try again in a moment",
                    f.name
                ))));
            }
            let srev = shards.first().map_or(0, |(rev, _)| *rev);
            i.bucket
                .commit(vec![
                    Op::Put(function_key(&key), enc(f)?, Some(rev)),
                    Op::Put(stats_key(&key), enc(&FunctionStats::default())?, Some(srev)),
                    Op::Put(secret_key(f.secret.as_str()), enc(f)?, None),
                ])
                .await
        })
        .await?;
        i.ensure_streams(&key).await
    }

    async fn update_function(&self, read: &Function, f: &Function) -> Result<()> {
        let i = &self.inner;
        let key = f.key();
        retry(|| async {
            let (rev, old) = i.bucket.get::<Function>(&function_key(&key)).await?;
            let Some(old) = old else {
                return Err(Refused::Error(StoreError::NotFound(format!(
                    "function {}",
                    f.name
                ))));
            };
            // Compared at `rev`, written only at `rev`: a change after the
            // read makes the put fail, and the retry compares again.
            if &old != read {
                return Err(Refused::Error(changed_meanwhile(&f.name)));
            }
            let mut ops = vec![Op::Put(function_key(&key), enc(f)?, Some(rev))];
            if old.secret != f.secret {
                ops.push(Op::Del(secret_key(old.secret.as_str()), None));
            }
            ops.push(Op::Put(secret_key(f.secret.as_str()), enc(f)?, None));
            i.bucket.commit(ops).await
        })
        .await
    }

    async fn get_function(&self, key: &FnKey) -> Result<Option<Function>> {
        self.inner.function(key).await
    }

    async fn function_by_secret(&self, secret: &str) -> Result<Option<Function>> {
        if !secret_shaped(secret) {
            return Ok(None);
        }
        let i = &self.inner;
        // The copy is written in the record's batches, so it is the record.
        Ok(i.bucket
            .get::<Function>(&secret_key(secret))
            .await?
            .1
            .filter(|f| f.secret.as_str() == secret))
    }

    async fn list_functions(&self, owner: Option<&Name>) -> Result<Vec<Function>> {
        let mut all: Vec<Function> = Vec::new();
        for (k, v) in self.inner.bucket.scan("f.").await? {
            let f: Function = dec(&k, &v)?;
            if owner.is_none_or(|o| &f.owner == o) {
                all.push(f);
            }
        }
        all.sort_by(|a, b| (&a.name, &a.owner).cmp(&(&b.name, &b.owner)));
        Ok(all)
    }

    async fn remove_function(&self, name: &FnKey) -> Result<()> {
        let i = &self.inner;
        retry(|| async {
            let (rev, old) = i.bucket.get::<Function>(&function_key(name)).await?;
            let Some(old) = old else {
                return Err(Refused::Error(StoreError::NotFound(format!(
                    "function {}",
                    name.name
                ))));
            };
            i.bucket
                .commit(vec![
                    Op::Del(function_key(name), Some(rev)),
                    Op::Del(secret_key(old.secret.as_str()), None),
                ])
                .await
        })
        .await
    }

    async fn purge_function(&self, name: &FnKey) -> Result<()> {
        self.inner.purge_function(name).await
    }

    async fn unpurged_functions(&self) -> Result<Vec<FnKey>> {
        let i = &self.inner;
        // Every shard names its function: one left behind by an
        // interrupted purge (or written after it) is found too.
        let keys: std::collections::BTreeSet<FnKey> = i
            .bucket
            .scan("s.")
            .await?
            .iter()
            .filter_map(|(k, _)| parse_stats_key(k.trim_start_matches("s.")))
            .collect();
        let mut out = Vec::new();
        for key in keys {
            if i.function(&key).await?.is_none() {
                out.push(key);
            }
        }
        Ok(out)
    }

    async fn stats(&self, function: &FnKey) -> Result<FunctionStats> {
        let i = &self.inner;
        let (output, log) = (Inner::output_stream(function), Inner::log_stream(function));
        let (shards, output, log) = tokio::join!(
            i.stats_shards(function),
            i.stream_bytes(&output),
            i.stream_bytes(&log),
        );
        let mut stats = FunctionStats::default();
        for (_, shard) in shards? {
            calls::add(&mut stats, &shard.unwrap_or_default());
        }
        stats.output_bytes = output?.0;
        stats.log_bytes = log?.0;
        Ok(stats)
    }

    // ---- calls ----
    async fn accept_within(&self, call: Call, payload: Bytes, budget: QueueBudget) -> Result<Call> {
        match self.inner.accept(call, payload, budget, None).await? {
            Accepted::New(call) => Ok(call),
            // Without a key there is no earlier call to find.
            Accepted::Earlier { call, .. } => Ok(call),
        }
    }

    async fn accept_idempotent(
        &self,
        call: Call,
        payload: Bytes,
        budget: QueueBudget,
        idem: Idempotency,
    ) -> Result<Accepted> {
        self.inner.accept(call, payload, budget, Some(&idem)).await
    }

    async fn get_call(&self, id: &CallId) -> Result<Option<Call>> {
        Ok(self.inner.bucket.get(&calls::call_key(id)).await?.1)
    }

    async fn queue_head(&self, owner: &Name) -> Result<Option<CallId>> {
        self.inner.queue_head(owner).await
    }

    async fn queued_owners(&self) -> Result<Vec<Name>> {
        // The owners whose queue subject holds a message (queued, or out
        // on a node and maybe due again), in one stream info: the cost of
        // a poll grows with the owners that have work, not with the users.
        use futures_util::TryStreamExt;
        let subjects: Vec<(String, usize)> = self
            .inner
            .queue
            .info_with_subjects("hfq.*")
            .await
            .map_err(|e| unavailable("listing the queues", e))?
            .try_collect()
            .await
            .map_err(|e| unavailable("listing the queues", e))?;
        Ok(subjects
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .filter_map(|(s, _)| Name::parse(s.strip_prefix("hfq.")?).ok())
            .collect())
    }

    async fn discard_queued(&self, owner: &Name, id: &CallId) -> Result<()> {
        self.inner.discard_head(owner, id).await;
        Ok(())
    }

    async fn queue_len(&self) -> Result<u64> {
        // Every counter shard of every function.
        let mut n = 0;
        for (k, v) in self.inner.bucket.scan("s.").await? {
            n += dec::<FunctionStats>(&k, &v)?.pending;
        }
        Ok(n)
    }

    async fn start(&self, id: &CallId) -> Result<Started> {
        self.inner.start(id).await
    }

    async fn requeue(&self, id: &CallId) -> Result<()> {
        self.inner.requeue(id).await
    }

    async fn finish(&self, id: &CallId, outcome: Outcome) -> Result<Call> {
        self.inner.end(id, outcome, Some(CallState::Running)).await
    }

    async fn cancel_queued(&self, function: &FnKey, message: &str) -> Result<usize> {
        self.inner.cancel_queued(function, message, false).await
    }

    async fn cancel_removed(&self, function: &FnKey, message: &str) -> Result<usize> {
        self.inner.cancel_queued(function, message, true).await
    }

    async fn take_output(&self, id: &CallId) -> Result<Option<OutputLookup>> {
        self.inner.take_output(id).await
    }

    async fn live_calls(&self, function: &FnKey) -> Result<Vec<Call>> {
        self.inner.live_calls(function).await
    }

    async fn running_calls(&self) -> Result<Vec<Call>> {
        self.inner.running_calls().await
    }

    async fn function_calls(
        &self,
        function: &FnKey,
        query: &crate::store::CallQuery,
    ) -> Result<crate::store::CallPage> {
        self.inner.function_calls(function, query).await
    }

    async fn prune(&self, before_ms: u64) -> Result<usize> {
        self.inner.prune(before_ms).await
    }

    // ---- logs ----
    async fn events(
        &self,
        function: &FnKey,
        after: Option<u64>,
        call: Option<&CallId>,
        tail: Option<usize>,
    ) -> Result<Vec<(u64, Event)>> {
        self.inner.events(function, after, call, tail).await
    }

    async fn last_event_seq(&self, function: &FnKey) -> Result<Option<u64>> {
        let (_, last) = self
            .inner
            .stream_bytes(&Inner::log_stream(function))
            .await?;
        Ok((last > 0).then_some(last))
    }

    // ---- completion webhooks ----
    async fn due_webhooks(&self, now_ms: u64, limit: usize) -> Result<Vec<(CallId, String)>> {
        self.inner.due_webhooks(now_ms, limit).await
    }

    async fn claim_webhook(
        &self,
        id: &CallId,
        holder: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<crate::model::Delivery>> {
        self.inner.claim_webhook(id, holder, now_ms, until_ms).await
    }

    async fn webhook_attempted(&self, d: &crate::model::Delivery, holder: &str) -> Result<()> {
        self.inner.webhook_attempted(d, holder).await
    }

    async fn get_webhook(&self, id: &CallId) -> Result<Option<crate::model::Delivery>> {
        self.inner.get_webhook(id).await
    }

    async fn redeliver_webhook(&self, id: &CallId, now_ms: u64) -> Result<crate::model::Delivery> {
        self.inner.redeliver_webhook(id, now_ms).await
    }

    // ---- container order across nodes ----
    async fn await_turn(&self, call: &Call) -> Result<()> {
        self.inner.await_turn(call).await
    }

    async fn created(&self, id: &CallId) {
        self.inner.created(id).await
    }
}
