//! HTTP: parse a request into a service call, authenticate, map the answer
//! and errors to status codes. No platform logic lives here.
//!
//! One warp filter captures every request; `route` looks its canonical path
//! and method up in the route table (`table.rs`, which the spec check reads
//! too) and dispatches on the operation found, so unknown routes (404), wrong
//! methods (405 with `Allow`) and bad input get the same JSON error shape as
//! everything else instead of warp's default rejections.

mod front;
mod pull;
mod rate;
mod table;
pub mod types;
pub mod ui;

use crate::model::{CallId, CallState, EnvVar, FunctionSpec, IdempotencyKey, Name};
use crate::service::{
    FunctionUpdate, OutputAnswer, Saved, ScheduleInput, Scope, Service, ServiceError, WebhookChange,
};
use bytes::{Buf, Bytes, BytesMut};
pub use front::{AddressKey, ClientAddr};
use front::{BodyError, Front, LongPermit};
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use table::{Miss, Op};
use types::*;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

/// The spec served at `/openapi.yaml`.
pub const OPENAPI: &str = include_str!("../../assets/openapi.yaml");

/// Longest a single `/wait` long-poll holds before answering 201/202
/// (also bounded by `[http] max_wait`); clients loop.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// An oversized body up to this many times the STDIN limit is drained
/// before the 413, so the client can read the answer.
const DRAIN_FACTOR: u64 = 4;
/// Longest request target (path and query) the API reads.
const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header fields a request may carry; hyper is told to parse twice as
/// many, so a request between the two gets the API's JSON 431, not hyper's.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of header fields (names, values, separators) a request may carry.
const MAX_HEADER_BYTES: usize = 64 * 1024;

type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send>>;

/// An HTTP error as the API shows it: a status and a stable code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The `Allow` header of a 405: the methods the path does take.
    pub allow: Option<String>,
    /// The `Retry-After` header (seconds) of a 429 or 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
            retry_after: None,
        }
    }
    fn with_allow(mut self, allow: String) -> ApiError {
        self.allow = Some(allow);
        self
    }
    fn with_retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        let message = e.to_string();
        let retry_after = match &e {
            ServiceError::TooManyRequests {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        let (status, code) = match e {
            ServiceError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ServiceError::ImageNotAllowed(_) => (StatusCode::BAD_REQUEST, "image_not_allowed"),
            ServiceError::UnknownRuntime(_) => (StatusCode::BAD_REQUEST, "unknown_runtime"),
            ServiceError::RuntimeNotAllowed(_) => (StatusCode::BAD_REQUEST, "runtime_not_allowed"),
            ServiceError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ServiceError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ServiceError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ServiceError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ServiceError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "engine_unavailable"),
            ServiceError::InsufficientStorage(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            ServiceError::StoreUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            ServiceError::OutcomeUnknown(_) => (StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown"),
            ServiceError::IdempotencyKeyReused(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            ServiceError::InvalidWebhook(_) => (StatusCode::BAD_REQUEST, "invalid_webhook"),
            ServiceError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ServiceError::TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_requests")
            }
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %message, "internal error");
        }
        ApiError {
            retry_after,
            ..ApiError::new(status, code, message)
        }
    }
}

impl From<crate::model::IdError> for ApiError {
    fn from(e: crate::model::IdError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

impl ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let allow = self.allow;
        let retry_after = self.retry_after;
        let mut r = json_response(
            status,
            &ErrorBody {
                error: ErrorDetail {
                    code: self.code.to_string(),
                    message: self.message,
                },
            },
        );
        if let Some(v) = allow.and_then(|a| warp::http::HeaderValue::from_str(&a).ok()) {
            r.headers_mut().insert(warp::http::header::ALLOW, v);
        }
        if let Some(secs) = retry_after {
            r.headers_mut().insert(
                warp::http::header::RETRY_AFTER,
                warp::http::HeaderValue::from(secs),
            );
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of a late body is not worth waiting for.
            r.headers_mut().insert(
                warp::http::header::CONNECTION,
                warp::http::HeaderValue::from_static("close"),
            );
        }
        r
    }
}

type ApiResult = Result<Response, ApiError>;

/// One request, as the router needs it.
struct Req {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    raw_query: String,
    headers: HeaderMap,
    body: BodyStream,
    /// The client's address (absent only when the API is served without
    /// `serve.rs`, as in warp's test harness).
    client: Option<ClientAddr>,
    front: Arc<Front>,
}

/// The whole API as one warp filter.
pub fn routes(
    svc: Arc<Service>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let raw_query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let front = Arc::new(Front::new(
        &svc.config().http,
        svc.config().limits.max_stdin_bytes,
        svc.config().data_dir(),
    ));
    let rates = Arc::new(rate::RateLimits::new());
    warp::method()
        .and(warp::path::full())
        .and(raw_query)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::ext::optional::<ClientAddr>())
        .then(
            move |method, path: warp::path::FullPath, raw_query: String, headers, body, client| {
                let (svc, rates) = (Arc::clone(&svc), Arc::clone(&rates));
                let front = Arc::clone(&front);
                let body: BodyStream = boxed_body(body);
                async move {
                    if let Err(e) = check_head(path.as_str(), &raw_query, &headers) {
                        return e.into_response();
                    }
                    let query = parse_query(&raw_query);
                    let path = path.as_str().to_string();
                    let req = Req {
                        method,
                        path: path.clone(),
                        query,
                        raw_query,
                        headers,
                        body,
                        client,
                        front,
                    };
                    let r = match route(&svc, &rates, req).await {
                        Ok(r) => r,
                        Err(e) => e.into_response(),
                    };
                    crate::metrics::http_request(&path, r.status().as_u16());
                    r
                }
            },
        )
}

