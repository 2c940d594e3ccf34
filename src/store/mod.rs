//! All persistent state: users, functions, calls, the per-user FIFO queues, the
//! payloads, and the byte-budgeted output and log caches.
//!
//! This is the only module that names sled. Callers see typed operations, each
//! of which is one atomic transaction; nothing outside may assume that one
//! process owns the data beyond what these operations promise.

mod blobs;
mod codec;

use blobs::{marker, marker_len, Blobs, Kind};

use crate::model::{
    Call, CallId, CallState, Event, EventKind, Function, Name, Outcome, OutputState, User,
};
use bytes::Bytes;
use codec::{decode, encode, key_prefix, key_seq, seq_key, seq_prefix};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sled::Error),
    #[error("database record: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("data file: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Transition(#[from] crate::model::TransitionError),
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Db(e),
        }
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(e: impl Into<StoreError>) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e.into()))
}

/// Per-function counters, kept in the same transactions as the records they count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionStats {
    pub total: u64,
    pub pending: u64,
    pub running: u64,
    pub finished: u64,
    pub failed: u64,
    /// Bytes of STDOUT held in the function's output cache.
    pub output_bytes: u64,
    /// Bytes of events held in the function's log cache.
    pub log_bytes: u64,
}

impl FunctionStats {
    fn count(&mut self, state: CallState, delta: i64) {
        let slot = match state {
            CallState::Pending => &mut self.pending,
            CallState::Running => &mut self.running,
            CallState::Finished => &mut self.finished,
            CallState::Failed => &mut self.failed,
        };
        *slot = slot.saturating_add_signed(delta);
    }
}

/// What `take_output` found.
#[derive(Debug)]
pub enum OutputLookup {
    /// The call finished; here is its STDOUT, now deleted from the cache.
    Output(Call, Bytes),
    /// The call has not ended, or it failed, or its output is gone: the call says which.
    NoOutput(Call),
}

/// sled's page cache: enough for the hot trees (queue heads, stats, recent
/// calls); the rest is read from disk when needed.
const PAGE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

// Tree indices of `Store::trees`, so one transaction can span any of them.
const USERS: usize = 0; // user name -> User
const KEYS: usize = 1; // key hash -> user name
const FUNCTIONS: usize = 2; // function name -> Function
const CALLS: usize = 3; // call id -> Call
const PAYLOADS: usize = 4; // call id -> length marker of the STDIN file, until the call ends
const QUEUE: usize = 5; // owner\0seq -> call id: the per-user FIFO
const OUTPUTS: usize = 6; // call id -> length marker of the STDOUT file
const OUTPUT_INDEX: usize = 7; // function\0seq -> call id, oldest first, for eviction
const LOGS: usize = 8; // function\0seq -> Event
const STATS: usize = 9; // function name -> FunctionStats
const FN_CALLS: usize = 10; // function\0seq -> call id: every call of a function
const META: usize = 11; // small singletons
const TREE_NAMES: [&str; 12] = [
    "users",
    "keys",
    "functions",
    "calls",
    "payloads",
    "queue",
    "outputs",
    "output_index",
    "logs",
    "stats",
    "fn_calls",
    "meta",
];

pub struct Store {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// Eviction scans outside a transaction; one evictor at a time keeps the
    /// byte accounting exact.
    evict_lock: std::sync::Mutex<()>,
    /// Payload and output bytes, as files (see `blobs`).
    blobs: Blobs,
}

