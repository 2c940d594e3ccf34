//! The JSON bodies of the API. The CLI sends and reads these same types, so
//! the two cannot drift apart. Field names are PascalCase, as in Docker's API.

use crate::model::FunctionStats;
use crate::model::{format_time, Budget, Call, Event, Function, User, UserLimits};
use serde::{Deserialize, Serialize};

/// `Runtime` naming no runtime: the function follows the server's default.
pub const RUNTIME_DEFAULT: &str = "default";
/// The `Event` of a call's accept that a schedule's tick made (a CALL
/// otherwise).
pub const SCHEDULE_EVENT: &str = "SCHEDULE";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct FunctionCreate {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    /// `K=V` strings.
    #[serde(default)]
    pub env: Vec<String>,
    /// A duration such as `30s` or `5m`; absent: no timeout.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    /// The OCI runtime (`runsc`); absent or `default`: the server's default.
    #[serde(default)]
    pub runtime: Option<String>,
    /// The completion webhook's URL (https; see README "Webhooks"). Its
    /// signing secret is made and answered once, in `WebhookSecret`.
    #[serde(default)]
    pub webhook: Option<String>,
    /// The ends it is sent for: `finished`, `failed` (default both).
    #[serde(default)]
    pub webhook_on: Option<Vec<String>>,
    /// A schedule: one call per tick (`Expression` required here).
    #[serde(default)]
    pub schedule: Option<ScheduleBody>,
}

/// A schedule in a create or update body. In an update, an absent part
/// keeps the function's current one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ScheduleBody {
    /// A 5-field cron expression (`*/5 * * * *`) or `@every DURATION`
    /// (`@every 5m`, at least 1s).
    #[serde(default)]
    pub expression: Option<String>,
    /// The IANA time zone the cron fields are read in; default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    /// The STDIN of each tick's call, base64 (at most 64 KiB decoded).
    #[serde(default)]
    pub payload: Option<String>,
}

/// A function's schedule as its view shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduleView {
    pub expression: String,
    pub timezone: String,
    /// The size of each tick's STDIN.
    pub payload_bytes: u64,
    /// When it was set or last changed: no earlier tick fires.
    pub since: String,
    /// Its next three ticks.
    pub next: Vec<String>,
}

