//! Drains the per-user FIFO queues into containers: at most `max_concurrency`
//! running calls per user, at most `host_max_running` on the host, shared
//! so that users' reserved slots stay free for them (`share.rs`), a freed
//! slot going to the waiting user who holds fewest, round-robin among
//! equals, so one user's backlog never delays another's calls.
//! Also recovery after a crash, Engine outages, timeouts and cancellation.
//!
//! It never runs a call whose RUNNING state is not yet on disk, so a crash can
//! never make a call run twice.
//!
//! This file holds the type, its state and the public face; the work is in
//! `dispatch.rs` (the loop, one call's run and its conclusion),
//! `recovery.rs` (recovery, the sweep, pruning, a removed function's
//! calls), `shutdown.rs` (stopping running calls), `pool.rs` (the warm
//! pool), `share.rs` (the reserved slots and who gets a freed one) and
//! `ticks.rs` (the schedules' ticker).

mod dispatch;
mod images;
mod pool;
mod recovery;
mod share;
mod shutdown;
mod ticks;
mod webhook_policy;
mod webhooks;

use crate::config::Config;
use crate::model::{Call, CallId, CallState, FnKey, Function, Name, Outcome};
use crate::runtime::{Runtime, WarmSpec};
use crate::store::{Store, StoreError};
use futures_util::future::Shared;
use pool::Pool;
use share::{Shares, Want};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

pub use images::{note_pulled, ImageUse};
pub use ticks::{Fired, TickSink};
pub use webhook_policy::{Policy as WebhookPolicy, Target as WebhookTarget};
pub use webhooks::{Webhooks, CALL_ID_HEADER, EXIT_CODE_HEADER, FUNCTION_HEADER, STATE_HEADER};

type StartSignal = Shared<oneshot::Receiver<()>>;

/// How often the dispatcher looks again while the Engine is down.
const ENGINE_RETRY: Duration = Duration::from_secs(1);
/// How often containers that belong to no running call are swept away (an
/// Engine restart can leave the containers of calls it killed).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often ended calls past `limits.call_retention` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// `PRUNE_EVERY`; the race tests (failpoints builds only) set a shorter
/// one with `HYPERFUNCD_TEST_PRUNE_MS`, so a prune falls inside the window
/// they hold open.
fn prune_every() -> Duration {
    #[cfg(feature = "failpoints")]
    if let Some(ms) = std::env::var("HYPERFUNCD_TEST_PRUNE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Duration::from_millis(ms.max(1));
    }
    PRUNE_EVERY
}
/// How often a node of a shared store looks at every queue, in case a
/// change notice from another node was lost.
const REMOTE_POLL: Duration = Duration::from_secs(2);
/// How often a node of a shared store reads the users' reservations again:
/// another node's `user update` reaches it within this.
const SHARES_REFRESH: Duration = Duration::from_secs(10);

pub struct Scheduler {
    store: Arc<dyn Store>,
    runtime: Arc<Runtime>,
    config: Arc<Config>,
    /// Wakes the dispatcher: a call was queued or a slot freed.
    wake: Notify,
    /// Asks the upkeep task (sweep, prune) for a prune now: recovery is done.
    prune_now: Notify,
    /// Bumped after every call state change; waiters re-read the store.
    changes: watch::Sender<u64>,
    state: Mutex<DispatchState>,
    pool: Arc<Pool>,
    /// The completion webhook worker and its address policy.
    webhooks: Arc<Webhooks>,
    /// Where the ticker makes a tick's call (the service, `set_tick_sink`).
    tick_sink: std::sync::OnceLock<std::sync::Weak<dyn TickSink>>,
    /// Wakes the ticker: a function changed on this node.
    ticks_wake: Notify,
}