/// Refuses a request line or head over the API's limits with a JSON error.
/// hyper refuses heads over its own limits itself, with an empty body and no
/// hook to change it, so these are well below hyper's (`serve.rs` raises its
/// header count to `2 * MAX_HEADERS`; its URI limit is 64 KiB and its head
/// buffer about 400 KiB): what crosses ours gets an answer a client can read.
fn check_head(path: &str, raw_query: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if path.len() + raw_query.len() > MAX_URI_BYTES {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is over {MAX_URI_BYTES} bytes"),
        ));
    }
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("at most {MAX_HEADERS} header fields and {MAX_HEADER_BYTES} bytes of them"),
        ));
    }
    Ok(())
}

fn boxed_body<S, B>(body: S) -> BodyStream
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf,
{
    Box::pin(body.map(|r| r.map(|mut b| b.copy_to_bytes(b.remaining()))))
}

async fn route(svc: &Arc<Service>, rates: &rate::RateLimits, mut req: Req) -> ApiResult {
    let segs = canonical_segments(&req.path)?;
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    // A `/v1` path needs a key whether or not it names a route, so that
    // without one the API reveals nothing, not even which paths exist.
    let caller = match s.first() {
        Some(&"v1") => {
            let caller = authenticate(svc, &req.front, req.client, &req.headers).await?;
            // The key has done its work: nothing past this point (a call's
            // environment, its record) may see it.
            req.headers.remove(warp::http::header::AUTHORIZATION);
            let rate = svc.budget(&caller).rate;
            rates
                .check(rate::Bucket::Key(caller.key_hash), rate)
                .map_err(|wait| svc.rate_limited("this API key", rate, wait))?;
            Some(caller)
        }
        _ => None,
    };
    let (op, p) = table::find(&req.method, &s).map_err(|miss| match miss {
        Miss::NoRoute => no_route(&req),
        Miss::Method(allow) => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{} is not allowed on {}; allowed: {allow}",
                req.method, req.path
            ),
        )
        .with_allow(allow),
    })?;
    if let Some(caller) = caller {
        return v1(svc, &caller, op, &p, req).await;
    }
    match op {
        // ---- data plane: capability URLs ----
        Op::CallAsync | Op::CallSync => {
            let f = url_function(svc, rates, &p).await?;
            accept(svc, f, op == Op::CallSync, req).await
        }
        Op::Output | Op::OutputWait => {
            let f = url_function(svc, rates, &p).await?;
            let wait = match op {
                Op::OutputWait => Some(wait_param(&req)?),
                _ => None,
            };
            let _long = long_if_waiting(&req, wait)?;
            output(svc, &Scope::Function(&f), p.get("callId"), wait).await
        }
        Op::Logs => {
            let f = url_function(svc, rates, &p).await?;
            logs(svc, f, &req.query, &req.front).await
        }
        Op::Status => {
            let f = url_function(svc, rates, &p).await?;
            Ok(json_response(
                StatusCode::OK,
                &StatusView::from(svc.stats(&f).await?),
            ))
        }

        // ---- unauthenticated service routes ----
        Op::Health => {
            let engine = svc.engine_ok().await;
            let store = svc.store_ok().await;
            // The Engine being down is not unhealthy: calls queue until it is
            // back. A store that cannot write is: nothing can be accepted.
            let status = if store.is_ok() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let h = Health {
                status: if store.is_ok() { "ok" } else { "unavailable" }.into(),
                engine: if engine { "up" } else { "down" }.into(),
                store: store.err().unwrap_or_else(|| "ok".into()),
                instance: svc.instance().to_string(),
            };
            Ok(json_response(status, &h))
        }
        Op::Metrics => {
            // Any valid key: queue sizes are not for the whole network. A
            // user sees their own series only; the admin, everyone's.
            let caller = authenticate(svc, &req.front, req.client, &req.headers).await?;
            let mut text = crate::metrics::render(svc.levels().await);
            if !caller.admin {
                text = crate::metrics::for_user(&text, caller.name.as_str());
            }
            Ok(text_response(text, "text/plain; version=0.0.4"))
        }
        Op::OpenApi => Ok(text_response(OPENAPI.to_string(), "application/yaml")),
        // The dashboard: static files only; it calls `/v1` like the CLI.
        Op::Root => Ok(ui::to_dashboard()),
        Op::Ui => Ok(ui::serve(&p.rest())),
        // `/v1` templates all start with `v1`, so they were answered above.
        _ => Err(no_route(&req)),
    }
}

/// The function of a call URL, once the URL's request rate allows.
async fn url_function(
    svc: &Service,
    rates: &rate::RateLimits,
    p: &table::Params<'_>,
) -> Result<crate::model::Function, ApiError> {
    let f = svc
        .function_by_secret(p.get("name"), p.get("secret"))
        .await?;
    let rate = svc.budget_of(&f.owner).await?.rate;
    rates
        .check(rate::Bucket::Url(f.key()), rate)
        .map_err(|wait| svc.rate_limited("this function's URL", rate, wait))?;
    Ok(f)
}

/// The router's answer for a path no template matches.
fn no_route(req: &Req) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method, req.path))
}

