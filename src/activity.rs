//! Calls over time, per function: accepted, finished and failed calls and
//! the run-time distribution, per minute for the last hour and per quarter
//! hour for the last day — what the dashboard draws and
//! `GET /v1/activity` answers.
//!
//! It counts the same events as the Prometheus counters (`metrics.rs` calls
//! in here) and keeps run times in the same buckets as
//! `hyperfuncd_call_run_seconds`, so its percentiles are what
//! `histogram_quantile` gives over `/metrics`. Like `metrics.rs` it is
//! process-wide and never fails a request: until `install` (unit tests,
//! the CLI) every function here is a no-op.
//!
//! Bounded: at most `MINUTES` + `QUARTERS` buckets per function with calls
//! in the last day (functions idle for a day are forgotten). Kept across
//! restarts in `DATA_DIR/activity.json`, written every `SAVE_EVERY` and at
//! a clean stop; a crash loses at most the last `SAVE_EVERY`. Each node of
//! a cluster counts the calls it ran.

use crate::model::{Call, CallState, FnKey, Name};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Upper bounds of the run-time buckets, in seconds, from a warm call's
/// queue wait (milliseconds) to a long batch job (an hour): also those of
/// every `*_seconds` histogram in `/metrics` (plus +Inf), so p50/p95 here
/// are what `histogram_quantile` gives there.
pub const RUN_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
const BINS: usize = 17;
const _: () = assert!(RUN_BOUNDS.len() + 1 == BINS);

/// Minute buckets kept: the last hour.
const MINUTES: usize = 60;
/// Quarter-hour buckets kept: the last day.
const QUARTERS: usize = 96;
const MINUTE: u64 = 60;
const QUARTER: u64 = 900;
/// How often the counts are written to disk when they changed.
pub const SAVE_EVERY: Duration = Duration::from_secs(60);
/// The file's format; another is ignored (and replaced).
const VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub accepted: u32,
    pub finished: u32,
    pub failed: u32,
    /// Ended calls that ran, by run time (`RUN_BOUNDS`, then +Inf).
    pub run: [u32; BINS],
}

impl Bucket {
    fn add(&mut self, o: &Bucket) {
        self.accepted = self.accepted.saturating_add(o.accepted);
        self.finished = self.finished.saturating_add(o.finished);
        self.failed = self.failed.saturating_add(o.failed);
        for (a, b) in self.run.iter_mut().zip(o.run) {
            *a = a.saturating_add(b);
        }
    }

    /// The `q` quantile of the run times, as Prometheus' `histogram_quantile`
    /// computes it: linear within the bucket it falls in; the +Inf bucket
    /// answers the highest finite bound. `None` without a run.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.run.iter().map(|&n| u64::from(n)).sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut seen = 0u64;
        for (i, &n) in self.run.iter().enumerate() {
            let before = seen;
            seen += u64::from(n);
            if (seen as f64) >= rank && n > 0 {
                let Some(&upper) = RUN_BOUNDS.get(i) else {
                    return RUN_BOUNDS.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { RUN_BOUNDS[i - 1] };
                let within = (rank - before as f64) / f64::from(n);
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
        }
        RUN_BOUNDS.last().copied()
    }
}

/// One function's buckets, oldest first, keyed by the bucket's start (Unix s).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Series {
    minutes: VecDeque<(u64, Bucket)>,
    quarters: VecDeque<(u64, Bucket)>,
}

impl Series {
    fn bucket(list: &mut VecDeque<(u64, Bucket)>, start: u64, keep: usize) -> &mut Bucket {
        match list.iter().position(|(s, _)| *s >= start) {
            Some(i) if list[i].0 == start => {}
            Some(i) => list.insert(i, (start, Bucket::default())),
            None => list.push_back((start, Bucket::default())),
        }
        while list.len() > keep {
            list.pop_front();
        }
        let i = list
            .iter()
            .position(|(s, _)| *s == start)
            // Just made; only a bucket older than every kept one is dropped
            // at once, and then the newest stands in for it.
            .unwrap_or(list.len() - 1);
        &mut list[i].1
    }

    fn record(&mut self, now: u64, f: impl Fn(&mut Bucket)) {
        f(Self::bucket(&mut self.minutes, now - now % MINUTE, MINUTES));
        f(Self::bucket(
            &mut self.quarters,
            now - now % QUARTER,
            QUARTERS,
        ));
    }