#[derive(Default)]
struct DispatchState {
    /// Owners that may have queued calls, in round-robin order.
    ready: VecDeque<Name>,
    ready_set: HashSet<Name>,
    running: HashMap<Name, u32>,
    running_total: u32,
    /// The users' reserved slots, as last read (`refresh_shares`): the
    /// dispatcher consults them on every turn, so they are read from the
    /// store only when users change, never per turn.
    shares: Shares,
    /// Bumped by `users_changed`; `shares` are stale while the generation
    /// they were read at is older.
    users_generation: u64,
    /// The generation `shares` were read at, and when.
    shares_read: Option<(u64, Instant)>,
    /// Reservations last cut to fit the host, so a cut is logged once.
    shares_cut: Vec<share::Cut>,
    /// One token per running call, to cancel it.
    cancels: HashMap<CallId, (u64, CancellationToken)>,
    /// The function of each running call, for a shared store: another
    /// node may remove it (`cancel_removed`).
    functions: HashMap<CallId, FnKey>,
    /// Tells apart two runs of one call (requeued after an Engine refusal).
    generation: u64,
    /// Per owner: resolves once the owner's latest dispatched call has its
    /// container (created, or a warm one framed). The next call waits for
    /// it, so an owner's containers are created in FIFO order even when
    /// dispatched together, while their starts overlap.
    /// With the call's queue sequence: on a shared store a call never
    /// waits here for a later one (that one may be waiting for it in
    /// `Store::await_turn`).
    start_chain: HashMap<Name, (u64, StartSignal)>,
    /// Recovery done: the queue may be drained.
    recovered: bool,
    /// The Engine refused the last attempt; retry after a ping succeeds.
    engine_down: bool,
    /// Shutting down: cancelled calls were cancelled by the stop.
    stopping: bool,
    /// At most one waiter per call that `finish` hands the stored end to,
    /// so it can answer from memory (`await_end`); tagged to tell apart
    /// two registrations of one call.
    end_waiters: HashMap<CallId, (u64, oneshot::Sender<Ended>)>,
    end_waiter_tag: u64,
}

/// How a call ended, as the store now holds it: handed from `finish` to a
/// waiter (a sync call), which may answer with it without reading it back.
pub enum Ended {
    /// FINISHED, and this output is in the function's output cache.
    Output(bytes::Bytes),
    /// FAILED: the stored record says why.
    Failed(Box<Call>),
}

/// A registration for a call's `Ended`; unregisters when dropped.
pub struct EndWaiter {
    scheduler: Arc<Scheduler>,
    id: CallId,
    tag: u64,
    /// Resolves once the call's end is durable; closed without a value if
    /// the end is one only the store can answer (an output rotated out at
    /// once) or another path ended the call.
    pub ended: oneshot::Receiver<Ended>,
}

impl Drop for EndWaiter {
    fn drop(&mut self) {
        let mut st = self.scheduler.state();
        if st
            .end_waiters
            .get(&self.id)
            .is_some_and(|(t, _)| *t == self.tag)
        {
            st.end_waiters.remove(&self.id);
        }
    }
}