impl From<&crate::model::Schedule> for ScheduleView {
    fn from(s: &crate::model::Schedule) -> ScheduleView {
        let next = s
            .timetable()
            .map(|t| t.upcoming(crate::model::now_ms(), 3))
            .unwrap_or_default();
        ScheduleView {
            expression: s.expr.clone(),
            timezone: s.timezone.clone(),
            payload_bytes: s.payload.len() as u64,
            since: format_time(s.since_ms),
            next: next.into_iter().map(format_time).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct FunctionPatch {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// `K=V` strings to add or replace.
    #[serde(default)]
    pub env: Vec<String>,
    /// Names to remove from the environment.
    #[serde(default)]
    pub unset_env: Vec<String>,
    /// A duration; `none` removes the timeout.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    /// An OCI runtime; `default` goes back to the server's default.
    #[serde(default)]
    pub runtime: Option<String>,
    /// Issue a new URL; the old one answers 404 from now on.
    #[serde(default)]
    pub refresh: bool,
    /// Pull the image's tag again and pin what it names now (a newer
    /// image, perhaps); without it an update keeps the pinned digest.
    #[serde(default)]
    pub pull: bool,
    /// Set the schedule, or change parts of it.
    #[serde(default)]
    pub schedule: Option<ScheduleBody>,
    /// Remove the schedule.
    #[serde(default)]
    pub no_schedule: bool,
    /// Sets the completion webhook's URL (a first one makes the secret).
    #[serde(default)]
    pub webhook: Option<String>,
    #[serde(default)]
    pub webhook_on: Option<Vec<String>>,
    /// Removes the webhook's URL (the secret stays, for `X-Callback-Url`s).
    #[serde(default)]
    pub no_webhook: bool,
    /// Makes a new signing secret, answered once in `WebhookSecret`.
    #[serde(default)]
    pub rotate_webhook_secret: bool,
}

/// A function's completion webhook as its view shows it (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WebhookView {
    /// Null when only calls' own `X-Callback-Url`s are delivered.
    pub url: Option<String>,
    pub on: Vec<String>,
}

/// A call's webhook delivery (`GET /v1/calls/{id}`'s `Webhook`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeliveryView {
    /// PENDING, DELIVERED or GAVE_UP.
    pub state: String,
    pub url: String,
    /// The `webhook-id` of every attempt.
    pub webhook_id: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// While PENDING: when the next attempt is due.
    pub next_attempt: Option<String>,
    /// When it was delivered or given up.
    pub ended: Option<String>,
}

impl From<&crate::model::Delivery> for DeliveryView {
    fn from(d: &crate::model::Delivery) -> DeliveryView {
        DeliveryView {
            state: d.state.as_str().to_string(),
            url: d.url.clone(),
            webhook_id: d.webhook_id(),
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error.clone(),
            next_attempt: d.due_ms().map(format_time),
            ended: d.ended_ms.map(format_time),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionView {
    pub name: String,
    pub owner: String,
    /// The image as given at create/update.
    pub image: String,
    /// What every call runs: the content `image` named when it was
    /// resolved (`repo@sha256:...`, or a local image's ID `sha256:...`);
    /// null for a function stored before digests were pinned and not
    /// pinned yet. (Absent from a daemon older than the CLI.)
    #[serde(default)]
    pub image_digest: Option<String>,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub timeout: Option<String>,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    /// The OCI runtime its calls run under: its own, else the server's
    /// default; null only while the Engine's default is unknown.
    pub runtime: Option<String>,
    /// The call URL: whoever holds it may call the function.
    pub address: String,
    pub created: String,
    pub updated: String,
    /// Its calls by state (the `/status` counts), so a list needs no
    /// request per function. (Absent from a daemon older than the CLI.)
    #[serde(default)]
    pub calls: StatusView,
    pub output_cache_bytes: u64,
    pub output_cache_budget: u64,
    pub log_cache_bytes: u64,
    pub log_cache_budget: u64,
    /// Its completion webhook; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookView>,
    /// The signing secret, in the create/update answer that made it only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// Its schedule, if it has one. (Absent from a daemon older than the CLI.)
    #[serde(default)]
    pub schedule: Option<ScheduleView>,
}

/// A function's cache occupancy and budgets, for its view.
pub struct CacheUse {
    pub stats: FunctionStats,
    pub output_budget: u64,
    pub log_budget: u64,
}

impl FunctionView {
    /// `runtime` is the effective one (`Service::runtime_of`).
    pub fn new(
        f: &Function,
        address: String,
        runtime: Option<String>,
        cache: CacheUse,
    ) -> FunctionView {
        FunctionView {
            name: f.name.to_string(),
            owner: f.owner.to_string(),
            image: f.spec.image.clone(),
            image_digest: f.image_digest.clone(),
            command: f.spec.command.clone(),
            env: f
                .spec
                .env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
            timeout: f.spec.timeout_ms.map(|t| {
                humantime::format_duration(std::time::Duration::from_millis(t)).to_string()
            }),
            memory: f.spec.memory_bytes,
            cpus: f.spec.cpus,
            runtime,
            address,
            created: format_time(f.created_ms),
            updated: format_time(f.updated_ms),
            calls: StatusView::from(cache.stats),
            output_cache_bytes: cache.stats.output_bytes,
            output_cache_budget: cache.output_budget,
            log_cache_bytes: cache.stats.log_bytes,
            log_cache_budget: cache.log_budget,
            webhook: f.webhook.as_ref().map(|w| WebhookView {
                url: w.url.clone(),
                on: w.on.names(),
            }),
            webhook_secret: None,
            schedule: f.schedule.as_ref().map(ScheduleView::from),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CallAccepted {
    pub call_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CallView {
    pub call_id: String,
    pub function: String,
    pub owner: String,
    pub state: String,
    pub created: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    /// Milliseconds from start to end (ended calls that started).
    #[serde(default)]
    pub duration_ms: Option<u64>,
    pub exit_code: Option<i64>,
    pub message: Option<String>,
    pub stdin_bytes: u64,
    pub stdout_bytes: u64,
    pub short_stderr: String,
    /// The image the call's container was made from (the function's
    /// pinned digest then); null before it ran, or for a call stored
    /// before this was recorded.
    #[serde(default)]
    pub image_digest: Option<String>,
    /// Its completion webhook's delivery (`GET /v1/calls/{id}` only);
    /// absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<DeliveryView>,
}

/// A page of `GET /v1/functions/{name}/calls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CallPageView {
    /// Newest first; the same view as `GET /v1/calls/{id}`.
    pub calls: Vec<CallView>,
    /// Passed back as `cursor=` for the next (older) page; absent once the
    /// history is exhausted. A page may be short, even empty, and still
    /// have one (its scan was bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

impl From<&Call> for CallView {
    fn from(c: &Call) -> CallView {
        CallView {
            call_id: c.id.to_string(),
            function: c.function.to_string(),
            owner: c.owner.to_string(),
            state: c.state.as_str().to_string(),
            created: format_time(c.created_ms),
            started: c.started_ms.map(format_time),
            finished: c.finished_ms.map(format_time),
            duration_ms: c
                .finished_ms
                .zip(c.started_ms)
                .map(|(f, s)| f.saturating_sub(s)),
            exit_code: c.exit_code,
            message: c.message.clone(),
            stdin_bytes: c.stdin_len,
            stdout_bytes: c.stdout_len,
            short_stderr: String::from_utf8_lossy(&c.short_stderr).into_owned(),
            image_digest: c.image_digest.clone(),
            webhook: None,
        }
    }
}

/// One log line of `/logs` (a JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EventView {
    pub time: String,
    pub event: String,
    pub call_id: String,
    pub short_stdin: String,
    pub short_stdout: String,
    pub short_stderr: String,
    pub message: String,
    /// The event's place in its function's log: a follow resumes with
    /// `after=` the last one seen. 0 from a server that predates it.
    #[serde(default)]
    pub seq: u64,
    /// On FINISHED and FAILED: the image the call ran (`CallView`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

impl From<&Event> for EventView {
    fn from(e: &Event) -> EventView {
        EventView {
            time: format_time(e.time_ms),
            // A CALL with a message is a tick's (`Schedule::tick_message`).
            event: if e.kind == crate::model::EventKind::Call && !e.message.is_empty() {
                SCHEDULE_EVENT.to_string()
            } else {
                e.kind.as_str().to_string()
            },
            call_id: e.call_id.to_string(),
            short_stdin: e.short_stdin.clone(),
            short_stdout: e.short_stdout.clone(),
            short_stderr: e.short_stderr.clone(),
            message: e.message.clone(),
            seq: 0,
            image_digest: e.image_digest.clone(),
        }
    }
}

impl EventView {
    /// The `func logs` text line of DESIGN 1.1.
    pub fn line(&self) -> String {
        let mut s = format!("{} [{}] CallId: {}", self.time, self.event, self.call_id);
        match self.event.as_str() {
            "CALL" => s.push_str(&format!(", ShortStdin: {}", self.short_stdin)),
            SCHEDULE_EVENT => s.push_str(&format!(
                ", {}, ShortStdin: {}",
                self.message, self.short_stdin
            )),
            "FINISHED" => s.push_str(&format!(
                ", ShortStdout: {}, ShortStderr: {}",
                self.short_stdout, self.short_stderr
            )),
            "FAILED" => s.push_str(&format!(
                ", ShortStdout: {}, ShortStderr: {}, Message: {}",
                self.short_stdout, self.short_stderr, self.message
            )),
            "WEBHOOK" => s.push_str(&format!(", {}", self.message)),
            _ => {}
        }
        terminal_safe(&s)
    }
}

/// `text` as it may be written to a terminal: one line (a newline becomes a
/// space), tabs kept, and every other control character (C0, DEL, C1: ESC,
/// BEL, CR, CSI...) shown as `\xNN` or `\u{NN}`, so bytes a function printed
/// or any URL holder sent cannot move the reader's cursor, retitle their
/// window or rewrite what was shown before. JSON output keeps the bytes.
fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push(' '),
            '\t' => out.push('\t'),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Calls over a window (`GET /v1/activity`, `.../functions/NAME/activity`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActivityView {
    /// `hour` or `day`.
    pub window: String,
    /// Seconds per point: 60 for an hour, 900 for a day.
    pub step: u64,
    /// Oldest first; the last is the current minute or quarter hour.
    pub points: Vec<ActivityPoint>,
    pub total: ActivityCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActivityPoint {
    /// The start of the point.
    pub time: String,
    #[serde(flatten)]
    pub counts: ActivityCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActivityCounts {
    pub accepted: u64,
    pub finished: u64,
    pub failed: u64,
    /// Median run time in seconds of the calls that ended; null without one.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
}

impl From<&crate::activity::Bucket> for ActivityCounts {
    fn from(b: &crate::activity::Bucket) -> ActivityCounts {
        ActivityCounts {
            accepted: u64::from(b.accepted),
            finished: u64::from(b.finished),
            failed: u64::from(b.failed),
            p50: b.quantile(0.5),
            p95: b.quantile(0.95),
        }
    }
}

impl From<crate::activity::Report> for ActivityView {
    fn from(r: crate::activity::Report) -> ActivityView {
        ActivityView {
            window: r.window.as_str().to_string(),
            step: r.window.step(),
            points: r
                .points
                .iter()
                .map(|(t, b)| ActivityPoint {
                    time: format_time(t * 1000),
                    counts: b.into(),
                })
                .collect(),
            total: (&r.total).into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StatusView {
    pub total: u64,
    pub pending: u64,
    pub running: u64,
    pub finished: u64,
    pub failed: u64,
}

impl From<FunctionStats> for StatusView {
    fn from(s: FunctionStats) -> StatusView {
        StatusView {
            total: s.total,
            pending: s.pending,
            running: s.running,
            finished: s.finished,
            failed: s.failed,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct UserCreate {
    pub name: String,
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub max_queued: Option<u64>,
    #[serde(default)]
    pub max_queued_bytes: Option<u64>,
    #[serde(default)]
    pub max_functions: Option<u32>,
    /// Requests per second per API key and per call URL.
    #[serde(default)]
    pub rate: Option<u32>,
    /// Slots of `host_max_running` kept for the user's calls.
    #[serde(default)]
    pub reserved: Option<u32>,
    #[serde(default)]
    pub admin: bool,
}

/// A user's budgets as a create or patch carries them: an absent one is
/// left as it is (on create: the `[scheduler]` default).
pub fn user_limits(
    max_queued: Option<u64>,
    max_queued_bytes: Option<u64>,
    max_functions: Option<u32>,
    rate: Option<u32>,
    reserved: Option<u32>,
) -> UserLimits {
    UserLimits {
        max_queued,
        max_queued_bytes,
        max_functions,
        rate,
        reserved,
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct UserPatch {
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub max_queued: Option<u64>,
    #[serde(default)]
    pub max_queued_bytes: Option<u64>,
    #[serde(default)]
    pub max_functions: Option<u32>,
    /// Requests per second per API key and per call URL.
    #[serde(default)]
    pub rate: Option<u32>,
    /// Slots of `host_max_running` kept for the user's calls.
    #[serde(default)]
    pub reserved: Option<u32>,
    /// Issue a new key; the old one stops working.
    #[serde(default)]
    pub rotate_key: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UserView {
    pub name: String,
    pub max_concurrency: u32,
    /// The budgets in force: the user's own, else the `[scheduler]` defaults.
    pub max_queued: u64,
    pub max_queued_bytes: u64,
    pub max_functions: u32,
    /// Requests per second per API key and per call URL.
    pub rate: u32,
    /// Slots of `host_max_running` kept for the user's calls (their own
    /// reservation, else the default for their role, at most their quota).
    pub reserved: u32,
    pub admin: bool,
    pub created: String,
    /// Only in the answer that created (or rotated) the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl UserCreate {
    pub fn limits(&self) -> UserLimits {
        user_limits(
            self.max_queued,
            self.max_queued_bytes,
            self.max_functions,
            self.rate,
            self.reserved,
        )
    }
}

impl UserPatch {
    pub fn limits(&self) -> UserLimits {
        user_limits(
            self.max_queued,
            self.max_queued_bytes,
            self.max_functions,
            self.rate,
            self.reserved,
        )
    }
}

impl UserView {
    pub fn new(u: &User, budget: &Budget, key: Option<String>) -> UserView {
        UserView {
            name: u.name.to_string(),
            max_concurrency: u.max_concurrency,
            max_queued: budget.max_queued,
            max_queued_bytes: budget.max_queued_bytes,
            max_functions: budget.max_functions,
            rate: budget.rate,
            reserved: budget.reserved,
            admin: u.admin,
            created: format_time(u.created_ms),
            key,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Health {
    pub status: String,
    /// `up` when the Docker Engine answers a ping, else `down`.
    pub engine: String,
    /// `ok`, or why the store cannot take writes (then the answer is 503).
    pub store: String,
    /// The value of the `io.hyperfuncd.instance` label on this daemon's containers.
    pub instance: String,
}

/// One line of `POST /v1/functions` or `PATCH /v1/functions/{name}` answered
/// as `application/x-ndjson` (asked with `Accept`, once the image is being
/// pulled): exactly one of `Pull`, `Progress`, or a final `Status` with
/// `Function` or `Error`. Absent fields are left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PullLine {
    /// The first line: the image is not on the Engine and is being pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullStart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<PullProgressView>,
    /// The status the plain request would have answered (201, 200, 400…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The last line of a success: the function, as the JSON answer has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionView>,
    /// The last line of a failure: the JSON error body's `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PullStart {
    pub image: String,
}

/// A layer's state during a pull, in the Engine's own state words
/// (`Downloading`, `Extracting`, `Pull complete`…); bytes when known.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PullProgressView {
    pub id: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, stdout: &str) -> EventView {
        EventView {
            image_digest: None,
            time: "2026-01-01T00:00:00Z".into(),
            event: kind.into(),
            call_id: "c".into(),
            short_stdin: "in\u{7}".into(),
            short_stdout: stdout.into(),
            short_stderr: "err\r\n".into(),
            message: "exit\u{1b}]0;owned\u{7}".into(),
            seq: 1,
        }
    }

    #[test]
    fn log_lines_escape_control_characters() {
        let line = event("FAILED", "\u{1b}[2Jcleared\ta\nb\u{7f}\u{9b}x").line();
        assert_eq!(
            line,
            "2026-01-01T00:00:00Z [FAILED] CallId: c, \
             ShortStdout: \\x1b[2Jcleared\ta b\\x7f\\u{9b}x, ShortStderr: err\\x0d , \
             Message: exit\\x1b]0;owned\\x07"
        );
        assert_eq!(
            event("CALL", "").line(),
            "2026-01-01T00:00:00Z [CALL] CallId: c, ShortStdin: in\\x07"
        );
        let mut tick = event(SCHEDULE_EVENT, "");
        tick.message = "tick 2026-01-01T00:00:00Z of \"@every 2s\" (UTC)".into();
        assert_eq!(
            tick.line(),
            "2026-01-01T00:00:00Z [SCHEDULE] CallId: c, tick 2026-01-01T00:00:00Z of \"@every 2s\" (UTC), ShortStdin: in\\x07"
        );
        // Plain text, including non-ASCII, is left as it is.
        assert_eq!(terminal_safe("héllo wörld ✓"), "héllo wörld ✓");
    }
}

/// `PUT /v1/registries/{host}`: a login to check and keep. Never echoed.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RegistryLoginBody {
    pub username: String,
    pub password: String,
}

/// A registry login as the API shows it: host and username, never the password.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RegistryLoginView {
    pub host: String,
    pub username: String,
    pub created: String,
}

impl RegistryLoginView {
    pub fn new(l: &crate::model::RegistryLogin) -> RegistryLoginView {
        RegistryLoginView {
            host: l.host.clone(),
            username: l.username.clone(),
            created: format_time(l.created_ms),
        }
    }
}

/// One image of `GET /v1/images` (admin): what functions run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageView {
    /// The pinned reference (or, for a function not pinned yet, its tag).
    pub reference: String,
    /// The image ID; null when the Engine does not have it now (the next
    /// call pulls it again).
    pub id: Option<String>,
    pub size_bytes: Option<u64>,
    /// hyperfuncd pulled it, so it removes it once no function uses it.
    pub pulled: bool,
    /// `OWNER/NAME` of each function that runs it.
    pub functions: Vec<String>,
}

impl From<&crate::service::ImageUse> for ImageView {
    fn from(u: &crate::service::ImageUse) -> ImageView {
        ImageView {
            reference: u.reference.clone(),
            id: u.id.clone(),
            size_bytes: u.size_bytes,
            pulled: u.pulled,
            functions: u.functions.iter().map(|f| f.to_string()).collect(),
        }
    }
}
