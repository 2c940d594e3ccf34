//! Prometheus metrics: the one place that names the `metrics` crates and
//! the metric names. Events (a call accepted, started, ended; an HTTP
//! answer; an Engine error; a warm-pool hit) are counted where they happen
//! through the small functions below; levels (queues, caches, warm
//! containers) are read from the store and the scheduler when `/metrics` is
//! scraped, so they can never drift from the state they describe.
//!
//! It never changes state and never fails a request: without an installed
//! recorder (unit tests, the CLI) every function here is a no-op.

use crate::model::{Call, CallState, FnKey, FunctionStats};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// Bucket bounds of every `*_seconds` histogram: the activity's.
const SECONDS_BUCKETS: &[f64] = crate::activity::RUN_BOUNDS;
/// Gauges are all set at scrape time; one not set for this long belongs to
/// a function or user that is gone, and leaves the output.
const GAUGE_IDLE: Duration = Duration::from_secs(30);
/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same
/// handle) and, inside a tokio runtime, its upkeep task. `None` if another
/// recorder is installed already.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .map(|b| b.idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE)))
                .and_then(|b| b.install_recorder());
            match handle {
                Ok(h) => {
                    describe();
                    // Present from the start, so a rate() has a baseline.
                    for kind in ["unreachable", "error", "pull"] {
                        counter!("hyperfuncd_engine_errors_total", "kind" => kind).absolute(0);
                    }
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        let upkeep = h.clone();
                        rt.spawn(async move {
                            let mut every = tokio::time::interval(UPKEEP_EVERY);
                            loop {
                                every.tick().await;
                                upkeep.run_upkeep();
                            }
                        });
                    }
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics shows levels only");
                    None
                }
            }
        })
        .as_ref()
}

// ---- events ----

/// A call was accepted (durable, answered 202).
pub fn call_accepted(call: &Call) {
    crate::activity::call_accepted(call);
    counter!("hyperfuncd_calls_accepted_total", "function" => call.function.to_string(), "owner" => call.owner.to_string())
        .increment(1);
}

/// A call got its container slot: how long it queued.
pub fn call_started(call: &Call) {
    if let Some(started) = call.started_ms {
        histogram!("hyperfuncd_call_queue_wait_seconds", "function" => call.function.to_string(), "owner" => call.owner.to_string())
            .record(ms_to_secs(started.saturating_sub(call.created_ms)));
    }
}

/// A call ended; `call` is the record as stored, so a FINISHED outcome the
/// store turned FAILED (no space for the output) counts as failed.
pub fn call_ended(call: &Call) {
    crate::activity::call_ended(call);
    let state = match call.state {
        CallState::Finished => "finished",
        CallState::Failed => "failed",
        // Not an end: nothing to count.
        CallState::Pending | CallState::Running => return,
    };
    let function = call.function.to_string();
    let owner = call.owner.to_string();
    counter!("hyperfuncd_calls_total", "function" => function.clone(), "owner" => owner.clone(), "state" => state)
        .increment(1);
    if let (Some(started), Some(ended)) = (call.started_ms, call.finished_ms) {
        histogram!("hyperfuncd_call_run_seconds", "function" => function, "owner" => owner)
            .record(ms_to_secs(ended.saturating_sub(started)));
    }
}

/// `count` queued calls of `function` were failed at once (`func rm --force`).
pub fn calls_cancelled(function: &FnKey, count: usize) {
    crate::activity::calls_cancelled(function, count);
    counter!("hyperfuncd_calls_total", "function" => function.name.to_string(), "owner" => function.owner.to_string(), "state" => "failed")
        .increment(count as u64);
}

/// One attempt of a completion webhook of `owner`'s came to `result`:
/// `delivered`, `retry` (due again later) or `gave_up`.
pub fn webhook_delivery(owner: &str, result: &'static str) {
    counter!("hyperfuncd_webhook_deliveries_total", "owner" => owner.to_string(), "result" => result)
        .increment(1);
}

/// A call of `function` took a warm container (`hit`) or, with the pool
/// on, found none ready.
pub fn pool_take(owner: &str, function: &str, hit: bool) {
    let name = if hit {
        "hyperfuncd_pool_hits_total"
    } else {
        "hyperfuncd_pool_misses_total"
    };
    counter!(name, "function" => function.to_string(), "owner" => owner.to_string()).increment(1);
}

/// How the Docker Engine failed a request (`RuntimeError::engine_fault`
/// says which, if it was the Engine's fault at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineFault {
    Unreachable,
    Error,
    Pull,
}