async fn v1(
    svc: &Arc<Service>,
    caller: &crate::model::User,
    op: Op,
    p: &table::Params<'_>,
    req: Req,
) -> ApiResult {
    match op {
        Op::ListFunctions => {
            let mut list = Vec::new();
            let owner = owner_param(&req.query)?;
            for f in svc.list_functions(caller, owner.as_ref()).await? {
                list.push(view(svc, &f).await?);
            }
            Ok(json_response(StatusCode::OK, &list))
        }
        Op::CreateFunction => {
            // Not "the caller's own" silently: an admin naming someone would
            // otherwise get a function of their own under that name.
            if req.query.contains_key("owner") {
                return Err(ApiError::bad_request(
                    "owner= is not accepted here: a function is created by its owner's key",
                ));
            }
            let body: FunctionCreate = json_body(svc, req.body).await?;
            let name = Name::parse(&body.name)?;
            let spec = FunctionSpec {
                image: body.image,
                command: body.command,
                env: parse_env(&body.env)?,
                timeout_ms: body
                    .timeout
                    .as_deref()
                    .map(parse_timeout)
                    .transpose()?
                    .flatten(),
                memory_bytes: body.memory,
                cpus: body.cpus,
                runtime: body.runtime.filter(|r| r != RUNTIME_DEFAULT),
            };
            let webhook = WebhookChange {
                url: body.webhook.map(Some),
                on: webhook_on(body.webhook_on.as_deref())?,
                rotate_secret: false,
            };
            let schedule = body.schedule.map(schedule_input).transpose()?;
            if pull::wanted(&req.headers) {
                let (s, caller) = (Arc::clone(svc), caller.clone());
                return pull::answer(svc, StatusCode::CREATED, move |tx| async move {
                    s.create_function(&caller, name, spec, webhook, schedule, Some(&tx))
                        .await
                })
                .await;
            }
            let saved = svc
                .create_function(caller, name, spec, webhook, schedule, None)
                .await?;
            Ok(json_response(
                StatusCode::CREATED,
                &saved_view(svc, &saved).await?,
            ))
        }
        Op::GetFunction => {
            let f = addressed(svc, caller, p.get("name"), &req.query).await?;
            Ok(json_response(StatusCode::OK, &view(svc, &f).await?))
        }
        Op::UpdateFunction => {
            let owner = owner_param(&req.query)?;
            let body: FunctionPatch = json_body(svc, req.body).await?;
            let update = FunctionUpdate {
                image: body.image,
                command: body.command,
                env_set: parse_env(&body.env)?,
                env_unset: body.unset_env,
                timeout_ms: body.timeout.as_deref().map(parse_timeout).transpose()?,
                memory_bytes: body.memory,
                cpus: body.cpus,
                runtime: body.runtime.map(|r| (r != RUNTIME_DEFAULT).then_some(r)),
                refresh: body.refresh,
                pull: body.pull,
                webhook: WebhookChange {
                    url: match (body.webhook, body.no_webhook) {
                        (Some(_), true) => {
                            return Err(ApiError::bad_request(
                                "Webhook and NoWebhook together: choose one",
                            ))
                        }
                        (Some(u), false) => Some(Some(u)),
                        (None, true) => Some(None),
                        (None, false) => None,
                    },
                    on: webhook_on(body.webhook_on.as_deref())?,
                    rotate_secret: body.rotate_webhook_secret,
                },
                schedule: body.schedule.map(schedule_input).transpose()?,
                no_schedule: body.no_schedule,
            };
            let name = Name::parse(p.get("name"))?;
            if pull::wanted(&req.headers) {
                let (s, caller) = (Arc::clone(svc), caller.clone());
                return pull::answer(svc, StatusCode::OK, move |tx| async move {
                    s.update_function(&caller, &name, owner.as_ref(), update, Some(&tx))
                        .await
                })
                .await;
            }
            let saved = svc
                .update_function(caller, &name, owner.as_ref(), update, None)
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &saved_view(svc, &saved).await?,
            ))
        }
        Op::DeleteFunction => {
            let force = flag(&req.query, "force");
            let owner = owner_param(&req.query)?;
            svc.delete_function(caller, &Name::parse(p.get("name"))?, owner.as_ref(), force)
                .await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Op::CallFunction => {
            let f = addressed(svc, caller, p.get("name"), &req.query).await?;
            let sync = flag(&req.query, "sync");
            accept(svc, f, sync, req).await
        }
        Op::FunctionLogs => {
            let f = addressed(svc, caller, p.get("name"), &req.query).await?;
            logs(svc, f, &req.query, &req.front).await
        }
        Op::FunctionStatus => {
            let f = addressed(svc, caller, p.get("name"), &req.query).await?;
            Ok(json_response(
                StatusCode::OK,
                &StatusView::from(svc.stats(&f).await?),
            ))
        }
        Op::FunctionActivity => {
            let f = addressed(svc, caller, p.get("name"), &req.query).await?;
            let window = window_param(&req.query)?;
            let key = f.key();
            let report = crate::activity::report(window, |k| *k == key);
            Ok(json_response(StatusCode::OK, &ActivityView::from(report)))
        }
        Op::FunctionCalls => {
            let f = addressed(svc, caller, p.get("name"), &req.query).await?;
            let query = calls_query(&req.query)?;
            let page = svc.function_calls(&f, &query).await?;
            Ok(json_response(
                StatusCode::OK,
                &CallPageView {
                    calls: page.calls.iter().map(CallView::from).collect(),
                    cursor: page.next.map(|c| format!("{:x}-{:x}", c.at_ms, c.seq)),
                },
            ))
        }
        Op::Activity => {
            let window = window_param(&req.query)?;
            let owner = owner_param(&req.query)?;
            let keys: std::collections::HashSet<_> = svc
                .list_functions(caller, owner.as_ref())
                .await?
                .iter()
                .map(|f| f.key())
                .collect();
            let report = crate::activity::report(window, |k| keys.contains(k));
            Ok(json_response(StatusCode::OK, &ActivityView::from(report)))
        }
        Op::GetCall => {
            let id = p.get("callId");
            let id = CallId::parse(id)
                .map_err(|_| ApiError::not_found(format!("call {id} not found")))?;
            let call = svc.call(&Scope::User(caller), &id).await?;
            let mut v = CallView::from(&call);
            v.webhook = svc
                .call_webhook(&Scope::User(caller), &id)
                .await?
                .as_ref()
                .map(DeliveryView::from);
            Ok(json_response(StatusCode::OK, &v))
        }
        Op::RedeliverCall => {
            let id = p.get("callId");
            let id = CallId::parse(id)
                .map_err(|_| ApiError::not_found(format!("call {id} not found")))?;
            let d = svc.redeliver(caller, &id).await?;
            Ok(json_response(StatusCode::ACCEPTED, &DeliveryView::from(&d)))
        }
        Op::CallEvents => call_events(svc, caller, p.get("callId"), &req.front).await,
        Op::CallOutput => {
            let wait = if req.query.contains_key("wait") {
                Some(wait_param(&req)?)
            } else {
                None
            };
            let _long = long_if_waiting(&req, wait)?;
            output(svc, &Scope::User(caller), p.get("callId"), wait).await
        }
        Op::Whoami => Ok(json_response(
            StatusCode::OK,
            &UserView::new(caller, &svc.budget(caller), None),
        )),
        Op::ListUsers => {
            let users: Vec<UserView> = svc
                .list_users(caller)
                .await?
                .iter()
                .map(|u| UserView::new(u, &svc.budget(u), None))
                .collect();
            Ok(json_response(StatusCode::OK, &users))
        }
        Op::CreateUser => {
            let body: UserCreate = json_body(svc, req.body).await?;
            let (user, key) = svc
                .add_user(
                    caller,
                    Name::parse(&body.name)?,
                    body.max_concurrency,
                    body.limits(),
                    body.admin,
                )
                .await?;
            Ok(json_response(
                StatusCode::CREATED,
                &UserView::new(&user, &svc.budget(&user), Some(key.as_str().to_string())),
            ))
        }
        Op::UpdateUser => {
            let body: UserPatch = json_body(svc, req.body).await?;
            let (user, key) = svc
                .update_user(
                    caller,
                    &Name::parse(p.get("name"))?,
                    body.max_concurrency,
                    body.limits(),
                    body.rotate_key,
                )
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &UserView::new(
                    &user,
                    &svc.budget(&user),
                    key.map(|k| k.as_str().to_string()),
                ),
            ))
        }
        Op::DeleteUser => {
            svc.delete_user(caller, &Name::parse(p.get("name"))?)
                .await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Op::ListImages => {
            let images: Vec<ImageView> = svc
                .list_images(caller)
                .await?
                .iter()
                .map(ImageView::from)
                .collect();
            Ok(json_response(StatusCode::OK, &images))
        }
        Op::ListRegistryLogins => {
            let logins: Vec<RegistryLoginView> = svc
                .registry_logins(caller)
                .await?
                .iter()
                .map(RegistryLoginView::new)
                .collect();
            Ok(json_response(StatusCode::OK, &logins))
        }
        Op::RegistryLogin => {
            let body: RegistryLoginBody = json_body(svc, req.body).await?;
            let login = svc
                .registry_login(caller, p.get("host"), &body.username, &body.password)
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &RegistryLoginView::new(&login),
            ))
        }
        Op::RegistryLogout => {
            svc.registry_logout(caller, p.get("host")).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        // Templates outside `/v1` never reach here (see `route`).
        _ => Err(no_route(&req)),
    }
}

