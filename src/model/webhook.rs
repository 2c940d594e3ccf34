//! Completion webhooks as data: a function's webhook and its signing
//! secret, the target a call was accepted with, the delivery record the
//! store keeps from the call's end until it is delivered or given up, the
//! envelope it carries, its Standard Webhooks signature, and the retry
//! rule (which answers are retried, after how long). No I/O: the sending
//! is `scheduler/webhooks.rs`'s.

use super::call::{Call, CallState, Event, EventKind};
use super::ids::{CallId, FnKey, Name};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Most bytes of a call's STDOUT copied into its delivery (base64 in
/// `Output`); beyond them `OutputTruncated` is true. The whole output is
/// still fetched as ever.
pub const WEBHOOK_OUTPUT_MAX: usize = 256 * 1024;
/// The longest webhook URL accepted.
pub const WEBHOOK_URL_MAX: usize = 2048;
/// Random bytes of a signing secret (the specification asks for 24 to 64).
const SECRET_BYTES: usize = 32;
const SECRET_PREFIX: &str = "whsec_";

/// A function's signing secret, `whsec_` + base64 of its key bytes, as the
/// Standard Webhooks libraries take it. Shown once, in the create/update
/// answer that made it; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    pub fn new() -> WebhookSecret {
        use rand::RngCore;
        let mut key = [0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut key);
        WebhookSecret(format!(
            "{SECRET_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ))
    }

    /// A secret as written (`whsec_` + base64); for tests and vectors.
    pub fn parse(s: &str) -> Result<WebhookSecret, String> {
        let secret = WebhookSecret(s.to_string());
        match secret.key() {
            Some(k) if !k.is_empty() => Ok(secret),
            _ => Err("a webhook secret is whsec_ followed by base64".into()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The HMAC key: the base64 after the prefix, decoded.
    fn key(&self) -> Option<Vec<u8>> {
        let b64 = self.0.strip_prefix(SECRET_PREFIX).unwrap_or(&self.0);
        base64::engine::general_purpose::STANDARD.decode(b64).ok()
    }
}

impl Default for WebhookSecret {
    fn default() -> Self {
        WebhookSecret::new()
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// Which ends a webhook is sent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookOn {
    pub finished: bool,
    pub failed: bool,
}

impl WebhookOn {
    pub const ALL: WebhookOn = WebhookOn {
        finished: true,
        failed: true,
    };

    /// `finished`, `failed`, or both (comma-separated, or as a list).
    pub fn parse<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<WebhookOn, String> {
        let mut on = WebhookOn {
            finished: false,
            failed: false,
        };
        for w in words {
            for w in w.split(',').map(str::trim).filter(|w| !w.is_empty()) {
                match w.to_ascii_lowercase().as_str() {
                    "finished" => on.finished = true,
                    "failed" => on.failed = true,
                    _ => {
                        return Err(format!(
                            "invalid webhook event {w:?}: expected finished or failed"
                        ))
                    }
                }
            }
        }
        if !on.finished && !on.failed {
            return Err("a webhook needs at least one of finished, failed".into());
        }
        Ok(on)
    }

    pub fn wants(&self, state: CallState) -> bool {
        match state {
            CallState::Finished => self.finished,
            CallState::Failed => self.failed,
            _ => false,
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.finished {
            v.push("finished".to_string());
        }
        if self.failed {
            v.push("failed".to_string());
        }
        v
    }
}

/// A function's webhook: where its calls' ends go (`url`: none when only
/// the calls' own `X-Callback-Url`s are used), for which ends, and the
/// secret that signs every delivery of its calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionWebhook {
    pub url: Option<String>,
    pub on: WebhookOn,
    pub secret: WebhookSecret,
}

/// Where a call's end goes, fixed when it is accepted: its own
/// `X-Callback-Url` (every end), else its function's webhook then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallWebhook {
    pub url: String,
    pub on: WebhookOn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Waiting for its next attempt.
    Pending,
    /// A 2xx answered.
    Delivered,
    /// Refused (a 4xx other than 429, the URL no longer allowed) or out of
    /// retries (`[webhooks] retry_for`); `redeliver` sends it again.
    GaveUp,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "PENDING",
            DeliveryState::Delivered => "DELIVERED",
            DeliveryState::GaveUp => "GAVE_UP",
        }
    }
}

/// Who is sending a delivery now, until when (shared stores: another node
/// takes it only once this has passed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub until_ms: u64,
}

