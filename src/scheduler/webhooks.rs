//! The completion webhook worker: every second (or when woken) it takes
//! the due deliveries from the store (`Store::due_webhooks`), claims each
//! (`Store::claim_webhook`, a lease, so nodes of a shared store do not
//! send one attempt twice), POSTs it signed as Standard Webhooks says, and
//! records the attempt (`Store::webhook_attempted`). At least once: a crash
//! between the POST and its record sends it again, with the same
//! `webhook-id`.
//!
//! Bounded: `[webhooks] max_in_flight` deliveries at once, `max_per_host`
//! per receiver, each with a connect and a response timeout, at most
//! `RESPONSE_READ_MAX` bytes of an answer read, no redirect followed, no
//! proxy, and every address checked by the `Policy` at connection time.
//! A delivery whose receiver is at its bound waits for a later turn
//! without being claimed, so a slow receiver holds only its own.
//! It must never hold a delivery's secret anywhere but the request's
//! signature, nor log it.

use super::webhook_policy::{Policy, Target};
use crate::config::WebhooksConfig;
use crate::model::{now_ms, Attempt, CallId, Delivery, DeliveryState, RetryRule};
use crate::store::{Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How often due deliveries are looked for.
const TICK: Duration = Duration::from_secs(1);
/// Most due deliveries one turn looks at.
const DUE_BATCH: usize = 1024;
/// Most bytes of a receiver's answer read (then the connection is dropped).
pub const RESPONSE_READ_MAX: usize = 4096;
/// A claim lasts the attempt's timeouts and this much more.
const LEASE_SLACK: Duration = Duration::from_secs(10);

/// The headers besides the three of Standard Webhooks.
pub const CALL_ID_HEADER: &str = "hyperfuncd-call-id";
pub const FUNCTION_HEADER: &str = "hyperfuncd-function";
pub const STATE_HEADER: &str = "hyperfuncd-state";
pub const EXIT_CODE_HEADER: &str = "hyperfuncd-exit-code";

pub struct Webhooks {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    policy: Arc<Policy>,
    rule: RetryRule,
    lease: Duration,
    /// Who this process is in a lease: random per run, so a restarted
    /// daemon waits out its predecessor's leases like anyone's.
    holder: String,
    max_per_host: usize,
    global: Arc<Semaphore>,
    per_host: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Deliveries this process is sending now (not looked at again).
    inflight: Mutex<HashSet<CallId>>,
    wake: Notify,
}

/// The resolver every delivery connects through: the system's answer,
/// less each address the policy refuses (DNS rebinding reaches nothing).
struct Resolver(Arc<Policy>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.0);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let ok = policy.filter(found.map(|a| a.ip()));
            if ok.is_empty() {
                return Err(format!("{host} resolves to no address webhooks may reach").into());
            }
            let addrs: reqwest::dns::Addrs =
                Box::new(ok.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Webhooks {
    pub fn new(store: Arc<dyn Store>, c: &WebhooksConfig) -> Result<Arc<Webhooks>, String> {
        let policy = Arc::new(Policy::from_config(c)?);
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(c.connect_timeout)
            .timeout(c.response_timeout)
            .pool_max_idle_per_host(c.max_per_host)
            .user_agent(concat!("hyperfuncd/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(Resolver(Arc::clone(&policy))));
        if let Some(path) = &c.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("webhooks.ca_file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("webhooks.ca_file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "webhooks.ca_file {}: no certificate in it",
                    path.display()
                ));
            }
            for cert in certs {
                b = b.add_root_certificate(cert);
            }
        }
        let client = b
            .build()
            .map_err(|e| format!("cannot make the webhook client: {e}"))?;
        Ok(Arc::new(Webhooks {
            store,
            client,
            policy,
            rule: RetryRule {
                min_backoff: c.min_backoff,
                max_backoff: c.max_backoff,
                retry_for: c.retry_for,
            },
            lease: c.connect_timeout + c.response_timeout + LEASE_SLACK,
            holder: uuid::Uuid::new_v4().simple().to_string(),
            max_per_host: c.max_per_host,
            global: Arc::new(Semaphore::new(c.max_in_flight)),
            per_host: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        }))
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Looks for due deliveries now (a redeliver).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            if let Err(e) = self.turn().await {
                tracing::debug!(error = %e, "looking for due webhooks failed");
            }
        }
    }

    /// Starts every due delivery whose receiver has room.
    async fn turn(self: &Arc<Self>) -> Result<(), StoreError> {
        let now = now_ms();
        for (id, url) in self.store.due_webhooks(now, DUE_BATCH).await? {
            if lock(&self.inflight).contains(&id) {
                continue;
            }
            let receiver = match self.policy.check_url(&url) {
                Ok(t) => t.receiver,
                // Refused at its attempt (and so given up), not here.
                Err(_) => String::new(),
            };
            let Ok(global) = Arc::clone(&self.global).try_acquire_owned() else {
                break;
            };
            let host = Arc::clone(
                lock(&self.per_host)
                    .entry(receiver)
                    .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_host))),
            );
            let Ok(local) = host.try_acquire_owned() else {
                continue;
            };
            let until = now_ms().saturating_add(self.lease.as_millis() as u64);
            let Some(d) = self
                .store
                .claim_webhook(&id, &self.holder, now_ms(), until)
                .await?
            else {
                continue;
            };
            lock(&self.inflight).insert(id);
            let this = Arc::clone(self);
            tokio::spawn(async move {
                this.deliver(d, (global, local)).await;
                lock(&this.inflight).remove(&id);
            });
        }
        // Receivers with nothing in flight are forgotten.
        let max = self.max_per_host;
        lock(&self.per_host).retain(|_, s| s.available_permits() < max);
        Ok(())
    }

    /// One attempt of `d`, recorded.
    async fn deliver(
        &self,
        mut d: Delivery,
        _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) {
        let attempt = self.attempt(&d).await;
        let jitter = rand::random::<f64>();
        d.record(&attempt, &self.rule, now_ms(), jitter);
        let result = match d.state {
            DeliveryState::Delivered => "delivered",
            DeliveryState::GaveUp => "gave_up",
            DeliveryState::Pending => "retry",
        };
        crate::metrics::webhook_delivery(d.owner.as_str(), result);
        match &attempt {
            Attempt::Delivered(_) => {
                tracing::info!(call = %d.call_id, attempts = d.attempts, "webhook delivered")
            }
            Attempt::Retry { error, .. } | Attempt::Refused { error, .. } => {
                tracing::info!(call = %d.call_id, attempts = d.attempts, error = %error, outcome = result, "webhook not delivered")
            }
        }
        if let Err(e) = self.store.webhook_attempted(&d, &self.holder).await {
            // Its lease passed (another takes it) or the store failed: the
            // attempt may be made again, which at least once allows.
            tracing::warn!(call = %d.call_id, error = %e, "cannot record a webhook attempt");
        }
    }

    async fn attempt(&self, d: &Delivery) -> Attempt {
        let target = match self.policy.check_url(&d.url) {
            Ok(t) => t,
            Err(e) => {
                return Attempt::Refused {
                    status: None,
                    error: e,
                }
            }
        };
        let secret = match self.store.get_function(&d.fn_key()).await {
            Ok(Some(f)) => match f.webhook {
                Some(w) => w.secret,
                None => {
                    return Attempt::Refused {
                        status: None,
                        error: "its function has no webhook secret any more".into(),
                    }
                }
            },
            Ok(None) => {
                return Attempt::Refused {
                    status: None,
                    error: "its function was removed".into(),
                }
            }
            Err(e) => {
                return Attempt::Retry {
                    status: None,
                    error: format!("cannot read its function: {e}"),
                    retry_after: None,
                }
            }
        };
        self.post(d, &target, &secret).await
    }

    async fn post(
        &self,
        d: &Delivery,
        target: &Target,
        secret: &crate::model::WebhookSecret,
    ) -> Attempt {
        let id = d.webhook_id();
        let ts = now_ms() / 1000;
        let signature = crate::model::sign(secret, &id, ts, &d.body);
        let mut req = self
            .client
            .post(target.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .header(CALL_ID_HEADER, d.call_id.to_string())
            .header(FUNCTION_HEADER, d.function.as_str())
            .header(STATE_HEADER, d.call_state.as_str());
        if let Some(code) = d.exit_code {
            req = req.header(EXIT_CODE_HEADER, code.to_string());
        }
        let answer = req.body(d.body.clone()).send().await;
        let mut resp = match answer {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    status: None,
                    error: describe(&e),
                    retry_after: None,
                }
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read a little (so a small answer completes), never more.
        let mut read = 0;
        while read < RESPONSE_READ_MAX {
            match resp.chunk().await {
                Ok(Some(c)) => read += c.len(),
                _ => break,
            }
        }
        Attempt::of_status(status, retry_after)
    }
}

/// A send error in a few words (reqwest's chain, without the URL: it is
/// shown beside anyway).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut s = what.to_string();
    let mut source = std::error::Error::source(e);
    let mut depth = 0;
    while let Some(cause) = source {
        if depth < 3 {
            s.push_str(": ");
            s.push_str(&cause.to_string());
        }
        depth += 1;
        source = cause.source();
    }
    s.chars().take(300).collect()
}