/// A create/update answer: the view, with the signing secret if this
/// made one (the only time it is shown).
async fn saved_view(svc: &Service, saved: &Saved) -> Result<FunctionView, ApiError> {
    let mut v = view(svc, &saved.function).await?;
    v.webhook_secret = saved.new_secret.as_ref().map(|s| s.as_str().to_string());
    Ok(v)
}

/// `WebhookOn` words, if given.
fn webhook_on(words: Option<&[String]>) -> Result<Option<crate::model::WebhookOn>, ApiError> {
    words
        .map(|w| crate::model::WebhookOn::parse(w.iter().map(String::as_str)))
        .transpose()
        .map_err(ApiError::bad_request)
}

async fn view(svc: &Service, f: &crate::model::Function) -> Result<FunctionView, ApiError> {
    let cache = CacheUse {
        stats: svc.stats(f).await?,
        output_budget: svc.config().limits.output_cache_bytes,
        log_budget: svc.config().limits.log_cache_bytes,
    };
    Ok(FunctionView::new(
        f,
        svc.address(f),
        svc.runtime_of(f),
        cache,
    ))
}

/// The caller a request's bearer key names. Failures count against the
/// client's address; an address past its budget gets 429 without its key
/// being looked at.
async fn authenticate(
    svc: &Service,
    front: &Front,
    client: Option<ClientAddr>,
    headers: &HeaderMap,
) -> Result<crate::model::User, ApiError> {
    front.check_blocked(client)?;
    match bearer_user(svc, headers).await {
        Err(e) if e.status == StatusCode::UNAUTHORIZED => Err(front.auth_failed(client, e)),
        r => r,
    }
}

async fn bearer_user(svc: &Service, headers: &HeaderMap) -> Result<crate::model::User, ApiError> {
    // RFC 9110: the scheme is case-insensitive (`bearer`, `BEARER`).
    let key = headers
        .get(warp::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .ok_or_else(|| ApiError::from(ServiceError::Unauthorized))?;
    Ok(svc.authenticate(key).await?)
}

/// Reads the body (bounded), accepts the call, and for `sync` waits for it.
async fn accept(svc: &Arc<Service>, f: crate::model::Function, sync: bool, req: Req) -> ApiResult {
    let env = request_env(&req);
    let key = idempotency_key(&req.headers)?;
    let callback = callback_url(&req.headers)?;
    // Before the body: a sync call that could not wait is not accepted.
    let long = sync.then(|| req.front.long()).transpose()?;
    let payload = read_body(svc, &req.front, &req.headers, req.body).await?;
    let submitted = svc
        .accept(&f, payload.bytes.clone(), env, key, callback)
        .await?;
    drop(payload);
    let id = submitted.id;
    let mut answer = if !sync {
        json_response(
            StatusCode::ACCEPTED,
            &CallAccepted {
                call_id: id.to_string(),
            },
        )
    } else {
        // Past `max_wait`, answered as an output `/wait` whose wait ran out:
        // 201/202 with the call id, and the client waits on there. A
        // resubmission waits for (or gets) the first call's end.
        let answer = output(
            svc,
            &Scope::Function(&f),
            &id.to_string(),
            Some(req.front.max_wait),
        )
        .await?;
        drop(long);
        answer
    };
    if submitted.replayed {
        answer.headers_mut().insert(
            IDEMPOTENT_REPLAYED_HEADER,
            warp::http::HeaderValue::from_static("true"),
        );
    }
    Ok(answer)
}

/// On a call answered under an `Idempotency-Key` already used: the call
/// named is the first one; nothing new was stored.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";
/// The request header of safe resubmission.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The `Idempotency-Key` of a call request, if it has one: one value,
/// checked (`IdempotencyKey::parse`), else 400 before the body is read.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "more than one Idempotency-Key header: send one",
        ));
    }
    let bad = |e: crate::model::BadIdempotencyKey| ApiError::bad_request(e.to_string());
    let text = v
        .to_str()
        .map_err(|_| bad(crate::model::BadIdempotencyKey))?;
    IdempotencyKey::parse(text.trim()).map(Some).map_err(bad)
}