    /// Drops buckets past their window; whether anything is left.
    fn prune(&mut self, now: u64) -> bool {
        let hour = now.saturating_sub(MINUTE * MINUTES as u64);
        let day = now.saturating_sub(QUARTER * QUARTERS as u64);
        self.minutes.retain(|(s, _)| *s + MINUTE > hour);
        self.quarters.retain(|(s, _)| *s + QUARTER > day);
        !self.quarters.is_empty()
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Saved {
    version: u32,
    functions: Vec<(String, String, Series)>,
}

struct State {
    series: HashMap<FnKey, Series>,
    dirty: bool,
}

pub struct Activity {
    state: Mutex<State>,
    path: PathBuf,
}

static ACTIVITY: OnceLock<Activity> = OnceLock::new();

/// The window a report covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last hour, a point a minute.
    Hour,
    /// The last day, a point a quarter hour.
    Day,
}

impl Window {
    pub fn parse(s: &str) -> Option<Window> {
        match s {
            "hour" | "1h" => Some(Window::Hour),
            "day" | "24h" | "1d" => Some(Window::Day),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }

    /// Seconds per point.
    pub fn step(self) -> u64 {
        match self {
            Window::Hour => MINUTE,
            Window::Day => QUARTER,
        }
    }

    fn points(self) -> usize {
        match self {
            Window::Hour => MINUTES,
            Window::Day => QUARTERS,
        }
    }
}

/// Totals per point of a window, oldest first, and over the whole window.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub window: Window,
    /// (start of the point in Unix seconds, its counts).
    pub points: Vec<(u64, Bucket)>,
    pub total: Bucket,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts counting, from what `path` kept (a missing or unreadable file
/// starts empty, said in the log), and, inside a tokio runtime, saving.
pub fn install(path: &Path) {
    let series = load(path);
    let first = ACTIVITY.set(Activity {
        state: Mutex::new(State {
            series,
            dirty: false,
        }),
        path: path.to_path_buf(),
    });
    if first.is_ok() {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async {
                let mut every = tokio::time::interval(SAVE_EVERY);
                every.tick().await;
                loop {
                    every.tick().await;
                    save().await;
                }
            });
        }
    }
}

fn load(path: &Path) -> HashMap<FnKey, Series> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the call activity; starting it empty");
            return HashMap::new();
        }
    };
    let saved: Saved = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable call activity; starting it empty");
            return HashMap::new();
        }
    };
    if saved.version != VERSION {
        return HashMap::new();
    }
    let now = now_secs();
    saved
        .functions
        .into_iter()
        .filter_map(|(owner, name, mut s)| {
            let key = FnKey::new(Name::parse(&owner).ok()?, Name::parse(&name).ok()?);
            // Newest kept, whatever a hand-edited file holds.
            while s.minutes.len() > MINUTES {
                s.minutes.pop_front();
            }
            while s.quarters.len() > QUARTERS {
                s.quarters.pop_front();
            }
            s.prune(now).then_some((key, s))
        })
        .collect()
}

