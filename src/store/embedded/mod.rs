//! The embedded store: sled trees, one transaction (or staged write) per
//! operation, and a group commit that makes each operation durable before
//! it returns.
//!
//! Layout: `calls.rs` (calls, the queues, retention), `caches.rs` (outputs
//! and logs, their eviction), `directory.rs` (users, keys, functions),
//! `blobs.rs` (payload and output bytes), `commit.rs` (group commit),
//! `stage.rs` (staged writes on the commit thread), `codec.rs` (records
//! and keys). Every sled call runs on a blocking thread or the commit
//! thread, never on the async runtime.

mod ballast;
mod blobs;
mod caches;
mod calls;
mod codec;
mod commit;
mod directory;
mod durable;
mod history;
#[cfg(test)]
mod idem_tests;
mod legacy;
mod stage;
#[cfg(test)]
mod tests;
mod trees;
mod webhooks;

use super::{
    changed_meanwhile, Accepted, FunctionStats, OutputLookup, Result, Started, Store, StoreConfig,
    StoreError,
};
use crate::model::{
    Call, CallId, CallState, Event, EventKind, FnKey, Function, Idempotency, Name, Outcome,
    PulledImage, QueueBudget, RegistryLogin, User,
};
use async_trait::async_trait;
use blobs::{Blobs, Kind, Marker};
use bytes::Bytes;
use codec::{decode, encode, seq_key};
use commit::Committer;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use trees::WriteGuard;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Corrupt(format!("database: {e}")),
            other => StoreError::Failed(other.to_string()),
        }
    }
}

impl From<codec::CodecError> for StoreError {
    fn from(e: codec::CodecError) -> Self {
        StoreError::Corrupt(format!("database record: {e}"))
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        }
    }
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<StoreError>>;

/// Reads and writes of a write's body: a sled transaction's trees, or the
/// commit thread's staged trees (`stage.rs`).
trait Kv {
    fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<sled::IVec>>;
    fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<sled::IVec>) -> TxResult<()>;
}

fn abort<T>(e: impl Into<StoreError>) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e.into()))
}

/// sled's page cache: enough for the hot trees (queue heads, stats, recent
/// calls); the rest is read from disk when needed.
const PAGE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Layout version in `meta`; `migrate` brings older databases up to it.
/// 3: a function's spec ends with its OCI runtime (`legacy.rs`).
/// 4: everything kept per function is keyed by owner and name (`legacy.rs`).
/// 5: users carry budgets (`UserLimits`), and `queued` counts each owner's
/// queue (`migrate_to_5`).
/// 6: a user's `UserLimits` ends with `reserved` (`migrate_users_to_6`).
/// 7: function, call and event records end with `image_digest`.
/// 8: function records end with their webhook, then their `schedule`;
/// call records with their webhook; events may be `Webhook`, and
/// `webhooks`/`webhook_due` hold deliveries.
const SCHEMA: u64 = 8;

// Tree indices of `Inner::trees`, so one transaction can span any of them.
const USERS: usize = 0; // user name -> User
const KEYS: usize = 1; // key hash -> user name
const FUNCTIONS: usize = 2; // owner\0name -> Function
const CALLS: usize = 3; // call id -> Call
const PAYLOADS: usize = 4; // call id -> Marker of the STDIN bytes, until the call ends
const QUEUE: usize = 5; // owner\0seq -> call id: the per-user FIFO
const OUTPUTS: usize = 6; // call id -> Marker of the STDOUT bytes
const OUTPUT_INDEX: usize = 7; // owner\0name\0seq -> call id, oldest first, for eviction
const LOGS: usize = 8; // owner\0name\0seq -> Event
const STATS: usize = 9; // owner\0name -> FunctionStats
const FN_CALLS: usize = 10; // owner\0name\0seq -> call id: every call of a function
const META: usize = 11; // small singletons
const LIVE: usize = 12; // owner\0name\0seq -> call id: calls not yet ended
const DONE: usize = 13; // finished_ms\0id -> (): ended calls, oldest first, for retention
const QUEUED: usize = 14; // owner -> QueueUse: the owner's PENDING calls and their payload bytes
const REGISTRY_LOGINS: usize = 15; // owner\0host -> RegistryLogin (a tree of its own: no schema change)
const PRIVATE_REGISTRIES: usize = 16; // host -> (): hosts someone logged in to
const PULLED_IMAGES: usize = 17; // instance\0image id -> PulledImage (a tree of its own)
                                 // Idempotency keys (new trees, no schema change: an older database has none).
const IDEM: usize = 18; // owner\0name\0KEY -> IdempotencyRecord (the call, its body's digest)
const IDEM_CALLS: usize = 19; // call id -> its IDEM key, so the call's removal takes the key along
const WEBHOOKS: usize = 20; // call id -> Delivery: its completion webhook, written with its end
const WEBHOOK_DUE: usize = 21; // due_ms_be call id -> url: pending deliveries, soonest first
const TREE_NAMES: [&str; 22] = [
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
    "live",
    "done",
    "queued",
    "registry_logins",
    "private_registries",
    "pulled_images",
    "idempotency",
    "idempotency_calls",
    "webhooks",
    "webhook_due",
];