/// The Docker Engine failed a request: it was unreachable, or answered
/// with an error. A refused image or runtime is the user's, not the Engine's.
pub fn engine_error(fault: Option<EngineFault>) {
    let kind = match fault {
        Some(EngineFault::Unreachable) => "unreachable",
        Some(EngineFault::Error) => "error",
        Some(EngineFault::Pull) => "pull",
        None => return,
    };
    counter!("hyperfuncd_engine_errors_total", "kind" => kind).increment(1);
}

/// An HTTP request was answered with `status`.
pub fn http_request(path: &str, status: u16) {
    counter!(
        "hyperfuncd_http_requests_total",
        "route" => route_class(path),
        "status" => status.to_string()
    )
    .increment(1);
}

/// A fixed label for a request path, so neither function names nor
/// capability secrets nor garbage paths become label values.
fn route_class(path: &str) -> &'static str {
    let mut segs = path.trim_start_matches('/').split('/');
    match (segs.next(), segs.next()) {
        (Some("call"), _) => "call",
        (Some("output"), _) => "output",
        (Some("logs"), _) => "logs",
        (Some("status"), _) => "status",
        (Some("healthz"), _) => "healthz",
        (Some("metrics"), _) => "metrics",
        (Some("openapi.yaml"), _) => "openapi",
        (Some("ui"), _) => "ui",
        (Some("v1"), Some("functions")) => "v1_functions",
        (Some("v1"), Some("calls")) => "v1_calls",
        (Some("v1"), Some("users")) => "v1_users",
        _ => "other",
    }
}

fn ms_to_secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

// ---- scrape ----

/// The levels `/metrics` shows, read at scrape time by the service.
#[derive(Debug, Default)]
pub struct Levels {
    pub engine_up: bool,
    pub db_bytes: u64,
    pub output_cache_budget: u64,
    pub log_cache_budget: u64,
    /// Every user with their quota, so an idle user shows with 0.
    pub users: Vec<(String, u32)>,
    pub functions: Vec<FunctionLevels>,
}

/// One function's levels.
#[derive(Debug)]
pub struct FunctionLevels {
    pub owner: String,
    pub name: String,
    pub stats: FunctionStats,
    /// Idle warm containers; `None` when the pool is off.
    pub pool_idle: Option<usize>,
}