/// The request header naming a call's own webhook.
pub const CALLBACK_URL_HEADER: &str = "x-callback-url";

/// The `X-Callback-Url` of a call request, if it has one (one value).
fn callback_url(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(CALLBACK_URL_HEADER).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "invalid_webhook", m);
    if values.next().is_some() {
        return Err(bad("more than one X-Callback-Url header: send one"));
    }
    let text = v.to_str().map_err(|_| bad("X-Callback-Url is not a URL"))?;
    Ok(Some(text.trim().to_string()))
}

/// A place among the long requests for an output request that waits.
fn long_if_waiting(req: &Req, wait: Option<Duration>) -> Result<Option<LongPermit>, ApiError> {
    match wait {
        Some(w) if !w.is_zero() => req.front.long().map(Some),
        _ => Ok(None),
    }
}

async fn output(
    svc: &Arc<Service>,
    scope: &Scope<'_>,
    id: &str,
    wait: Option<Duration>,
) -> ApiResult {
    let id = CallId::parse(id).map_err(|_| ApiError::not_found(format!("call {id} not found")))?;
    let state = |status, state: &str| {
        json_response(
            status,
            &serde_json::json!({"CallId": id.to_string(), "State": state}),
        )
    };
    let mut r = match svc.output(scope, &id, wait).await? {
        OutputAnswer::Output(bytes) => {
            let mut r = warp::http::Response::new(bytes).into_response();
            r.headers_mut().insert(
                warp::http::header::CONTENT_TYPE,
                warp::http::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        OutputAnswer::Running => state(StatusCode::CREATED, "RUNNING"),
        OutputAnswer::Pending => state(StatusCode::ACCEPTED, "PENDING"),
        OutputAnswer::Failed(call) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({
                "error": {"code": "call_failed", "message": call.message.clone().unwrap_or_default()},
                "CallId": call.id.to_string(),
                "ExitCode": call.exit_code,
                "ShortStderr": String::from_utf8_lossy(&call.short_stderr),
            }),
        ),
        OutputAnswer::Gone(call) => ApiError::new(
            StatusCode::GONE,
            "output_gone",
            Service::output_state_message(&call),
        )
        .into_response(),
    };
    // Every answer names its call, so a sync caller (whose 200 body is the
    // bare output) can look the call up afterwards.
    if let Ok(v) = warp::http::HeaderValue::from_str(&id.to_string()) {
        r.headers_mut().insert(CALL_ID_HEADER, v);
    }
    Ok(r)
}

/// On every output answer, sync call answers included: the call's id.
pub const CALL_ID_HEADER: &str = "hyperfuncd-call-id";

/// How often a log follower that saw no call change checks that its
/// function still has the secret it was opened with.
const FOLLOW_RECHECK: Duration = Duration::from_secs(1);

async fn logs(
    svc: &Arc<Service>,
    f: crate::model::Function,
    query: &HashMap<String, String>,
    front: &Front,
) -> ApiResult {
    let tail = match query.get("tail") {
        Some(t) => Some(
            t.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid tail {t:?}")))?,
        ),
        None => None,
    };
    let call = match query.get("callid") {
        Some(c) => Some(CallId::parse(c)?),
        None => None,
    };
    let after = match query.get("after") {
        Some(a) => Some(
            a.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid after {a:?}")))?,
        ),
        None => None,
    };
    let follow = flag(query, "follow");
    let long = follow.then(|| front.long()).transpose()?;
    let lines = |events: Vec<(u64, crate::model::Event)>| -> Bytes {
        let mut out = Vec::new();
        for (seq, e) in events {
            let mut view = EventView::from(&e);
            view.seq = seq;
            // Serializing a struct of strings cannot fail.
            if let Ok(mut line) = serde_json::to_vec(&view) {
                line.push(b'\n');
                out.extend(line);
            }
        }
        Bytes::from(out)
    };
    if !follow {
        let events = svc.events(&f, after, call.as_ref(), tail).await?;
        return Ok(with_type(
            warp::http::Response::new(lines(events)).into_response(),
            "application/x-ndjson",
        ));
    }
    // Follow: what is there, then new events as calls change state, until
    // the client goes away or the service ends the follow (see
    // `Service::follow_logs`). It also ends after `max_wait`; the client
    // goes on with `after=` the last `Seq` it saw (or the
    // `Hyperfuncd-Log-Seq` header's if none).
    let deadline = tokio::time::Instant::now() + front.max_wait;
    let (start, first, mut batches) = svc
        .follow_logs(f, after, call, tail, FOLLOW_RECHECK, deadline)
        .await?;
    let head = lines(first);
    let stream = async_stream(move |tx| async move {
        let _long = long;
        if tx.send(head).await.is_err() {
            return;
        }
        while let Some(events) = batches.next().await {
            if tx.send(lines(events)).await.is_err() {
                return;
            }
        }
    });
    let mut r = with_type(
        warp::reply::stream(stream).into_response(),
        "application/x-ndjson",
    );
    r.headers_mut().insert(
        LOG_SEQ_HEADER,
        warp::http::HeaderValue::from(start.unwrap_or(0)),
    );
    Ok(r)
}

/// `GET /v1/calls/ID/events`: the call's state as server-sent events, one
/// `event: state` with the call's view (as `GET /v1/calls/ID`) now and at
/// each change, ending after its end (FINISHED or FAILED) or `max_wait`
/// (the client connects again: the first event is always the state now).
/// Visibility is checked first, so another user's call is 404.
async fn call_events(
    svc: &Arc<Service>,
    caller: &crate::model::User,
    id: &str,
    front: &Front,
) -> ApiResult {
    let id = CallId::parse(id).map_err(|_| ApiError::not_found(format!("call {id} not found")))?;
    let mut changes = svc.call_changes();
    let first = svc.call(&Scope::User(caller), &id).await?;
    let long = front.long()?;
    let deadline = tokio::time::Instant::now() + front.max_wait;
    let event = |c: &crate::model::Call| -> Bytes {
        // Serializing a struct of strings and numbers cannot fail.
        let data = serde_json::to_string(&CallView::from(c)).unwrap_or_default();
        Bytes::from(format!("event: state\ndata: {data}\n\n"))
    };
    let (svc, caller) = (Arc::clone(svc), caller.clone());
    let stream = async_stream(move |tx| async move {
        let _long = long;
        let mut last = first.state;
        if tx.send(event(&first)).await.is_err() || last.is_done() {
            return;
        }
        loop {
            // A change on another node wakes nobody here: look every second.
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
                    return;
                },
                () = tokio::time::sleep(FOLLOW_RECHECK) => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
            let Ok(call) = svc.call(&Scope::User(&caller), &id).await else {
                return;
            };
            if call.state != last {
                last = call.state;
                if tx.send(event(&call)).await.is_err() || last.is_done() {
                    return;
                }
            }
        }
    });
    let mut r = with_type(
        warp::reply::stream(stream).into_response(),
        "text/event-stream",
    );
    r.headers_mut().insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("no-store"),
    );
    Ok(r)
}

