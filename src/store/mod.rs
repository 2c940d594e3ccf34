//! All persistent state behind one interface: users, functions, calls, the
//! per-user FIFO queues, the payloads, and the byte-budgeted output and log
//! caches. `embedded` implements it on sled; nothing outside this module
//! names sled or assumes that one process owns the data.
//!
//! Every mutating operation is durable when it returns: a caller never
//! flushes, and never acts on a state (creates a container, answers 202,
//! hands out an output) that a crash could take back.

#[cfg(test)]
mod contract;
mod embedded;
#[cfg(test)]
mod history_check;
mod nats;
#[cfg(test)]
mod webhook_check;

pub use embedded::SledStore;
pub use nats::{NatsConfig, NatsStore, NODE_LOST};

pub use crate::model::FunctionStats;
use crate::model::{
    Call, CallId, CallState, Delivery, Event, FnKey, Function, Idempotency, Name, Outcome,
    PulledImage, QueueBudget, RegistryLogin, User,
};
use async_trait::async_trait;
use bytes::Bytes;

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Transition(#[from] crate::model::TransitionError),
    /// Not enough free space to take the write; nothing was stored.
    #[error("{0}")]
    Full(String),
    /// The store cannot write (an I/O error other than a full disk):
    /// nothing was stored; the daemon must restart to recover.
    #[error("the store cannot write: {0}")]
    Failed(String),
    /// The write may or may not be on disk: it was applied, and then making
    /// it durable failed (or the store stopped first). After the restart
    /// it is either there or not; a client may look, or resubmit knowing
    /// that the first attempt may have been stored.
    #[error("the outcome of this write is unknown (it may have been stored): {0}")]
    Unsure(String),
    /// Over the owner's budget (queued calls or bytes, functions); nothing
    /// was stored.
    #[error("{0}")]
    OverBudget(String),
    /// A record or data file is missing or damaged.
    #[error("{0}")]
    Corrupt(String),
    /// A shared store's servers cannot be reached now, or a data file
    /// cannot be read now (after retries); nothing was lost, and the same
    /// request may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// The store's settings cannot work (found when it opens): the message
    /// names the setting to change.
    #[error("{0}")]
    Config(String),
}

/// `update_function`'s refusal when the record is no longer the one read.
pub(crate) fn changed_meanwhile(name: &Name) -> StoreError {
    StoreError::Conflict(format!("function {name} changed meanwhile; try again"))
}

/// What the embedded store needs from the config.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Payloads and outputs up to this size live in the database (and share
    /// its group commit); larger ones are files of their own.
    pub inline_max_bytes: u64,
    /// Free space kept on the data dir's filesystem: writes that would eat
    /// into it are refused, so state changes always have room.
    pub min_free_bytes: u64,
    /// Space set aside in the data dir for a full disk (sled only): given
    /// back when the filesystem has less than `min_free_bytes` free, made
    /// again once it has that and this much more; 0 sets none aside.
    pub ballast_bytes: u64,
    /// Per function: bytes of finished outputs kept.
    pub output_budget: u64,
    /// Per function: bytes of log events kept.
    pub log_budget: u64,
}

impl StoreConfig {
    /// What the store needs to know of the daemon's configuration.
    pub fn from_config(config: &crate::config::Config) -> StoreConfig {
        StoreConfig {
            inline_max_bytes: config.store.inline_max_bytes,
            min_free_bytes: config.store.min_free_bytes,
            ballast_bytes: config.store.ballast_bytes,
            output_budget: config.limits.output_cache_bytes,
            log_budget: config.limits.log_cache_bytes,
        }
    }
}

/// What `take_output` found.
#[derive(Debug)]
pub enum OutputLookup {
    /// The call finished; here is its STDOUT, now durably deleted from the cache.
    Output(Call, Bytes),
    /// The call has not ended, or it failed, or its output is gone: the call says which.
    NoOutput(Call),
}

