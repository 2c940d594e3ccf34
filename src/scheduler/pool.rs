//! The warm pool (DESIGN 6): per function, a few containers created and
//! started ahead of their call under the init program, so a call pays an
//! attach instead of a container start. Each serves exactly one call and is
//! removed after it, like any call container.
//!
//! Adaptive: a function gets warm containers only once it has been called
//! (`record_call`, at every dispatch), as many as it started calls within
//! the last `DEMAND_WINDOW`, at least one and at most `per_function`. A
//! function not called for `idle_secs` loses its pool (`expire`). When the
//! host bound leaves no room, the idle containers of the least recently
//! called functions give way to a more recently called one.
//!
//! Invariants: the pool never makes more than `per_function` containers of a
//! function nor `host_max` in all; a container is handed out only if it was
//! made from the function's current spec (same `WarmSpec`), so an update never
//! runs a call with the old env or command; `drop_function` and `close`
//! remove what the pool holds, and a fill that ends after either removes its
//! own container. A container's name stays in `names` from before its create
//! until `release` (after its call's container was removed), so the sweep,
//! which spares those names, can never remove one a call has just taken.
//! The pool is memory only: after a crash, recovery removes the containers it
//! had made (they carry no call); `close` waits for fills in flight and then
//! removes every warm container still without a call.

use crate::config::PoolConfig;
use crate::runtime::{Runtime, WarmSpec};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long shutdown waits for warm containers still being made.
const CLOSE_WAIT: Duration = Duration::from_secs(20);
/// A function's pool is sized by the calls it started this long back (its
/// calls per minute, within `1..=per_function`): a function called now and
/// then keeps one warm container, one called in bursts as many as a burst
/// was wide; a minute is long enough that the size does not swing with
/// each call's timing.
const DEMAND_WINDOW: Duration = Duration::from_secs(60);

pub struct Pool {
    runtime: Arc<Runtime>,
    config: PoolConfig,
    state: Mutex<State>,
    /// Signalled whenever a fill ends, for `close`.
    filled: Notify,
}

#[derive(Default)]
struct State {
    /// Started containers waiting for a call, oldest first, per function.
    idle: HashMap<String, VecDeque<Ready>>,
    /// Containers being made for the current epoch, per function.
    filling: HashMap<String, usize>,
    /// Containers being made, all epochs.
    in_flight: usize,
    /// Bumped when a function's pool is dropped: a fill begun before then
    /// removes what it made.
    epoch: HashMap<String, u64>,
    /// Names of every container the pool made that is not yet released.
    names: HashSet<String>,
    /// Per function that was called: when, recently. Only these get warm
    /// containers; `expire` forgets those idle for `idle_secs`.
    usage: HashMap<String, Usage>,
    closed: bool,
}

#[derive(Default)]
struct Usage {
    /// Start times of its calls within `DEMAND_WINDOW`, oldest first.
    recent: VecDeque<Instant>,
    last: Option<Instant>,
}

struct Ready {
    id: String,
    name: String,
    spec: WarmSpec,
    /// The image id the container was made from, to notice a re-tag.
    image_id: String,
}

/// A warm container handed to a call; `release` it once removed.
pub struct Claimed {
    pub id: String,
    pub name: String,
}

impl State {
    fn owned(&self) -> usize {
        self.idle.values().map(VecDeque::len).sum::<usize>() + self.in_flight
    }

    fn epoch(&self, function: &str) -> u64 {
        self.epoch.get(function).copied().unwrap_or(0)
    }

    /// Warm containers `function` should have now: none unless it was
    /// called, else its recent demand within `1..=per_function`.
    fn target(&self, function: &str, per_function: usize, now: Instant) -> usize {
        let Some(u) = self.usage.get(function) else {
            return 0;
        };
        let recent = u
            .recent
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < DEMAND_WINDOW)
            .count();
        recent.clamp(1, per_function.max(1)).min(per_function)
    }

    /// When `function` was last called (never: `None`, which sorts first).
    fn last_call(&self, function: &str) -> Option<Instant> {
        self.usage.get(function).and_then(|u| u.last)
    }
}

