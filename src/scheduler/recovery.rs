//! Reconciling the store with the Engine: recovery after a start, the
//! periodic sweep of leftover containers (and of out-of-date warm ones), the
//! pruning of ended calls, and the cancellation and purge of a removed
//! function's calls. Every decision is durable before a container that is
//! evidence for it is removed.

use super::Scheduler;
use crate::model::{CallId, FnKey};
use crate::store::StoreError;
use std::collections::HashSet;
use std::time::Duration;

impl Scheduler {
    /// Removes warm containers that are out of date: their function was
    /// removed or changed since (a call that ended meanwhile may have
    /// refilled it), or their image tag now names another image.
    async fn prune_pool(&self) {
        let mut stale = Vec::new();
        for (spec, image_id) in self.pool.idle_specs() {
            let current = match FnKey::parse(&spec.key()) {
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

    /// Reconciles the store with the Engine after a start. A RUNNING call
    /// whose container exists ran, at least partly, and ends FAILED; one
    /// without a container never reached the Engine (its RUNNING state was
    /// durable before any create) and is queued again. Every decision is
    /// durable before any container is removed, so a crash during recovery
    /// leaves the evidence for the next one.
    pub(super) async fn recover(&self) -> Result<(), StoreError> {
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
    pub(super) async fn prune(&self) {
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
                    crate::hold_point!("prune-function");
                    // The list may be stale: the removal was finished and
                    // the name re-created meanwhile. A re-created function's
                    // calls are not the removed one's to cancel.
                    match self.store.get_function(&name).await {
                        Ok(None) => {}
                        Ok(Some(_)) => {
                            tracing::debug!(function = %name, "re-created meanwhile; nothing to purge");
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(function = %name, error = %e, "purge deferred");
                            continue;
                        }
                    }
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
    pub async fn remove_function_calls(&self, name: &FnKey) -> Result<(), StoreError> {
        const REMOVED: &str = "cancelled: the function was removed";
        let mut changes = self.subscribe();
        // The deadline bounds a wait without progress, not the cancelling
        // itself (100k queued calls take a while).
        let mut remaining = usize::MAX;
        let mut deadline = tokio::time::Instant::now();
        loop {
            changes.borrow_and_update();
            let cancelled = self.store.cancel_removed(name, REMOVED).await?;
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
            // Read after the live calls: if the name was re-created after
            // this look, every call above is still the removed function's
            // (a new one's calls need its record first).
            if self.store.get_function(name).await?.is_some() {
                return Err(recreated(name));
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
        crate::hold_point!("rm-before-purge");
        self.store.purge_function(name).await?;
        self.pool.drop_function(&name.to_string());
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

    /// Removes this instance's containers that belong to no running call.
    /// Never before recovery: recovery reads the leftovers as evidence.
    pub(super) async fn sweep(&self) {
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
}

/// A removal's cancelling found the name taken by a new function: the
/// removed one's calls were purged meanwhile, and the new one's are not
/// touched.
fn recreated(name: &FnKey) -> StoreError {
    StoreError::Conflict(format!(
        "function {name} was created again meanwhile: its calls are not cancelled"
    ))
}