/// A call's delivery, stored in the same commit as the call's end and kept
/// (delivered or given up) until the call's record goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub call_id: CallId,
    pub function: Name,
    pub owner: Name,
    pub url: String,
    /// The call's end, for the headers.
    pub call_state: CallState,
    pub exit_code: Option<i64>,
    /// The envelope (`envelope`), the same bytes at every attempt.
    pub body: Vec<u8>,
    pub state: DeliveryState,
    pub attempts: u32,
    /// The retries' window starts here (the end, or a `redeliver`).
    pub since_ms: u64,
    /// When the next attempt is due (while `Pending`).
    pub next_ms: u64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// When it was delivered or given up.
    pub ended_ms: Option<u64>,
    pub lease: Option<Lease>,
}

/// The JSON body of every delivery. Field names and meanings are stable
/// (README "Webhooks").
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Envelope {
    pub call_id: String,
    pub function: String,
    pub owner: String,
    pub state: String,
    pub exit_code: Option<i64>,
    pub message: Option<String>,
    pub accepted_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_ms: Option<u64>,
    /// base64 of the first `WEBHOOK_OUTPUT_MAX` bytes of STDOUT (FINISHED
    /// calls; empty otherwise).
    pub output: String,
    pub output_truncated: bool,
}

/// The envelope of `call`'s end with its STDOUT `stdout`.
pub fn envelope(call: &Call, stdout: &[u8]) -> Vec<u8> {
    let stdout = if call.state == CallState::Finished {
        stdout
    } else {
        &[]
    };
    let cut = stdout.len().min(WEBHOOK_OUTPUT_MAX);
    let e = Envelope {
        call_id: call.id.to_string(),
        function: call.function.to_string(),
        owner: call.owner.to_string(),
        state: call.state.as_str().to_string(),
        exit_code: call.exit_code,
        message: call.message.clone(),
        accepted_at: super::format_time(call.created_ms),
        started_at: call.started_ms.map(super::format_time),
        ended_at: call.finished_ms.map(super::format_time),
        duration_ms: call
            .finished_ms
            .zip(call.started_ms)
            .map(|(f, s)| f.saturating_sub(s)),
        output: base64::engine::general_purpose::STANDARD.encode(&stdout[..cut]),
        output_truncated: cut < stdout.len(),
    };
    // A struct of strings and numbers always serializes.
    serde_json::to_vec(&e).unwrap_or_default()
}

/// `v1,` + base64 of HMAC-SHA256(`id.timestamp.body`) under the secret's
/// key bytes: the `webhook-signature` of the Standard Webhooks specification.
pub fn sign(secret: &WebhookSecret, id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret.key().unwrap_or_default());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// How long deliveries are retried, and how far apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryRule {
    /// The first retry's base delay; each later one doubles it.
    pub min_backoff: Duration,
    /// No delay grows past this (a `Retry-After` included).
    pub max_backoff: Duration,
    /// Retries stop once the next would come later than this after the end.
    pub retry_for: Duration,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx.
    Delivered(u16),
    /// Worth another try: a timeout, a connection error, 429 or 5xx (with
    /// the answer's `Retry-After`, seconds).
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Never worth another try: another 4xx (or 1xx/3xx: no redirect is
    /// followed), or a URL the policy no longer allows.
    Refused { status: Option<u16>, error: String },
}

impl Attempt {
    /// An HTTP answer's status, as the rule classes it.
    pub fn of_status(status: u16, retry_after: Option<Duration>) -> Attempt {
        match status {
            200..=299 => Attempt::Delivered(status),
            429 | 500..=599 => Attempt::Retry {
                status: Some(status),
                error: format!("answered {status}"),
                retry_after,
            },
            _ => Attempt::Refused {
                status: Some(status),
                error: format!("answered {status}"),
            },
        }
    }
}

/// The delay before retry number `attempts` (1: after the first attempt):
/// `min_backoff * 2^(attempts-1)` capped at `max_backoff`, with "equal
/// jitter" (half fixed, half random by `jitter` in [0, 1)), and never
/// sooner than a `Retry-After` (itself capped at `max_backoff`).
pub fn backoff(
    rule: &RetryRule,
    attempts: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let base = rule
        .min_backoff
        .saturating_mul(1u32 << exp)
        .min(rule.max_backoff);
    let jitter = jitter.clamp(0.0, 1.0);
    let delay = base / 2 + base.mul_f64(jitter) / 2;
    match retry_after {
        Some(r) => delay.max(r.min(rule.max_backoff)),
        None => delay,
    }
}