/// What `start` did with a queued call.
#[derive(Debug)]
pub enum Started {
    /// RUNNING is durable: the call may get a container, with these STDIN bytes.
    Running(Box<Call>, Bytes),
    /// It was no longer PENDING (cancelled meanwhile), or it could not run
    /// (its function was removed, its payload is lost) and is now FAILED.
    /// Its queue entry is gone either way.
    Skipped,
}

/// What an accept under an idempotency key did.
#[derive(Debug)]
pub enum Accepted {
    /// The key was new: this call is stored with it, durable.
    New(Call),
    /// The key names an earlier call of the same owner and function (as it
    /// is now, durable): nothing was stored. `same_body` says whether that
    /// call's body had the same digest.
    Earlier { call: Call, same_body: bool },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Most index entries one `function_calls` request examines: a page
/// stops there, with a cursor to go on, however few calls matched.
pub const CALLS_SCAN_MAX: usize = 2000;

/// What `Store::function_calls` lists: a function's calls newest first.
#[derive(Debug, Clone, Default)]
pub struct CallQuery {
    /// The states to keep; empty keeps every state.
    pub states: Vec<CallState>,
    /// Only calls accepted at or after this time.
    pub since_ms: Option<u64>,
    /// Only calls accepted at or before this time.
    pub until_ms: Option<u64>,
    /// Most calls in the page (the API bounds it).
    pub limit: usize,
    /// Only calls older than this place (where the previous page stopped).
    pub before: Option<CallCursor>,
}

/// A place in a function's history, newest first. Both backends order by
/// the acceptance sequence (NATS within the hour of `at_ms`, see
/// `store/nats/history.rs`), which later accepts only ever exceed, so a
/// cursor stays valid while calls arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallCursor {
    pub at_ms: u64,
    pub seq: u64,
}

/// One page of `function_calls`.
#[derive(Debug, Default)]
pub struct CallPage {
    pub calls: Vec<Call>,
    /// Where to go on from; `None` once the history is exhausted.
    pub next: Option<CallCursor>,
}

impl CallQuery {
    /// Whether `call` passes the state and time filters.
    pub(crate) fn keeps(&self, call: &Call) -> bool {
        (self.states.is_empty() || self.states.contains(&call.state))
            && self.since_ms.is_none_or(|s| call.created_ms >= s)
            && self.until_ms.is_none_or(|u| call.created_ms <= u)
    }

    /// Whether a call accepted at `created_ms` and every older one are
    /// before `since` (with a second's slack: sequence and acceptance time
    /// are taken a moment apart), so the scan can stop.
    pub(crate) fn past_since(&self, created_ms: u64) -> bool {
        self.since_ms
            .is_some_and(|s| created_ms.saturating_add(1000) < s)
    }
}

#[async_trait]
pub trait Store: Send + Sync {
    /// A random id of this data directory, made on first use. Labels the
    /// containers of this instance so two daemons on one Engine never touch
    /// each other's.
    async fn instance_id(&self) -> Result<String>;
    /// `Err(reason)` while the store cannot take writes (free space below
    /// the reserve, or an I/O error).
    async fn health(&self) -> std::result::Result<(), String>;
    /// Resolves with the reason once the store has failed for good (an I/O
    /// error while writing): only a restart recovers.
    async fn failed(&self) -> String;
    async fn size_on_disk(&self) -> u64;
    /// For a store shared by several nodes: owners whose calls another node
    /// changed (queued, started, ended), so this node's dispatcher looks
    /// again. Taken once; `None` for a store only this process writes.
    fn remote_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Name>> {
        None
    }
    /// True when other nodes share this store.
    fn shared(&self) -> bool {
        false
    }

    // ---- users ----
    async fn create_user(&self, user: &User) -> Result<()>;
    /// Replaces a user record (quota, key); the key index follows.
    async fn update_user(&self, user: &User) -> Result<()>;
    async fn get_user(&self, name: &Name) -> Result<Option<User>>;
    async fn user_by_key_hash(&self, hash: &[u8; 32]) -> Result<Option<User>>;
    async fn list_users(&self) -> Result<Vec<User>>;
    /// Removes a user who owns no functions, with their registry logins.
    async fn delete_user(&self, name: &Name) -> Result<()>;

