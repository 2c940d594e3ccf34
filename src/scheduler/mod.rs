//! Drains the per-user FIFO queues into containers: at most `max_concurrency`
//! running calls per user, at most `host_max_running` on the host, users
//! served round-robin so one user's backlog never delays another's calls.
//! Also recovery after a crash, Engine outages, timeouts and cancellation.
//!
//! It never runs a call whose RUNNING state is not yet on disk, so a crash can
//! never make a call run twice.

mod pool;

use crate::config::Config;
use crate::model::{Call, CallId, Function, Name, Outcome};
use crate::runtime::{RunSpec, Runtime, RuntimeError, Warm, WarmSpec};
use crate::store::{Started, Store, StoreError};
use futures_util::future::{FutureExt, Shared};
use pool::Pool;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

type StartSignal = Shared<oneshot::Receiver<()>>;

/// How often the dispatcher looks again while the Engine is down.
const ENGINE_RETRY: Duration = Duration::from_secs(1);
/// How often containers that belong to no running call are swept away (an
/// Engine restart can leave the containers of calls it killed).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How long shutdown waits for killed calls to be recorded.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// How often ended calls past `limits.call_retention` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

pub struct Scheduler {
    store: Arc<dyn Store>,
    runtime: Arc<Runtime>,
    config: Arc<Config>,
    /// Wakes the dispatcher: a call was queued or a slot freed.
    wake: Notify,
    /// Bumped after every call state change; waiters re-read the store.
    changes: watch::Sender<u64>,
    state: Mutex<DispatchState>,
    pool: Arc<Pool>,
}

/// What one owner's turn in the dispatcher did.
enum Turn {
    Started,
    /// The head was a call cancelled meanwhile; it was dropped from the queue.
    Stale,
    AtQuota,
    Empty,
}

/// A running call's claim on its owner's quota and the host cap; released on
/// drop, so a panicking call task cannot leak a slot.
struct Slot {
    scheduler: Arc<Scheduler>,
    owner: Name,
    id: CallId,
    generation: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut st = self.scheduler.state();
            if let Some(n) = st.running.get_mut(&self.owner) {
                *n = n.saturating_sub(1);
            }
            st.running_total = st.running_total.saturating_sub(1);
            if st
                .cancels
                .get(&self.id)
                .is_some_and(|(g, _)| *g == self.generation)
            {
                st.cancels.remove(&self.id);
            }
        }
        self.scheduler.changed();
        self.scheduler.wake.notify_one();
    }
}

#[derive(Default)]
struct DispatchState {
    /// Owners that may have queued calls, in round-robin order.
    ready: VecDeque<Name>,
    ready_set: HashSet<Name>,
    running: HashMap<Name, u32>,
    running_total: u32,
    /// One token per running call, to cancel it.
    cancels: HashMap<CallId, (u64, CancellationToken)>,
    /// Tells apart two runs of one call (requeued after an Engine refusal).
    generation: u64,
    /// Per owner: resolves once the owner's latest dispatched call has its
    /// container (created, or a warm one framed). The next call waits for
    /// it, so an owner's containers are created in FIFO order even when
    /// dispatched together, while their starts overlap.
    start_chain: HashMap<Name, StartSignal>,
    /// Recovery done: the queue may be drained.
    recovered: bool,
    /// The Engine refused the last attempt; retry after a ping succeeds.
    engine_down: bool,
    /// Shutting down: cancelled calls were cancelled by the stop.
    stopping: bool,
}