impl Store {
    /// Opens (or creates) the store in `dir`. sled's page cache is bounded
    /// by `PAGE_CACHE_BYTES` (its default is 1 GiB, which a long queue fills).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .cache_capacity(PAGE_CACHE_BYTES)
            .open()?;
        let trees = TREE_NAMES
            .iter()
            .map(|n| db.open_tree(n))
            .collect::<Result<Vec<_>, _>>()?;
        let store = Store {
            db,
            trees,
            evict_lock: std::sync::Mutex::new(()),
            blobs: Blobs::open(dir.join("hf-blobs"))?,
        };
        store.collect_orphans()?;
        Ok(store)
    }

    /// Removes blob files whose marker was never committed (a crash between
    /// writing the file and the transaction) or was removed (a crash before the file was).
    fn collect_orphans(&self) -> Result<(), StoreError> {
        for (kind, id) in self.blobs.list()? {
            let tree = match kind {
                Kind::Payload => PAYLOADS,
                Kind::Output => OUTPUTS,
            };
            if self.tree(tree).get(id.as_bytes())?.is_none() {
                self.blobs.remove(kind, &id);
            }
        }
        Ok(())
    }

    fn tree(&self, i: usize) -> &sled::Tree {
        &self.trees[i]
    }

    fn tx<T>(&self, f: impl Fn(&[TransactionalTree]) -> TxResult<T>) -> Result<T, StoreError> {
        Ok(self.trees.as_slice().transaction(|t| f(t))?)
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// A monotonic number, unique across restarts.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// A random id of this data directory, made on first use. Labels the
    /// containers of this instance so two daemons on one Engine never touch
    /// each other's.
    pub fn instance_id(&self) -> Result<String, StoreError> {
        let meta = self.tree(META);
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let _ =
            meta.compare_and_swap("instance_id", None as Option<&[u8]>, Some(encode(&fresh)?))?;
        match meta.get("instance_id")? {
            Some(v) => Ok(decode(&v)?),
            None => Err(StoreError::NotFound("instance id".into())),
        }
    }

    // ---- users ----

    pub fn create_user(&self, user: &User) -> Result<(), StoreError> {
        self.tx(|t| {
            if t[USERS].get(user.name.as_str())?.is_some() {
                return abort(StoreError::Conflict(format!(
                    "user {} already exists",
                    user.name
                )));
            }
            t[USERS].insert(user.name.as_str(), enc(user)?)?;
            t[KEYS].insert(&user.key_hash[..], user.name.as_str())?;
            Ok(())
        })
    }

    /// Replaces a user record (quota, key); the key index follows.
    pub fn update_user(&self, user: &User) -> Result<(), StoreError> {
        self.tx(|t| {
            let old: User = match t[USERS].get(user.name.as_str())? {
                Some(v) => dec(&v)?,
                None => return abort(StoreError::NotFound(format!("user {}", user.name))),
            };
            t[KEYS].remove(&old.key_hash[..])?;
            t[KEYS].insert(&user.key_hash[..], user.name.as_str())?;
            t[USERS].insert(user.name.as_str(), enc(user)?)?;
            Ok(())
        })
    }

    pub fn get_user(&self, name: &Name) -> Result<Option<User>, StoreError> {
        get(self.tree(USERS), name.as_str())
    }

    pub fn user_by_key_hash(&self, hash: &[u8; 32]) -> Result<Option<User>, StoreError> {
        match self.tree(KEYS).get(hash)? {
            None => Ok(None),
            Some(name) => get(self.tree(USERS), name),
        }
    }

    pub fn list_users(&self) -> Result<Vec<User>, StoreError> {
        values(self.tree(USERS).iter())
    }

    /// Removes a user who owns no functions.
    pub fn delete_user(&self, name: &Name) -> Result<(), StoreError> {
        let owns = self.list_functions(Some(name))?;
        if let Some(f) = owns.first() {
            return Err(StoreError::Conflict(format!(
                "user {name} still owns {} function(s), e.g. {}: remove them first",
                owns.len(),
                f.name
            )));
        }
        self.tx(|t| {
            let user: User = match t[USERS].remove(name.as_str())? {
                Some(v) => dec(&v)?,
                None => return abort(StoreError::NotFound(format!("user {name}"))),
            };
            t[KEYS].remove(&user.key_hash[..])?;
            Ok(())
        })
    }

    // ---- functions ----

    pub fn create_function(&self, f: &Function) -> Result<(), StoreError> {
        self.tx(|t| {
            if t[FUNCTIONS].get(f.name.as_str())?.is_some() {
                return abort(StoreError::Conflict(format!(
                    "function {} already exists",
                    f.name
                )));
            }
            t[FUNCTIONS].insert(f.name.as_str(), enc(f)?)?;
            t[STATS].insert(f.name.as_str(), enc(&FunctionStats::default())?)?;
            Ok(())
        })
    }

    pub fn update_function(&self, f: &Function) -> Result<(), StoreError> {
        self.tx(|t| {
            if t[FUNCTIONS].get(f.name.as_str())?.is_none() {
                return abort(StoreError::NotFound(format!("function {}", f.name)));
            }
            t[FUNCTIONS].insert(f.name.as_str(), enc(f)?)?;
            Ok(())
        })
    }

    pub fn get_function(&self, name: &Name) -> Result<Option<Function>, StoreError> {
        get(self.tree(FUNCTIONS), name.as_str())
    }

    /// Functions of `owner`, or all of them.
    pub fn list_functions(&self, owner: Option<&Name>) -> Result<Vec<Function>, StoreError> {
        let all: Vec<Function> = values(self.tree(FUNCTIONS).iter())?;
        Ok(all
            .into_iter()
            .filter(|f| owner.is_none_or(|o| &f.owner == o))
            .collect())
    }

    /// Deletes a function with everything it owns: calls, outputs, logs. The
    /// caller has already cancelled its live calls.
    pub fn delete_function(&self, name: &Name) -> Result<(), StoreError> {
        if self.tree(FUNCTIONS).remove(name.as_str())?.is_none() {
            return Err(StoreError::NotFound(format!("function {name}")));
        }
        let prefix = seq_prefix(name.as_str());
        for kv in self.tree(FN_CALLS).scan_prefix(&prefix) {
            let (k, id) = kv?;
            // A call accepted while the function was being removed may still be queued.
            if let Some(call) = get::<Call>(self.tree(CALLS), &id)? {
                self.tree(QUEUE)
                    .remove(seq_key(call.owner.as_str(), call.seq))?;
            }
            self.tree(CALLS).remove(&id)?;
            self.tree(PAYLOADS).remove(&id)?;
            self.tree(OUTPUTS).remove(&id)?;
            self.tree(FN_CALLS).remove(k)?;
            if let Ok(call_id) = call_id(&id) {
                self.blobs.remove(Kind::Payload, &call_id);
                self.blobs.remove(Kind::Output, &call_id);
            }
        }
        for tree in [OUTPUT_INDEX, LOGS] {
            for kv in self.tree(tree).scan_prefix(&prefix) {
                self.tree(tree).remove(kv?.0)?;
            }
        }
        self.tree(STATS).remove(name.as_str())?;
        Ok(())
    }

    pub fn stats(&self, function: &Name) -> Result<FunctionStats, StoreError> {
        Ok(get(self.tree(STATS), function.as_str())?.unwrap_or_default())
    }

    // ---- calls ----

    /// Persists an accepted call with its payload and queues it at the back of
    /// its owner's FIFO. Durable once `flush` has returned.
    pub fn accept(&self, call: &Call, payload: &[u8], log_budget: u64) -> Result<(), StoreError> {
        let call_seq = self.next_seq()?;
        let pending_seq = self.next_seq()?;
        let id = call.id.as_bytes();
        self.blobs.write(Kind::Payload, &call.id, payload)?;
        let committed = self.tx(|t| {
            if t[FUNCTIONS].get(call.function.as_str())?.is_none() {
                return abort(StoreError::NotFound(format!("function {}", call.function)));
            }
            t[CALLS].insert(id, enc(call)?)?;
            t[PAYLOADS].insert(id, &marker(payload.len()))?;
            t[QUEUE].insert(seq_key(call.owner.as_str(), call.seq), id)?;
            t[FN_CALLS].insert(seq_key(call.function.as_str(), call.seq), id)?;
            let mut stats = tx_stats(&t[STATS], &call.function)?;
            stats.total += 1;
            stats.count(CallState::Pending, 1);
            log(&t[LOGS], &mut stats, call, EventKind::Call, call_seq)?;
            log(&t[LOGS], &mut stats, call, EventKind::Pending, pending_seq)?;
            t[STATS].insert(call.function.as_str(), enc(&stats)?)?;
            Ok(())
        });
        if let Err(e) = committed {
            self.blobs.remove(Kind::Payload, &call.id);
            return Err(e);
        }
        self.evict_logs_logged(&call.function, log_budget);
        Ok(())
    }

    pub fn get_call(&self, id: &CallId) -> Result<Option<Call>, StoreError> {
        get(self.tree(CALLS), id.as_bytes())
    }

    /// The oldest queued call of `owner`, if any.
    pub fn queue_head(&self, owner: &Name) -> Result<Option<CallId>, StoreError> {
        match self
            .tree(QUEUE)
            .scan_prefix(seq_prefix(owner.as_str()))
            .next()
        {
            None => Ok(None),
            Some(kv) => Ok(Some(call_id(&kv?.1)?)),
        }
    }

    /// Owners that have queued calls.
    pub fn queued_owners(&self) -> Result<Vec<Name>, StoreError> {
        let mut owners: Vec<Name> = Vec::new();
        for kv in self.tree(QUEUE).iter() {
            let (k, _) = kv?;
            let owner = String::from_utf8_lossy(key_prefix(&k)).into_owned();
            if owners.last().is_none_or(|o| o.as_str() != owner) {
                if let Ok(n) = Name::parse(&owner) {
                    owners.push(n);
                }
            }
        }
        Ok(owners)
    }

    /// Removes `id` from `owner`'s queue: a head whose call was cancelled or
    /// deleted meanwhile.
    pub fn discard_queued(&self, owner: &Name, id: &CallId) -> Result<(), StoreError> {
        for kv in self.tree(QUEUE).scan_prefix(seq_prefix(owner.as_str())) {
            let (k, v) = kv?;
            if v.as_ref() == id.as_bytes() {
                self.tree(QUEUE).remove(k)?;
                break;
            }
        }
        Ok(())
    }

    pub fn queue_len(&self) -> usize {
        self.tree(QUEUE).len()
    }

    /// Takes a queued call off its owner's queue and marks it RUNNING; returns
    /// it with its payload.
    pub fn start(&self, id: &CallId, log_budget: u64) -> Result<(Call, Bytes), StoreError> {
        let seq = self.next_seq()?;
        // Read before the transaction: once RUNNING, the call must get its payload.
        let payload = Bytes::from(self.blobs.read(Kind::Payload, id)?);
        let out = self.tx(|t| {
            let mut call: Call = tx_get(&t[CALLS], id.as_bytes(), "call")?;
            if let Err(e) = call.transition(CallState::Running) {
                return abort(e);
            }
            t[QUEUE].remove(seq_key(call.owner.as_str(), call.seq))?;
            t[CALLS].insert(id.as_bytes(), enc(&call)?)?;
            let mut stats = tx_stats(&t[STATS], &call.function)?;
            stats.count(CallState::Pending, -1);
            stats.count(CallState::Running, 1);
            log(&t[LOGS], &mut stats, &call, EventKind::Running, seq)?;
            t[STATS].insert(call.function.as_str(), enc(&stats)?)?;
            Ok((call, payload.clone()))
        })?;
        self.evict_logs_logged(&out.0.function, log_budget);
        Ok(out)
    }

    /// Puts a RUNNING call back at its old place in the queue: the Engine
    /// refused it before any container existed.
    pub fn requeue(&self, id: &CallId) -> Result<(), StoreError> {
        self.tx(|t| {
            let mut call: Call = tx_get(&t[CALLS], id.as_bytes(), "call")?;
            if let Err(e) = call.transition(CallState::Pending) {
                return abort(e);
            }
            t[QUEUE].insert(seq_key(call.owner.as_str(), call.seq), id.as_bytes())?;
            t[CALLS].insert(id.as_bytes(), enc(&call)?)?;
            let mut stats = tx_stats(&t[STATS], &call.function)?;
            stats.count(CallState::Running, -1);
            stats.count(CallState::Pending, 1);
            t[STATS].insert(call.function.as_str(), enc(&stats)?)?;
            Ok(())
        })
    }

    /// Ends a call: stores its STDOUT in the function's output cache (evicting
    /// the oldest outputs beyond `output_budget`), drops the payload, logs the end.
    pub fn finish(
        &self,
        id: &CallId,
        outcome: &Outcome,
        output_budget: u64,
        log_budget: u64,
    ) -> Result<Call, StoreError> {
        let seq = self.next_seq()?;
        let function = match self.get_call(id)? {
            Some(c) => c.function,
            None => return Err(StoreError::NotFound(format!("call {id}"))),
        };
        let len = outcome.stdout.len() as u64;
        // Only a FINISHED call's output can be fetched, so only it is kept;
        // one larger than the whole budget is rotated out at once.
        let keep = outcome.state == CallState::Finished && len <= output_budget;
        let call = {
            // Room is made before the insert, so the cache never holds more
            // than its budget, even for a moment.
            let _guard = self.evict_lock.lock().unwrap_or_else(|p| p.into_inner());
            if keep {
                self.evict_outputs_to(&function, output_budget - len)?;
                self.blobs.write(Kind::Output, id, &outcome.stdout)?;
            }
            let committed = self.tx(|t| {
                let mut call: Call = tx_get(&t[CALLS], id.as_bytes(), "call")?;
                let was = call.state;
                if let Err(e) = call.finish(outcome) {
                    return abort(e);
                }
                if was == CallState::Pending {
                    t[QUEUE].remove(seq_key(call.owner.as_str(), call.seq))?;
                }
                t[PAYLOADS].remove(id.as_bytes())?;
                let mut stats = tx_stats(&t[STATS], &call.function)?;
                if keep {
                    t[OUTPUTS].insert(id.as_bytes(), &marker(outcome.stdout.len()))?;
                    t[OUTPUT_INDEX]
                        .insert(seq_key(call.function.as_str(), call.seq), id.as_bytes())?;
                    stats.output_bytes += len;
                } else if call.state == CallState::Finished {
                    call.output = OutputState::Evicted;
                }
                t[CALLS].insert(id.as_bytes(), enc(&call)?)?;
                stats.count(was, -1);
                stats.count(call.state, 1);
                let kind = if call.state == CallState::Finished {
                    EventKind::Finished
                } else {
                    EventKind::Failed
                };
                log(&t[LOGS], &mut stats, &call, kind, seq)?;
                t[STATS].insert(call.function.as_str(), enc(&stats)?)?;
                Ok(call)
            });
            match committed {
                Ok(call) => call,
                Err(e) => {
                    if keep {
                        self.blobs.remove(Kind::Output, id);
                    }
                    return Err(e);
                }
            }
        };
        self.blobs.remove(Kind::Payload, id);
        self.evict_logs_logged(&call.function, log_budget);
        Ok(call)
    }

    /// Returns a finished call's STDOUT and deletes it from the cache.
    pub fn take_output(&self, id: &CallId) -> Result<Option<OutputLookup>, StoreError> {
        // Read the file first; the transaction then decides whether it is handed out.
        let stored = self
            .get_call(id)?
            .is_some_and(|c| c.state == CallState::Finished && c.output == OutputState::Stored);
        let bytes = if stored {
            Bytes::from(self.blobs.read(Kind::Output, id)?)
        } else {
            Bytes::new()
        };
        let found = self.tx(|t| {
            let mut call: Call = match t[CALLS].get(id.as_bytes())? {
                Some(v) => dec(&v)?,
                None => return abort(StoreError::NotFound(format!("call {id}"))),
            };
            if call.state != CallState::Finished || call.output != OutputState::Stored {
                return Ok(OutputLookup::NoOutput(call));
            }
            if !stored {
                // It finished between our read and this transaction: try again.
                return abort(StoreError::Conflict("output changed".into()));
            }
            let len = t[OUTPUTS]
                .remove(id.as_bytes())?
                .map_or(0, |v| marker_len(&v));
            t[OUTPUT_INDEX].remove(seq_key(call.function.as_str(), call.seq))?;
            call.output = OutputState::Fetched;
            t[CALLS].insert(id.as_bytes(), enc(&call)?)?;
            let mut stats = tx_stats(&t[STATS], &call.function)?;
            stats.output_bytes = stats.output_bytes.saturating_sub(len);
            t[STATS].insert(call.function.as_str(), enc(&stats)?)?;
            Ok(OutputLookup::Output(call, bytes.clone()))
        });
        match found {
            Ok(OutputLookup::Output(call, out)) => {
                self.blobs.remove(Kind::Output, id);
                Ok(Some(OutputLookup::Output(call, out)))
            }
            Ok(other) => Ok(Some(other)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(StoreError::Conflict(_)) if !stored => self.take_output(id),
            Err(e) => Err(e),
        }
    }

    /// Calls of `function` that have not ended, oldest first.
    pub fn live_calls(&self, function: &Name) -> Result<Vec<Call>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .tree(FN_CALLS)
            .scan_prefix(seq_prefix(function.as_str()))
        {
            let (_, id) = kv?;
            if let Some(call) = get::<Call>(self.tree(CALLS), &id)? {
                if !call.state.is_done() {
                    out.push(call);
                }
            }
        }
        Ok(out)
    }

    /// Every call left RUNNING, e.g. by a crash.
    pub fn running_calls(&self) -> Result<Vec<Call>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree(STATS).iter() {
            let (k, v) = kv?;
            let stats: FunctionStats = decode(&v)?;
            if stats.running == 0 {
                continue;
            }
            if let Ok(name) = Name::parse(&String::from_utf8_lossy(&k)) {
                out.extend(
                    self.live_calls(&name)?
                        .into_iter()
                        .filter(|c| c.state == CallState::Running),
                );
            }
        }
        Ok(out)
    }

    // ---- logs ----

    /// Events of `function` after sequence `after`, oldest first, with their sequence.
    pub fn events(
        &self,
        function: &Name,
        after: Option<u64>,
        call: Option<&CallId>,
        tail: Option<usize>,
    ) -> Result<Vec<(u64, Event)>, StoreError> {
        let tree = self.tree(LOGS);
        let start = seq_key(function.as_str(), after.map_or(0, |a| a.saturating_add(1)));
        let end = seq_key(function.as_str(), u64::MAX);
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

    /// The sequence of `function`'s newest event, so a follower can skip
    /// what it has already scanned even when its filter matched nothing.
    pub fn last_event_seq(&self, function: &Name) -> Result<Option<u64>, StoreError> {
        let start = seq_key(function.as_str(), 0);
        let end = seq_key(function.as_str(), u64::MAX);
        match self.tree(LOGS).range(start..=end).next_back() {
            Some(kv) => Ok(Some(key_seq(&kv?.0))),
            None => Ok(None),
        }
    }

    /// Evicts the oldest outputs of `function` until it holds at most
    /// `target` bytes. The caller holds `evict_lock`.
    fn evict_outputs_to(&self, function: &Name, target: u64) -> Result<(), StoreError> {
        let prefix = seq_prefix(function.as_str());
        while self.stats(function)?.output_bytes > target {
            let Some(kv) = self.tree(OUTPUT_INDEX).scan_prefix(&prefix).next() else {
                break;
            };
            let (key, id) = kv?;
            self.tx(|t| {
                t[OUTPUT_INDEX].remove(&key)?;
                let len = t[OUTPUTS].remove(&id)?.map_or(0, |v| marker_len(&v));
                if let Some(v) = t[CALLS].get(&id)? {
                    let mut call: Call = dec(&v)?;
                    call.output = OutputState::Evicted;
                    t[CALLS].insert(&id, enc(&call)?)?;
                }
                let mut stats = tx_stats(&t[STATS], function)?;
                stats.output_bytes = stats.output_bytes.saturating_sub(len);
                t[STATS].insert(function.as_str(), enc(&stats)?)?;
                Ok(())
            })?;
            if let Ok(id) = call_id(&id) {
                self.blobs.remove(Kind::Output, &id);
            }
        }
        Ok(())
    }

    /// Eviction after a committed operation: a failure must not turn that
    /// operation into an error (the client would retry a call that exists).
    fn evict_logs_logged(&self, function: &Name, budget: u64) {
        if let Err(e) = self.evict_logs(function, budget) {
            tracing::error!(function = %function, error = %e, "log eviction failed");
        }
    }

    fn evict_logs(&self, function: &Name, budget: u64) -> Result<(), StoreError> {
        let _guard = self.evict_lock.lock().unwrap_or_else(|p| p.into_inner());
        let prefix = seq_prefix(function.as_str());
        while self.stats(function)?.log_bytes > budget {
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
                t[STATS].insert(function.as_str(), enc(&stats)?)?;
                Ok(())
            })?;
        }
        Ok(())
    }
}