    // ---- registry logins (credentials: never logged or answered) ----
    /// Stores `owner`'s login to `login.host`, replacing an earlier one.
    async fn put_registry_login(&self, owner: &Name, login: &RegistryLogin) -> Result<()>;
    /// `owner`'s logins, by host.
    async fn registry_logins(&self, owner: &Name) -> Result<Vec<RegistryLogin>>;
    /// Removes `owner`'s login to `host`; false when there was none.
    async fn delete_registry_login(&self, owner: &Name, host: &str) -> Result<bool>;
    /// Marks `host` as a registry whose images need a login, for good (a
    /// logout does not make an image someone's login pulled public).
    async fn mark_private_registry(&self, host: &str) -> Result<()>;
    async fn is_private_registry(&self, host: &str) -> Result<bool>;

    // ---- images hyperfuncd pulled ----
    /// Records (or replaces) an image `image.instance`'s Engine got from a
    /// pull of hyperfuncd's: only such images are ever removed by it.
    async fn put_pulled_image(&self, image: &PulledImage) -> Result<()>;
    /// The images recorded for `instance` (one daemon's Engine).
    async fn pulled_images(&self, instance: &str) -> Result<Vec<PulledImage>>;
    /// Forgets image `id` of `instance` (removed, or not ours to remove).
    async fn delete_pulled_image(&self, instance: &str, id: &str) -> Result<()>;

    // ---- functions ----
    /// Refused when its owner already has a function of that name, or while
    /// an earlier one of that owner and name is still being purged. Other
    /// owners' functions of the same name do not matter.
    async fn create_function(&self, f: &Function) -> Result<()>;
    /// `create_function`, refused with `OverBudget` when the owner already
    /// owns `max_functions`. A store only this process writes counts in the
    /// step that creates; a shared one may let concurrent creates on
    /// several nodes pass together (by at most one per node).
    async fn create_function_within(&self, f: &Function, max_functions: u32) -> Result<()> {
        let owned = self.list_functions(Some(&f.owner)).await?.len();
        if owned >= max_functions as usize {
            return Err(over_functions(&f.owner, max_functions));
        }
        self.create_function(f).await
    }
    /// Replaces the record `read` (as the caller read it) by `f`, or is
    /// `Conflict` if the stored record is no longer `read`: two updates
    /// from one read cannot both land, so a slow one cannot write back a
    /// secret a `--refresh` replaced meanwhile. The check and the write are
    /// one atomic step.
    async fn update_function(&self, read: &Function, f: &Function) -> Result<()>;
    async fn get_function(&self, key: &FnKey) -> Result<Option<Function>>;
    /// The function whose call URL carries `secret` (secrets are random and
    /// unique), from an index or an in-memory copy: the data plane's lookup,
    /// never a scan of the records. The caller still compares the secret in
    /// constant time and checks the name.
    async fn function_by_secret(&self, secret: &str) -> Result<Option<Function>>;
    /// Functions of `owner`, or all of them.
    async fn list_functions(&self, owner: Option<&Name>) -> Result<Vec<Function>>;
    /// Removes the function's record: from now on its calls are neither
    /// accepted nor started. Its calls stay until `purge_function`.
    async fn remove_function(&self, key: &FnKey) -> Result<()>;
    /// Deletes every call, output and event of a removed function; refused
    /// while one of its calls is still RUNNING.
    async fn purge_function(&self, key: &FnKey) -> Result<()>;
    /// Functions that still have calls or counters but no record (a
    /// removal interrupted by a crash).
    async fn unpurged_functions(&self) -> Result<Vec<FnKey>>;
    async fn stats(&self, function: &FnKey) -> Result<FunctionStats>;

