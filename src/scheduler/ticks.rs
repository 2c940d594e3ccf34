//! The schedules' clock: a task that wakes at each scheduled function's
//! next tick (and at least every `TICKS_REFRESH`, to see functions other
//! nodes changed) and makes the tick's call through a `TickSink` (the
//! service's accept path: queued under the owner's budget like any call).
//!
//! Exactly one call per tick, on any number of nodes and across crashes:
//! each tick is accepted under its own idempotency key
//! (`IdempotencyKey::tick`), which the store records in the same durable
//! write as the call. A tick whose key is there already fired (on this
//! node before a crash, or on another node) and makes nothing. Which tick
//! is due is `Schedule::due` (the catch-up policy: only the latest, within
//! the keys' retention); this task never decides that a tick fired by
//! itself, it only forgets a tick the store said is done.
//!
//! It must never make a call but through the sink, nor hold anything a
//! restart needs: what it keeps is a cache of the store's functions.

use super::Scheduler;
use crate::model::{catch_up_window, now_ms, CallId, FnKey, Function, Schedule, Timetable};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The longest the ticker sleeps: how soon it sees a function another
/// node created, changed or removed, and how often it tries a refused
/// tick again.
const TICKS_REFRESH: Duration = Duration::from_secs(2);
/// Ticks accepted at once (one per function), so a slow store answer for
/// one function does not hold back the others' ticks.
const FIRES_AT_ONCE: usize = 16;

/// How a tick's call is made: implemented by the service (which the
/// scheduler cannot name), so a tick goes through the same accept as an
/// HTTP call.
#[async_trait::async_trait]
pub trait TickSink: Send + Sync {
    /// Accepts `f`'s call for `tick_ms` (ms since the epoch) under the
    /// tick's idempotency key.
    async fn fire(&self, f: &Function, tick_ms: u64) -> Fired;
}

/// What became of a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fired {
    /// Its call is accepted, durable.
    New(CallId),
    /// Its key was there: the tick had fired already.
    Already,
    /// Refused (a full queue, the owner's budget, a full disk, the store
    /// away): tried again at the next wake until a newer tick replaces it.
    Refused(String),
    /// The function (or its schedule) is gone.
    Gone,
}

/// One scheduled function as the ticker knows it.
struct Entry {
    function: Function,
    table: Timetable,
    /// A due tick not yet settled (fired, found fired, or superseded).
    pending: Option<u64>,
    /// The first tick after the last look; `None` if the pattern ran out.
    next: Option<u64>,
    /// The tick whose refusal was last logged, so a tick tried again and
    /// again is logged once.
    refused: Option<u64>,
}

impl Entry {
    fn new(function: Function, table: Timetable, now: u64, window: u64) -> Entry {
        let mut e = Entry {
            function,
            table,
            pending: None,
            next: None,
            refused: None,
        };
        e.look(now, window);
        e
    }

    fn schedule(&self) -> Option<&Schedule> {
        self.function.schedule.as_ref()
    }

    /// Takes the tick due at `now` (the latest, per `Schedule::due`) as
    /// the pending one, and the next tick after `now`.
    fn look(&mut self, now: u64, window: u64) {
        if let Some(s) = &self.function.schedule {
            if let Some(t) = s.due(&self.table, now, window) {
                if self.pending.is_none_or(|p| t > p) {
                    self.pending = Some(t);
                }
            }
        }
        // A pending tick past the window is never fired: its key may be
        // gone, so firing it could fire it twice.
        if self
            .pending
            .is_some_and(|p| now.saturating_sub(p) >= window)
        {
            self.pending = None;
        }
        self.next = self.table.next_after(now);
    }
}

impl Scheduler {
    /// Hands the ticker the way to make a tick's call (the service). Held
    /// weakly: the service holds the scheduler.
    pub fn set_tick_sink(&self, sink: Weak<dyn TickSink>) {
        let _ = self.tick_sink.set(sink);
    }

