//! Shutdown of the dispatcher: running calls get their grace period, then
//! are killed and end FAILED with the reason. Queued calls stay queued; a
//! kill -9 instead leaves the containers to the next start's recovery.

use super::Scheduler;
use std::time::Duration;

/// How long shutdown waits for killed calls to be recorded.
const STOP_WAIT: Duration = Duration::from_secs(15);

impl Scheduler {
    /// On shutdown: lets running calls finish within the grace period, then
    /// kills the rest (they end FAILED with the reason), so a stopped daemon
    /// leaves no container on the Engine. A kill -9 instead leaves them to
    /// the next start's recovery.
    pub(super) async fn stop_running(&self) {
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
    pub(super) fn cancel_reason(&self) -> &'static str {
        if self.state().stopping {
            "cancelled: hyperfuncd was stopped"
        } else {
            "cancelled"
        }
    }
}