    // ---- calls ----
    /// Persists an accepted call (its `seq` is assigned here) with its
    /// payload and queues it at the back of its owner's FIFO. Durable on return.
    async fn accept(&self, call: Call, payload: Bytes) -> Result<Call> {
        self.accept_within(call, payload, QueueBudget::UNLIMITED)
            .await
    }
    /// `accept`, refused with `OverBudget` (nothing stored) when the owner's
    /// queued calls (PENDING) would exceed `budget.max_calls` or their
    /// payload bytes `budget.max_bytes`. The embedded store checks in the
    /// write that queues the call, so concurrent accepts never pass it
    /// together; the NATS store's bound is documented there.
    async fn accept_within(&self, call: Call, payload: Bytes, budget: QueueBudget) -> Result<Call>;
    /// `accept_within` under an idempotency key, per owner and function:
    /// the key → call mapping is stored in the same durable write as the
    /// call (so neither exists without the other), and a key already there
    /// stores nothing and answers its call (`Accepted::Earlier`), whatever
    /// the budget. The mapping goes when its call's record goes (retention,
    /// a function's purge).
    async fn accept_idempotent(
        &self,
        call: Call,
        payload: Bytes,
        budget: QueueBudget,
        idem: Idempotency,
    ) -> Result<Accepted>;
    async fn get_call(&self, id: &CallId) -> Result<Option<Call>>;
    /// The oldest queued call of `owner`, if any.
    async fn queue_head(&self, owner: &Name) -> Result<Option<CallId>>;
    /// Owners that have queued calls.
    async fn queued_owners(&self) -> Result<Vec<Name>>;
    /// Drops a queue entry whose call record is gone.
    async fn discard_queued(&self, owner: &Name, id: &CallId) -> Result<()>;
    async fn queue_len(&self) -> Result<u64>;
    /// PENDING → RUNNING, durable, with the call's payload (verified against
    /// its recorded length).
    async fn start(&self, id: &CallId) -> Result<Started>;
    /// RUNNING → PENDING at its old place in the queue: the Engine refused it
    /// before any container existed.
    async fn requeue(&self, id: &CallId) -> Result<()>;
    /// Ends a call with `outcome`, storing a FINISHED call's STDOUT in the
    /// function's output cache. If the output cannot be stored for lack of
    /// space, the call ends FAILED saying so.
    async fn finish(&self, id: &CallId, outcome: Outcome) -> Result<Call>;
    /// PENDING → FAILED with `message`, for every queued call of `function`;
    /// a call that has started meanwhile is left alone. Returns how many.
    async fn cancel_queued(&self, function: &FnKey, message: &str) -> Result<usize>;
    /// `cancel_queued` for a removed function (the removal's and the
    /// prune's): nothing is cancelled if the name has a record again
    /// (created after the purge: its calls are the new function's). The
    /// record is read after the live calls, so a re-create after that read
    /// came after every call it cancels.
    async fn cancel_removed(&self, function: &FnKey, message: &str) -> Result<usize>;
    /// Returns a finished call's STDOUT once its deletion from the cache is durable.
    async fn take_output(&self, id: &CallId) -> Result<Option<OutputLookup>>;
    /// Calls of `function` that have not ended, oldest first.
    async fn live_calls(&self, function: &FnKey) -> Result<Vec<Call>>;
    /// Every call left RUNNING, e.g. by a crash.
    async fn running_calls(&self) -> Result<Vec<Call>>;
    /// A page of `function`'s calls (any state, kept until retention prunes
    /// them), newest first, examining at most `CALLS_SCAN_MAX` index
    /// entries, never the function's whole history.
    async fn function_calls(&self, function: &FnKey, query: &CallQuery) -> Result<CallPage>;
    /// Deletes the records of calls that ended before `before_ms` (with any
    /// output they still hold). Returns how many.
    async fn prune(&self, before_ms: u64) -> Result<usize>;

    // ---- logs ----
    /// Events of `function` after sequence `after`, oldest first, with their sequence.
    async fn events(
        &self,
        function: &FnKey,
        after: Option<u64>,
        call: Option<&CallId>,
        tail: Option<usize>,
    ) -> Result<Vec<(u64, Event)>>;
    /// The sequence of `function`'s newest event, so a follower can skip
    /// what it has already scanned even when its filter matched nothing.
    async fn last_event_seq(&self, function: &FnKey) -> Result<Option<u64>>;