impl Scheduler {
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<Runtime>,
        config: Arc<Config>,
    ) -> Arc<Scheduler> {
        let pool = Pool::new(Arc::clone(&runtime), config.pool.clone());
        Arc::new(Scheduler {
            store,
            runtime,
            config,
            pool,
            wake: Notify::new(),
            changes: watch::channel(0).0,
            state: Mutex::new(DispatchState::default()),
        })
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

    /// Warm containers ready for a call, per function name.
    pub fn pool_idle(&self) -> HashMap<String, usize> {
        let mut idle = HashMap::new();
        for (spec, _) in self.pool.idle_specs() {
            *idle.entry(spec.function).or_default() += 1;
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

    /// Drains the queues until `shutdown` fires.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = sweep.tick() => self.sweep().await,
                _ = prune.tick() => self.prune().await,
            }
        }
        self.stop_running().await;
        self.pool.close().await;
    }

    /// On shutdown: lets running calls finish within the grace period, then
    /// kills the rest (they end FAILED with the reason), so a stopped daemon
    /// leaves no container on the Engine. A kill -9 instead leaves them to
    /// the next start's recovery.
    async fn stop_running(&self) {
        let grace = Duration::from_secs(self.config.scheduler.shutdown_grace_secs);
        let mut changes = self.subscribe();
        let mut deadline = tokio::time::Instant::now() + grace;
        let mut killed = false;
        loop {
            changes.borrow_and_update();
            let running = self.running_total();
            if running == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_ok()
            {
                continue;
            }
            if killed {
                tracing::warn!(
                    running,
                    "calls still running at exit; the next start reconciles them"
                );
                return;
            }
            tracing::info!(running, "stopping: killing the calls still running");
            killed = true;
            let mut st = self.state();
            st.stopping = true;
            for (_, token) in st.cancels.values() {
                token.cancel();
            }
            drop(st);
            deadline = tokio::time::Instant::now() + STOP_WAIT;
        }
    }

    /// Why a cancelled call was cancelled.
    fn cancel_reason(&self) -> &'static str {
        if self.state().stopping {
            "cancelled: hyperfuncd was stopped"
        } else {
            "cancelled"
        }
    }

    /// What a warm container of `f` is made of.
    fn warm_spec(&self, f: &Function) -> WarmSpec {
        WarmSpec {
            function: f.name.to_string(),
            image: f.spec.image.clone(),
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
        self.pool.drop_function(f.name.as_str());
        if self.state().recovered {
            self.pool.fill(&self.warm_spec(f));
        }
    }

    /// Fills the pool of every function (after recovery, or once the Engine
    /// is back).
    async fn prefill(&self) -> Result<(), StoreError> {
        if self.pool.enabled() {
            for f in self.store.list_functions(None).await? {
                self.pool.fill(&self.warm_spec(&f));
            }
        }
        Ok(())
    }

    /// Tops up the pool of `warm.function` if `warm` is still its spec.
    async fn refill(&self, warm: &WarmSpec) {
        let Ok(name) = Name::parse(&warm.function) else {
            return;
        };
        if let Ok(Some(f)) = self.store.get_function(&name).await {
            if self.warm_spec(&f) == *warm {
                self.pool.fill(warm);
            }
        }
    }

    /// Removes warm containers that are out of date: their function was
    /// removed or changed since (a call that ended meanwhile may have
    /// refilled it), or their image tag now names another image.
    async fn prune_pool(&self) {
        let mut stale = Vec::new();
        for (spec, image_id) in self.pool.idle_specs() {
            let current = match Name::parse(&spec.function) {
                Ok(n) => match self.store.get_function(&n).await {
                    Ok(f) => f.map(|f| self.warm_spec(&f)),
                    // Unknown: keep them for now.
                    Err(_) => continue,
                },
                Err(_) => None,
            };
            let outdated = current.as_ref() != Some(&spec)
                || match self.runtime.image_id(&spec.image).await {
                    Ok(id) => id.as_deref() != Some(image_id.as_str()),
                    Err(_) => false,
                };
            if outdated {
                stale.push((spec, image_id));
            }
        }
        if !stale.is_empty() {
            self.pool
                .prune(|s, i| stale.iter().any(|(ss, ii)| ss == s && ii == i));
        }
    }

    /// `name` was removed: its warm containers go with it.
    pub fn function_removed(&self, name: &Name) {
        self.pool.drop_function(name.as_str());
    }

    /// Reconciles the store with the Engine after a start. A RUNNING call
    /// whose container exists ran, at least partly, and ends FAILED; one
    /// without a container never reached the Engine (its RUNNING state was
    /// durable before any create) and is queued again. Every decision is
    /// durable before any container is removed, so a crash during recovery
    /// leaves the evidence for the next one.
    async fn recover(&self) -> Result<(), StoreError> {
        let containers = match self.runtime.containers().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "recovery waits for the Docker Engine");
                return Ok(());
            }
        };
        let ran: HashSet<&str> = containers.iter().map(|c| c.call.as_str()).collect();
        for call in self.store.running_calls().await? {
            let had_container = ran.contains(call.id.to_string().as_str());
            tracing::debug!(call = %call.id, had_container, "recovering a RUNNING call");
            if had_container {
                self.fail(
                    &call.id,
                    "hyperfuncd stopped while the call was running; its output could not be recovered",
                )
                .await?;
            } else {
                self.store.requeue(&call.id).await?;
            }
        }
        for c in &containers {
            self.runtime.remove(&c.id).await;
        }
        let owners = self.store.queued_owners().await?;
        {
            let mut st = self.state();
            for o in owners {
                if st.ready_set.insert(o.clone()) {
                    st.ready.push_back(o);
                }
            }
            st.recovered = true;
        }
        let queued = self.store.queue_len().await?;
        tracing::info!(queued, removed = containers.len(), "recovery done");
        self.prefill().await
    }

    /// Deletes ended calls past their retention, and finishes removals of
    /// functions that a crash interrupted.
    async fn prune(&self) {
        if !self.state().recovered {
            return;
        }
        let retention = self.config.limits.call_retention.as_millis() as u64;
        let before = crate::model::now_ms().saturating_sub(retention);
        match self.store.prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "pruned ended calls past their retention"),
            Err(e) => tracing::error!(error = %e, "pruning ended calls failed"),
        }
        match self.store.unpurged_functions().await {
            Ok(names) => {
                for name in names {
                    if let Err(e) = self.remove_function_calls(&name).await {
                        tracing::debug!(function = %name, error = %e, "purge deferred");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "listing removed functions failed"),
        }
    }

    /// Ends the calls of a function whose record is removed: queued ones
    /// FAILED "cancelled", running ones killed through their token (they
    /// end FAILED once their container is dead), then, once none is live,
    /// its calls, outputs and events are deleted. The one cancellation path
    /// of `func rm --force`, and of a removal a crash interrupted.
    pub async fn remove_function_calls(&self, name: &Name) -> Result<(), StoreError> {
        const REMOVED: &str = "cancelled: the function was removed";
        let mut changes = self.subscribe();
        // The deadline bounds a wait without progress, not the cancelling
        // itself (100k queued calls take a while).
        let mut remaining = usize::MAX;
        let mut deadline = tokio::time::Instant::now();
        loop {
            changes.borrow_and_update();
            let cancelled = self.store.cancel_queued(name, REMOVED).await?;
            if cancelled > 0 {
                crate::metrics::calls_cancelled(name, cancelled);
                crate::logging::calls_cancelled(name, cancelled);
                // Wake output waiters of the failed calls.
                self.changed();
            }
            crate::crash_point!("rm-cancelled");
            let live = self.store.live_calls(name).await?;
            if live.is_empty() {
                break;
            }
            for call in &live {
                self.cancel(&call.id);
            }
            if live.len() < remaining {
                remaining = live.len();
                deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(StoreError::Conflict(format!(
                    "function {name} still has running calls that did not stop in time; its records are removed once they have"
                )));
            }
        }
        self.store.purge_function(name).await?;
        self.pool.drop_function(name.as_str());
        self.changed();
        Ok(())
    }

    /// A call the store still says is RUNNING although no task runs it (its
    /// outcome could not be written): its container is the evidence the next
    /// recovery needs to fail it rather than run it again.
    async fn is_running_on_disk(&self, call: &str) -> bool {
        let Ok(id) = CallId::parse(call) else {
            return false;
        };
        self.store
            .get_call(&id)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| c.state == crate::model::CallState::Running)
    }

    /// Ends a call FAILED with `message`.
    async fn fail(&self, id: &CallId, message: &str) -> Result<(), StoreError> {
        self.finish(id, Outcome::failed(message)).await?;
        Ok(())
    }

    /// Records how a call ended: every end of a call that ran or was
    /// dispatched goes through here, so this is where ends are counted.
    async fn finish(&self, id: &CallId, outcome: Outcome) -> Result<Call, StoreError> {
        let call = self.store.finish(id, outcome).await?;
        crate::metrics::call_ended(&call);
        crate::logging::call_ended(&call);
        Ok(call)
    }

    /// Removes this instance's containers that belong to no running call.
    /// Never before recovery: recovery reads the leftovers as evidence.
    async fn sweep(&self) {
        if !self.state().recovered {
            return;
        }
        self.prune_pool().await;
        let containers = match self.runtime.containers().await {
            Ok(c) => c,
            Err(e) => return tracing::debug!(error = %e, "sweep skipped"),
        };
        // Read after listing: a call enters `cancels` before its container is
        // created and leaves it after its container is removed, so a listed
        // container of a live call is always kept.
        let keep: HashSet<String> = self.state().cancels.keys().map(|c| c.to_string()).collect();
        let mut removed = 0;
        for c in containers {
            let warm = c.call.is_empty() && self.pool.owns(&c.name);
            if warm || keep.contains(&c.call) || self.is_running_on_disk(&c.call).await {
                continue;
            }
            self.runtime.remove(&c.id).await;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(count = removed, "removed leftover containers");
        }
    }

    /// Gives `owner` one turn: starts its oldest queued call if its quota allows.
    async fn dispatch_one(self: &Arc<Self>, owner: &Name) -> Result<Turn, StoreError> {
        let quota = self
            .store
            .get_user(owner)
            .await?
            .map_or(self.config.scheduler.default_max_concurrency, |u| {
                u.max_concurrency
            });
        if self.state().running.get(owner).copied().unwrap_or(0) >= quota {
            return Ok(Turn::AtQuota);
        }
        let Some(id) = self.store.queue_head(owner).await? else {
            return Ok(Turn::Empty);
        };
        // RUNNING is durable once `start` returns: only then may a container
        // exist (see module doc).
        let (call, payload) = match self.store.start(&id).await {
            Ok(Started::Running(call, payload)) => (*call, payload),
            // Cancelled meanwhile, or failed (function removed, payload
            // lost): its queue entry is gone; the next head is up.
            Ok(Started::Skipped) => {
                self.changed();
                return Ok(Turn::Stale);
            }
            Err(StoreError::NotFound(_)) => {
                self.store.discard_queued(owner, &id).await?;
                return Ok(Turn::Stale);
            }
            Err(e) => return Err(e),
        };
        crate::crash_point!("start-durable");
        tracing::debug!(call = %id, owner = %owner, "dispatched");
        crate::metrics::call_started(&call);
        let token = CancellationToken::new();
        let (started_tx, started_rx) = oneshot::channel();
        let (previous, generation) = {
            let mut st = self.state();
            let previous = st.start_chain.insert(owner.clone(), started_rx.shared());
            *st.running.entry(owner.clone()).or_default() += 1;
            st.running_total += 1;
            st.generation += 1;
            let generation = st.generation;
            st.cancels.insert(id, (generation, token.clone()));
            st.ready.push_back(owner.clone());
            (previous, generation)
        };
        self.changed();
        let this = Arc::clone(self);
        tokio::spawn(async move {
            // Undoes the bookkeeping even if the call's task panics.
            let _slot = Slot {
                scheduler: Arc::clone(&this),
                owner: call.owner.clone(),
                id,
                generation,
            };
            if let Some(previous) = previous {
                // Err only means that call ended before starting: fine.
                let _ = previous.await;
            }
            if let Err(e) = this.execute(call, payload, token, started_tx).await {
                tracing::error!(call = %id, error = %e, "call bookkeeping failed");
            }
        });
        Ok(Turn::Started)
    }

    /// Starts as many queued calls as the quotas allow.
    async fn dispatch(self: &Arc<Self>) -> Result<(), StoreError> {
        if !self.state().recovered {
            self.recover().await?;
            if !self.state().recovered {
                return Ok(());
            }
            self.prune().await;
        }
        if self.state().engine_down {
            if self.runtime.ping().await.is_err() {
                return Ok(());
            }
            tracing::info!("Docker Engine is back; draining the queue");
            self.state().engine_down = false;
            self.sweep().await;
            self.prefill().await?;
        }
        let host_cap = self.config.scheduler.host_max_running;
        // Each turn gives one owner one slot, then moves on: round-robin.
        let mut idle_turns = 0;
        loop {
            let owner = {
                let mut st = self.state();
                if st.running_total >= host_cap || st.engine_down || idle_turns >= st.ready.len() {
                    break;
                }
                match st.ready.pop_front() {
                    Some(o) => o,
                    None => break,
                }
            };
            match self.dispatch_one(&owner).await {
                Ok(Turn::Started) => idle_turns = 0,
                Ok(Turn::Stale) => {
                    self.state().ready.push_front(owner);
                    idle_turns = 0;
                }
                Ok(Turn::AtQuota) => {
                    self.state().ready.push_back(owner);
                    idle_turns += 1;
                }
                Ok(Turn::Empty) => {
                    // Leave the ready set, then look once more: a call
                    // accepted in between found the owner still in the set
                    // and did not re-add it.
                    self.state().ready_set.remove(&owner);
                    if self.store.queue_head(&owner).await?.is_some() {
                        self.queued(&owner);
                    }
                }
                Err(e) => {
                    // Keep the owner's turn: its other calls must not be stranded.
                    self.state().ready.push_back(owner);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn execute(
        &self,
        call: Call,
        payload: bytes::Bytes,
        token: CancellationToken,
        started: oneshot::Sender<()>,
    ) -> Result<(), StoreError> {
        let limits = &self.config.limits;
        let Some(function) = self.store.get_function(&call.function).await? else {
            return self
                .fail(&call.id, "cancelled: the function was removed")
                .await;
        };
        if token.is_cancelled() {
            return self.fail(&call.id, self.cancel_reason()).await;
        }
        let warm = self.warm_spec(&function);
        let spec = RunSpec {
            call_id: call.id,
            function: function.name.to_string(),
            image: function.spec.image.clone(),
            command: function.spec.command.clone(),
            env: call_env(&function.spec.env, &call.request_env),
            memory_bytes: function
                .spec
                .memory_bytes
                .unwrap_or(self.config.container.memory_bytes),
            cpus: function.spec.cpus,
            runtime: warm.runtime.clone(),
            timeout: function.spec.timeout_ms.map(Duration::from_millis),
            stdin: payload,
            max_stdout: limits.max_stdout_bytes,
            max_stderr: limits.max_stderr_bytes,
            started: Some(started),
        };
        let claimed = self.pool.take(&warm);
        if self.pool.enabled() {
            crate::metrics::pool_take(&warm.function, claimed.is_some());
        }
        let result = match &claimed {
            Some(c) => {
                // The container has the function's env; the frame adds the request's.
                let frame_env: Vec<String> = spec
                    .env
                    .iter()
                    .filter(|e| !warm.env.contains(e))
                    .cloned()
                    .collect();
                match self
                    .runtime
                    .run_warm(&c.id, spec, &frame_env, token.clone())
                    .await
                {
                    Ok(Warm::Ran(ran)) => Ok(ran),
                    Ok(Warm::Unusable(spec)) => self.runtime.run(*spec, token).await,
                    Err(e) => Err(e),
                }
            }
            None => self.runtime.run(spec, token).await,
        };
        let ended = self.conclude(&call, &warm, result).await;
        // Only now, with its container removed, may the sweep forget it.
        if let Some(c) = claimed {
            self.pool.release(&c.name);
        }
        ended
    }

    /// Stores how a call ended, then removes its container.
    async fn conclude(
        &self,
        call: &Call,
        warm: &WarmSpec,
        result: Result<crate::runtime::Ran, RuntimeError>,
    ) -> Result<(), StoreError> {
        if let Err(e) = &result {
            crate::metrics::engine_error(e);
        }
        match result {
            Ok(mut ran) => {
                if ran.outcome.message.as_deref() == Some("cancelled") {
                    ran.outcome.message = Some(self.cancel_reason().into());
                }
                tracing::debug!(call = %call.id, state = ?ran.outcome.state, "ended");
                // Durable before the container goes: if this fails, the call
                // stays RUNNING on disk and its container is the evidence
                // that makes the next recovery fail it, never re-run it.
                self.finish(&call.id, ran.outcome).await?;
                crate::crash_point!("finish-durable");
                if let Some(c) = ran.container {
                    self.runtime.remove(&c).await;
                }
                // After the call, so making its successor does not slow it;
                // not for a function removed or changed meanwhile.
                self.refill(warm).await;
            }
            Err(RuntimeError::Unavailable { message, .. }) => {
                tracing::warn!(call = %call.id, error = %message, "Docker Engine unreachable; call requeued");
                self.state().engine_down = true;
                self.pool.forget_all();
                self.store.requeue(&call.id).await?;
                let mut st = self.state();
                if st.ready_set.insert(call.owner.clone()) {
                    st.ready.push_front(call.owner.clone());
                }
            }
            Err(e) => self.fail(&call.id, &e.to_string()).await?,
        }
        Ok(())
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
