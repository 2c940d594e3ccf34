//! The platform's operations, in the vocabulary of the model: who may do what,
//! and in which order the store, the scheduler and the runtime are asked.
//! The HTTP layer parses into these calls and maps their errors; nothing here
//! knows about HTTP.

use crate::config::Config;
use crate::model::RegistryLogin;
use crate::model::{
    now_ms, ApiKey, Budget, Call, CallId, CallState, EnvVar, Event, FnKey, Function, FunctionSpec,
    Idempotency, IdempotencyKey, Name, OutputState, Schedule, Secret, User, UserLimits,
};
use crate::model::{CallWebhook, Delivery, FunctionWebhook, WebhookOn, WebhookSecret};
use crate::runtime::{LoginError, PullAuth, Resolved, Runtime, RuntimeError};
/// How a create or update tells of its image pull: the API streams it.
pub use crate::runtime::{PullEvent, PullProgress};
/// An image functions run, as `image ls` shows it.
pub use crate::scheduler::ImageUse;
use crate::scheduler::{EndWaiter, Ended, Scheduler};
use crate::store::{Accepted, FunctionStats, OutputLookup, Store, StoreError};
/// What a page of a function's call history asks for, and where it resumes.
pub use crate::store::{CallCursor, CallQuery};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    BadRequest(String),
    /// An image from a registry the operator has not allowed.
    #[error("{0}")]
    ImageNotAllowed(String),
    /// An OCI runtime the Docker Engine has not registered; the message
    /// lists the ones it has.
    #[error("{0}")]
    UnknownRuntime(String),
    /// An OCI runtime a non-admin may not choose (`[container]
    /// allowed_runtimes`); the message lists the ones they may.
    #[error("{0}")]
    RuntimeNotAllowed(String),
    #[error("missing or unknown API key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// Over one of the caller's budgets; nothing was stored. The client may
    /// try again after `retry_after_secs`.
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    /// No space to store the request; nothing was stored.
    #[error("{0}")]
    InsufficientStorage(String),
    /// The store cannot write (an I/O error): nothing was stored; the
    /// daemon restarts to recover.
    #[error("{0}")]
    StoreUnavailable(String),
    /// A write whose outcome is unknown: it may or may not have been stored.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// An idempotency key resubmitted with another body than its first call's.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// A webhook URL the policy refuses (`scheduler::WebhookPolicy`), or a
    /// callback a function without a signing secret cannot sign.
    #[error("{0}")]
    InvalidWebhook(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ServiceError::NotFound(format!("{what} not found")),
            StoreError::Conflict(m) => ServiceError::Conflict(m),
            StoreError::Transition(t) => ServiceError::Conflict(t.to_string()),
            e @ StoreError::Full(_) => ServiceError::InsufficientStorage(e.to_string()),
            e @ StoreError::Failed(_) => ServiceError::StoreUnavailable(e.to_string()),
            e @ StoreError::Unsure(_) => ServiceError::OutcomeUnknown(e.to_string()),
            StoreError::Corrupt(m) | StoreError::Config(m) => ServiceError::Internal(m),
            StoreError::Unavailable(m) => ServiceError::StoreUnavailable(m),
            StoreError::OverBudget(message) => ServiceError::TooManyRequests {
                message,
                retry_after_secs: QUEUE_RETRY_AFTER_SECS,
            },
        }
    }
}