fn log(
    logs: &TransactionalTree,
    stats: &mut FunctionStats,
    call: &Call,
    kind: EventKind,
    seq: u64,
) -> TxResult<()> {
    let bytes = enc(&call.event(kind))?;
    stats.log_bytes += bytes.len() as u64;
    logs.insert(seq_key(call.function.as_str(), seq), bytes)?;
    Ok(())
}

fn tx_stats(stats: &TransactionalTree, function: &Name) -> TxResult<FunctionStats> {
    match stats.get(function.as_str())? {
        Some(v) => dec(&v),
        None => Ok(FunctionStats::default()),
    }
}

fn tx_get<T: serde::de::DeserializeOwned>(
    tree: &TransactionalTree,
    key: &[u8],
    what: &str,
) -> TxResult<T> {
    match tree.get(key)? {
        Some(v) => dec(&v),
        None => abort(StoreError::NotFound(what.to_string())),
    }
}

fn enc<T: Serialize>(v: &T) -> TxResult<Vec<u8>> {
    encode(v).or_else(abort)
}

fn dec<T: serde::de::DeserializeOwned>(v: &[u8]) -> TxResult<T> {
    decode(v).or_else(abort)
}

fn get<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        Some(v) => Ok(Some(decode(&v)?)),
        None => Ok(None),
    }
}