/// An owner's queue as `accept` checks it against their budget: kept in
/// the same writes as the `queue` entries it counts, so it is exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
struct QueueUse {
    calls: u64,
    bytes: u64,
}

/// What a write did besides its transactions, for `SledStore::write` to
/// finish once the transactions are durable.
#[derive(Default)]
struct Effects {
    /// Something was committed: wait for the group flush.
    committed: bool,
    /// Files whose markers were dropped: deleted after the flush.
    deletes: Vec<PathBuf>,
    /// Functions whose log cache went over budget: evicted in the background.
    evict_logs: Vec<FnKey>,
}

/// The synchronous core; every method runs on a blocking thread.
struct Inner {
    /// The trees and their write lock (`trees.rs`): a write without the
    /// lock does not compile.
    trees: trees::Trees,
    /// For flushes, ids and sizes: no tree is written through it.
    db: sled::Db,
    blobs: Blobs,
    config: StoreConfig,
    /// Per function: output eviction and the insert it makes room for run
    /// one at a time, so the byte count stays exact; other functions and
    /// intake never wait for it.
    evict_locks: Mutex<HashMap<FnKey, Arc<Mutex<()>>>>,
    /// Space set aside for a full disk (`ballast.rs`).
    ballast: Arc<ballast::Ballast>,
}

pub struct SledStore {
    inner: Arc<Inner>,
    committer: Arc<Committer>,
    /// Every function record, read on each call's intake: served from
    /// memory, written through after each durable change.
    functions: std::sync::RwLock<Functions>,
    /// Every user and key hash, read on each authenticated request and each
    /// dispatch: served from memory, written through after each durable
    /// change.
    users: std::sync::RwLock<Users>,
    /// Users and functions change one at a time, so each cache follows the
    /// order of the commits.
    directory: tokio::sync::Mutex<()>,
    /// Functions whose log eviction is under way, so one runs per function.
    log_evicting: Arc<Mutex<HashSet<FnKey>>>,
    /// Stops the ballast's watcher when the store goes.
    stop_watch: Arc<std::sync::atomic::AtomicBool>,
}

/// The in-memory copy of the function records, by key and by secret (the
/// data plane's lookup).
#[derive(Default)]
struct Functions {
    by_key: HashMap<FnKey, Function>,
    by_secret: HashMap<String, FnKey>,
}

impl Functions {
    fn put(&mut self, f: Function) {
        let key = f.key();
        if let Some(old) = self.by_key.get(&key) {
            self.by_secret.remove(old.secret.as_str());
        }
        self.by_secret
            .insert(f.secret.as_str().to_string(), key.clone());
        self.by_key.insert(key, f);
    }

    fn remove(&mut self, key: &FnKey) {
        if let Some(old) = self.by_key.remove(key) {
            self.by_secret.remove(old.secret.as_str());
        }
    }
}

#[derive(Default)]
struct Users {
    by_name: HashMap<Name, User>,
    by_key: HashMap<[u8; 32], Name>,
}

impl Users {
    fn put(&mut self, user: User) {
        if let Some(old) = self.by_name.get(&user.name) {
            self.by_key.remove(&old.key_hash);
        }
        self.by_key.insert(user.key_hash, user.name.clone());
        self.by_name.insert(user.name.clone(), user);
    }

