//! The warm pool (DESIGN 6): per function, a few containers created and
//! started ahead of their call under the init program, so a call pays an
//! attach instead of a container start. Each serves exactly one call and is
//! removed after it, like any call container.
//!
//! Invariants: the pool never holds more than `per_function` containers of a
//! function nor `host_max` in all; a container is handed out only if it was
//! made from the function's current spec (same `WarmSpec`), so an update never
//! runs a call with the old env or command; `drop_function` and `close`
//! remove what the pool holds, and a fill that ends after either removes its
//! own container. The pool is memory only: after a crash, recovery removes
//! the containers it had made (they carry no call), and the sweep skips only
//! the names the pool knows.

use crate::config::PoolConfig;
use crate::runtime::{Runtime, WarmSpec};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

pub struct Pool {
    runtime: Arc<Runtime>,
    config: PoolConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Started containers waiting for a call, oldest first, per function.
    idle: HashMap<String, VecDeque<Ready>>,
    /// Containers being made, per function.
    filling: HashMap<String, usize>,
    /// Bumped when a function's pool is dropped: a fill begun before then
    /// removes what it made.
    epoch: HashMap<String, u64>,
    /// Names of every container the pool owns (being made or idle).
    names: HashSet<String>,
    closed: bool,
}

struct Ready {
    id: String,
    name: String,
    spec: WarmSpec,
}

impl State {
    fn owned(&self) -> usize {
        self.idle.values().map(VecDeque::len).sum::<usize>() + self.filling.values().sum::<usize>()
    }
}

impl Pool {
    pub fn new(runtime: Arc<Runtime>, config: PoolConfig) -> Arc<Pool> {
        Arc::new(Pool {
            runtime,
            config,
            state: Mutex::new(State::default()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.config.per_function > 0 && self.config.host_max > 0
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A started container for `spec`, if one is ready. Containers made
    /// from an older spec of the function are removed on the way.
    pub fn take(&self, spec: &WarmSpec) -> Option<String> {
        let mut stale = Vec::new();
        let found = {
            let mut st = self.state();
            let mut found = None;
            if let Some(queue) = st.idle.get_mut(&spec.function) {
                while let Some(ready) = queue.pop_front() {
                    if ready.spec == *spec {
                        found = Some(ready);
                        break;
                    }
                    stale.push(ready);
                }
            }
            for r in stale.iter().chain(found.iter()) {
                st.names.remove(&r.name);
            }
            found
        };
        self.remove_all(stale);
        found.map(|r| r.id)
    }

    /// Starts making containers for `spec` until its function has
    /// `per_function` of them, within the host-wide bound.
    pub fn fill(self: &Arc<Self>, spec: &WarmSpec) {
        if !self.enabled() {
            return;
        }
        let (count, epoch) = {
            let mut st = self.state();
            if st.closed {
                return;
            }
            let have = st.idle.get(&spec.function).map_or(0, VecDeque::len)
                + st.filling.get(&spec.function).copied().unwrap_or(0);
            let room = self.config.host_max.saturating_sub(st.owned());
            let count = self.config.per_function.saturating_sub(have).min(room);
            *st.filling.entry(spec.function.clone()).or_default() += count;
            (count, st.epoch.get(&spec.function).copied().unwrap_or(0))
        };
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
            if let Some(n) = st.filling.get_mut(&spec.function) {
                *n = n.saturating_sub(1);
            }
            match made {
                Ok(id) => {
                    let current = st.epoch.get(&spec.function).copied().unwrap_or(0) == epoch;
                    if current && !st.closed {
                        st.idle
                            .entry(spec.function.clone())
                            .or_default()
                            .push_back(Ready { id, name, spec });
                        return;
                    }
                    st.names.remove(&name);
                    id
                }
                Err(e) => {
                    st.names.remove(&name);
                    tracing::warn!(function = %spec.function, error = %e, "cannot make a warm container");
                    return;
                }
            }
        };
        self.runtime.remove(&unwanted).await;
    }

    /// Removes the function's warm containers: it changed or is gone.
    pub fn drop_function(&self, function: &str) {
        let dropped: Vec<Ready> = {
            let mut st = self.state();
            *st.epoch.entry(function.to_string()).or_default() += 1;
            let dropped: Vec<Ready> = st.idle.remove(function).unwrap_or_default().into();
            for r in &dropped {
                st.names.remove(&r.name);
            }
            dropped
        };
        self.remove_all(dropped);
    }

    /// Forgets every warm container without removing them: the Engine was
    /// lost, and with it the containers; the sweep removes any that remain.
    pub fn forget_all(&self) {
        let mut st = self.state();
        for (function, queue) in std::mem::take(&mut st.idle) {
            *st.epoch.entry(function).or_default() += 1;
            for r in queue {
                st.names.remove(&r.name);
            }
        }
    }

    /// The spec of each idle container, once per distinct spec.
    pub fn idle_specs(&self) -> Vec<WarmSpec> {
        let st = self.state();
        let mut specs: Vec<WarmSpec> = Vec::new();
        for r in st.idle.values().flatten() {
            if !specs.contains(&r.spec) {
                specs.push(r.spec.clone());
            }
        }
        specs
    }

    /// Whether `name` is a container the pool owns (for the sweep).
    pub fn owns(&self, name: &str) -> bool {
        self.state().names.contains(name)
    }

    /// Stops filling and removes every idle container (on shutdown).
    pub async fn close(&self) {
        let all: Vec<Ready> = {
            let mut st = self.state();
            st.closed = true;
            let all: Vec<Ready> = std::mem::take(&mut st.idle)
                .into_values()
                .flatten()
                .collect();
            st.names.clear();
            all
        };
        for r in all {
            self.runtime.remove(&r.id).await;
        }
    }

    fn remove_all(&self, containers: Vec<Ready>) {
        if containers.is_empty() {
            return;
        }
        let runtime = Arc::clone(&self.runtime);
        tokio::spawn(async move {
            for r in containers {
                runtime.remove(&r.id).await;
            }
        });
    }
}