/// The Prometheus text exposition: `levels`, then every series the
/// recorder holds.
pub fn render(levels: Levels) -> String {
    let Some(handle) = install() else {
        return String::new();
    };
    gauge!("hyperfuncd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!("hyperfuncd_engine_up").set(if levels.engine_up { 1.0 } else { 0.0 });
    gauge!("hyperfuncd_db_bytes").set(levels.db_bytes as f64);
    gauge!("hyperfuncd_output_cache_budget_bytes").set(levels.output_cache_budget as f64);
    gauge!("hyperfuncd_log_cache_budget_bytes").set(levels.log_cache_budget as f64);

    // Per user: every user shows, with 0 when idle.
    let mut per_user: HashMap<String, (u64, u64)> = HashMap::new();
    for (user, max_concurrency) in levels.users {
        gauge!("hyperfuncd_user_max_concurrency", "user" => user.clone())
            .set(f64::from(max_concurrency));
        per_user.entry(user).or_default();
    }
    for f in levels.functions {
        let s = f.stats;
        let u = per_user.entry(f.owner.clone()).or_default();
        u.0 += s.pending;
        u.1 += s.running;
        gauge!("hyperfuncd_output_cache_bytes", "function" => f.name.clone(), "owner" => f.owner.clone())
            .set(s.output_bytes as f64);
        gauge!("hyperfuncd_log_cache_bytes", "function" => f.name.clone(), "owner" => f.owner.clone())
            .set(s.log_bytes as f64);
        if let Some(n) = f.pool_idle {
            gauge!("hyperfuncd_pool_idle_containers", "function" => f.name, "owner" => f.owner)
                .set(n as f64);
        }
    }
    for (user, (queued, running)) in per_user {
        gauge!("hyperfuncd_queued_calls", "user" => user.clone()).set(queued as f64);
        gauge!("hyperfuncd_running_calls", "user" => user).set(running as f64);
    }
    handle.render()
}

/// The series without an `owner` or `user` label a tenant may see: they
/// describe the daemon, not anyone's traffic. The others without such a
/// label (HTTP answers, Engine errors, the database's size) add up every
/// user's activity, so only the admin sees them.
const PUBLIC: &[&str] = &[
    "hyperfuncd_build_info",
    "hyperfuncd_engine_up",
    "hyperfuncd_output_cache_budget_bytes",
    "hyperfuncd_log_cache_budget_bytes",
];

/// `text` (an exposition from `render`) as `user` may see it: only the
/// series whose `owner` or `user` label names them, and the `PUBLIC` ones,
/// so a tenant's scrape says nothing of other users, their function names
/// (ARCHITECTURE: lookups say nothing of other users' names) or their
/// traffic. A family left without samples loses its `# HELP`/`# TYPE`
/// lines too. A sample line that does not parse is dropped: when in doubt,
/// show less (a series added later is the admin's until it is labelled or
/// listed).
pub fn for_user(text: &str, user: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for block in text.split_terminator("\n\n") {
        let mut comments = Vec::new();
        let mut samples = Vec::new();
        let mut had_samples = false;
        for line in block.lines().filter(|l| !l.is_empty()) {
            if line.starts_with('#') {
                comments.push(line);
                continue;
            }
            had_samples = true;
            let visible = series_labels(line).is_some_and(|labels| {
                let mut named = labels
                    .iter()
                    .filter(|(k, _)| matches!(k.as_str(), "owner" | "user"))
                    .peekable();
                match named.peek() {
                    Some(_) => named.all(|(_, v)| v == user),
                    None => PUBLIC.contains(&series_name(line)),
                }
            });
            if visible {
                samples.push(line);
            }
        }
        if had_samples && samples.is_empty() {
            continue;
        }
        for line in comments.into_iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// The metric name of a sample line `name{...} value` or `name value`.
fn series_name(line: &str) -> &str {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    &line[..end]
}

/// The labels of a sample line `name{k="v",...} value`, values unescaped;
/// `None` if the line is not of that shape.
fn series_labels(line: &str) -> Option<Vec<(String, String)>> {
    let Some(open) = line.find('{') else {
        // `name value`: no labels.
        return (!line.trim().is_empty()).then(Vec::new);
    };
    let mut rest = line.get(open + 1..)?;
    let mut labels = Vec::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return after.starts_with(' ').then_some(labels);
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        rest = after.get(end + 1..)?;
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// What each metric means, in the exposition's `# HELP` lines.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "hyperfuncd_calls_accepted_total",
        "Calls accepted (durable, answered 202), per function."
    );
    describe_counter!(
        "hyperfuncd_webhook_deliveries_total",
        "Completion webhook attempts, per owner, by result (delivered, retry, gave_up)."
    );
    describe_counter!(
        "hyperfuncd_calls_total",
        "Calls that ended, per function, by state (finished or failed)."
    );
    describe_histogram!(
        "hyperfuncd_call_queue_wait_seconds",
        Unit::Seconds,
        "Time from acceptance to dispatch into a container, per function."
    );
    describe_histogram!(
        "hyperfuncd_call_run_seconds",
        Unit::Seconds,
        "Time from dispatch to the recorded end of a call, per function."
    );
    describe_counter!(
        "hyperfuncd_pool_hits_total",
        "Calls that took a ready warm container, per function."
    );
    describe_counter!(
        "hyperfuncd_pool_misses_total",
        "Calls that found no ready warm container (pool enabled), per function."
    );
    describe_counter!(
        "hyperfuncd_engine_errors_total",
        "Docker Engine failures by kind: unreachable, error, pull."
    );
    describe_counter!(
        "hyperfuncd_http_requests_total",
        "HTTP requests answered, by route class and status code."
    );
    describe_gauge!(
        "hyperfuncd_build_info",
        "Always 1; the version of this daemon is in the labels."
    );
    describe_gauge!(
        "hyperfuncd_engine_up",
        "Whether the Docker Engine answers (1) or not (0)."
    );
    describe_gauge!(
        "hyperfuncd_db_bytes",
        Unit::Bytes,
        "Size of the database on disk."
    );
    describe_gauge!(
        "hyperfuncd_output_cache_bytes",
        Unit::Bytes,
        "STDOUT bytes held in the function's output cache."
    );
    describe_gauge!(
        "hyperfuncd_log_cache_bytes",
        Unit::Bytes,
        "Log event bytes held in the function's log cache."
    );
    describe_gauge!(
        "hyperfuncd_output_cache_budget_bytes",
        Unit::Bytes,
        "Budget of each function's output cache (limits.output_cache_bytes)."
    );
    describe_gauge!(
        "hyperfuncd_log_cache_budget_bytes",
        Unit::Bytes,
        "Budget of each function's log cache (limits.log_cache_bytes)."
    );
    describe_gauge!(
        "hyperfuncd_pool_idle_containers",
        "Warm containers ready for a call, per function."
    );
    describe_gauge!(
        "hyperfuncd_queued_calls",
        "Calls waiting in the user's queue."
    );
    describe_gauge!(
        "hyperfuncd_running_calls",
        "Calls of the user running in containers."
    );
    describe_gauge!(
        "hyperfuncd_user_max_concurrency",
        "The user's quota of calls running at once."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "\
# HELP hyperfuncd_calls_total Calls that ended.
# TYPE hyperfuncd_calls_total counter
hyperfuncd_calls_total{function=\"ok\",owner=\"alice\",state=\"finished\"} 3
hyperfuncd_calls_total{function=\"ok\",owner=\"bob\",state=\"finished\"} 2

# TYPE hyperfuncd_pool_hits_total counter
hyperfuncd_pool_hits_total{function=\"secret-project\",owner=\"bob\"} 1

# HELP hyperfuncd_queued_calls Calls waiting.
# TYPE hyperfuncd_queued_calls gauge
hyperfuncd_queued_calls{user=\"bob\"} 0
hyperfuncd_queued_calls{user=\"alice\"} 1

# TYPE hyperfuncd_engine_up gauge
hyperfuncd_engine_up 1

# TYPE hyperfuncd_call_run_seconds histogram
hyperfuncd_call_run_seconds_bucket{function=\"ok\",owner=\"alice\",le=\"+Inf\"} 3
hyperfuncd_call_run_seconds_sum{function=\"ok\",owner=\"alice\"} 0.5
hyperfuncd_call_run_seconds_count{function=\"ok\",owner=\"alice\"} 3
hyperfuncd_call_run_seconds_bucket{function=\"ok\",owner=\"bob\",le=\"+Inf\"} 2
hyperfuncd_call_run_seconds_sum{function=\"ok\",owner=\"bob\"} 0.1
hyperfuncd_call_run_seconds_count{function=\"ok\",owner=\"bob\"} 2

# TYPE hyperfuncd_db_bytes gauge
hyperfuncd_db_bytes 4096

# TYPE hyperfuncd_http_requests_total counter
hyperfuncd_http_requests_total{route=\"call\",status=\"202\"} 5
hyperfuncd_odd{owner=\"alice\\\"x\"} 1
hyperfuncd_broken{owner=\"alice 1

";

    #[test]
    fn a_tenant_sees_only_its_own_series() {
        let alice = for_user(SCRAPE, "alice");
        assert!(!alice.contains("bob"), "{alice}");
        assert!(!alice.contains("secret-project"), "{alice}");
        // A family with nothing left loses its header too.
        assert!(!alice.contains("hyperfuncd_pool_hits_total"), "{alice}");
        for line in [
            "# HELP hyperfuncd_calls_total Calls that ended.",
            "hyperfuncd_calls_total{function=\"ok\",owner=\"alice\",state=\"finished\"} 3",
            "hyperfuncd_queued_calls{user=\"alice\"} 1",
            "hyperfuncd_engine_up 1",
            "hyperfuncd_call_run_seconds_count{function=\"ok\",owner=\"alice\"} 3",
        ] {
            assert!(alice.lines().any(|l| l == line), "{line} missing: {alice}");
        }
        // Every tenant's traffic adds up in the unlabelled series: the
        // admin's only.
        for series in ["hyperfuncd_http_requests_total", "hyperfuncd_db_bytes"] {
            assert!(SCRAPE.contains(series));
            assert!(!alice.contains(series), "{series}: {alice}");
        }
        // An escaped quote is part of the value, not its end; a line that
        // does not parse is left out.
        assert!(!alice.contains("hyperfuncd_odd"), "{alice}");
        assert!(!alice.contains("hyperfuncd_broken"), "{alice}");
        assert!(for_user(SCRAPE, "alice\"x").contains("hyperfuncd_odd"));
        // Families stay separated by one blank line.
        assert!(!alice.contains("\n\n\n"), "{alice}");
        assert!(alice.ends_with("\n\n"), "{alice}");
    }

    #[test]
    fn route_classes_are_a_fixed_set() {
        assert_eq!(route_class("/call/f/secret/sync"), "call");
        assert_eq!(route_class("/v1/functions/f/call"), "v1_functions");
        assert_eq!(route_class("/v1/users"), "v1_users");
        assert_eq!(route_class("/v1"), "other");
        assert_eq!(route_class("/../../etc/passwd"), "other");
        assert_eq!(route_class(""), "other");
    }
}