    /// The ticker: until `shutdown`, fires each scheduled function's due
    /// tick (see the module comment).
    pub(super) async fn ticks(self: Arc<Self>, shutdown: CancellationToken) {
        let window = catch_up_window(self.config.limits.call_retention);
        let mut entries: HashMap<FnKey, Entry> = HashMap::new();
        let mut listed: Option<Instant> = None;
        let mut relisted = false;
        loop {
            let stale = listed.is_none_or(|at| at.elapsed() >= TICKS_REFRESH);
            if stale {
                match self.store.list_functions(None).await {
                    Ok(all) => {
                        reconcile(&mut entries, all, now_ms(), window);
                        listed = Some(Instant::now());
                    }
                    Err(e) => tracing::debug!(error = %e, "listing the scheduled functions failed"),
                }
            }
            if self.fire_due(&mut entries, window).await {
                // A schedule changed elsewhere since the listing: list
                // again at once (once: a store that keeps disagreeing
                // with itself waits for the next turn).
                listed = None;
                if !relisted {
                    relisted = true;
                    continue;
                }
            }
            relisted = false;
            let now = now_ms();
            let until_next = entries
                .values()
                .filter_map(|e| e.next)
                .min()
                .map(|n| Duration::from_millis(n.saturating_sub(now)));
            let mut sleep = TICKS_REFRESH;
            if let Some(d) = until_next {
                sleep = sleep.min(d);
            }
            if let Some(at) = listed {
                sleep = sleep.min(TICKS_REFRESH.saturating_sub(at.elapsed()));
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(sleep) => {}
                _ = self.ticks_wake.notified() => listed = None,
            }
        }
    }

    /// Fires every pending tick, each function's at most once a turn.
    /// Answers whether a function was found changed or gone (its entry is
    /// dropped; the caller lists the functions again).
    async fn fire_due(&self, entries: &mut HashMap<FnKey, Entry>, window: u64) -> bool {
        let now = now_ms();
        for e in entries.values_mut() {
            if e.next.is_some_and(|n| n <= now) {
                e.look(now, window);
            }
        }
        let due: Vec<(FnKey, u64, Option<Schedule>)> = entries
            .iter()
            .filter_map(|(k, e)| e.pending.map(|t| (k.clone(), t, e.schedule().cloned())))
            .collect();
        if due.is_empty() {
            return false;
        }
        let Some(sink) = self.tick_sink.get().and_then(Weak::upgrade) else {
            return false;
        };
        let fired: Vec<(FnKey, u64, Fired)> = futures_util::stream::iter(due)
            .map(|(key, tick, schedule)| {
                let sink = Arc::clone(&sink);
                async move {
                    // Read again just before: another node may have
                    // changed or removed it since the last listing, and
                    // the tick is the old schedule's.
                    let fired = match self.store.get_function(&key).await {
                        Ok(Some(f)) if f.schedule == schedule => Ok(f),
                        Ok(_) => Err(Fired::Gone),
                        Err(e) => Err(Fired::Refused(e.to_string())),
                    };
                    let fired = match fired {
                        Ok(f) => sink.fire(&f, tick).await,
                        Err(e) => e,
                    };
                    (key, tick, fired)
                }
            })
            .buffer_unordered(FIRES_AT_ONCE)
            .collect()
            .await;
        let mut changed = false;
        for (key, tick, fired) in fired {
            let Some(e) = entries.get_mut(&key) else {
                continue;
            };
            match fired {
                Fired::New(call) => {
                    tracing::info!(function = %key, tick = %crate::model::format_time(tick), call = %call, "schedule tick fired");
                    settle(e, tick);
                }
                Fired::Already => {
                    tracing::debug!(function = %key, tick, "schedule tick fired already");
                    settle(e, tick);
                }
                Fired::Refused(why) => {
                    if e.refused != Some(tick) {
                        e.refused = Some(tick);
                        tracing::warn!(function = %key, tick = %crate::model::format_time(tick), error = %why, "schedule tick refused; trying again until the next tick");
                    }
                }
                Fired::Gone => {
                    entries.remove(&key);
                    changed = true;
                }
            }
        }
        changed
    }

    /// A function was created, changed or removed here: look again now.
    pub(super) fn ticks_changed(&self) {
        self.ticks_wake.notify_one();
    }
}

/// Forgets `tick` once the store settled it (a newer pending tick stays).
fn settle(e: &mut Entry, tick: u64) {
    if e.pending == Some(tick) {
        e.pending = None;
    }
}