/// On a log follow: the sequence the follow starts after, for a client that
/// resumes (`after=`) before any line came.
pub const LOG_SEQ_HEADER: &str = "hyperfuncd-log-seq";

/// A byte stream fed by a task; the task stops when the client goes away.
fn async_stream<F, Fut>(
    f: F,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + Sync + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// The CGI-style environment of a call: `X-Foo-Bar: v` → `HTTP_X_FOO_BAR=v`,
/// plus REQUEST_METHOD and QUERY_STRING.
fn request_env(req: &Req) -> Vec<(String, String)> {
    let mut env = header_env(&req.headers);
    env.push(("REQUEST_METHOD".into(), req.method.to_string()));
    env.push(("QUERY_STRING".into(), req.raw_query.clone()));
    env
}

/// The `HTTP_*` variables of `headers`. A name holding `_` is dropped, as
/// nginx drops it: `X_User` and `X-User` would both become `HTTP_X_USER`, so
/// a client could pass for a header a proxy in front sets. The management
/// API's own Authorization header never gets here (`route` removes it once
/// the caller is authenticated), and one carrying a hyperfuncd key in any
/// spelling (`carries_key`) sent to a capability URL is dropped too.
fn header_env(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        if name == warp::http::header::AUTHORIZATION
            && value.to_str().map_or(true, |v| carries_key(v, 0))
        {
            continue;
        }
        // httpoxy: `Proxy:` would become HTTP_PROXY and redirect the
        // function's own outgoing HTTP through the caller's proxy.
        if name.as_str() == "proxy" || name.as_str().contains('_') {
            continue;
        }
        let Ok(value) = value.to_str() else { continue };
        let key = format!(
            "HTTP_{}",
            name.as_str().to_ascii_uppercase().replace('-', "_")
        );
        if !key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
            continue;
        }
        match env.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => {
                v.push_str(", ");
                v.push_str(value);
            }
            None => env.push((key, value.to_string())),
        }
    }
    env
}

/// Whether an Authorization value holds a hyperfuncd key: in clear
/// (`Bearer hfk_...`, a Digest `username="hfk_..."`) or base64-encoded, in
/// either alphabet, with or without padding, however the key is placed in
/// the encoded text (`Basic base64(user:hfk_...)`, `base64(hfk_...:)`), and
/// encoded again up to `MAX_DEPTH` times.
fn carries_key(text: &str, depth: u32) -> bool {
    use base64::Engine as _;
    const MAX_DEPTH: u32 = 3;
    const LENIENT: base64::engine::GeneralPurposeConfig =
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true);
    const STANDARD: base64::engine::GeneralPurpose =
        base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
    if text.contains(crate::model::API_KEY_PREFIX) {
        return true;
    }
    if depth >= MAX_DEPTH {
        return false;
    }
    text.split(|c: char| c.is_ascii_whitespace() || matches!(c, ',' | '=' | '"' | '\''))
        .filter(|token| token.len() >= 4)
        .any(|token| {
            // One alphabet: the URL-safe one's two letters mapped onto the
            // standard one's.
            let token = token.replace('-', "+").replace('_', "/");
            STANDARD
                .decode(token)
                .is_ok_and(|bytes| carries_key(&String::from_utf8_lossy(&bytes), depth + 1))
        })
}

/// Reads a call body within the STDIN limit (`front.rs` bounds the memory
/// it holds while it arrives).
async fn read_body(
    svc: &Service,
    front: &Front,
    headers: &HeaderMap,
    mut body: BodyStream,
) -> Result<front::Body, ApiError> {
    let limit = svc.config().limits.max_stdin_bytes;
    let declared = headers
        .get(warp::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A client still sending when the 413 arrives sees a broken pipe instead
    // of the answer, so a moderately oversized body is read and discarded
    // (never stored) before answering; a huge one is refused at once.
    if declared.is_some_and(|n| n > limit.saturating_mul(DRAIN_FACTOR)) {
        return Err(svc.too_large().into());
    }
    let clock = BodyClock::new(&svc.config().http);
    let mut seen = match front.read_body(limit, &mut body, &clock).await {
        Ok(b) => return Ok(b),
        Err(BodyError::Api(e)) => return Err(e),
        Err(BodyError::TooLarge { seen }) => seen,
    };
    while seen <= limit.saturating_mul(DRAIN_FACTOR) {
        match clock.next(&mut body, seen).await? {
            Some(chunk) => seen += chunk.len() as u64,
            None => break,
        }
    }
    Err(svc.too_large().into())
}

/// How long a request body may take: `[http] body_timeout`, plus one second
/// per `body_min_rate` bytes already received. A body slower than that holds
/// a connection for nothing, so it is answered 408 and the connection closed.
struct BodyClock {
    start: tokio::time::Instant,
    grace: Duration,
    min_rate: u64,
}

impl BodyClock {
    fn new(http: &crate::config::HttpConfig) -> BodyClock {
        BodyClock {
            start: tokio::time::Instant::now(),
            grace: http.body_timeout,
            min_rate: http.body_min_rate.max(1),
        }
    }

    /// The next chunk of `body`, `None` at its end, or 408 if it is late.
    async fn next(&self, body: &mut BodyStream, seen: u64) -> Result<Option<Bytes>, ApiError> {
        let earned = Duration::from_secs_f64(seen as f64 / self.min_rate as f64);
        let deadline = self.start + self.grace + earned;
        match tokio::time::timeout_at(deadline, body.next()).await {
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body arrived too slowly",
            )),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => Err(ApiError::bad_request(format!(
                "cannot read request body: {e}"
            ))),
            Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        }
    }
}