impl Scheduler {
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<Runtime>,
        config: Arc<Config>,
    ) -> Result<Arc<Scheduler>, String> {
        let pool = Pool::new(Arc::clone(&runtime), config.pool.clone());
        let webhooks = Webhooks::new(Arc::clone(&store), &config.webhooks)?;
        Ok(Arc::new(Scheduler {
            store,
            runtime,
            config,
            pool,
            webhooks,
            wake: Notify::new(),
            prune_now: Notify::new(),
            changes: watch::channel(0).0,
            state: Mutex::new(DispatchState::default()),
            tick_sink: std::sync::OnceLock::new(),
            ticks_wake: Notify::new(),
        }))
    }

    /// The completion webhook worker (its policy; a wake after a redeliver).
    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DispatchState> {
        // A panic while holding this lock would be a bug; keep serving anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that changes whenever any call changes state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Hands the durable end of call `id` to the returned waiter, unless
    /// another waits for it already (then `None`: read the store).
    pub fn await_end(self: &Arc<Self>, id: CallId) -> Option<EndWaiter> {
        let mut st = self.state();
        if st.end_waiters.contains_key(&id) {
            return None;
        }
        st.end_waiter_tag += 1;
        let tag = st.end_waiter_tag;
        let (tx, ended) = oneshot::channel();
        st.end_waiters.insert(id, (tag, tx));
        Some(EndWaiter {
            scheduler: Arc::clone(self),
            id,
            tag,
            ended,
        })
    }

    /// A user was added, changed or removed: their reservation may have
    /// changed, so `shares` are read again before the next turn.
    pub fn users_changed(&self) {
        self.state().users_generation += 1;
        self.wake.notify_one();
    }

    /// Reads the users' reservations again if a user changed since the last
    /// read (or, on a shared store, where other nodes change users too, if
    /// it is older than `SHARES_REFRESH`). Reservations that do not fit the
    /// host are cut (`Shares::new`) and the cut is logged once. If the
    /// users cannot be read, the last reservations stay in force.
    async fn refresh_shares(&self) {
        let generation = {
            let st = self.state();
            let fresh = st.shares_read.is_some_and(|(g, at)| {
                g == st.users_generation && (!self.store.shared() || at.elapsed() < SHARES_REFRESH)
            });
            if fresh {
                return;
            }
            st.users_generation
        };
        let users = match self.store.list_users().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "reading the users' reservations failed; the last ones stay");
                return;
            }
        };
        let s = &self.config.scheduler;
        let host_cap = s.host_max_running;
        let wants = users
            .iter()
            .map(|u| Want {
                user: u.name.clone(),
                admin: u.admin,
                reserved: u.reserved(s.admin_reserved, s.default_reserved),
            })
            .collect();
        let (shares, cuts) = Shares::new(wants, host_cap);
        let mut st = self.state();
        if !cuts.is_empty() && cuts != st.shares_cut {
            let cut: Vec<String> = cuts
                .iter()
                .map(|c| format!("{} {} of {}", c.user, c.granted, c.wanted))
                .collect();
            tracing::warn!(
                host_max_running = host_cap,
                cut = %cut.join(", "),
                "reserved slots add up to more than host_max_running - 1 leaves; \
                 admins are served first, then users by name (user update --reserved, or \
                 [scheduler] admin_reserved/default_reserved)"
            );
        }
        st.shares_cut = cuts;
        st.shares = shares;
        st.shares_read = Some((generation, Instant::now()));
    }

    /// A call of `owner` was queued.
    pub fn queued(&self, owner: &Name) {
        let mut st = self.state();
        if st.ready_set.insert(owner.clone()) {
            st.ready.push_back(owner.clone());
        }
        drop(st);
        self.changed();
        self.wake.notify_one();
    }

    pub fn engine_down(&self) -> bool {
        self.state().engine_down
    }

    pub fn running_total(&self) -> u32 {
        self.state().running_total
    }

    /// Warm containers ready for a call, per function (`owner/name`).
    pub fn pool_idle(&self) -> HashMap<String, usize> {
        let mut idle = HashMap::new();
        for (spec, _) in self.pool.idle_specs() {
            *idle.entry(spec.key()).or_default() += 1;
        }
        idle
    }

    /// Cancels a running call: its container is killed and it ends FAILED "cancelled".
    pub fn cancel(&self, id: &CallId) -> bool {
        match self.state().cancels.get(id) {
            Some((_, t)) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// For a shared store: cancels this node's running calls whose function
    /// another node removed (`func rm --force` there waits for them to end).
    /// A function cannot be created again while calls of its old self are
    /// live, so a missing record is the removal.
    async fn cancel_removed(&self) {
        let running: HashSet<FnKey> = self.state().functions.values().cloned().collect();
        for key in running {
            match self.store.get_function(&key).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    let ids: Vec<CallId> = {
                        let st = self.state();
                        st.functions
                            .iter()
                            .filter(|(_, k)| **k == key)
                            .map(|(id, _)| *id)
                            .collect()
                    };
                    tracing::debug!(function = %key, calls = ids.len(), "function removed elsewhere: cancelling its calls here");
                    for id in &ids {
                        self.cancel(id);
                    }
                }
                Err(e) => tracing::debug!(function = %key, error = %e, "reading a function failed"),
            }
        }
    }

    /// Drains the queues until `shutdown` fires. The sweep and the prune
    /// run on a task of their own (`upkeep`): a prune may wait up to 30 s on
    /// a removed function's calls, and no dispatch waits with it.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let images = tokio::spawn(Arc::clone(&self).images_loop(shutdown.clone()));
        let upkeep = tokio::spawn(Arc::clone(&self).upkeep());
        let webhooks = tokio::spawn(Arc::clone(&self.webhooks).run(shutdown.clone()));
        let ticks = tokio::spawn(Arc::clone(&self).ticks(shutdown.clone()));
        // A shared store: other nodes queue and end calls too. They say so
        // (best effort), and every REMOTE_POLL the queues are looked at anyway.
        // Handled by a task of their own, not between dispatch turns: a turn
        // may wait up to a second on the queue (another node took the
        // message), and a waiter for a call that node ran must not.
        let forward = self.store.remote_changes().map(|mut remote| {
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                while let Some(owner) = remote.recv().await {
                    this.queued(&owner);
                }
            })
        });
        let shared = self.store.shared();
        let mut poll = tokio::time::interval(REMOTE_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expire = tokio::time::interval(self.pool.expire_every());
        expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(e) = self.dispatch().await {
                tracing::error!(error = %e, "dispatch failed");
            }
            let retry = {
                let st = self.state();
                !st.recovered || st.engine_down
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(ENGINE_RETRY), if retry => {}
                _ = poll.tick(), if shared => {
                    match self.store.queued_owners().await {
                        Ok(owners) => owners.iter().for_each(|o| self.queued(o)),
                        Err(e) => tracing::debug!(error = %e, "listing queues failed"),
                    }
                    self.cancel_removed().await;
                }
                _ = expire.tick() => {
                    let removed = self.pool.expire();
                    if removed > 0 {
                        tracing::debug!(count = removed, "idle warm containers expired");
                    }
                }
            }
        }
        if let Some(task) = forward {
            task.abort();
        }
        images.abort();
        // A delivery cut short is sent again (at least once).
        webhooks.abort();
        // A purge under way is a store write on a blocking thread: it
        // finishes; a removal cut short here is the next start's prune's.
        upkeep.abort();
        // A tick being accepted is cut short: its key and call are stored
        // together or not at all, and the next start fires it if not.
        ticks.abort();
        self.stop_running().await;
        self.pool.close().await;
    }

    /// The sweep and the prune, each on its tick (and a prune as soon as
    /// recovery is done), off the dispatch loop. Both wait for recovery.
    async fn upkeep(self: Arc<Self>) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(prune_every());
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick() => self.sweep().await,
                _ = prune.tick() => self.prune().await,
                _ = self.prune_now.notified() => self.prune().await,
            }
        }
    }

    /// What a warm container of `f` is made of.
    fn warm_spec(&self, f: &Function) -> WarmSpec {
        WarmSpec {
            function: f.name.to_string(),
            owner: f.owner.to_string(),
            // The pinned digest: a pool container of another digest is
            // another spec, so it is never handed out for this one.
            image: f.run_image().to_string(),
            command: f.spec.command.clone(),
            env: call_env(&f.spec.env, &[]),
            memory_bytes: f
                .spec
                .memory_bytes
                .unwrap_or(self.config.container.memory_bytes),
            cpus: f.spec.cpus,
            runtime: self.runtime_of(f),
        }
    }

    /// The OCI runtime of `f`'s containers: its own, else `[container] runtime`.
    fn runtime_of(&self, f: &Function) -> Option<String> {
        f.spec
            .runtime_or(self.config.container.runtime.as_deref())
            .map(str::to_string)
    }

    /// `f` was created or changed: its warm containers are made afresh.
    /// Before recovery the pool waits: recovery removes every container
    /// and then fills the pools itself.
    pub fn function_changed(&self, f: &Function) {
        self.ticks_changed();
        self.pool.drop_function(&f.key().to_string());
        if self.state().recovered {
            self.pool.fill(&self.warm_spec(f));
        }
    }

    /// Fills the pool of every function that was called recently (after
    /// recovery none was, so it fills nothing; once the Engine is back, those
    /// in use get theirs again).
    async fn prefill(&self) -> Result<(), StoreError> {
        if self.pool.enabled() {
            for f in self.store.list_functions(None).await? {
                if self.pool.wanted(&f.key().to_string()) {
                    self.pool.fill(&self.warm_spec(&f));
                }
            }
        }
        Ok(())
    }

    /// Tops up the pool of `warm.function` if `warm` is still its spec.
    async fn refill(&self, warm: &WarmSpec) {
        let Ok(key) = FnKey::parse(&warm.key()) else {
            return;
        };
        if let Ok(Some(f)) = self.store.get_function(&key).await {
            if self.warm_spec(&f) == *warm {
                self.pool.fill(warm);
            }
        }
    }

    /// `key` was removed: its warm containers go with it.
    pub fn function_removed(&self, key: &FnKey) {
        self.ticks_changed();
        self.pool.drop_function(&key.to_string());
    }

    /// Ends a call FAILED with `message`.
    async fn fail(&self, id: &CallId, message: &str) -> Result<(), StoreError> {
        self.finish(id, Outcome::failed(message)).await?;
        Ok(())
    }

    /// Records how a call ended: every end of a call that ran or was
    /// dispatched goes through here, so this is where ends are counted.
    /// Once the end is durable (never before: a waiter answered from it
    /// must not learn of an end a crash could still undo), a waiter of the
    /// call gets it with the very bytes the store was given.
    async fn finish(&self, id: &CallId, outcome: Outcome) -> Result<Call, StoreError> {
        let stdout = outcome.stdout.clone();
        let call = self.store.finish(id, outcome).await?;
        crate::metrics::call_ended(&call);
        crate::logging::call_ended(&call);
        let waiter = self.state().end_waiters.remove(id);
        if let Some((_, tx)) = waiter {
            // The store keeps a FINISHED output unless it exceeds the whole
            // cache budget; that one (and any other end) the waiter reads
            // from the store, as before.
            let ended = match call.state {
                CallState::Finished
                    if stdout.len() as u64 <= self.config.limits.output_cache_bytes =>
                {
                    Some(Ended::Output(stdout))
                }
                CallState::Failed => Some(Ended::Failed(Box::new(call.clone()))),
                _ => None,
            };
            if let Some(ended) = ended {
                let _ = tx.send(ended);
            }
        }
        Ok(call)
    }
}

/// The container's environment: the request's CGI variables, then the
/// function's own. A request variable never shadows the function's, PATH or HOME.
pub fn call_env(
    function_env: &[crate::model::EnvVar],
    request_env: &[(String, String)],
) -> Vec<String> {
    let reserved: HashSet<&str> = function_env
        .iter()
        .map(|e| e.name.as_str())
        .chain(["PATH", "HOME"])
        .collect();
    request_env
        .iter()
        .filter(|(k, _)| !reserved.contains(k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .chain(
            function_env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value)),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EnvVar;

    #[test]
    fn function_env_wins_over_headers() {
        let fenv = vec![EnvVar::parse("HTTP_X_A=fn").unwrap()];
        let req = vec![
            ("HTTP_X_A".to_string(), "hdr".to_string()),
            ("HTTP_X_B".to_string(), "b".to_string()),
            ("PATH".to_string(), "/evil".to_string()),
        ];
        assert_eq!(call_env(&fenv, &req), vec!["HTTP_X_B=b", "HTTP_X_A=fn"]);
    }
}
