//! The dispatch loop: owners served within their quota and the host cap as
//! shared by the reserved slots (`share.rs`: the owner holding fewest
//! first, round-robin among equals), an owner's calls taken in FIFO order
//! with their containers created in that order (`start_chain`), each call
//! run cold or warm, and its outcome made durable before its container is
//! removed.

use super::{call_env, Scheduler};
use crate::model::{Call, CallId, FnKey, Name, Outcome};
use crate::runtime::{RunSpec, RuntimeError, Warm, WarmSpec};
use crate::store::{Started, StoreError};
use futures_util::future::FutureExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

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
                st.functions.remove(&self.id);
            }
        }
        self.scheduler.changed();
        self.scheduler.wake.notify_one();
    }
}

impl Scheduler {
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
            Err(e @ StoreError::Unavailable(_)) => {
                // Its payload cannot be read now (after the store's own
                // retries); it is not lost and stays at the head: look
                // again soon, even if nothing else wakes the dispatcher.
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    this.wake.notify_one();
                });
                return Err(e);
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
            let previous = st
                .start_chain
                .insert(owner.clone(), (call.seq, started_rx.shared()));
            *st.running.entry(owner.clone()).or_default() += 1;
            st.running_total += 1;
            st.generation += 1;
            let generation = st.generation;
            st.cancels.insert(id, (generation, token.clone()));
            st.functions
                .insert(id, FnKey::new(call.owner.clone(), call.function.clone()));
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
            if let Some((seq, previous)) = previous {
                // A call handed out again (a redelivery, a requeue) may come
                // after later ones; on a shared store `await_turn` orders
                // it, and waiting here for a later call would be a cycle.
                if !(this.store.shared() && seq > call.seq) {
                    // Err only means that call ended before starting: fine.
                    let _ = previous.await;
                }
            }
            let started_tx = if this.store.shared() {
                this.take_turn(&call, &token).await;
                this.tell_created(call.id, started_tx)
            } else {
                started_tx
            };
            if let Err(e) = this.execute(call, payload, token, started_tx).await {
                tracing::error!(call = %id, error = %e, "call bookkeeping failed");
            }
        });
        Ok(Turn::Started)
    }

    /// On a shared store: waits until the owner's earlier calls on other
    /// nodes have their containers (`Store::await_turn`), or the call is
    /// cancelled meanwhile (`execute` then fails it, or requeues it when
    /// the daemon is stopping).
    async fn take_turn(&self, call: &Call, token: &CancellationToken) {
        tokio::select! {
            waited = self.store.await_turn(call) => {
                if let Err(e) = waited {
                    // Order is lost for this call only; the call still runs.
                    tracing::warn!(call = %call.id, error = %e, "could not wait for the owner's earlier calls");
                }
            }
            _ = token.cancelled() => {}
        }
    }

    /// A sender for the runtime's "container made" signal that passes it on
    /// to this node's next call of the owner (`start_chain`) and then to the
    /// other nodes (`Store::created`).
    fn tell_created(&self, id: CallId, started: oneshot::Sender<()>) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            // Err: the call ended without a container; dropping `started`
            // lets the next call go all the same.
            if rx.await.is_ok() {
                let _ = started.send(());
                store.created(&id).await;
            }
        });
        tx
    }

    /// Starts as many queued calls as the quotas allow.
    pub(super) async fn dispatch(self: &Arc<Self>) -> Result<(), StoreError> {
        if !self.state().recovered {
            self.recover().await?;
            if !self.state().recovered {
                return Ok(());
            }
            // On the upkeep task, not here: a prune may wait on calls.
            self.prune_now.notify_one();
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
        self.refresh_shares().await;
        let host_cap = self.config.scheduler.host_max_running;
        // Each turn gives one owner one slot, then moves on: whoever holds
        // fewest first, round-robin among equals (`Shares::pick`). Owners at
        // their quota sit out the rest of this pass; a call that ends wakes
        // the next one.
        let mut at_quota: HashSet<Name> = HashSet::new();
        loop {
            let owner = {
                let mut st = self.state();
                if st.engine_down {
                    break;
                }
                let picked = st.shares.pick(
                    &st.ready,
                    &at_quota,
                    &st.running,
                    st.running_total,
                    host_cap,
                );
                match picked.and_then(|i| st.ready.remove(i)) {
                    Some(o) => o,
                    None => break,
                }
            };
            match self.dispatch_one(&owner).await {
                Ok(Turn::Started) => {}
                Ok(Turn::Stale) => {
                    self.state().ready.push_front(owner);
                }
                Ok(Turn::AtQuota) => {
                    at_quota.insert(owner.clone());
                    self.state().ready.push_back(owner);
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
        let function = match self.store.get_function(&call.fn_key()).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                return self
                    .fail(&call.id, "cancelled: the function was removed")
                    .await
            }
            // Nothing ran yet: back to the queue rather than RUNNING forever
            // (a requeue that fails too stops the node into recovery).
            Err(e) => {
                tracing::warn!(call = %call.id, error = %e, "the call's function could not be read; requeued");
                return self.store.requeue(&call.id).await;
            }
        };
        if token.is_cancelled() {
            if self.state().stopping {
                // Stopped before its container was made (it was waiting
                // for the owner's earlier calls): it never ran, so it goes
                // back to its place in the queue, as after a crash.
                tracing::info!(call = %call.id, "stopping: requeued before its container was made");
                return self.store.requeue(&call.id).await;
            }
            return self.fail(&call.id, self.cancel_reason()).await;
        }
        let warm = self.warm_spec(&function);
        let spec = RunSpec {
            call_id: call.id,
            function: function.name.to_string(),
            owner: function.owner.to_string(),
            image: warm.image.clone(),
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
        self.pool.record_call(&warm.key());
        let claimed = self.pool.take(&warm);
        if self.pool.enabled() {
            crate::metrics::pool_take(&warm.owner, &warm.function, claimed.is_some());
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
            // A cold call makes its container from the pinned image,
            // pulled again first if it is gone.
            None => match self.ensure_pinned(&function).await {
                Ok(()) => self.runtime.run(spec, token).await,
                Err(e) => Err(e),
            },
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
            crate::metrics::engine_error(e.engine_fault());
        }
        match result {
            Ok(mut ran) => {
                ran.outcome.image_digest = Some(warm.image.clone());
                if ran.outcome.message.as_deref() == Some("cancelled") {
                    ran.outcome.message = Some(self.cancel_reason().into());
                }
                tracing::debug!(call = %call.id, state = ?ran.outcome.state, "ended");
                // Durable before the container goes: if this fails, the call
                // stays RUNNING on disk and its container is the evidence
                // that makes the next recovery fail it, never re-run it.
                self.settle(&call.id, ran.outcome).await?;
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
            Err(e) => {
                let mut failed = Outcome::failed(e.to_string());
                failed.image_digest = Some(warm.image.clone());
                self.settle(&call.id, failed).await?;
                // The function was called: it gets its pool all the same.
                self.refill(warm).await;
            }
        }
        Ok(())
    }

    /// Stores how a call ended, trying again with back-off while the store
    /// refuses for a reason that may pass (`SETTLE_RETRIES`); if that end
    /// still cannot be stored, the call ends FAILED saying why. So a call
    /// never stays RUNNING while the daemon runs on: the error returned
    /// means the store failed for good (the daemon stops, and the restart's
    /// recovery settles the call, its container kept as evidence) or the
    /// call has ended some other way meanwhile.
    async fn settle(&self, id: &CallId, outcome: Outcome) -> Result<(), StoreError> {
        let mut pauses = SETTLE_RETRIES.iter();
        let why = loop {
            match self.finish(id, outcome.clone()).await {
                Ok(_) => return Ok(()),
                Err(
                    e @ (StoreError::Unsure(_)
                    | StoreError::Transition(_)
                    | StoreError::NotFound(_)),
                ) => return Err(e),
                Err(e) => match pauses.next() {
                    Some(p) => {
                        tracing::warn!(call = %id, error = %e, "storing the call's end failed; trying again");
                        tokio::time::sleep(*p).await;
                    }
                    None => break e,
                },
            }
        };
        tracing::error!(call = %id, error = %why, "the call's end cannot be stored; it ends FAILED");
        self.fail(
            id,
            &format!("hyperfuncd could not store how the call ended: {why}"),
        )
        .await
    }
}

/// Pauses before each new try of storing a call's end.
const SETTLE_RETRIES: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(5),
];