    // ---- completion webhooks ----
    // A call's delivery is written by the write that ends it (`finish`,
    // `cancel_queued`, ...: `Delivery::for_end`), and removed with its
    // record (retention, purge).
    /// Pending deliveries due at `now_ms` (next attempt and any lease
    /// passed), soonest first, at most `limit`, with their URLs.
    async fn due_webhooks(&self, now_ms: u64, limit: usize) -> Result<Vec<(CallId, String)>>;
    /// Takes delivery `id` for `holder` until `until_ms`, if it is due at
    /// `now_ms`: one atomic step, so of two holders at most one gets it
    /// (`None`: not due, settled, taken, or no delivery).
    async fn claim_webhook(
        &self,
        id: &CallId,
        holder: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<Delivery>>;
    /// Stores the attempt `holder` recorded in `d` (`Delivery::record`),
    /// with its `[WEBHOOK]` event in the function's log once it is
    /// settled; `Conflict` if `holder` no longer holds it (its lease ran
    /// out and another took it, or it was redelivered meanwhile).
    async fn webhook_attempted(&self, d: &Delivery, holder: &str) -> Result<()>;
    async fn get_webhook(&self, id: &CallId) -> Result<Option<Delivery>>;
    /// Makes call `id`'s delivery due now with a new retry window
    /// (`Delivery::restart`); `NotFound` if it has none.
    async fn redeliver_webhook(&self, id: &CallId, now_ms: u64) -> Result<Delivery>;

    // ---- container order across nodes (shared stores) ----
    /// Returns once every call of `call.owner` queued before `call` has its
    /// container or has ended, wherever it runs: an owner's containers are
    /// created in submission order cluster-wide, as on one host. A node
    /// orders its own calls itself (the scheduler's `start_chain`), so a
    /// store only this process writes has nothing to wait for.
    async fn await_turn(&self, _call: &Call) -> Result<()> {
        Ok(())
    }
    /// The RUNNING call `id`'s container exists (created cold, or a warm
    /// one framed): the owner's later calls on other nodes may have theirs.
    async fn created(&self, _id: &CallId) {}
}

/// The refusal of a call that would take its owner's queue past `budget`,
/// where `calls` and `bytes` are queued now and the call brings `len`.
pub(crate) fn over_queue(
    owner: &Name,
    budget: &QueueBudget,
    calls: u64,
    bytes: u64,
    len: u64,
) -> Option<StoreError> {
    let what = if calls.saturating_add(1) > budget.max_calls {
        format!(
            "{calls} calls queued, their limit (max_queued {})",
            budget.max_calls
        )
    } else if bytes.saturating_add(len) > budget.max_bytes {
        format!(
            "{} of payloads queued and this call brings {}, over their limit (max_queued_bytes {})",
            crate::model::human_bytes(bytes),
            crate::model::human_bytes(len),
            crate::model::human_bytes(budget.max_bytes)
        )
    } else {
        return None;
    };
    Some(StoreError::OverBudget(format!(
        "user {owner} has {what}: try again once some have started"
    )))
}

pub(crate) fn over_functions(owner: &Name, max: u32) -> StoreError {
    StoreError::OverBudget(format!("user {owner} owns {max} functions, their limit"))
}

/// Connects to the shared JetStream store; `dir` keeps this node's id.
pub async fn open_nats(
    dir: &std::path::Path,
    config: StoreConfig,
    nats: NatsConfig,
) -> Result<Arc<dyn Store>> {
    Ok(Arc::new(NatsStore::open(dir, config, nats).await?))
}

/// Opens the embedded store in `dir`.
pub fn open(dir: &std::path::Path, config: StoreConfig) -> Result<Arc<dyn Store>> {
    Ok(Arc::new(SledStore::open(dir, config)?))
}