/// JSON request bodies are small; 1 MiB is plenty.
async fn json_body<T: serde::de::DeserializeOwned>(
    svc: &Service,
    mut body: BodyStream,
) -> Result<T, ApiError> {
    const LIMIT: usize = 1024 * 1024;
    let mut buf = BytesMut::new();
    let clock = BodyClock::new(&svc.config().http);
    while let Some(chunk) = clock.next(&mut body, buf.len() as u64).await? {
        if buf.len() + chunk.len() > LIMIT {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "JSON body over 1 MiB",
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&buf)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// A body's schedule for the service: its payload decoded from base64.
fn schedule_input(b: ScheduleBody) -> Result<ScheduleInput, ApiError> {
    use base64::Engine as _;
    let payload = b
        .payload
        .map(|p| {
            base64::engine::general_purpose::STANDARD
                .decode(p.as_bytes())
                .map_err(|e| {
                    ApiError::bad_request(format!("invalid schedule Payload: not base64 ({e})"))
                })
        })
        .transpose()?;
    Ok(ScheduleInput {
        expr: b.expression,
        timezone: b.timezone,
        payload,
    })
}

fn parse_env(vars: &[String]) -> Result<Vec<EnvVar>, ApiError> {
    vars.iter()
        .map(|v| EnvVar::parse(v).map_err(ApiError::bad_request))
        .collect()
}

/// `30s`, `5m`, `1h30m`; `none`/`0` means no timeout.
fn parse_timeout(s: &str) -> Result<Option<u64>, ApiError> {
    match s.trim() {
        "" | "none" | "0" => Ok(None),
        t => {
            let d = humantime::parse_duration(t)
                .map_err(|e| ApiError::bad_request(format!("invalid timeout {t:?}: {e}")))?;
            u64::try_from(d.as_millis())
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid timeout {t:?}: too long")))
        }
    }
}

fn wait_param(req: &Req) -> Result<Duration, ApiError> {
    match req.query.get("wait").map(String::as_str) {
        None | Some("") | Some("1") | Some("true") => Ok(MAX_WAIT),
        Some(s) => s
            .parse::<u64>()
            .map(|n| Duration::from_secs(n).min(MAX_WAIT))
            .map_err(|_| ApiError::bad_request(format!("invalid wait {s:?}: seconds expected"))),
    }
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    matches!(
        query.get(name).map(String::as_str),
        Some("" | "1" | "true" | "yes")
    )
}

/// `?owner=USER`: whose function a `/v1/functions/{name}` route means (the
/// caller's when absent). Only an admin may name another user; for anyone
/// else such a function is "not found" (`Service::function`).
/// The function `/v1/functions/{name}` addresses: the caller's own, or with
/// `?owner=` (admins only) another user's.
async fn addressed(
    svc: &Service,
    caller: &crate::model::User,
    name: &str,
    query: &HashMap<String, String>,
) -> Result<crate::model::Function, ApiError> {
    let owner = owner_param(query)?;
    Ok(svc
        .function(caller, &Name::parse(name)?, owner.as_ref())
        .await?)
}

/// `window=hour` (the default) or `window=day`.
fn window_param(query: &HashMap<String, String>) -> Result<crate::activity::Window, ApiError> {
    match query.get("window") {
        None => Ok(crate::activity::Window::Hour),
        Some(w) => crate::activity::Window::parse(w)
            .ok_or_else(|| ApiError::bad_request(format!("invalid window {w:?}: hour or day"))),
    }
}

/// Calls a history page holds by default, and at most.
pub const CALLS_LIMIT_DEFAULT: usize = 50;
pub const CALLS_LIMIT_MAX: usize = 500;

/// The query of `GET /v1/functions/{name}/calls`: `state` (one or several,
/// comma-separated), `since`/`until` (RFC 3339, or a duration meaning that
/// long ago), `limit`, `cursor` (from the previous page).
fn calls_query(query: &HashMap<String, String>) -> Result<crate::service::CallQuery, ApiError> {
    let mut q = crate::service::CallQuery {
        limit: CALLS_LIMIT_DEFAULT,
        ..Default::default()
    };
    if let Some(states) = query.get("state") {
        for s in states.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let state = match s.to_ascii_uppercase().as_str() {
                "PENDING" => CallState::Pending,
                "RUNNING" => CallState::Running,
                "FINISHED" => CallState::Finished,
                "FAILED" => CallState::Failed,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "invalid state {:?}: PENDING, RUNNING, FINISHED or FAILED",
                        s.chars().take(40).collect::<String>()
                    )))
                }
            };
            if !q.states.contains(&state) {
                q.states.push(state);
            }
        }
    }
    q.since_ms = query
        .get("since")
        .map(|v| time_param("since", v))
        .transpose()?;
    q.until_ms = query
        .get("until")
        .map(|v| time_param("until", v))
        .transpose()?;
    if let Some(l) = query.get("limit") {
        q.limit = match l.parse::<usize>() {
            Ok(n) if (1..=CALLS_LIMIT_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "invalid limit {:?}: 1 to {CALLS_LIMIT_MAX}",
                    l.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    if let Some(c) = query.get("cursor") {
        let parsed = c.split_once('-').and_then(|(a, s)| {
            Some(crate::service::CallCursor {
                at_ms: u64::from_str_radix(a, 16).ok()?,
                seq: u64::from_str_radix(s, 16).ok()?,
            })
        });
        q.before = Some(parsed.ok_or_else(|| {
            ApiError::bad_request("invalid cursor: pass back the Cursor of the previous page")
        })?);
    }
    Ok(q)
}

/// A time as RFC 3339 (`2026-12-07T10:00:00Z`) or as a duration before now
/// (`90s`, `15m`, `2h`, `1d`), in milliseconds since the epoch.
fn time_param(name: &str, v: &str) -> Result<u64, ApiError> {
    if let Ok(d) = humantime::parse_duration(v) {
        let ago = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        return Ok(crate::model::now_ms().saturating_sub(ago));
    }
    humantime::parse_rfc3339_weak(v)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid {name} {:?}: an RFC 3339 time or a duration such as 15m",
                v.chars().take(40).collect::<String>()
            ))
        })
}