/// Brings the ticker's entries in line with the store's functions: a new
/// or changed schedule gets a fresh entry (its due tick looked for at
/// once), an unchanged one keeps its state (the function's other fields
/// are refreshed), a function without one (or gone) is dropped.
fn reconcile(entries: &mut HashMap<FnKey, Entry>, all: Vec<Function>, now: u64, window: u64) {
    let mut seen = HashMap::with_capacity(entries.len());
    for f in all {
        let Some(s) = &f.schedule else { continue };
        let key = f.key();
        let same = entries
            .get(&key)
            .and_then(Entry::schedule)
            .is_some_and(|old| old == s);
        if same {
            if let Some(e) = entries.remove(&key) {
                seen.insert(key, Entry { function: f, ..e });
            }
            continue;
        }
        match s.timetable() {
            Ok(table) => {
                seen.insert(key, Entry::new(f, table, now, window));
            }
            Err(e) => {
                tracing::warn!(function = %key, error = %e, "a stored schedule no longer parses; it does not fire")
            }
        }
    }
    *entries = seen;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(schedule: Option<Schedule>) -> Function {
        Function {
            schedule,
            ..Function::for_test("alice", "tick")
        }
    }

    const WEEK: u64 = 7 * 24 * 3600 * 1000;

    #[test]
    fn a_restart_after_missed_ticks_looks_at_the_latest_only() {
        let s = Schedule::new("@every 2s", None, vec![], 1_000).unwrap();
        let mut entries = HashMap::new();
        // Down from 11 s to 31.5 s: ticks 12..30 s were missed.
        reconcile(&mut entries, vec![function(Some(s.clone()))], 31_500, WEEK);
        let e = entries.values().next().unwrap();
        assert_eq!(
            e.pending,
            Some(30_000),
            "one catch-up: the latest missed tick"
        );
        assert_eq!(e.next, Some(32_000));
    }

    #[test]
    fn an_unchanged_schedule_keeps_its_state_and_a_changed_one_starts_afresh() {
        let s = Schedule::new("@every 2s", None, vec![], 1_000).unwrap();
        let mut entries = HashMap::new();
        reconcile(&mut entries, vec![function(Some(s.clone()))], 4_100, WEEK);
        let key = function(None).key();
        settle(entries.get_mut(&key).unwrap(), 4_000);
        reconcile(&mut entries, vec![function(Some(s.clone()))], 4_200, WEEK);
        assert_eq!(entries[&key].pending, None, "4 s settled, not due again");
        // Set anew at 4.3 s: the 4 s tick is before it.
        let again = Schedule::new("@every 3s", None, vec![], 4_300).unwrap();
        reconcile(&mut entries, vec![function(Some(again))], 4_400, WEEK);
        assert_eq!(entries[&key].pending, None);
        assert_eq!(entries[&key].next, Some(6_000));
        // Removed: the entry goes.
        reconcile(&mut entries, vec![function(None)], 4_500, WEEK);
        assert!(entries.is_empty());
    }

    #[test]
    fn a_refused_tick_stays_until_a_newer_one_or_the_window_replaces_it() {
        let s = Schedule::new("@every 2s", None, vec![], 0).unwrap();
        let t = s.timetable().unwrap();
        let mut e = Entry::new(function(Some(s)), t, 2_100, WEEK);
        assert_eq!(e.pending, Some(2_000));
        // Refused: still pending at the next look before the next tick.
        e.look(3_000, WEEK);
        assert_eq!(e.pending, Some(2_000));
        // The next tick supersedes it.
        e.look(4_050, WEEK);
        assert_eq!(e.pending, Some(4_000));
        settle(&mut e, 2_000);
        assert_eq!(
            e.pending,
            Some(4_000),
            "an older settle leaves the newer tick"
        );
        // Past the window, a pending tick is dropped unfired.
        let s = Schedule::new("@every 60s", None, vec![], 0).unwrap();
        let t = s.timetable().unwrap();
        let mut e = Entry::new(function(Some(s)), t, 60_100, 5_000);
        assert_eq!(e.pending, Some(60_000));
        e.look(64_000, 5_000);
        assert_eq!(e.pending, Some(60_000));
        e.look(65_000, 5_000);
        assert_eq!(e.pending, None);
    }
}