    fn remove(&mut self, name: &Name) {
        if let Some(old) = self.by_name.remove(name) {
            self.by_key.remove(&old.key_hash);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; keep going if it did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. sled's page cache is bounded
    /// by `PAGE_CACHE_BYTES` (its default is 1 GiB, which a long queue fills).
    ///
    /// On a full filesystem the ballast (`ballast.rs`) is released first,
    /// and again if sled still cannot open: sled writes at open.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<SledStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Failed(format!("{}: {e}", dir.display())))?;
        let ballast = Arc::new(ballast::Ballast::new(
            dir,
            config.ballast_bytes,
            config.min_free_bytes,
        ));
        if free_bytes(dir).is_ok_and(|free| free < ballast.low()) {
            ballast.release();
        }
        let open = || {
            sled::Config::new()
                .path(dir)
                .mode(sled::Mode::LowSpace)
                .cache_capacity(PAGE_CACHE_BYTES)
                // The commit thread flushes and syncs (`durable.rs`);
                // sled's own flusher would write between its blob listing
                // and its fdatasync.
                .flush_every_ms(None)
                .open()
        };
        let db = match open() {
            Ok(db) => db,
            // Only for want of space: another daemon holding the lock must
            // not cost the first one its ballast.
            Err(sled::Error::Io(e))
                if ballast.present()
                    && matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                tracing::warn!(error = %e, "cannot open the database; trying again without the ballast");
                ballast.release();
                open()?
            }
            Err(e) => {
                return Err(match free_bytes(dir) {
                    Ok(free) if free < ballast::FLOOR => StoreError::Full(format!(
                        "the data dir's filesystem is full ({} free) and no ballast is left to release: \
                         free some space on it, then start again ({e})",
                        approx_bytes(free)
                    )),
                    _ => e.into(),
                })
            }
        };
        let trees = TREE_NAMES
            .iter()
            .map(|n| db.open_tree(n))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let blobs = Blobs::open(dir.join("hf-blobs"))
            .map_err(|e| StoreError::Failed(format!("{}: {e}", dir.display())))?;
        let inner = Inner {
            trees: trees::Trees::new(trees),
            db: db.clone(),
            blobs,
            config,
            evict_locks: Mutex::new(HashMap::new()),
            ballast: Arc::clone(&ballast),
        };
        if inner.replay_intent()? {
            tracing::info!("finished a write that a crash interrupted");
        }
        inner.migrate()?;
        inner.collect_orphans()?;
        db.flush()?;
        let committer = Committer::start(db, dir, inner.trees.lock_for_commits())
            .map_err(|e| StoreError::Failed(format!("cannot make the database durable: {e}")))?;
        let mut functions = Functions::default();
        for f in inner.list_functions(None)? {
            functions.put(f);
        }
        let mut users = Users::default();
        for u in values::<User>(inner.tree(USERS).iter())? {
            users.put(u);
        }
        let stop_watch = Arc::new(std::sync::atomic::AtomicBool::new(false));
        ballast
            .watch(Arc::clone(&stop_watch))
            .map_err(|e| StoreError::Failed(format!("cannot start the ballast's watcher: {e}")))?;
        Ok(SledStore {
            inner: Arc::new(inner),
            committer: Arc::new(committer),
            functions: std::sync::RwLock::new(functions),
            users: std::sync::RwLock::new(users),
            directory: tokio::sync::Mutex::new(()),
            log_evicting: Arc::new(Mutex::new(HashSet::new())),
            stop_watch,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Failed(format!("store task: {e}")))?
    }

    /// Runs a write on a blocking thread, waits until what it committed is
    /// durable, deletes the files it released, then returns its result.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Effects) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if let Some(reason) = self.committer.failure() {
            return Err(StoreError::Failed(reason));
        }
        let inner = Arc::clone(&self.inner);
        let (value, fx) = tokio::task::spawn_blocking(move || {
            let mut fx = Effects::default();
            let v = f(&inner, &mut fx);
            (v, fx)
        })
        .await
        .map_err(|e| StoreError::Failed(format!("store task: {e}")))?;
        if fx.committed || !fx.deletes.is_empty() {
            self.committer.durable(fx.deletes).await?;
        }
        for name in fx.evict_logs {
            self.evict_logs_later(name);
        }
        value
    }

    /// Runs a short write on the commit thread, in the round of its flush,
    /// as a staged write (`stage.rs`): no hop through a blocking thread and
    /// no sled transaction, and concurrent writes share the flush. Long
    /// writes (scans, file I/O) use `write` instead.
    async fn commit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Effects) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.committer.submit(Box::new(move || {
            let mut fx = Effects::default();
            let value = f(&inner, &mut fx);
            let evict = std::mem::take(&mut fx.evict_logs);
            commit::Done {
                deletes: fx.deletes,
                reply: Box::new(move |flushed| {
                    let _ = tx.send((value, flushed, evict));
                }),
            }
        }))?;
        let (value, flushed, evict) = rx
            .await
            .map_err(|_| StoreError::Unsure("the commit thread stopped".into()))?;
        // A write that refused wrote nothing, whatever became of the round.
        let value = value?;
        flushed.map_err(StoreError::Unsure)?;
        for name in evict {
            self.evict_logs_later(name);
        }
        Ok(value)
    }

    async fn accept_keyed(
        &self,
        call: Call,
        payload: Bytes,
        budget: QueueBudget,
        idem: Option<Idempotency>,
    ) -> Result<Accepted> {
        if payload.len() as u64 > self.inner.config.inline_max_bytes {
            // Its own file, written and fsynced off the commit thread.
            self.write(move |i, fx| i.accept(call, &payload, budget, idem.as_ref(), fx))
                .await
        } else {
            self.commit(move |i, fx| i.accept(call, &payload, budget, idem.as_ref(), fx))
                .await
        }
    }

    fn cached_functions(&self) -> std::sync::RwLockReadGuard<'_, Functions> {
        self.functions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn cached_users(&self) -> std::sync::RwLockReadGuard<'_, Users> {
        self.users.read().unwrap_or_else(|p| p.into_inner())
    }

    fn cached_users_mut(&self) -> std::sync::RwLockWriteGuard<'_, Users> {
        self.users.write().unwrap_or_else(|p| p.into_inner())
    }

    fn cache_function(&self, key: &FnKey, f: Option<Function>) {
        let mut cache = self.functions.write().unwrap_or_else(|p| p.into_inner());
        match f {
            Some(f) => cache.put(f),
            None => cache.remove(key),
        };
    }

    /// Evicts `function`'s oldest events in the background, off the path of
    /// the write that went over budget; one evictor per function. Evicted
    /// events release no file, so their removal needs no flush of its own:
    /// the next group flush carries it, which is all a cache needs.
    fn evict_logs_later(&self, function: FnKey) {
        if !lock(&self.log_evicting).insert(function.clone()) {
            return;
        }
        let inner = Arc::clone(&self.inner);
        let evicting = Arc::clone(&self.log_evicting);
        tokio::spawn(async move {
            loop {
                let (i, f) = (Arc::clone(&inner), function.clone());
                let done = tokio::task::spawn_blocking(move || i.evict_logs(&f)).await;
                if let Ok(Err(e)) | Err(e) = done.map_err(|e| StoreError::Failed(e.to_string())) {
                    tracing::error!(function = %function, error = %e, "log eviction failed");
                }
                lock(&evicting).remove(&function);
                // A write that went over budget while we finished found us
                // still in the set: look once more.
                let (i, f) = (Arc::clone(&inner), function.clone());
                let over = tokio::task::spawn_blocking(move || i.logs_over_budget(&f))
                    .await
                    .unwrap_or(Ok(false))
                    .unwrap_or(false);
                if !over || !lock(&evicting).insert(function.clone()) {
                    break;
                }
            }
        });
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.stop_watch
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.committer.close();
    }
}