fn values<T: serde::de::DeserializeOwned>(iter: sled::Iter) -> Result<Vec<T>, StoreError> {
    iter.map(|kv| Ok(decode(&kv?.1)?)).collect()
}

fn call_id(bytes: &[u8]) -> Result<CallId, StoreError> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| StoreError::NotFound("well-formed call id in queue".into()))?;
    Ok(CallId::from_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FunctionSpec, Secret};

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    /// sled's background thread may hold the lock file for a moment after drop.
    fn reopen(dir: &Path) -> Store {
        for _ in 0..50 {
            if let Ok(s) = Store::open(dir) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Store::open(dir).unwrap()
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let f = Function {
            name: name("f"),
            owner: name("alice"),
            spec: FunctionSpec {
                image: "img".into(),
                command: vec![],
                env: vec![],
                timeout_ms: None,
                memory_bytes: None,
                cpus: None,
            },
            secret: Secret::new(),
            created_ms: 0,
            updated_ms: 0,
        };
        store.create_function(&f).unwrap();
        (dir, store)
    }

    fn accept(store: &Store, payload: &[u8]) -> Call {
        let call = Call::new(
            name("f"),
            name("alice"),
            store.next_seq().unwrap(),
            payload,
            vec![],
        );
        store.accept(&call, payload, u64::MAX).unwrap();
        call
    }

    fn ok(stdout: &[u8]) -> Outcome {
        Outcome {
            state: CallState::Finished,
            exit_code: Some(0),
            message: None,
            stdout: Bytes::copy_from_slice(stdout),
            stderr: Bytes::new(),
        }
    }

    #[test]
    fn queue_is_fifo_per_owner_and_counts_follow() {
        let (_d, store) = setup();
        let a = accept(&store, b"1");
        let b = accept(&store, b"2");
        assert_eq!(store.queued_owners().unwrap(), vec![name("alice")]);
        assert_eq!(store.queue_head(&name("alice")).unwrap(), Some(a.id));
        let (started, payload) = store.start(&a.id, u64::MAX).unwrap();
        assert_eq!(
            (started.state, &payload[..]),
            (CallState::Running, &b"1"[..])
        );
        assert_eq!(store.queue_head(&name("alice")).unwrap(), Some(b.id));
        assert!(
            store.start(&a.id, u64::MAX).is_err(),
            "a running call cannot start again"
        );
        store.requeue(&a.id).unwrap();
        assert_eq!(store.queue_head(&name("alice")).unwrap(), Some(a.id));
        store.start(&a.id, u64::MAX).unwrap();
        store
            .finish(&a.id, &ok(b"out"), u64::MAX, u64::MAX)
            .unwrap();
        let s = store.stats(&name("f")).unwrap();
        assert_eq!(
            (s.total, s.pending, s.running, s.finished, s.failed),
            (2, 1, 0, 1, 0)
        );
        assert_eq!(s.output_bytes, 3);
        match store.take_output(&a.id).unwrap() {
            Some(OutputLookup::Output(_, out)) => assert_eq!(&out[..], b"out"),
            other => panic!("{other:?}"),
        }
        match store.take_output(&a.id).unwrap() {
            Some(OutputLookup::NoOutput(c)) => assert_eq!(c.output, OutputState::Fetched),
            other => panic!("{other:?}"),
        }
        assert!(store.take_output(&CallId::new()).unwrap().is_none());
        assert_eq!(store.stats(&name("f")).unwrap().output_bytes, 0);
        let kinds: Vec<_> = store
            .events(&name("f"), None, Some(&a.id), None)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::Call,
                EventKind::Pending,
                EventKind::Running,
                EventKind::Running,
                EventKind::Finished
            ]
        );
    }

    #[test]
    fn output_cache_evicts_oldest_within_budget() {
        let (_d, store) = setup();
        let mut ids = vec![];
        for _ in 0..5 {
            let c = accept(&store, b"");
            store.start(&c.id, u64::MAX).unwrap();
            store
                .finish(&c.id, &ok(&[7u8; 100]), 250, u64::MAX)
                .unwrap();
            ids.push(c.id);
        }
        assert_eq!(store.stats(&name("f")).unwrap().output_bytes, 200);
        for id in &ids[..3] {
            assert_eq!(
                store.get_call(id).unwrap().unwrap().output,
                OutputState::Evicted
            );
        }
        assert!(matches!(
            store.take_output(&ids[4]).unwrap(),
            Some(OutputLookup::Output(..))
        ));
    }

    #[test]
    fn blobs_follow_their_markers() {
        let (dir, store) = setup();
        let blob_count = || {
            std::fs::read_dir(dir.path().join("hf-blobs"))
                .unwrap()
                .count()
        };
        let c = accept(&store, b"payload");
        assert_eq!(blob_count(), 1);
        store.start(&c.id, u64::MAX).unwrap();
        store
            .finish(&c.id, &ok(b"out"), u64::MAX, u64::MAX)
            .unwrap();
        assert_eq!(blob_count(), 1, "payload file gone, output file there");
        assert!(
            matches!(store.take_output(&c.id).unwrap(), Some(OutputLookup::Output(_, o)) if &o[..] == b"out")
        );
        assert_eq!(blob_count(), 0, "a fetched output gives its file back");
        // A file whose transaction never committed is an orphan.
        store
            .blobs
            .write(Kind::Output, &CallId::new(), b"x")
            .unwrap();
        drop(store);
        reopen(dir.path());
        assert_eq!(blob_count(), 0, "orphans are collected on open");
    }

    #[test]
    fn log_cache_stays_within_budget() {
        let (_d, store) = setup();
        for _ in 0..50 {
            let c = Call::new(
                name("f"),
                name("alice"),
                store.next_seq().unwrap(),
                b"x",
                vec![],
            );
            store.accept(&c, b"x", 2000).unwrap();
        }
        let s = store.stats(&name("f")).unwrap();
        assert!(s.log_bytes <= 2000 && s.log_bytes > 1000, "{s:?}");
        let events = store.events(&name("f"), None, None, None).unwrap();
        let bytes: usize = events.iter().map(|(_, e)| encode(e).unwrap().len()).sum();
        assert_eq!(bytes as u64, s.log_bytes);
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let store = Store::open(dir.path()).unwrap();
            let f = Function {
                name: name("f"),
                owner: name("alice"),
                spec: FunctionSpec {
                    image: "i".into(),
                    command: vec![],
                    env: vec![],
                    timeout_ms: None,
                    memory_bytes: None,
                    cpus: None,
                },
                secret: Secret::new(),
                created_ms: 0,
                updated_ms: 0,
            };
            store.create_function(&f).unwrap();
            id = accept(&store, b"payload").id;
            let inst = store.instance_id().unwrap();
            assert_eq!(store.instance_id().unwrap(), inst);
            store.db.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.queue_head(&name("alice")).unwrap(), Some(id));
        assert_eq!(store.stats(&name("f")).unwrap().pending, 1);
        let tail = store.events(&name("f"), None, None, Some(1)).unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].1.kind, EventKind::Pending);
        assert_eq!(store.last_event_seq(&name("f")).unwrap(), Some(tail[0].0));
        store.delete_function(&name("f")).unwrap();
        assert!(store.get_call(&id).unwrap().is_none());
        assert_eq!(
            store.queue_head(&name("alice")).unwrap(),
            None,
            "no stale queue entry"
        );
    }
}