fn state() -> Option<MutexGuard<'static, State>> {
    let a = ACTIVITY.get()?;
    Some(a.state.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Writes the counts to disk if they changed: a new file, fsynced, renamed
/// over the old one, so a crash leaves the old or the new whole.
pub async fn save() {
    let Some(a) = ACTIVITY.get() else { return };
    let json = {
        let Some(mut st) = state() else { return };
        if !st.dirty {
            return;
        }
        st.dirty = false;
        let now = now_secs();
        st.series.retain(|_, s| s.prune(now));
        let saved = Saved {
            version: VERSION,
            functions: st
                .series
                .iter()
                .map(|(k, s)| (k.owner.to_string(), k.name.to_string(), s.clone()))
                .collect(),
        };
        match serde_json::to_vec(&saved) {
            Ok(j) => j,
            Err(_) => return,
        }
    };
    let path = a.path.clone();
    let written = tokio::task::spawn_blocking(move || write_atomic(&path, &json)).await;
    if let Ok(Err(e)) = written {
        tracing::warn!(path = %a.path.display(), error = %e, "cannot save the call activity; will try again");
        if let Some(mut st) = state() {
            st.dirty = true;
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn record(key: FnKey, f: impl Fn(&mut Bucket)) {
    let Some(mut st) = state() else { return };
    st.series.entry(key).or_default().record(now_secs(), f);
    st.dirty = true;
}

/// A call was accepted.
pub fn call_accepted(call: &Call) {
    record(FnKey::new(call.owner.clone(), call.function.clone()), |b| {
        b.accepted = b.accepted.saturating_add(1);
    });
}

/// A call ended (the record as stored).
pub fn call_ended(call: &Call) {
    let failed = match call.state {
        CallState::Finished => false,
        CallState::Failed => true,
        CallState::Pending | CallState::Running => return,
    };
    let run = match (call.started_ms, call.finished_ms) {
        (Some(s), Some(e)) => Some(e.saturating_sub(s) as f64 / 1000.0),
        _ => None,
    };
    record(FnKey::new(call.owner.clone(), call.function.clone()), |b| {
        if failed {
            b.failed = b.failed.saturating_add(1);
        } else {
            b.finished = b.finished.saturating_add(1);
        }
        if let Some(secs) = run {
            let i = RUN_BOUNDS
                .iter()
                .position(|&ub| secs <= ub)
                .unwrap_or(RUN_BOUNDS.len());
            b.run[i] = b.run[i].saturating_add(1);
        }
    });
}

/// `count` queued calls of `function` failed at once (removed).
pub fn calls_cancelled(function: &FnKey, count: usize) {
    let n = u32::try_from(count).unwrap_or(u32::MAX);
    record(function.clone(), |b| b.failed = b.failed.saturating_add(n));
}

/// The window's points summed over the functions `include` admits.
pub fn report(window: Window, include: impl Fn(&FnKey) -> bool) -> Report {
    let now = now_secs();
    let step = window.step();
    let first = now - now % step - step * (window.points() as u64 - 1);
    let mut points: Vec<(u64, Bucket)> = (0..window.points() as u64)
        .map(|i| (first + i * step, Bucket::default()))
        .collect();
    if let Some(st) = state() {
        for s in st.series.iter().filter(|(k, _)| include(k)).map(|(_, s)| s) {
            let list = match window {
                Window::Hour => &s.minutes,
                Window::Day => &s.quarters,
            };
            for (start, b) in list {
                if *start >= first {
                    let i = ((start - first) / step) as usize;
                    if let Some(p) = points.get_mut(i) {
                        p.1.add(b);
                    }
                }
            }
        }
    }
    let mut total = Bucket::default();
    for (_, b) in &points {
        total.add(b);
    }
    Report {
        window,
        points,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(secs: &[f64]) -> Bucket {
        let mut b = Bucket::default();
        for &s in secs {
            let i = RUN_BOUNDS
                .iter()
                .position(|&ub| s <= ub)
                .unwrap_or(RUN_BOUNDS.len());
            b.run[i] += 1;
        }
        b
    }

    #[test]
    fn quantiles_as_prometheus_computes_them() {
        assert_eq!(Bucket::default().quantile(0.5), None);
        // Four runs in (0.1, 0.25]: the median is half way through it.
        let b = runs(&[0.2, 0.2, 0.2, 0.2]);
        let p50 = b.quantile(0.5).unwrap();
        assert!((p50 - 0.175).abs() < 1e-9, "{p50}");
        // One slow run in ten: p95 falls in its bucket, p50 does not.
        let mut secs = vec![0.004; 9];
        secs.push(7.0);
        let b = runs(&secs);
        assert!(b.quantile(0.5).unwrap() <= 0.005);
        let p95 = b.quantile(0.95).unwrap();
        assert!(p95 > 5.0 && p95 <= 10.0, "{p95}");
        // Past the last bound: the last bound.
        assert_eq!(runs(&[5000.0]).quantile(0.5), Some(3600.0));
    }

    #[test]
    fn series_keep_their_windows() {
        let mut s = Series::default();
        let t0 = 1_000_000 * QUARTER;
        for m in 0..200u64 {
            s.record(t0 + m * MINUTE, |b| b.finished += 1);
        }
        assert_eq!(s.minutes.len(), MINUTES);
        assert_eq!(s.minutes.back().map(|(t, _)| *t), Some(t0 + 199 * MINUTE));
        // 200 minutes over 14 quarters, all kept.
        assert_eq!(s.quarters.len(), 14);
        let sum: u32 = s.quarters.iter().map(|(_, b)| b.finished).sum();
        assert_eq!(sum, 200);
        // A day later, nothing is left.
        assert!(!s.prune(t0 + 2 * 86_400));
        // A late event for an earlier minute goes in order.
        let mut s = Series::default();
        s.record(t0 + 120, |b| b.failed += 1);
        s.record(t0 + 60, |b| b.failed += 1);
        let starts: Vec<u64> = s.minutes.iter().map(|(t, _)| *t).collect();
        assert_eq!(starts, [t0 + 60, t0 + 120]);
    }

    #[test]
    fn saved_counts_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity.json");
        let mut s = Series::default();
        let now = now_secs();
        s.record(now, |b| b.finished += 3);
        let saved = Saved {
            version: VERSION,
            functions: vec![
                ("alice".into(), "f".into(), s),
                ("Bad Name".into(), "g".into(), Series::default()),
            ],
        };
        write_atomic(&path, &serde_json::to_vec(&saved).unwrap()).unwrap();
        let back = load(&path);
        assert_eq!(back.len(), 1);
        let key = FnKey::new(Name::parse("alice").unwrap(), Name::parse("f").unwrap());
        assert_eq!(back[&key].minutes[0].1.finished, 3);
        std::fs::write(&path, b"not json").unwrap();
        assert!(load(&path).is_empty());
    }
}