impl From<RuntimeError> for ServiceError {
    fn from(e: RuntimeError) -> Self {
        crate::metrics::engine_error(e.engine_fault());
        match e {
            RuntimeError::Unavailable { .. } => ServiceError::Unavailable(e.to_string()),
            RuntimeError::Pull { .. } => ServiceError::BadRequest(e.to_string()),
            RuntimeError::BadImage(m) => ServiceError::BadRequest(m),
            RuntimeError::Engine(m) => ServiceError::Internal(format!("Docker Engine: {m}")),
            RuntimeError::UnknownRuntime { .. } => ServiceError::UnknownRuntime(e.to_string()),
            RuntimeError::Firewall(_) => ServiceError::Internal(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, ServiceError>;

/// `runtime::pull_summary`'s words for a registry that said no: the one
/// pull failure a login can change, so its message says how.
const DENIED: &str = "not found, or access denied";

/// `Retry-After` of a call refused for a full queue: the queue drains at
/// the user's pace, which nothing here can foresee; a few seconds spares
/// the daemon a client that retries at once.
pub const QUEUE_RETRY_AFTER_SECS: u64 = 5;
/// `Retry-After` of a create refused at `max_functions`: only a removal
/// makes room, so this is a pause, not a promise.
const FUNCTIONS_RETRY_AFTER_SECS: u64 = 60;

/// A call `Service::accept` took, or found under its idempotency key.
#[derive(Debug, Clone, Copy)]
pub struct Submitted {
    pub id: CallId,
    /// The key named an earlier call, which this is: nothing new was stored.
    pub replayed: bool,
}

/// Changes asked by `func update`; `None` leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct FunctionUpdate {
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    /// Variables to add or replace.
    pub env_set: Vec<EnvVar>,
    /// Variable names to remove.
    pub env_unset: Vec<String>,
    /// `Some(None)` removes the timeout.
    pub timeout_ms: Option<Option<u64>>,
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    /// `Some(None)` goes back to the daemon's default runtime.
    pub runtime: Option<Option<String>>,
    /// Issue a new URL secret; the old URL stops working.
    pub refresh: bool,
    /// Resolve the image again: pull its tag (a newer image, perhaps) and
    /// pin what it names now.
    pub pull: bool,
    pub webhook: WebhookChange,
    /// Set or change the schedule (absent parts keep the current one's).
    pub schedule: Option<ScheduleInput>,
    /// Remove the schedule: its ticks stop.
    pub no_schedule: bool,
}

/// A schedule as a create or an update gives it. In an update, a part
/// left `None` keeps the function's current one; otherwise the time zone
/// defaults to UTC and the payload to nothing.
#[derive(Debug, Default, Clone)]
pub struct ScheduleInput {
    /// A 5-field cron expression or `@every DURATION`.
    pub expr: Option<String>,
    pub timezone: Option<String>,
    /// The STDIN of each tick's call.
    pub payload: Option<Vec<u8>>,
}

/// A webhook change of `func create`/`update`; `None` leaves a part as it is.
#[derive(Debug, Default, Clone)]
pub struct WebhookChange {
    /// `Some(Some(url))` sets the function's webhook, `Some(None)` removes
    /// it (`--no-webhook`; the secret stays, for calls' own callbacks).
    pub url: Option<Option<String>>,
    pub on: Option<WebhookOn>,
    /// Make a new signing secret (made anyway with a function's first webhook).
    pub rotate_secret: bool,
}

/// A create or update done: the function, and the signing secret it made,
/// if it made one (shown in this answer only, never again).
#[derive(Debug)]
pub struct Saved {
    pub function: Function,
    pub new_secret: Option<WebhookSecret>,
}

/// What a `get` of a call's output finds.
#[derive(Debug)]
pub enum OutputAnswer {
    Output(Bytes),
    Pending,
    Running,
    /// The call failed; the record says why.
    Failed(Call),
    /// The output was fetched already or rotated out of the cache.
    Gone(Call),
}

/// Who is asking about a call: a user of the management API, or the holder
/// of a function's capability URL.
pub enum Scope<'a> {
    User(&'a User),
    Function(&'a Function),
}

/// The one way in for the API and the metrics: its parts are private, so
/// every rule of who may see or change what is applied here.
pub struct Service {
    store: Arc<dyn Store>,
    scheduler: Arc<Scheduler>,
    runtime: Arc<Runtime>,
    config: Arc<Config>,
    /// `https://HOST:PORT`, the base of call URLs.
    base_url: String,
}

impl Service {
    pub fn new(
        store: Arc<dyn Store>,
        scheduler: Arc<Scheduler>,
        runtime: Arc<Runtime>,
        config: Arc<Config>,
        base_url: String,
    ) -> Service {
        Service {
            store,
            scheduler,
            runtime,
            config,
            base_url,
        }
    }

    /// The daemon's configuration (read only).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `https://HOST:PORT`, the base of call URLs.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The Engine label value that marks this daemon's containers.
    pub fn instance(&self) -> &str {
        self.runtime.instance()
    }

    pub fn address(&self, f: &Function) -> String {
        format!("{}/call/{}/{}", self.base_url, f.name, f.secret.as_str())
    }

    // ---- users ----

    pub async fn authenticate(&self, key: &str) -> Result<User> {
        self.store
            .user_by_key_hash(&crate::model::hash_key(key))
            .await?
            .ok_or(ServiceError::Unauthorized)
    }

    fn require_admin(caller: &User) -> Result<()> {
        if caller.admin {
            Ok(())
        } else {
            Err(ServiceError::Forbidden("this needs the admin key".into()))
        }
    }

    pub async fn add_user(
        &self,
        caller: &User,
        name: Name,
        max_concurrency: Option<u32>,
        limits: UserLimits,
        admin: bool,
    ) -> Result<(User, ApiKey)> {
        Self::require_admin(caller)?;
        check_user_limits(&limits)?;
        let (user, key) = self
            .create_user_with(name, max_concurrency, limits, admin, true)
            .await?;
        crate::logging::user_added(caller, &user);
        Ok((user, key))
    }

    /// Creates a user without a caller (first start makes `admin` this way).
    pub async fn create_user(
        &self,
        name: Name,
        max_concurrency: Option<u32>,
        admin: bool,
    ) -> Result<(User, ApiKey)> {
        self.create_user_with(name, max_concurrency, UserLimits::default(), admin, false)
            .await
    }

    /// `check_share`: refuse a reservation the host has no room for (the
    /// first start's admin is not checked: at start, reservations that do
    /// not fit are cut instead, see `scheduler/share.rs`).
    async fn create_user_with(
        &self,
        name: Name,
        max_concurrency: Option<u32>,
        limits: UserLimits,
        admin: bool,
        check_share: bool,
    ) -> Result<(User, ApiKey)> {
        let max_concurrency =
            max_concurrency.unwrap_or(self.config.scheduler.default_max_concurrency);
        if max_concurrency == 0 {
            return Err(ServiceError::BadRequest(
                "max-concurrency must be at least 1".into(),
            ));
        }
        let key = ApiKey::generate();
        let user = User {
            name,
            key_hash: key.hash(),
            max_concurrency,
            admin,
            created_ms: now_ms(),
            limits,
        };
        if check_share {
            self.check_reserved(&user, 0).await?;
        }
        self.store.create_user(&user).await?;
        self.scheduler.users_changed();
        Ok((user, key))
    }

    /// The images functions use on this daemon's Engine (admin).
    pub async fn list_images(&self, caller: &User) -> Result<Vec<crate::scheduler::ImageUse>> {
        Self::require_admin(caller)?;
        self.scheduler
            .image_uses()
            .await
            .map_err(ServiceError::Internal)
    }

    pub async fn list_users(&self, caller: &User) -> Result<Vec<User>> {
        Self::require_admin(caller)?;
        Ok(self.store.list_users().await?)
    }

    pub async fn update_user(
        &self,
        caller: &User,
        name: &Name,
        max_concurrency: Option<u32>,
        limits: UserLimits,
        rotate_key: bool,
    ) -> Result<(User, Option<ApiKey>)> {
        Self::require_admin(caller)?;
        check_user_limits(&limits)?;
        let mut user = self
            .store
            .get_user(name)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("user {name} not found")))?;
        let before = self.budget(&user).reserved;
        if let Some(m) = max_concurrency {
            if m == 0 {
                return Err(ServiceError::BadRequest(
                    "max-concurrency must be at least 1".into(),
                ));
            }
            user.max_concurrency = m;
        }
        let l = &mut user.limits;
        l.max_queued = limits.max_queued.or(l.max_queued);
        l.max_queued_bytes = limits.max_queued_bytes.or(l.max_queued_bytes);
        l.max_functions = limits.max_functions.or(l.max_functions);
        l.rate = limits.rate.or(l.rate);
        l.reserved = limits.reserved.or(l.reserved);
        self.check_reserved(&user, before).await?;
        let key = rotate_key.then(ApiKey::generate);
        if let Some(k) = &key {
            user.key_hash = k.hash();
        }
        self.store.update_user(&user).await?;
        crate::logging::user_updated(caller, &user, key.is_some());
        self.scheduler.users_changed();
        // A raised quota may let queued calls start now.
        self.scheduler.queued(name);
        Ok((user, key))
    }

    /// Refuses to raise `user`'s reserved host slots above `before` when
    /// all users' reservations would then leave no slot of
    /// `host_max_running` unreserved (README "Sharing the host"). Lowering
    /// one, or changing anything else, is never refused, even on a host
    /// whose reservations no longer fit (they are cut at start).
    async fn check_reserved(&self, user: &User, before: u32) -> Result<()> {
        let s = &self.config.scheduler;
        let wanted = user.reserved(s.admin_reserved, s.default_reserved);
        if wanted <= before {
            return Ok(());
        }
        let mut others: Vec<(Name, u32)> = self
            .store
            .list_users()
            .await?
            .iter()
            .filter(|u| u.name != user.name)
            .map(|u| {
                (
                    u.name.clone(),
                    u.reserved(s.admin_reserved, s.default_reserved),
                )
            })
            .filter(|(_, r)| *r > 0)
            .collect();
        others.sort();
        let taken: u64 = others.iter().map(|(_, r)| u64::from(*r)).sum();
        let room = u64::from(s.host_max_running.saturating_sub(1));
        if taken + u64::from(wanted) <= room {
            return Ok(());
        }
        let who = if others.is_empty() {
            "no other user reserves any".to_string()
        } else {
            let list: Vec<String> = others.iter().map(|(n, r)| format!("{n} {r}")).collect();
            format!("other users reserve {taken} ({})", list.join(", "))
        };
        let from = if user.limits.reserved.is_none() {
            let key = if user.admin {
                "admin_reserved"
            } else {
                "default_reserved"
            };
            format!(" (from [scheduler] {key}; --reserved sets another)")
        } else {
            String::new()
        };
        let slots = if wanted == 1 { "slot" } else { "slots" };
        Err(ServiceError::Conflict(format!(
            "cannot reserve {wanted} host {slots} for {}{from}: host_max_running is {}, \
             one slot must stay unreserved, and {who}, so at most {} can be reserved for them",
            user.name,
            s.host_max_running,
            room.saturating_sub(taken)
        )))
    }

    /// The budgets in force for `user`: their own, else `[scheduler]`'s.
    pub fn budget(&self, user: &User) -> Budget {
        let d = &self.config.scheduler;
        let l = &user.limits;
        Budget {
            max_queued: l.max_queued.unwrap_or(d.default_max_queued),
            max_queued_bytes: l.max_queued_bytes.unwrap_or(d.default_max_queued_bytes),
            max_functions: l.max_functions.unwrap_or(d.default_max_functions),
            rate: l.rate.unwrap_or(d.default_rate),
            reserved: user.reserved(d.admin_reserved, d.default_reserved),
        }
    }

    /// The budgets of `owner` (a function's): a user removed meanwhile has
    /// no functions left to call, so the defaults are as good as any.
    pub async fn budget_of(&self, owner: &Name) -> Result<Budget> {
        Ok(match self.store.get_user(owner).await? {
            Some(u) => self.budget(&u),
            None => self.budget(&User::from(crate::model::UserV1 {
                name: owner.clone(),
                key_hash: [0; 32],
                max_concurrency: 1,
                admin: false,
                created_ms: 0,
            })),
        })
    }

    pub async fn delete_user(&self, caller: &User, name: &Name) -> Result<()> {
        Self::require_admin(caller)?;
        if caller.name == *name {
            return Err(ServiceError::Conflict("you cannot remove yourself".into()));
        }
        self.store.delete_user(name).await?;
        self.scheduler.users_changed();
        crate::logging::user_removed(caller, name);
        Ok(())
    }

    // ---- functions ----

    pub async fn create_function(
        &self,
        caller: &User,
        name: Name,
        mut spec: FunctionSpec,
        webhook: WebhookChange,
        schedule: Option<ScheduleInput>,
        progress: Option<&PullProgress>,
    ) -> Result<Saved> {
        self.check_limits(&mut spec).await?;
        self.check_webhook_change(&webhook).await?;
        let schedule = schedule
            .map(|s| self.schedule_of(None, s, now_ms()))
            .transpose()?;
        self.check_image(caller, &spec.image).await?;
        // Before the pull, so a refused create costs nothing; the store
        // checks again in the write that creates it.
        let max_functions = self.budget(caller).max_functions;
        let owned = self.store.list_functions(Some(&caller.name)).await?.len();
        if owned >= max_functions as usize {
            return Err(too_many_functions(&caller.name, max_functions));
        }
        // Only the caller's own names conflict: another user's function of
        // the same name is theirs, and its existence is not told.
        let key = FnKey::new(caller.name.clone(), name.clone());
        if self.store.get_function(&key).await?.is_some() {
            return Err(ServiceError::Conflict(format!(
                "function {name} already exists"
            )));
        }
        self.check_runtime(caller, &spec).await?;
        let resolved = self
            .ensure_image(&caller.name, &spec.image, false, progress)
            .await?;
        let now = now_ms();
        let f = Function {
            name,
            owner: caller.name.clone(),
            spec,
            secret: Secret::new(),
            created_ms: now,
            updated_ms: now,
            image_digest: Some(resolved.pinned),
            webhook: None,
            schedule,
        };
        let mut f = f;
        let new_secret = apply_webhook(&mut f, &webhook)?;
        match self.store.create_function_within(&f, max_functions).await {
            Err(StoreError::OverBudget(_)) => {
                return Err(too_many_functions(&caller.name, max_functions))
            }
            r => r?,
        }
        crate::logging::function_created(caller, &f);
        self.scheduler.function_changed(&f);
        Ok(Saved {
            function: f,
            new_secret,
        })
    }

    /// Refuses a webhook URL the policy refuses: its shape, and its host
    /// if that is an address (or `localhost`). A name is not resolved
    /// here (no lookup on the request's path, none a client can aim): the
    /// delivery's resolver refuses every address the policy refuses, at
    /// every connection.
    async fn check_webhook_url(&self, url: &str) -> Result<()> {
        self.scheduler
            .webhooks()
            .policy()
            .check_url(url)
            .map(|_| ())
            .map_err(ServiceError::InvalidWebhook)
    }

    async fn check_webhook_change(&self, change: &WebhookChange) -> Result<()> {
        if let Some(Some(url)) = &change.url {
            self.check_webhook_url(url).await?;
        }
        Ok(())
    }

    /// The delivery of call `id`'s webhook, if `scope` may see the call.
    pub async fn call_webhook(&self, scope: &Scope<'_>, id: &CallId) -> Result<Option<Delivery>> {
        self.call(scope, id).await?;
        Ok(self.store.get_webhook(id).await?)
    }

    /// Sends call `id`'s webhook again (its owner or an admin): due now,
    /// with a new retry window.
    pub async fn redeliver(&self, caller: &User, id: &CallId) -> Result<Delivery> {
        let call = self.call(&Scope::User(caller), id).await?;
        let d = match self.store.redeliver_webhook(id, now_ms()).await {
            Err(StoreError::NotFound(_)) => {
                return Err(ServiceError::NotFound(format!(
                    "call {} has no webhook delivery{}",
                    call.id,
                    if call.state.is_done() {
                        ""
                    } else {
                        " (it has not ended)"
                    }
                )))
            }
            r => r?,
        };
        tracing::info!(target: "hyperfuncd::audit", user = %caller.name, owner = %call.owner, call = %call.id, "webhook redelivery asked");
        self.scheduler.webhooks().wake();
        Ok(d)
    }

    /// The schedule `input` makes of `current` (a function's, if it has
    /// one) at `now`: checked (the expression, the zone, the payload within
    /// `SCHEDULE_PAYLOAD_MAX` and the STDIN limit). Set again unchanged, a
    /// schedule keeps the time it was set, so no tick is skipped or redone.
    fn schedule_of(
        &self,
        current: Option<&Schedule>,
        input: ScheduleInput,
        now: u64,
    ) -> Result<Schedule> {
        let expr = match (input.expr, current) {
            (Some(e), _) => e,
            (None, Some(c)) => c.expr.clone(),
            (None, None) => {
                return Err(ServiceError::BadRequest(
                    "the function has no schedule to change: give its expression (--schedule)"
                        .into(),
                ))
            }
        };
        let timezone = input
            .timezone
            .or_else(|| current.map(|c| c.timezone.clone()));
        let payload = input
            .payload
            .or_else(|| current.map(|c| c.payload.clone()))
            .unwrap_or_default();
        let max = self.config.limits.max_stdin_bytes;
        if payload.len() as u64 > max {
            return Err(ServiceError::BadRequest(format!(
                "schedule payload exceeds the STDIN limit of {}",
                crate::model::human_bytes(max)
            )));
        }
        let mut new = Schedule::new(&expr, timezone.as_deref(), payload, now)
            .map_err(ServiceError::BadRequest)?;
        if let Some(c) = current.filter(|c| c.same_as(&new)) {
            new.since_ms = c.since_ms;
        }
        Ok(new)
    }

    /// Makes sure the Engine has `image`, pulled with `owner`'s login to its
    /// registry (else the host's `credentials_file` entry, else none). An
    /// image of a registry someone has a login to is pulled even when the
    /// Engine has it, so the registry decides whether `owner` may read it
    /// (another user's login pulled the local copy, perhaps).
    ///
    /// `pull` pulls even a public image the Engine has (`update --pull`).
    /// Answers what `image` names now (what a function pins), having
    /// recorded an image the pull brought (`Store::put_pulled_image`), so
    /// that it is removed once no function uses it.
    async fn ensure_image(
        &self,
        owner: &Name,
        image: &str,
        pull: bool,
        progress: Option<&PullProgress>,
    ) -> Result<Resolved> {
        let registry = crate::model::ImageRef::parse(image)
            .ok()
            .and_then(|r| r.registry().map(str::to_string));
        let (login, always) = match &registry {
            Some(host) => (
                self.login_for(owner, host).await?,
                self.private_registry(host).await?,
            ),
            None => (None, false),
        };
        let auth = PullAuth {
            login: login.as_ref(),
            always: always || pull,
        };
        let pulled = self
            .runtime
            .ensure_image(
                image,
                Duration::from_secs(self.config.docker.pull_timeout_secs),
                progress,
                &auth,
            )
            .await;
        match pulled {
            Ok(r) => {
                if r.fresh {
                    crate::scheduler::note_pulled(&*self.store, self.runtime.instance(), image, &r)
                        .await?;
                }
                Ok(r)
            }
            Err(RuntimeError::Pull { image, message }) if message == DENIED => {
                crate::metrics::engine_error(Some(crate::metrics::EngineFault::Pull));
                let host = registry.unwrap_or_default();
                let hint = match &login {
                    None => format!(
                        "; if it is private, log in first: hyperfuncd registry login {host} --username USER --password-stdin"
                    ),
                    Some(l) => format!(
                        " with the registry login of user {} to {host}",
                        l.username
                    ),
                };
                Err(ServiceError::BadRequest(format!(
                    "image {image} is not present and could not be pulled: {message}{hint}"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `owner`'s own login to `host`, else the host's (`credentials_file`).
    async fn login_for(&self, owner: &Name, host: &str) -> Result<Option<RegistryLogin>> {
        let own = self.store.registry_logins(owner).await?;
        if let Some(l) = own.into_iter().find(|l| l.host == host) {
            return Ok(Some(l));
        }
        match &self.config.images.credentials_file {
            None => Ok(None),
            Some(file) => crate::registry::host_login(file, host).await.map_err(|e| {
                tracing::warn!(error = %e, "[images] credentials_file unreadable");
                ServiceError::Internal(
                    "the server's registry credentials file cannot be read; the operator's log says why"
                        .into(),
                )
            }),
        }
    }

    /// Whether pulls from `host` need a login: someone logged in to it
    /// once (marked for good: a logout does not make the Engine's copy of
    /// a private image public), or the host's file has one. Such images are pulled at every create and
    /// update (see `ensure_image`).
    async fn private_registry(&self, host: &str) -> Result<bool> {
        if let Some(file) = &self.config.images.credentials_file {
            if matches!(crate::registry::host_login(file, host).await, Ok(Some(_))) {
                return Ok(true);
            }
        }
        Ok(self.store.is_private_registry(host).await?)
    }

    // ---- registry logins ----

    /// Checks a login with the registry (through the Engine) and keeps it
    /// for the caller's pulls from that host, replacing an earlier one.
    /// Only hosts images may come from are asked: a login is a connection
    /// the Engine makes, as a pull is.
    pub async fn registry_login(
        &self,
        caller: &User,
        host: &str,
        username: &str,
        password: &str,
    ) -> Result<RegistryLogin> {
        let login = crate::registry::new_login(host, username, password)
            .map_err(ServiceError::BadRequest)?;
        let images = &self.config.images;
        let allowed = images.allows(&login.host) || (caller.admin && images.admin_any);
        if !allowed {
            return Err(ServiceError::ImageNotAllowed(format!(
                "registry {} is not in [images] registries on this server",
                login.host
            )));
        }
        self.runtime
            .check_login(&login)
            .await
            .map_err(|e| match e {
                LoginError::Denied => ServiceError::BadRequest(format!(
                    "{} refused the login of {}: wrong username or password",
                    login.host, login.username
                )),
                LoginError::Unreachable(why) => ServiceError::BadRequest(format!(
                    "registry {} could not be reached: {why}",
                    login.host
                )),
                LoginError::Engine(m) => ServiceError::Unavailable(m),
            })?;
        // Marked first: from the moment the login can pull, the host's
        // images are pulled at each create and update.
        self.store.mark_private_registry(&login.host).await?;
        self.store.put_registry_login(&caller.name, &login).await?;
        crate::logging::registry_login(caller, &login.host, &login.username);
        Ok(login)
    }

    pub async fn registry_logout(&self, caller: &User, host: &str) -> Result<()> {
        let host = crate::model::parse_registry_host(host).map_err(ServiceError::BadRequest)?;
        if !self
            .store
            .delete_registry_login(&caller.name, &host)
            .await?
        {
            return Err(ServiceError::NotFound(format!(
                "you have no registry login to {host}"
            )));
        }
        crate::logging::registry_logout(caller, &host);
        Ok(())
    }

    /// The caller's logins (the API shows their host and username only).
    pub async fn registry_logins(&self, caller: &User) -> Result<Vec<RegistryLogin>> {
        Ok(self.store.registry_logins(&caller.name).await?)
    }

    /// Refuses, before the Engine is asked anything about it (a reference
    /// makes the Engine connect to its host), an image the caller may not
    /// use. The rule (README "Behaviour"): a reference must name a
    /// repository, since the Engine resolves an ID or a digest alone to
    /// whatever local image has it, whoever put it there; its registry is
    /// the host its name says, whether the image is local or pulled; and
    /// it must be in `[images] registries`, or be the image of one of the
    /// caller's own functions (so a function keeps working, and can be
    /// updated and copied, after its registry leaves the list, while
    /// nobody else gains it). Admins may use anything with `admin_any`.
    async fn check_image(&self, caller: &User, image: &str) -> Result<()> {
        let r = crate::model::ImageRef::parse(image).map_err(ServiceError::BadRequest)?;
        let images = &self.config.images;
        if caller.admin && images.admin_any {
            return Ok(());
        }
        let (registry, canonical) = match &r {
            crate::model::ImageRef::Named {
                registry,
                canonical,
            } => (registry, canonical),
            crate::model::ImageRef::IdOnly => {
                return Err(ServiceError::ImageNotAllowed(format!(
                    "image reference {image:?} names no repository: an image ID or a digest \
                     alone is not accepted, since it would reach any image on the Docker \
                     Engine; use the image's name (NAME[:TAG] or NAME@DIGEST)"
                )))
            }
        };
        if images.allows(registry) {
            return Ok(());
        }
        let own = self.store.list_functions(Some(&caller.name)).await?;
        let used_before = own.iter().any(|f| {
            crate::model::ImageRef::parse(&f.spec.image)
                .ok()
                .is_some_and(|o| o.canonical() == Some(canonical.as_str()))
        });
        if used_before {
            return Ok(());
        }
        Err(ServiceError::ImageNotAllowed(format!(
            "images from {registry} are not allowed on this server"
        )))
    }

    /// The OCI runtime `spec`'s containers would run under (its own, else
    /// `[container] runtime`) must be one a non-admin may choose (the
    /// default, or one of `[container] allowed_runtimes`: isolation is the
    /// operator's choice) and be registered with the Engine now: an
    /// unknown one would fail every call. Asked at each create and update,
    /// since an operator may change the Engine's runtimes and reload it.
    async fn check_runtime(&self, caller: &User, spec: &FunctionSpec) -> Result<()> {
        let c = &self.config.container;
        if let Some(wanted) = spec.runtime.as_deref().filter(|_| !caller.admin) {
            let allowed = c.runtime.as_deref() == Some(wanted)
                || c.allowed_runtimes.iter().any(|a| a == wanted)
                || (c.runtime.is_none() && self.is_engine_default(wanted).await);
            if !allowed {
                let default = self
                    .runtime
                    .effective_runtime(c.runtime.as_deref())
                    .unwrap_or_else(|| "the Docker Engine's default".into());
                let mut may = vec![default];
                for a in &c.allowed_runtimes {
                    if !may.contains(a) {
                        may.push(a.clone());
                    }
                }
                return Err(ServiceError::RuntimeNotAllowed(format!(
                    "OCI runtime {wanted:?} is not allowed on this server (functions may use: {})",
                    may.join(", ")
                )));
            }
        }
        match spec.runtime_or(c.runtime.as_deref()) {
            Some(r) => Ok(self.runtime.check_runtime(r).await?),
            None => {
                // The Engine's default, for `func inspect`, if the Engine
                // did not answer at start; nothing to refuse.
                if self.runtime.effective_runtime(None).is_none() {
                    let _ = self.runtime.runtimes().await;
                }
                Ok(())
            }
        }
    }

    /// Whether `runtime` is the Engine's default runtime, asked now (the
    /// default of a server whose config names none).
    async fn is_engine_default(&self, runtime: &str) -> bool {
        let _ = self.runtime.runtimes().await;
        self.runtime.effective_runtime(None).as_deref() == Some(runtime)
    }

    /// The OCI runtime `f`'s calls run under: its own, `[container] runtime`,
    /// or the Engine's default (`None` until the Engine has answered).
    pub fn runtime_of(&self, f: &Function) -> Option<String> {
        self.runtime
            .effective_runtime(f.spec.runtime_or(self.config.container.runtime.as_deref()))
    }

    /// Refuses, before anything is stored, a spec that could never run or
    /// that asks for more than the operator's ceilings (`[limits] max_*`;
    /// unset memory and CPU ceilings are half of the Engine host's, see
    /// `LimitsConfig::memory_ceiling`). A missing timeout becomes the
    /// ceiling's.
    async fn check_limits(&self, spec: &mut FunctionSpec) -> Result<()> {
        use crate::model::human_bytes;
        spec.validate().map_err(ServiceError::BadRequest)?;
        let l = &self.config.limits;
        let bad = |m: String| Err(ServiceError::BadRequest(m));
        let memory = spec
            .memory_bytes
            .unwrap_or(self.config.container.memory_bytes);
        if let Some(max) = l.max_timeout {
            let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
            match spec.timeout_ms {
                Some(t) if t > max_ms => {
                    return bad(format!(
                        "timeout {} is above this server's ceiling of {}",
                        humantime::format_duration(Duration::from_millis(t)),
                        humantime::format_duration(max)
                    ))
                }
                Some(_) => {}
                None => spec.timeout_ms = Some(max_ms),
            }
        }
        // Unknown while the Engine does not answer: then only configured
        // ceilings apply here, and the Engine is needed for the image next.
        let host = self.runtime.host_resources().await;
        let memory_max = l.memory_ceiling(
            host.map(|h| h.memory_bytes),
            self.config.container.memory_bytes,
        );
        if let Some(max) = memory_max.filter(|max| memory > *max) {
            let whose = if l.max_memory_bytes.is_some() {
                "this server's ceiling"
            } else {
                "this server's default ceiling (half of the host's memory)"
            };
            return bad(format!(
                "memory {} is above {whose} of {}",
                human_bytes(memory),
                human_bytes(max)
            ));
        }
        let cpus_max = l.cpus_ceiling(host.map(|h| h.cpus));
        if let Some((c, max)) = spec.cpus.zip(cpus_max).filter(|(c, max)| c > max) {
            let whose = if l.max_cpus.is_some() {
                "this server's ceiling"
            } else {
                "this server's default ceiling (half of the host's CPUs)"
            };
            return bad(format!("cpus {c} is above {whose} of {max}"));
        }
        // The Engine would refuse these at every call (a configured
        // ceiling may be above the host).
        if let Some(host) = host {
            if let Some(c) = spec.cpus.filter(|c| *c > host.cpus) {
                return bad(format!("cpus {c} is more than the host's {}", host.cpus));
            }
            if memory > host.memory_bytes {
                return bad(format!(
                    "memory {} is more than the host's {}",
                    human_bytes(memory),
                    human_bytes(host.memory_bytes)
                ));
            }
        }
        Ok(())
    }

    /// The function `name` of `owner` (the caller when `None`) if `caller`
    /// may see it: a user sees only their own, an admin anyone's. Anything
    /// else is "not found", the same words as for a name nobody owns.
    pub async fn function(
        &self,
        caller: &User,
        name: &Name,
        owner: Option<&Name>,
    ) -> Result<Function> {
        let owner = owner.unwrap_or(&caller.name);
        let not_found = || ServiceError::NotFound(format!("function {name} not found"));
        if !caller.admin && *owner != caller.name {
            return Err(not_found());
        }
        let key = FnKey::new(owner.clone(), name.clone());
        if let Some(f) = self.store.get_function(&key).await? {
            return Ok(f);
        }
        if caller.admin && *owner == caller.name {
            // An admin may have meant someone else's: say whose exist.
            let others: Vec<String> = self
                .store
                .list_functions(None)
                .await?
                .into_iter()
                .filter(|f| f.name == *name)
                .map(|f| f.key().to_string())
                .take(5)
                .collect();
            if !others.is_empty() {
                return Err(ServiceError::NotFound(format!(
                    "function {name} not found; {} exist{} (use OWNER/NAME)",
                    others.join(", "),
                    if others.len() == 1 { "s" } else { "" }
                )));
            }
        }
        Err(not_found())
    }

    /// The caller's functions; for an admin everyone's, or `owner`'s.
    pub async fn list_functions(
        &self,
        caller: &User,
        owner: Option<&Name>,
    ) -> Result<Vec<Function>> {
        if !caller.admin {
            if owner.is_some_and(|o| *o != caller.name) {
                return Ok(Vec::new());
            }
            return Ok(self.store.list_functions(Some(&caller.name)).await?);
        }
        Ok(self.store.list_functions(owner).await?)
    }

    pub async fn update_function(
        &self,
        caller: &User,
        name: &Name,
        owner: Option<&Name>,
        u: FunctionUpdate,
        progress: Option<&PullProgress>,
    ) -> Result<Saved> {
        self.check_webhook_change(&u.webhook).await?;
        let mut f = self.function(caller, name, owner).await?;
        let read = f.clone();
        let s = &mut f.spec;
        let image_given = u.image.is_some();
        if let Some(image) = u.image {
            s.image = image;
        }
        if let Some(c) = u.command {
            s.command = c;
        }
        s.env.retain(|e| !u.env_unset.contains(&e.name));
        for var in u.env_set {
            match s.env.iter_mut().find(|e| e.name == var.name) {
                Some(e) => e.value = var.value,
                None => s.env.push(var),
            }
        }
        if let Some(t) = u.timeout_ms {
            s.timeout_ms = t;
        }
        if let Some(m) = u.memory_bytes {
            s.memory_bytes = Some(m);
        }
        if let Some(c) = u.cpus {
            s.cpus = Some(c);
        }
        if let Some(r) = u.runtime {
            s.runtime = r;
        }
        if u.no_schedule && u.schedule.is_some() {
            return Err(ServiceError::BadRequest(
                "a schedule cannot be both set and removed".into(),
            ));
        }
        if u.no_schedule {
            f.schedule = None;
        } else if let Some(input) = u.schedule {
            f.schedule = Some(self.schedule_of(f.schedule.as_ref(), input, now_ms())?);
        }
        self.check_limits(s).await?;
        self.check_image(caller, &s.image).await?;
        self.check_runtime(caller, s).await?;
        // A new image, or `--pull`, is resolved afresh; otherwise the
        // pinned digest stays and only it is checked (pulled by digest if
        // it is private or gone), so an update never moves a function to
        // whatever the tag names today. An unpinned function is pinned now.
        let moved = image_given || u.pull || f.image_digest.is_none();
        let check = if moved {
            f.spec.image.clone()
        } else {
            f.run_image().to_string()
        };
        let resolved = self
            .ensure_image(&f.owner, &check, u.pull, progress)
            .await?;
        if moved {
            f.image_digest = Some(resolved.pinned);
        }
        if u.refresh {
            f.secret = Secret::new();
        }
        let new_secret = apply_webhook(&mut f, &u.webhook)?;
        f.updated_ms = now_ms();
        self.store.update_function(&read, &f).await?;
        crate::logging::function_updated(caller, &f, u.refresh);
        self.scheduler.function_changed(&f);
        Ok(Saved {
            function: f,
            new_secret,
        })
    }

    /// Removes a function. With live calls it is a conflict unless `force`,
    /// which cancels them through the scheduler: queued ones end FAILED,
    /// running ones are killed first. Once the record is gone no call of
    /// the function is accepted or started.
    pub async fn delete_function(
        &self,
        caller: &User,
        name: &Name,
        owner: Option<&Name>,
        force: bool,
    ) -> Result<()> {
        let f = self.function(caller, name, owner).await?;
        let key = f.key();
        let live = self.store.live_calls(&key).await?;
        if !live.is_empty() && !force {
            return Err(ServiceError::Conflict(format!(
                "function {name} has {} queued or running call(s); use --force to cancel them",
                live.len()
            )));
        }
        self.store.remove_function(&key).await?;
        crate::logging::function_removed(caller, &key, force);
        self.scheduler.function_removed(&key);
        self.scheduler.remove_function_calls(&key).await?;
        Ok(())
    }

    /// The function behind a capability URL: found by its secret (names
    /// are per owner, secrets unique), then the name must match and the
    /// secret is compared again in constant time. Anything wrong is "not found".
    pub async fn function_by_secret(&self, name: &str, secret: &str) -> Result<Function> {
        let not_found = || ServiceError::NotFound("no such function URL".into());
        let name = Name::parse(name).map_err(|_| not_found())?;
        match self.store.function_by_secret(secret).await? {
            Some(f) if f.secret.matches(secret) && f.name == name => Ok(f),
            _ => Err(not_found()),
        }
    }

    pub async fn stats(&self, f: &Function) -> Result<FunctionStats> {
        Ok(self.store.stats(&f.key()).await?)
    }

    /// A page of `f`'s call history, newest first (`f` was found for the
    /// caller by `function`, so another tenant's is already a 404).
    pub async fn function_calls(
        &self,
        f: &Function,
        query: &crate::store::CallQuery,
    ) -> Result<crate::store::CallPage> {
        Ok(self.store.function_calls(&f.key(), query).await?)
    }

    // ---- calls ----

    /// Accepts a call; returns once it and its payload are on disk. Under
    /// an idempotency key (per owner and function), a key already used
    /// answers its first call again and stores nothing, or, if that call
    /// had another body, is refused.
    pub async fn accept(
        &self,
        f: &Function,
        payload: Bytes,
        request_env: Vec<(String, String)>,
        key: Option<IdempotencyKey>,
        callback: Option<String>,
    ) -> Result<Submitted> {
        if payload.len() as u64 > self.config.limits.max_stdin_bytes {
            return Err(self.too_large());
        }
        // The store assigns the FIFO sequence.
        let mut call = Call::new(f.name.clone(), f.owner.clone(), 0, &payload, request_env);
        call.webhook = self.call_target(f, callback).await?;
        self.accept_call(f, call, payload, key).await
    }

    /// The accept every call goes through, an HTTP call's or a tick's.
    async fn accept_call(
        &self,
        f: &Function,
        call: Call,
        payload: Bytes,
        key: Option<IdempotencyKey>,
    ) -> Result<Submitted> {
        let budget = self.budget_of(&f.owner).await?.queue();
        let call = match key {
            None => self.store.accept_within(call, payload, budget).await?,
            Some(key) => {
                let idem = Idempotency::new(key, &payload);
                match self
                    .store
                    .accept_idempotent(call, payload, budget, idem.clone())
                    .await?
                {
                    Accepted::New(call) => call,
                    Accepted::Earlier {
                        call,
                        same_body: true,
                    } => {
                        return Ok(Submitted {
                            id: call.id,
                            replayed: true,
                        });
                    }
                    Accepted::Earlier { call, .. } => {
                        return Err(ServiceError::IdempotencyKeyReused(format!(
                            "idempotency key {} was used for call {} with another body; \
                             use a new key for a new call",
                            idem.key, call.id
                        )))
                    }
                }
            }
        };
        crate::crash_point!("accept-durable");
        crate::metrics::call_accepted(&call);
        crate::logging::call_accepted(&call);
        self.scheduler.queued(&f.owner);
        Ok(Submitted {
            id: call.id,
            replayed: false,
        })
    }

    /// Where a call of `f` delivers its end: its own `X-Callback-Url`
    /// (checked now, before anything is stored: a refused one costs no
    /// connection), signed with `f`'s secret, else `f`'s webhook.
    async fn call_target(
        &self,
        f: &Function,
        callback: Option<String>,
    ) -> Result<Option<CallWebhook>> {
        match callback {
            Some(url) => {
                self.check_webhook_url(&url).await?;
                if f.webhook.is_none() {
                    return Err(ServiceError::InvalidWebhook(format!(
                        "function {} has no webhook secret to sign a callback with: make one with `hyperfuncd func update {} --rotate-webhook-secret` (shown once)",
                        f.name, f.name
                    )));
                }
                Ok(Some(CallWebhook {
                    url,
                    on: WebhookOn::ALL,
                }))
            }
            None => Ok(f.webhook.as_ref().and_then(|w| {
                w.url.as_ref().map(|url| CallWebhook {
                    url: url.clone(),
                    on: w.on,
                })
            })),
        }
    }

    /// A request refused by the rate limit of an API key or call URL.
    pub fn rate_limited(&self, what: &str, rate: u32, retry_after_secs: u64) -> ServiceError {
        ServiceError::TooManyRequests {
            message: format!("{what} is over its rate of {rate} requests per second"),
            retry_after_secs,
        }
    }

    pub fn too_large(&self) -> ServiceError {
        ServiceError::TooLarge(format!(
            "request body exceeds the STDIN limit of {}",
            crate::model::human_bytes(self.config.limits.max_stdin_bytes)
        ))
    }

    /// The call `id` if `scope` may see it.
    pub async fn call(&self, scope: &Scope<'_>, id: &CallId) -> Result<Call> {
        let call = self.store.get_call(id).await?;
        match (call, scope) {
            (Some(c), Scope::User(u)) if u.admin || c.owner == u.name => Ok(c),
            (Some(c), Scope::Function(f)) if c.function == f.name && c.owner == f.owner => Ok(c),
            _ => Err(ServiceError::NotFound(format!("call {id} not found"))),
        }
    }

    /// Fetches (and deletes) a call's output. With `wait`, blocks until the
    /// call has ended or `wait` has passed.
    pub async fn output(
        &self,
        scope: &Scope<'_>,
        id: &CallId,
        wait: Option<Duration>,
    ) -> Result<OutputAnswer> {
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        let mut changes = self.scheduler.subscribe();
        // Registered before the first look, so no end is missed: `finish`
        // hands it the durable end, and the answer need not wait for the
        // container's removal nor read the output back (ARCHITECTURE: sync
        // answers). Visibility is still checked first, below.
        let mut waiter: Option<EndWaiter> = match wait {
            Some(_) => self.scheduler.await_end(*id),
            None => None,
        };
        loop {
            // Visibility first, so another user's call id answers 404.
            let call = self.call(scope, id).await?;
            if call.state.is_done() {
                return match self.store.take_output(id).await? {
                    Some(OutputLookup::Output(_, out)) => Ok(OutputAnswer::Output(out)),
                    Some(OutputLookup::NoOutput(c)) if c.state == CallState::Failed => {
                        Ok(OutputAnswer::Failed(c))
                    }
                    // A shared store's reads may disagree for a moment
                    // (e.g. across a leader change): a record that is not
                    // ended after all is "not yet", never "gone".
                    Some(OutputLookup::NoOutput(c)) if !c.state.is_done() => Ok(match c.state {
                        CallState::Running => OutputAnswer::Running,
                        _ => OutputAnswer::Pending,
                    }),
                    Some(OutputLookup::NoOutput(c)) => Ok(OutputAnswer::Gone(c)),
                    None => Err(ServiceError::NotFound(format!("call {id} not found"))),
                };
            }
            let answer = if call.state == CallState::Running {
                OutputAnswer::Running
            } else {
                OutputAnswer::Pending
            };
            let d = match deadline {
                Some(d) if tokio::time::Instant::now() < d => d,
                _ => return Ok(answer),
            };
            enum Woke {
                Handed(Ended),
                /// `finish` had nothing to hand: only the store can answer.
                Closed,
                Changed,
                Deadline,
            }
            let handed = async {
                match waiter.as_mut() {
                    Some(w) => match (&mut w.ended).await {
                        Ok(e) => Woke::Handed(e),
                        Err(_) => Woke::Closed,
                    },
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                w = handed => w,
                changed = tokio::time::timeout_at(d, changes.changed()) => match changed {
                    Ok(_) => Woke::Changed,
                    Err(_) => Woke::Deadline,
                },
            };
            match woke {
                Woke::Deadline => return Ok(answer),
                Woke::Handed(Ended::Output(out)) => {
                    // The output is durable in the cache; removing it, as a
                    // fetch does, is off the caller's path.
                    let store = Arc::clone(&self.store);
                    let id = *id;
                    tokio::spawn(async move {
                        if let Err(e) = store.take_output(&id).await {
                            tracing::warn!(call = %id, error = %e, "removing an answered output failed");
                        }
                    });
                    return Ok(OutputAnswer::Output(out));
                }
                Woke::Handed(Ended::Failed(call)) => return Ok(OutputAnswer::Failed(*call)),
                Woke::Closed => waiter = None,
                Woke::Changed => {}
            }
        }
    }

    /// Log events of `f` after `after`, optionally of one call, at most the last `tail`.
    pub async fn events(
        &self,
        f: &Function,
        after: Option<u64>,
        call: Option<&CallId>,
        tail: Option<usize>,
    ) -> Result<Vec<(u64, Event)>> {
        Ok(self.store.events(&f.key(), after, call, tail).await?)
    }

    /// The newest event's sequence of `f` (see `Store::last_event_seq`).
    pub async fn last_event_seq(&self, f: &Function) -> Result<Option<u64>> {
        Ok(self.store.last_event_seq(&f.key()).await?)
    }

    /// The log events of `f` after `after` (matching `call`), then, as
    /// calls change state, every newer one, in batches; the stream ends
    /// when the function is removed or its secret is no longer the one
    /// `f` carries (a follower must not outlive the URL it came by and
    /// watch the calls of whoever holds the new one), or at `deadline`.
    /// A refresh wakes no follower (nor does a change made on another
    /// node), hence the recheck every `recheck`. The first item is what is
    /// there now (possibly empty), with the sequence the follow starts
    /// after (`None`: the log is empty and `after` was not given).
    pub async fn follow_logs(
        self: &Arc<Self>,
        f: Function,
        after: Option<u64>,
        call: Option<CallId>,
        tail: Option<usize>,
        recheck: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<(Option<u64>, Vec<(u64, Event)>, LogFollow)> {
        // Subscribe before reading, so no event falls between the read and
        // the follow; `last` covers everything scanned, matching the
        // filter or not.
        let mut changes = self.scheduler.subscribe();
        let top = self.last_event_seq(&f).await?;
        let first = self.events(&f, after, call.as_ref(), tail).await?;
        let start = first.last().map(|(seq, _)| *seq).max(top).max(after);
        let svc = Arc::clone(self);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = start;
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() {
                        return;
                    },
                    () = tokio::time::sleep(recheck) => {}
                    () = tokio::time::sleep_until(deadline) => return,
                    () = tx.closed() => return,
                }
                let now = svc.store.get_function(&f.key()).await.ok().flatten();
                if now.as_ref().is_some_and(|now| now.secret != f.secret) {
                    return;
                }
                let Ok(top) = svc.last_event_seq(&f).await else {
                    return;
                };
                let Ok(events) = svc.events(&f, last, call.as_ref(), None).await else {
                    return;
                };
                last = events.last().map(|(seq, _)| *seq).max(top).max(last);
                if !events.is_empty() && tx.send(events).await.is_err() {
                    return;
                }
                if now.is_none() {
                    return;
                }
            }
        });
        Ok((start, first, LogFollow { rx }))
    }

    /// Wakes whenever a call changes state on this node (changes made on
    /// other nodes wake nobody: a watcher also looks again on its own).
    pub fn call_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.scheduler.subscribe()
    }

    /// What `/metrics` shows as levels, read now (never mirrored).
    pub async fn levels(&self) -> crate::metrics::Levels {
        let mut levels = crate::metrics::Levels {
            engine_up: self.engine_ok().await,
            db_bytes: self.store.size_on_disk().await,
            output_cache_budget: self.config.limits.output_cache_bytes,
            log_cache_budget: self.config.limits.log_cache_bytes,
            ..Default::default()
        };
        if let Ok(users) = self.store.list_users().await {
            levels.users = users
                .into_iter()
                .map(|u| (u.name.to_string(), u.max_concurrency))
                .collect();
        }
        let idle = self.scheduler.pool_idle();
        if let Ok(functions) = self.store.list_functions(None).await {
            for f in functions {
                let Ok(stats) = self.store.stats(&f.key()).await else {
                    continue;
                };
                let pool_idle = (self.config.pool.per_function > 0)
                    .then(|| idle.get(&f.key().to_string()).copied().unwrap_or(0));
                levels.functions.push(crate::metrics::FunctionLevels {
                    owner: f.owner.to_string(),
                    name: f.name.to_string(),
                    stats,
                    pool_idle,
                });
            }
        }
        levels
    }

    /// `Err(reason)` while the store cannot take writes, for `/healthz`.
    pub async fn store_ok(&self) -> std::result::Result<(), String> {
        self.store.health().await
    }

    /// Whether the Engine answers, for `/healthz`.
    pub async fn engine_ok(&self) -> bool {
        self.runtime.ping().await.is_ok()
    }

    pub fn output_state_message(call: &Call) -> String {
        match call.output {
            OutputState::Fetched => format!("the output of call {} was already fetched", call.id),
            OutputState::Evicted => format!(
                "the output of call {} was rotated out of function {}'s output cache",
                call.id, call.function
            ),
            _ => format!("call {} has no output", call.id),
        }
    }
}

/// Budgets set on a user must leave room for something: 0 is refused.
/// Applies `change` to `f`'s webhook; answers the secret it made, if any
/// (a function's first webhook, or a rotation).
fn apply_webhook(f: &mut Function, change: &WebhookChange) -> Result<Option<WebhookSecret>> {
    let mut made = None;
    match (&change.url, f.webhook.as_mut()) {
        (Some(Some(url)), Some(w)) => w.url = Some(url.clone()),
        (Some(Some(url)), None) => {
            let secret = WebhookSecret::new();
            made = Some(secret.clone());
            f.webhook = Some(FunctionWebhook {
                url: Some(url.clone()),
                on: WebhookOn::ALL,
                secret,
            });
        }
        (Some(None), Some(w)) => w.url = None,
        (Some(None), None) | (None, _) => {}
    }
    if let Some(on) = change.on {
        match f.webhook.as_mut() {
            Some(w) if w.url.is_some() => w.on = on,
            _ => {
                return Err(ServiceError::BadRequest(
                    "webhook events need a webhook: give its URL too".into(),
                ))
            }
        }
    }
    if change.rotate_secret {
        let secret = WebhookSecret::new();
        made = Some(secret.clone());
        match f.webhook.as_mut() {
            Some(w) => w.secret = secret,
            None => {
                f.webhook = Some(FunctionWebhook {
                    url: None,
                    on: WebhookOn::ALL,
                    secret,
                })
            }
        }
    }
    Ok(made)
}

fn check_user_limits(l: &UserLimits) -> Result<()> {
    let zero = [
        ("max-queued", l.max_queued == Some(0)),
        ("max-queued-bytes", l.max_queued_bytes == Some(0)),
        ("max-functions", l.max_functions == Some(0)),
        ("rate", l.rate == Some(0)),
    ];
    match zero.iter().find(|(_, z)| *z) {
        Some((name, _)) => Err(ServiceError::BadRequest(format!(
            "{name} must be at least 1"
        ))),
        None => Ok(()),
    }
}

fn too_many_functions(owner: &Name, max: u32) -> ServiceError {
    ServiceError::TooManyRequests {
        message: format!(
            "user {owner} owns {max} functions, their limit (user update --max-functions); remove one first"
        ),
        retry_after_secs: FUNCTIONS_RETRY_AFTER_SECS,
    }
}

/// The batches of a log follow (`Service::follow_logs`); dropping it ends
/// the follow's task.
pub struct LogFollow {
    rx: tokio::sync::mpsc::Receiver<Vec<(u64, Event)>>,
}

impl LogFollow {
    /// The next batch of newer events; `None` once the follow has ended.
    pub async fn next(&mut self) -> Option<Vec<(u64, Event)>> {
        self.rx.recv().await
    }
}

/// A tick of a schedule makes its call here: the accept of any call (the
/// owner's budget, the store's durable write), under the tick's
/// idempotency key, with the tick told in the call's CALL event.
#[async_trait::async_trait]
impl crate::scheduler::TickSink for Service {
    async fn fire(&self, f: &Function, tick_ms: u64) -> crate::scheduler::Fired {
        use crate::scheduler::Fired;
        let Some(s) = &f.schedule else {
            return Fired::Gone;
        };
        let payload = Bytes::from(s.payload.clone());
        let mut call = Call::new(f.name.clone(), f.owner.clone(), 0, &payload, Vec::new());
        call.message = Some(s.tick_message(tick_ms));
        // A tick's call delivers its end to the function's webhook.
        call.webhook = self.call_target(f, None).await.unwrap_or(None);
        match self
            .accept_call(f, call, payload, Some(IdempotencyKey::tick(tick_ms)))
            .await
        {
            Ok(Submitted {
                replayed: false,
                id,
            }) => Fired::New(id),
            // Under this tick's key already: fired (a payload changed since
            // makes the key's body differ, which is the same tick all the same).
            Ok(_) | Err(ServiceError::IdempotencyKeyReused(_)) => Fired::Already,
            Err(ServiceError::NotFound(_)) => Fired::Gone,
            Err(e) => Fired::Refused(e.to_string()),
        }
    }
}