impl Inner {
    /// Tree `i`, for reading; writes go through `write_lock`.
    fn tree(&self, i: usize) -> trees::Reader<'_> {
        self.trees.read(i)
    }

    /// The write lock (`trees.rs`): the only way to write a tree.
    fn write_lock(&self) -> trees::WriteGuard<'_> {
        self.trees.write()
    }

    /// A sled transaction, one writer at a time (see `stage.rs` for why).
    fn tx<T>(&self, f: impl Fn(&[TransactionalTree]) -> TxResult<T>) -> Result<T> {
        let w = self.write_lock();
        Ok(w.transaction(f)?)
    }

    /// A monotonic number, unique across restarts.
    fn next_seq(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// Refuses a write of `extra` bytes that would leave less than the
    /// reserve free on the data dir's filesystem.
    fn check_space(&self, extra: u64, what: &str) -> Result<()> {
        match self.space_short(extra)? {
            Some(why) => Err(StoreError::Full(format!(
                "no space left to store {what}: {why}"
            ))),
            None => Ok(()),
        }
    }

    /// Why `extra` more bytes would take the data dir's filesystem under
    /// the reserve, and by how much; `None` if they fit. Below the reserve
    /// the ballast goes at once (its watcher would within a second).
    fn space_short(&self, extra: u64) -> Result<Option<String>> {
        let read = || {
            free_bytes(self.blobs.dir())
                .map_err(|e| StoreError::Failed(format!("cannot read the free space: {e}")))
        };
        let mut free = read()?;
        if free < self.ballast.low() && self.ballast.release() {
            free = read()?;
        }
        // Given back for the writes that settle calls, not for new bytes.
        let reserve = self
            .config
            .min_free_bytes
            .saturating_add(self.ballast.owed());
        let need = reserve.saturating_add(extra);
        if free >= need {
            return Ok(None);
        }
        let short = approx_bytes(need - free);
        let kept = if self.ballast.owed() > 0 {
            "kept in reserve ([store] min_free_bytes, and ballast_bytes until the ballast is made again)"
        } else {
            "kept in reserve ([store] min_free_bytes)"
        };
        Ok(Some(if extra == 0 {
            format!(
                "the data dir's filesystem is full: {} free, {short} under the {} {kept}",
                approx_bytes(free),
                approx_bytes(reserve),
            )
        } else {
            format!(
                "the data dir's filesystem is full: {} free, {short} short of the {} it needs and the {} {kept}",
                approx_bytes(free),
                approx_bytes(extra),
                approx_bytes(reserve),
            )
        }))
    }

    /// Brings a database of an earlier layout up to `SCHEMA`.
    fn migrate(&self) -> Result<()> {
        let meta = self.tree(META);
        let schema: u64 = match meta.get("schema")? {
            Some(v) => decode(&v)?,
            // Schema 1 had no version key; an empty database is new.
            None if self.tree(CALLS).is_empty() && self.tree(FUNCTIONS).is_empty() => SCHEMA,
            None => 1,
        };
        if schema == 1 {
            tracing::info!("migrating the database to schema 2");
            let w = self.write_lock();
            // Blob markers were bare lengths of files.
            for tree in [PAYLOADS, OUTPUTS] {
                for kv in w.tree(tree).iter() {
                    let (k, v) = kv?;
                    let mut b = [0u8; 8];
                    if v.len() == 8 {
                        b.copy_from_slice(&v);
                    }
                    w.tree(tree)
                        .insert(k, Marker::File(u64::from_be_bytes(b)).encode())?;
                }
            }
            // The live and done indexes are new.
            for kv in w.tree(CALLS).iter() {
                let call: Call = decode(&kv?.1)?;
                self.index_call(&w, &call)?;
            }
        } else if schema > SCHEMA {
            return Err(StoreError::Corrupt(format!(
                "the database has layout {schema}, newer than this release ({SCHEMA}) knows"
            )));
        }
        if schema < 3 {
            self.migrate_functions_to_3()?;
        }
        if schema < 4 {
            self.migrate_keys_to_4()?;
        }
        if schema < 5 {
            self.migrate_to_5()?;
        }
        if schema < 6 {
            self.migrate_users_to_6()?;
        }
        // Schema 7: function, call and event records gained a trailing
        // `image_digest`, which records of 6 lack and read as `None`
        // (`model::trailing`), so nothing is rewritten: the number only
        // stops an older release, which would refuse the longer records
        // one by one, at open. Schema 8 likewise: function and call
        // records gained a trailing `webhook` and function records then a
        // trailing `schedule` (read with `trailing`), events a `Webhook`
        // kind, and the delivery trees are new.
        self.write_lock()
            .tree(META)
            .insert("schema", encode(&SCHEMA)?)?;
        Ok(())
    }

    /// Removes blob files whose marker was never committed (a crash between
    /// writing the file and the transaction) or was removed (a crash before
    /// the file was).
    fn collect_orphans(&self) -> Result<()> {
        let listed = self
            .blobs
            .list()
            .map_err(|e| StoreError::Failed(format!("cannot list data files: {e}")))?;
        for (kind, id) in listed {
            let tree = match kind {
                Kind::Payload => PAYLOADS,
                Kind::Output => OUTPUTS,
            };
            let owed = match self.tree(tree).get(id.as_bytes())? {
                Some(v) => matches!(Marker::decode(&v)?, Marker::File(_)),
                None => false,
            };
            if !owed {
                self.blobs.remove_uncommitted(kind, &id);
            }
        }
        Ok(())
    }

    fn instance_id(&self, fx: &mut Effects) -> Result<String> {
        let meta = self.tree(META);
        if let Some(v) = meta.get("instance_id")? {
            return Ok(decode(&v)?);
        }
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let _ = self.write_lock().tree(META).compare_and_swap(
            "instance_id",
            None as Option<&[u8]>,
            Some(encode(&fresh)?),
        )?;
        fx.committed = true;
        match meta.get("instance_id")? {
            Some(v) => Ok(decode(&v)?),
            None => Err(StoreError::NotFound("instance id".into())),
        }
    }

    fn evict_lock(&self, function: &FnKey) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.evict_locks).entry(function.clone()).or_default())
    }
}