impl Pool {
    pub fn new(runtime: Arc<Runtime>, config: PoolConfig) -> Arc<Pool> {
        Arc::new(Pool {
            runtime,
            config,
            state: Mutex::new(State::default()),
            filled: Notify::new(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.config.per_function > 0 && self.config.host_max > 0
    }

    /// A call of `function` is being dispatched: it now counts as used, and
    /// its demand grows.
    pub fn record_call(&self, function: &str) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let mut st = self.state();
        let u = st.usage.entry(function.to_string()).or_default();
        while u
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= DEMAND_WINDOW)
        {
            u.recent.pop_front();
        }
        // Bounded: more than `per_function` recent calls size it no further.
        if u.recent.len() >= self.config.per_function {
            u.recent.pop_front();
        }
        u.recent.push_back(now);
        u.last = Some(now);
    }

    /// Whether `function` was called recently enough to have a pool.
    pub fn wanted(&self, function: &str) -> bool {
        self.enabled() && self.state().usage.contains_key(function)
    }

    /// Drops the pools of functions not called (nor refilled after a call)
    /// for `idle_secs`; answers
    /// how many containers went.
    pub fn expire(self: &Arc<Self>) -> usize {
        let idle = Duration::from_secs(self.config.idle_secs);
        let now = Instant::now();
        let expired: Vec<String> = {
            let st = self.state();
            st.usage
                .iter()
                .filter(|(_, u)| {
                    u.last
                        .is_none_or(|t| now.saturating_duration_since(t) >= idle)
                })
                .map(|(f, _)| f.clone())
                .collect()
        };
        let mut removed = 0;
        for f in expired {
            self.state().usage.remove(&f);
            removed += self.drop_function(&f);
        }
        removed
    }

    /// How often `expire` should run so a pool goes about `idle_secs` after
    /// its last call.
    pub fn expire_every(&self) -> Duration {
        (Duration::from_secs(self.config.idle_secs) / 4)
            .clamp(Duration::from_millis(250), Duration::from_secs(15))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A started container made from `spec`, if one is ready. Containers of
    /// another spec stay: `drop_function` and `prune` deal with those.
    pub fn take(&self, spec: &WarmSpec) -> Option<Claimed> {
        let mut st = self.state();
        let queue = st.idle.get_mut(&spec.key())?;
        let at = queue.iter().position(|r| r.spec == *spec)?;
        queue.remove(at).map(|r| Claimed {
            id: r.id,
            name: r.name,
        })
    }

    /// The claimed container `name` is gone: forget it.
    pub fn release(&self, name: &str) {
        self.state().names.remove(name);
    }

    /// Starts making containers for `spec` until its function has as many
    /// as its demand asks (none if it was not called), within the host-wide
    /// bound; at that bound, idle containers of functions called less
    /// recently are removed to make room.
    pub fn fill(self: &Arc<Self>, spec: &WarmSpec) {
        if !self.enabled() {
            return;
        }
        let (count, epoch, evicted) = {
            let mut st = self.state();
            if st.closed {
                return;
            }
            let want = st.target(&spec.key(), self.config.per_function, Instant::now());
            let have = st.idle.get(&spec.key()).map_or(0, VecDeque::len)
                + st.filling.get(&spec.key()).copied().unwrap_or(0);
            let need = want.saturating_sub(have);
            let mut evicted = Vec::new();
            let mut room = self.config.host_max.saturating_sub(st.owned());
            if room < need {
                // Least recently called first; only those called before `spec`'s.
                let mine = st.last_call(&spec.key());
                let mut others: Vec<(Option<Instant>, String)> = st
                    .idle
                    .iter()
                    .filter(|(f, q)| **f != spec.key() && !q.is_empty())
                    .map(|(f, _)| (st.last_call(f), f.clone()))
                    .filter(|(last, _)| *last < mine)
                    .collect();
                others.sort();
                for (_, f) in others {
                    while room < need {
                        let Some(r) = st.idle.get_mut(&f).and_then(VecDeque::pop_front) else {
                            break;
                        };
                        evicted.push(r);
                        room += 1;
                    }
                }
            }
            // The function is in use: its idle time counts from now.
            if let Some(u) = st.usage.get_mut(&spec.key()) {
                u.last = Some(Instant::now());
            }
            let count = need.min(room);
            *st.filling.entry(spec.key()).or_default() += count;
            st.in_flight += count;
            (count, st.epoch(&spec.key()), evicted)
        };
        if !evicted.is_empty() {
            tracing::debug!(function = %spec.key(), count = evicted.len(), "warm containers of less recently called functions give way");
        }
        self.remove_all(evicted);
        for _ in 0..count {
            let this = Arc::clone(self);
            let spec = spec.clone();
            tokio::spawn(async move { this.make_one(spec, epoch).await });
        }
    }

    async fn make_one(&self, spec: WarmSpec, epoch: u64) {
        let name = format!("hyperfuncd-pool-{}", uuid::Uuid::new_v4().simple());
        self.state().names.insert(name.clone());
        let made = self.runtime.warm(&spec, &name).await;
        let unwanted = {
            let mut st = self.state();
            st.in_flight = st.in_flight.saturating_sub(1);
            let current = st.epoch(&spec.key()) == epoch;
            if current {
                if let Some(n) = st.filling.get_mut(&spec.key()) {
                    *n = n.saturating_sub(1);
                }
            }
            match made {
                Ok((id, image_id)) if current && !st.closed => {
                    st.idle.entry(spec.key()).or_default().push_back(Ready {
                        id,
                        name,
                        spec,
                        image_id,
                    });
                    None
                }
                Ok((id, _)) => Some((id, name)),
                Err(e) => {
                    st.names.remove(&name);
                    tracing::warn!(function = %spec.key(), error = %e, "cannot make a warm container");
                    None
                }
            }
        };
        if let Some((id, name)) = unwanted {
            self.runtime.remove(&id).await;
            self.release(&name);
        }
        self.filled.notify_waiters();
    }

    /// Removes the function's warm containers: it changed, is gone, or
    /// went idle. Fills in flight remove theirs when they end. Answers how
    /// many idle ones went.
    pub fn drop_function(self: &Arc<Self>, function: &str) -> usize {
        let dropped: Vec<Ready> = {
            let mut st = self.state();
            *st.epoch.entry(function.to_string()).or_default() += 1;
            st.filling.remove(function);
            st.idle.remove(function).unwrap_or_default().into()
        };
        let n = dropped.len();
        self.remove_all(dropped);
        n
    }

    /// Removes the idle containers `stale` says are out of date (spec or
    /// image changed), keeping the others.
    pub fn prune(self: &Arc<Self>, stale: impl Fn(&WarmSpec, &str) -> bool) {
        let dropped: Vec<Ready> = {
            let mut st = self.state();
            let mut dropped = Vec::new();
            for queue in st.idle.values_mut() {
                let (old, keep): (Vec<Ready>, Vec<Ready>) = std::mem::take(queue)
                    .into_iter()
                    .partition(|r| stale(&r.spec, &r.image_id));
                *queue = keep.into();
                dropped.extend(old);
            }
            dropped
        };
        self.remove_all(dropped);
    }

    /// Forgets every idle container without removing it: the Engine was
    /// lost, and with it the containers; the sweep removes any that remain.
    pub fn forget_all(&self) {
        let mut st = self.state();
        for r in std::mem::take(&mut st.idle).into_values().flatten() {
            st.names.remove(&r.name);
        }
    }

    /// The spec and image id of each idle container, once per distinct pair.
    pub fn idle_specs(&self) -> Vec<(WarmSpec, String)> {
        let st = self.state();
        let mut specs: Vec<(WarmSpec, String)> = Vec::new();
        for r in st.idle.values().flatten() {
            if !specs.iter().any(|(s, i)| *s == r.spec && *i == r.image_id) {
                specs.push((r.spec.clone(), r.image_id.clone()));
            }
        }
        specs
    }

    /// Whether `name` is a container the pool made and has not released.
    pub fn owns(&self, name: &str) -> bool {
        self.state().names.contains(name)
    }

    /// Stops filling, waits (bounded) for fills in flight, and removes every
    /// warm container that has not taken a call (on shutdown).
    pub async fn close(&self) {
        self.state().closed = true;
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        loop {
            let notified = self.filled.notified();
            if self.state().in_flight == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!("warm containers still being made at shutdown");
                break;
            }
        }
        let idle: Vec<Ready> = std::mem::take(&mut self.state().idle)
            .into_values()
            .flatten()
            .collect();
        for r in &idle {
            self.runtime.remove(&r.id).await;
        }
        // Also those a background removal or a dropped fill had not
        // finished: any warm container without a call. A fill that ends
        // just now may still be removing its own, so look again briefly.
        for _ in 0..5 {
            let Ok(all) = self.runtime.containers().await else {
                break;
            };
            let left: Vec<_> = all.iter().filter(|c| c.call.is_empty()).collect();
            if left.is_empty() {
                break;
            }
            for c in left {
                self.runtime.remove(&c.id).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn remove_all(self: &Arc<Self>, containers: Vec<Ready>) {
        if containers.is_empty() {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            for r in containers {
                this.runtime.remove(&r.id).await;
                this.release(&r.name);
            }
        });
    }
}