impl Delivery {
    /// The delivery of `call`'s end (its STDOUT `stdout`), if the call was
    /// accepted with a webhook that wants this end.
    pub fn for_end(call: &Call, stdout: &[u8]) -> Option<Delivery> {
        let hook = call.webhook.as_ref()?;
        if !call.state.is_done() || !hook.on.wants(call.state) {
            return None;
        }
        let now = call.finished_ms.unwrap_or_else(super::now_ms);
        Some(Delivery {
            call_id: call.id,
            function: call.function.clone(),
            owner: call.owner.clone(),
            url: hook.url.clone(),
            call_state: call.state,
            exit_code: call.exit_code,
            body: envelope(call, stdout),
            state: DeliveryState::Pending,
            attempts: 0,
            since_ms: now,
            next_ms: now,
            last_status: None,
            last_error: None,
            ended_ms: None,
            lease: None,
        })
    }

    pub fn fn_key(&self) -> FnKey {
        FnKey::new(self.owner.clone(), self.function.clone())
    }

    /// `webhook-id`: the same at every attempt and after a restart, so a
    /// receiver can drop a repeat.
    pub fn webhook_id(&self) -> String {
        format!("msg_{}", self.call_id)
    }

    /// When an attempt may next be made: `None` once it is settled.
    pub fn due_ms(&self) -> Option<u64> {
        if self.state != DeliveryState::Pending {
            return None;
        }
        let leased = self.lease.as_ref().map_or(0, |l| l.until_ms);
        Some(self.next_ms.max(leased))
    }

    /// Records an attempt's result at `now_ms`: delivered, given up, or
    /// due again after `backoff` (given up instead if that is past the
    /// retry window). Releases the lease.
    pub fn record(&mut self, attempt: &Attempt, rule: &RetryRule, now_ms: u64, jitter: f64) {
        self.attempts = self.attempts.saturating_add(1);
        self.lease = None;
        match attempt {
            Attempt::Delivered(status) => {
                self.state = DeliveryState::Delivered;
                self.last_status = Some(*status);
                self.last_error = None;
                self.ended_ms = Some(now_ms);
            }
            Attempt::Refused { status, error } => {
                self.state = DeliveryState::GaveUp;
                self.last_status = *status;
                self.last_error = Some(error.clone());
                self.ended_ms = Some(now_ms);
            }
            Attempt::Retry {
                status,
                error,
                retry_after,
            } => {
                self.last_status = *status;
                self.last_error = Some(error.clone());
                let delay = backoff(rule, self.attempts, *retry_after, jitter);
                let next = now_ms.saturating_add(delay.as_millis() as u64);
                let window_end = self
                    .since_ms
                    .saturating_add(rule.retry_for.as_millis() as u64);
                if next > window_end {
                    self.state = DeliveryState::GaveUp;
                    self.ended_ms = Some(now_ms);
                } else {
                    self.next_ms = next;
                }
            }
        }
    }

    /// Starts it over (`func redeliver`): due now, a new retry window.
    pub fn restart(&mut self, now_ms: u64) {
        self.state = DeliveryState::Pending;
        self.since_ms = now_ms;
        self.next_ms = now_ms;
        self.ended_ms = None;
        self.lease = None;
    }