/// A size for a message: exact below 1 MiB, else to a tenth of a MiB or GiB.
fn approx_bytes(n: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    match n {
        n if n < MIB => crate::model::human_bytes(n),
        n if n < 1024 * MIB => format!("{:.1} MiB", n as f64 / MIB as f64),
        n => format!("{:.1} GiB", n as f64 / (1024 * MIB) as f64),
    }
}

/// Below this many free inodes the data dir's filesystem is reported as
/// refusing writes (`health`), whatever its free bytes: a payload or an
/// output file, and its temporary name, each need one.
const MIN_FREE_INODES: u64 = 8;

/// Free inodes for an unprivileged writer on the filesystem holding
/// `path`; `None` where the filesystem has no fixed count (btrfs and
/// others report 0 files).
fn free_inodes(path: &Path) -> std::io::Result<Option<u64>> {
    let s = statvfs(path)?;
    if s.f_files == 0 {
        return Ok(None);
    }
    Ok(Some(s.f_favail as u64))
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = statvfs(path)?;
    Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path for the duration of the call.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s)
}

/// Appends `event` to `function`'s log at `seq`, counting its bytes.
fn log_event(
    logs: &impl Kv,
    stats: &mut FunctionStats,
    function: &FnKey,
    event: &Event,
    seq: u64,
) -> TxResult<()> {
    let bytes = enc(event)?;
    stats.log_bytes += bytes.len() as u64;
    logs.insert(seq_key(function.store_key().as_str(), seq), bytes)?;
    Ok(())
}

fn log(
    logs: &impl Kv,
    stats: &mut FunctionStats,
    call: &Call,
    kind: EventKind,
    seq: u64,
) -> TxResult<()> {
    let bytes = enc(&call.event(kind))?;
    stats.log_bytes += bytes.len() as u64;
    logs.insert(seq_key(fk(call).as_str(), seq), bytes)?;
    Ok(())
}

/// The store key of a call's function (`owner NUL name`).
fn fk(call: &Call) -> String {
    call.fn_key().store_key()
}

/// Adds `calls` and `bytes` to `owner`'s queue count; returns it as it was.
fn queue_add(queued: &impl Kv, owner: &Name, calls: i64, bytes: i64) -> TxResult<QueueUse> {
    let was: QueueUse = match queued.get(owner.as_str())? {
        Some(v) => dec(&v)?,
        None => QueueUse::default(),
    };
    let now = QueueUse {
        calls: was.calls.saturating_add_signed(calls),
        bytes: was.bytes.saturating_add_signed(bytes),
    };
    queued.insert(owner.as_str(), enc(&now)?)?;
    Ok(was)
}