fn owner_param(query: &HashMap<String, String>) -> Result<Option<Name>, ApiError> {
    match query.get("owner") {
        Some(o) => Ok(Some(Name::parse(o)?)),
        None => Ok(None),
    }
}

/// The query as `application/x-www-form-urlencoded` (`+` is a space here,
/// and only here); a repeated key keeps its last value.
fn parse_query(raw: &str) -> HashMap<String, String> {
    form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect()
}

/// The one canonical reading of a request path, before anything routes on
/// it: percent-decoded segments. A path that has another spelling (an empty
/// segment as in `//v1`, a `.` or `..` segment, an encoded `/`, invalid
/// UTF-8) is refused rather than guessed at, so that no route can be reached
/// under a name the checks that depend on the route do not recognise. One
/// trailing slash is tolerated. `+` is a plus in a path.
fn canonical_segments(raw: &str) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "request path is not canonical: no empty, '.' or '..' segments, no encoded '/'",
        )
    };
    let rest = raw.strip_prefix('/').ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    rest.split('/')
        .map(|seg| {
            let decoded = percent_encoding::percent_decode_str(seg)
                .decode_utf8()
                .map_err(|_| bad())?;
            match decoded.as_ref() {
                "" | "." | ".." => Err(bad()),
                d if d.contains(['/', '\0']) => Err(bad()),
                d => Ok(d.to_string()),
            }
        })
        .collect()
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = warp::http::Response::new(Bytes::from(body)).into_response();
    *r.status_mut() = status;
    with_type(r, "application/json")
}

fn text_response(text: String, content_type: &'static str) -> Response {
    with_type(
        warp::http::Response::new(Bytes::from(text)).into_response(),
        content_type,
    )
}

fn empty(status: StatusCode) -> Response {
    let mut r = warp::http::Response::new(Bytes::new()).into_response();
    *r.status_mut() = status;
    r
}

fn with_type(mut r: Response, content_type: &'static str) -> Response {
    r.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_percent_decoding() {
        let q = parse_query("tail=5&callid=a%2Db&follow&x=a+b");
        assert_eq!(q["tail"], "5");
        assert_eq!(q["callid"], "a-b");
        assert_eq!(q["follow"], "");
        assert_eq!(q["x"], "a b");
        let segs = |p: &str| canonical_segments(p).map_err(|e| e.message);
        assert_eq!(
            segs("/%761/functions/a+b").unwrap(),
            ["v1", "functions", "a+b"]
        );
        assert_eq!(segs("/v1/functions/").unwrap(), ["v1", "functions"]);
        assert_eq!(segs("/%zz%4").unwrap(), ["%zz%4"]);
        assert!(segs("/").unwrap().is_empty());
        for bad in [
            "//v1/functions",
            "/v1//functions",
            "/v1/./functions",
            "/v1/functions/../users",
            "/v1/functions/%2e%2e",
            "/v1/a%2Fb",
            "/v1/%ff",
            "/v1/a%00",
            "v1",
        ] {
            assert!(segs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_env_drops_underscored_names_and_keys() {
        use base64::Engine as _;
        use warp::http::HeaderValue;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let key = "hfk_Zm9vYmFyYmF6cXV4LV9hYmM";
        let env_of = |pairs: &[(&str, String)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(
                    warp::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            header_env(&h)
        };
        let env = env_of(&[
            ("x-user", "proxy-said".into()),
            ("x_user", "client-said".into()),
            ("x-foo-bar", "v".into()),
        ]);
        assert_eq!(
            env,
            [
                ("HTTP_X_USER".to_string(), "proxy-said".to_string()),
                ("HTTP_X_FOO_BAR".to_string(), "v".to_string()),
            ]
        );
        for auth in [
            format!("Bearer {key}"),
            format!("Basic {}", b64(&format!("user:{key}"))),
            format!("Basic {}", b64(&format!("{key}:"))),
            format!("Basic {}", b64(&format!("x{key}:")).trim_end_matches('=')),
            format!("basic   {}", b64(&format!("ab:{key}")).replace('+', "-")),
            format!("Token token={}", b64(key)),
            format!("Digest username=\"{key}\", realm=\"r\""),
            format!("Basic {}", b64(&b64(&format!("u:{key}")))),
        ] {
            let env = env_of(&[("authorization", auth.clone())]);
            assert!(env.is_empty(), "{auth} reached the call: {env:?}");
        }
        // Other credentials are the function's business.
        let basic = format!("Basic {}", b64("alice:s3cret"));
        assert_eq!(
            env_of(&[("authorization", basic.clone())]),
            [("HTTP_AUTHORIZATION".to_string(), basic)]
        );
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("none").unwrap(), None);
        assert_eq!(parse_timeout("1m30s").unwrap(), Some(90_000));
        assert!(parse_timeout("soon").is_err());
        assert!(parse_timeout("99999999999999999s").is_err());
    }
}

#[cfg(test)]
mod openapi_check;