    /// What `func logs` shows once it is settled: `[WEBHOOK]`, with
    /// "delivered 200 after 3 attempts" or "gave up after N attempts: ...".
    pub fn event(&self) -> Event {
        let n = self.attempts;
        let tries = if n == 1 { "attempt" } else { "attempts" };
        let message = match self.state {
            DeliveryState::Delivered => format!(
                "delivered {} after {n} {tries}",
                self.last_status.unwrap_or_default()
            ),
            _ => format!(
                "gave up after {n} {tries}: {}",
                self.last_error.as_deref().unwrap_or("no answer")
            ),
        };
        Event {
            time_ms: super::now_ms(),
            kind: EventKind::Webhook,
            call_id: self.call_id,
            short_stdin: String::new(),
            short_stdout: String::new(),
            short_stderr: String::new(),
            message,
            image_digest: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_standard_webhooks_test_vector() {
        // The specification's libraries' own vector.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_random_prefixed_and_never_in_debug() {
        let (a, b) = (WebhookSecret::new(), WebhookSecret::new());
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("whsec_"));
        assert_eq!(a.key().unwrap().len(), SECRET_BYTES);
        assert!(!format!("{a:?}").contains(a.as_str()));
        let hook = FunctionWebhook {
            url: None,
            on: WebhookOn::ALL,
            secret: a.clone(),
        };
        assert!(!format!("{hook:?}").contains(&a.as_str()[6..]));
        assert!(WebhookSecret::parse("whsec_!!").is_err());
    }

    #[test]
    fn events_to_send_on() {
        assert_eq!(
            WebhookOn::parse(["finished,failed"]).unwrap(),
            WebhookOn::ALL
        );
        let f = WebhookOn::parse(["FINISHED"]).unwrap();
        assert!(f.wants(CallState::Finished) && !f.wants(CallState::Failed));
        assert!(WebhookOn::parse(["done"]).is_err());
        assert!(WebhookOn::parse([""]).is_err());
    }

    const RULE: RetryRule = RetryRule {
        min_backoff: Duration::from_secs(10),
        max_backoff: Duration::from_secs(3600),
        retry_for: Duration::from_secs(24 * 3600),
    };

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after() {
        assert_eq!(backoff(&RULE, 1, None, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(&RULE, 1, None, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(&RULE, 3, None, 0.0), Duration::from_secs(20));
        // Capped, however many attempts.
        assert_eq!(backoff(&RULE, 40, None, 1.0), Duration::from_secs(3600));
        // Retry-After wins when later, within the cap.
        let ra = Some(Duration::from_secs(120));
        assert_eq!(backoff(&RULE, 1, ra, 0.5), Duration::from_secs(120));
        assert_eq!(
            backoff(&RULE, 1, Some(Duration::from_secs(86400)), 0.0),
            Duration::from_secs(3600)
        );
        assert_eq!(
            backoff(&RULE, 5, Some(Duration::from_secs(1)), 0.0),
            Duration::from_secs(80)
        );
    }

    #[test]
    fn which_answers_are_retried() {
        assert_eq!(Attempt::of_status(204, None), Attempt::Delivered(204));
        for s in [429, 500, 502, 503] {
            assert!(
                matches!(Attempt::of_status(s, None), Attempt::Retry { .. }),
                "{s}"
            );
        }
        for s in [301, 302, 400, 401, 404, 410, 413] {
            assert!(
                matches!(Attempt::of_status(s, None), Attempt::Refused { .. }),
                "{s}"
            );
        }
    }

    fn delivery() -> Delivery {
        let n = Name::parse("f").unwrap();
        let mut c = Call::new(n.clone(), n, 1, b"", vec![]);
        c.webhook = Some(CallWebhook {
            url: "https://example.com/h".into(),
            on: WebhookOn::ALL,
        });
        c.transition(CallState::Running).unwrap();
        let mut done = super::super::Outcome::failed("");
        done.state = CallState::Finished;
        done.message = None;
        done.exit_code = Some(0);
        done.stdout = bytes::Bytes::from(vec![b'x'; WEBHOOK_OUTPUT_MAX + 1]);
        c.finish(&done).unwrap();
        Delivery::for_end(&c, &done.stdout).unwrap()
    }

    #[test]
    fn a_delivery_retries_until_its_window_closes() {
        let mut d = delivery();
        let e: Envelope = serde_json::from_slice(&d.body).unwrap();
        assert!(e.output_truncated);
        assert_eq!(e.state, "FINISHED");
        assert_eq!(d.webhook_id(), format!("msg_{}", d.call_id));
        let t0 = d.since_ms;
        let retry = Attempt::Retry {
            status: Some(500),
            error: "answered 500".into(),
            retry_after: None,
        };
        d.record(&retry, &RULE, t0, 0.0);
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.next_ms, t0 + 5000);
        d.record(&Attempt::Delivered(200), &RULE, t0 + 6000, 0.0);
        assert_eq!(d.state, DeliveryState::Delivered);
        assert_eq!(d.event().message, "delivered 200 after 2 attempts");
        assert_eq!(d.due_ms(), None);
        // Past the window: given up, and redeliver starts it over.
        d.restart(t0);
        d.record(&retry, &RULE, t0 + 24 * 3600 * 1000, 0.0);
        assert_eq!(d.state, DeliveryState::GaveUp);
        assert!(d
            .event()
            .message
            .starts_with("gave up after 3 attempts: answered 500"));
        d.restart(t0 + 1);
        d.record(
            &Attempt::Refused {
                status: Some(404),
                error: "answered 404".into(),
            },
            &RULE,
            t0 + 2,
            0.0,
        );
        assert_eq!(d.state, DeliveryState::GaveUp);
        // A lease holds it back.
        d.restart(t0);
        d.lease = Some(Lease {
            holder: "n".into(),
            until_ms: t0 + 9,
        });
        assert_eq!(d.due_ms(), Some(t0 + 9));
    }
}