/// A call's payload length as a signed count.
fn payload_len(call: &Call) -> i64 {
    i64::try_from(call.stdin_len).unwrap_or(i64::MAX)
}

fn tx_stats(stats: &impl Kv, function: &FnKey) -> TxResult<FunctionStats> {
    match stats.get(function.store_key().as_str())? {
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
    tree: trees::Reader<'_>,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>> {
    match tree.get(key)? {
        Some(v) => Ok(Some(decode(&v)?)),
        None => Ok(None),
    }
}

/// `instance\0id`: an instance id holds no NUL.
fn pulled_key(instance: &str, id: &str) -> Vec<u8> {
    let mut k = instance.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn values<T: serde::de::DeserializeOwned>(iter: sled::Iter) -> Result<Vec<T>> {
    iter.map(|kv| Ok(decode(&kv?.1)?)).collect()
}

fn call_id(bytes: &[u8]) -> Result<CallId> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("malformed call id in an index".into()))?;
    Ok(CallId::from_bytes(arr))
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

#[async_trait]
impl Store for SledStore {
    async fn instance_id(&self) -> Result<String> {
        self.write(|i, fx| i.instance_id(fx)).await
    }

    async fn health(&self) -> std::result::Result<(), String> {
        if let Some(reason) = self.committer.failure() {
            return Err(format!("the store cannot write: {reason}"));
        }
        let refused = self
            .read(|i| {
                if let Some(why) = i.space_short(0)? {
                    return Ok(Some(format!("writes refused: {why}")));
                }
                // Free bytes are not enough: without inodes every file
                // write fails.
                let inodes = free_inodes(i.blobs.dir())
                    .map_err(|e| StoreError::Failed(format!("cannot read the free inodes: {e}")))?;
                Ok(match inodes {
                    Some(n) if n < MIN_FREE_INODES => Some(format!(
                        "writes refused: the data dir's filesystem has {n} free inodes (files) \
                         left, fewer than the {MIN_FREE_INODES} its writes need, whatever its \
                         free bytes: remove files on it or give it more inodes"
                    )),
                    _ => None,
                })
            })
            .await;
        match refused {
            Ok(None) => Ok(()),
            Ok(Some(why)) => Err(why),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn failed(&self) -> String {
        let mut rx = self.committer.subscribe_failure();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // The committer is gone with the store: nothing will fail.
                std::future::pending::<()>().await;
            }
        }
    }

    async fn size_on_disk(&self) -> u64 {
        self.read(|i| Ok(i.db.size_on_disk().unwrap_or(0)))
            .await
            .unwrap_or(0)
    }

    async fn create_user(&self, user: &User) -> Result<()> {
        let _one = self.directory.lock().await;
        let made = user.clone();
        self.write(move |i, fx| {
            i.check_space(0, "the user")?;
            i.create_user(&made, fx)
        })
        .await?;
        self.cached_users_mut().put(user.clone());
        Ok(())
    }

    async fn update_user(&self, user: &User) -> Result<()> {
        let _one = self.directory.lock().await;
        let changed = user.clone();
        self.write(move |i, fx| {
            i.check_space(0, "the user")?;
            i.update_user(&changed, fx)
        })
        .await?;
        self.cached_users_mut().put(user.clone());
        Ok(())
    }

    async fn get_user(&self, name: &Name) -> Result<Option<User>> {
        Ok(self.cached_users().by_name.get(name).cloned())
    }

    async fn user_by_key_hash(&self, hash: &[u8; 32]) -> Result<Option<User>> {
        let users = self.cached_users();
        Ok(users
            .by_key
            .get(hash)
            .and_then(|n| users.by_name.get(n))
            .cloned())
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        let mut all: Vec<User> = self.cached_users().by_name.values().cloned().collect();
        all.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        Ok(all)
    }

    async fn delete_user(&self, name: &Name) -> Result<()> {
        let _one = self.directory.lock().await;
        let n = name.clone();
        self.write(move |i, fx| i.delete_user(&n, fx)).await?;
        self.cached_users_mut().remove(name);
        Ok(())
    }

    async fn put_registry_login(&self, owner: &Name, login: &RegistryLogin) -> Result<()> {
        let (owner, login) = (owner.clone(), login.clone());
        self.write(move |i, fx| {
            i.check_space(0, "the registry login")?;
            i.put_registry_login(&owner, &login, fx)
        })
        .await
    }

    async fn registry_logins(&self, owner: &Name) -> Result<Vec<RegistryLogin>> {
        let owner = owner.clone();
        self.read(move |i| i.registry_logins(&owner)).await
    }

    async fn delete_registry_login(&self, owner: &Name, host: &str) -> Result<bool> {
        let (owner, host) = (owner.clone(), host.to_string());
        self.write(move |i, fx| i.delete_registry_login(&owner, &host, fx))
            .await
    }

    async fn mark_private_registry(&self, host: &str) -> Result<()> {
        let host = host.to_string();
        self.write(move |i, fx| {
            i.write_lock()
                .tree(PRIVATE_REGISTRIES)
                .insert(host.as_bytes(), &[])?;
            fx.committed = true;
            Ok(())
        })
        .await
    }

    async fn put_pulled_image(&self, image: &PulledImage) -> Result<()> {
        let image = image.clone();
        self.write(move |i, fx| {
            i.check_space(0, "the pulled image's record")?;
            i.write_lock()
                .tree(PULLED_IMAGES)
                .insert(pulled_key(&image.instance, &image.id), encode(&image)?)?;
            fx.committed = true;
            Ok(())
        })
        .await
    }

    async fn pulled_images(&self, instance: &str) -> Result<Vec<PulledImage>> {
        let mut prefix = instance.as_bytes().to_vec();
        prefix.push(0);
        self.read(move |i| values(i.tree(PULLED_IMAGES).scan_prefix(prefix)))
            .await
    }

    async fn delete_pulled_image(&self, instance: &str, id: &str) -> Result<()> {
        let key = pulled_key(instance, id);
        self.write(move |i, fx| {
            fx.committed = i.write_lock().tree(PULLED_IMAGES).remove(key)?.is_some();
            Ok(())
        })
        .await
    }

    async fn is_private_registry(&self, host: &str) -> Result<bool> {
        let host = host.to_string();
        self.read(move |i| Ok(i.tree(PRIVATE_REGISTRIES).contains_key(host.as_bytes())?))
            .await
    }

    async fn create_function(&self, f: &Function) -> Result<()> {
        let _one = self.directory.lock().await;
        let made = f.clone();
        self.write(move |i, fx| {
            i.check_space(0, "the function")?;
            i.create_function(&made, fx)
        })
        .await?;
        self.cache_function(&f.key(), Some(f.clone()));
        Ok(())
    }

    async fn create_function_within(&self, f: &Function, max_functions: u32) -> Result<()> {
        // Directory writes are one at a time: the count cannot change
        // between this look and the create.
        let _one = self.directory.lock().await;
        let owned = self
            .cached_functions()
            .by_key
            .keys()
            .filter(|k| k.owner == f.owner)
            .count();
        if owned >= max_functions as usize {
            return Err(super::over_functions(&f.owner, max_functions));
        }
        let made = f.clone();
        self.write(move |i, fx| {
            i.check_space(0, "the function")?;
            i.create_function(&made, fx)
        })
        .await?;
        self.cache_function(&f.key(), Some(f.clone()));
        Ok(())
    }

    async fn update_function(&self, read: &Function, f: &Function) -> Result<()> {
        let _one = self.directory.lock().await;
        let (read, changed) = (read.clone(), f.clone());
        self.write(move |i, fx| {
            i.check_space(0, "the function")?;
            i.update_function(&read, &changed, fx)
        })
        .await?;
        self.cache_function(&f.key(), Some(f.clone()));
        Ok(())
    }

    async fn get_function(&self, key: &FnKey) -> Result<Option<Function>> {
        Ok(self.cached_functions().by_key.get(key).cloned())
    }

    async fn function_by_secret(&self, secret: &str) -> Result<Option<Function>> {
        let cache = self.cached_functions();
        Ok(cache
            .by_secret
            .get(secret)
            .and_then(|k| cache.by_key.get(k))
            .cloned())
    }

    async fn list_functions(&self, owner: Option<&Name>) -> Result<Vec<Function>> {
        let mut all: Vec<Function> = self
            .cached_functions()
            .by_key
            .values()
            .filter(|f| owner.is_none_or(|o| &f.owner == o))
            .cloned()
            .collect();
        all.sort_by(|a, b| (&a.name, &a.owner).cmp(&(&b.name, &b.owner)));
        Ok(all)
    }

    async fn remove_function(&self, name: &FnKey) -> Result<()> {
        let _one = self.directory.lock().await;
        let n = name.clone();
        // Out of the cache first: intake stops taking its calls at once
        // (the transactions check the record too).
        self.cache_function(name, None);
        let removed = self.write(move |i, fx| i.remove_function(&n, fx)).await;
        if removed.is_err() {
            if let Ok(Some(f)) = self
                .read({
                    let n = name.clone();
                    move |i| get::<Function>(i.tree(FUNCTIONS), n.store_key().as_str())
                })
                .await
            {
                self.cache_function(name, Some(f));
            }
        }
        removed
    }

    async fn purge_function(&self, name: &FnKey) -> Result<()> {
        let n = name.clone();
        self.write(move |i, fx| i.purge_function(&n, fx)).await?;
        lock(&self.inner.evict_locks).remove(name);
        Ok(())
    }

    async fn unpurged_functions(&self) -> Result<Vec<FnKey>> {
        self.read(|i| i.unpurged_functions()).await
    }

    async fn stats(&self, function: &FnKey) -> Result<FunctionStats> {
        let name = function.clone();
        self.read(move |i| i.stats(&name)).await
    }

    async fn accept_within(&self, call: Call, payload: Bytes, budget: QueueBudget) -> Result<Call> {
        match self.accept_keyed(call, payload, budget, None).await? {
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
        self.accept_keyed(call, payload, budget, Some(idem)).await
    }

    async fn get_call(&self, id: &CallId) -> Result<Option<Call>> {
        let id = *id;
        self.read(move |i| get(i.tree(CALLS), id.as_bytes())).await
    }

    async fn queue_head(&self, owner: &Name) -> Result<Option<CallId>> {
        let owner = owner.clone();
        self.read(move |i| i.queue_head(&owner)).await
    }

    async fn queued_owners(&self) -> Result<Vec<Name>> {
        self.read(|i| i.queued_owners()).await
    }

    async fn discard_queued(&self, owner: &Name, id: &CallId) -> Result<()> {
        let (owner, id) = (owner.clone(), *id);
        self.write(move |i, fx| i.discard_queued(&owner, &id, fx))
            .await
    }

    async fn queue_len(&self) -> Result<u64> {
        self.read(|i| Ok(i.tree(QUEUE).len() as u64)).await
    }

    async fn start(&self, id: &CallId) -> Result<Started> {
        let id = *id;
        self.write(move |i, fx| i.start(&id, fx)).await
    }

    async fn requeue(&self, id: &CallId) -> Result<()> {
        let id = *id;
        self.write(move |i, fx| i.requeue(&id, fx)).await
    }

    async fn finish(&self, id: &CallId, outcome: Outcome) -> Result<Call> {
        let id = *id;
        self.write(move |i, fx| i.finish(&id, outcome, fx)).await
    }

    async fn cancel_queued(&self, function: &FnKey, message: &str) -> Result<usize> {
        let (function, message) = (function.clone(), message.to_string());
        self.write(move |i, fx| i.cancel_queued(&function, &message, false, fx))
            .await
    }

    async fn cancel_removed(&self, function: &FnKey, message: &str) -> Result<usize> {
        let (function, message) = (function.clone(), message.to_string());
        self.write(move |i, fx| i.cancel_queued(&function, &message, true, fx))
            .await
    }

    async fn take_output(&self, id: &CallId) -> Result<Option<OutputLookup>> {
        let id = *id;
        self.write(move |i, fx| i.take_output(&id, fx)).await
    }

    async fn live_calls(&self, function: &FnKey) -> Result<Vec<Call>> {
        let function = function.clone();
        self.read(move |i| i.live_calls(Some(&function))).await
    }

    async fn function_calls(
        &self,
        function: &FnKey,
        query: &super::CallQuery,
    ) -> Result<super::CallPage> {
        let (function, query) = (function.clone(), query.clone());
        self.read(move |i| i.function_calls(&function, &query))
            .await
    }

    async fn running_calls(&self) -> Result<Vec<Call>> {
        self.read(|i| {
            Ok(i.live_calls(None)?
                .into_iter()
                .filter(|c| c.state == CallState::Running)
                .collect())
        })
        .await
    }

    async fn prune(&self, before_ms: u64) -> Result<usize> {
        self.write(move |i, fx| i.prune(before_ms, fx)).await
    }

    async fn events(
        &self,
        function: &FnKey,
        after: Option<u64>,
        call: Option<&CallId>,
        tail: Option<usize>,
    ) -> Result<Vec<(u64, Event)>> {
        let (function, call) = (function.clone(), call.copied());
        self.read(move |i| i.events(&function, after, call.as_ref(), tail))
            .await
    }

    async fn last_event_seq(&self, function: &FnKey) -> Result<Option<u64>> {
        let function = function.clone();
        self.read(move |i| i.last_event_seq(&function)).await
    }
    async fn due_webhooks(&self, now_ms: u64, limit: usize) -> Result<Vec<(CallId, String)>> {
        self.read(move |i| i.due_webhooks(now_ms, limit)).await
    }

    async fn claim_webhook(
        &self,
        id: &CallId,
        holder: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<crate::model::Delivery>> {
        let (id, holder) = (*id, holder.to_string());
        self.write(move |i, fx| i.claim_webhook(&id, &holder, now_ms, until_ms, fx))
            .await
    }

    async fn webhook_attempted(&self, d: &crate::model::Delivery, holder: &str) -> Result<()> {
        let (d, holder) = (d.clone(), holder.to_string());
        self.write(move |i, fx| i.webhook_attempted(&d, &holder, fx))
            .await
    }

    async fn get_webhook(&self, id: &CallId) -> Result<Option<crate::model::Delivery>> {
        let id = *id;
        self.read(move |i| get(i.tree(WEBHOOKS), id.as_bytes()))
            .await
    }

    async fn redeliver_webhook(&self, id: &CallId, now_ms: u64) -> Result<crate::model::Delivery> {
        let id = *id;
        self.write(move |i, fx| i.redeliver_webhook(&id, now_ms, fx))
            .await
    }
}
