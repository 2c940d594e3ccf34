//! What the front door bounds per request, beyond the connection limits of
//! `serve/conns.rs`: long requests (log follows, `/sync`, output `/wait`)
//! share `[http] long_request_cap` places, so they never take the
//! connections short requests need; failed authentications are limited per
//! client address (a token bucket from `governor`) and logged in summary;
//! request bodies are held in memory within `[http] body_memory_bytes` and
//! spooled to unnamed files in the data dir beyond it.
//!
//! It knows nothing of functions or calls: `mod.rs` decides which request is
//! long and what a key is.

use super::ApiError;
use bytes::{Bytes, BytesMut};
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use warp::http::StatusCode;

/// The address of the client that sent a request, as `serve.rs` puts it in
/// the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The client address a limit counts against: an IPv4 address, or the /64
/// an IPv6 address is in (one host usually holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    pub fn of(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    AddressKey(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// Failed authentications are summed up in one log line this often.
const AUTH_LOG_EVERY: Duration = Duration::from_secs(60);
/// Addresses blocked at once at most; past it the oldest blocks are
/// forgotten (a flood from that many addresses is the network's problem).
const MAX_BLOCKED: usize = 100_000;
/// A body keeps at most this much in memory while it arrives; the rest goes
/// to its spool file.
const IN_MEMORY_PER_BODY: usize = 256 * 1024;
/// Spool file operations at once (each on a blocking thread).
const SPOOL_THREADS: usize = 4;

/// The request-level bounds (see the module doc); one per server.
pub struct Front {
    long: Arc<Semaphore>,
    long_cap: usize,
    pub max_wait: Duration,
    auth: DefaultKeyedRateLimiter<AddressKey>,
    auth_state: Mutex<AuthState>,
    /// Bytes of bodies still arriving, held in memory.
    receiving: Arc<Semaphore>,
    /// Bytes of whole bodies in memory, from their last byte until the
    /// call is stored.
    assembled: Arc<Semaphore>,
    assembled_cap: usize,
    spool_dir: PathBuf,
    /// Spool file operations running at once.
    spool_io: Semaphore,
}

#[derive(Default)]
struct AuthState {
    blocked: HashMap<AddressKey, Instant>,
    failures: u64,
    addresses: HashMap<AddressKey, u64>,
    window_start: Option<Instant>,
    last_clean: Option<Instant>,
}

/// Why a body could not be read.
#[derive(Debug)]
pub(super) enum BodyError {
    /// Over the limit after `seen` bytes; the rest is still unread.
    TooLarge {
        seen: u64,
    },
    Api(ApiError),
}

impl From<ApiError> for BodyError {
    fn from(e: ApiError) -> BodyError {
        BodyError::Api(e)
    }
}

/// A place among the long requests, held for the request's lifetime.
pub struct LongPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// A whole request body in memory, counted against `body_memory_bytes`
/// until dropped (after the call is stored).
pub struct Body {
    pub bytes: Bytes,
    _held: Option<OwnedSemaphorePermit>,
}

impl Front {
    pub fn new(http: &crate::config::HttpConfig, max_stdin: u64, data_dir: PathBuf) -> Front {
        let long_cap = http.long_request_cap();
        let per_minute = NonZeroU32::new(http.auth_failures_per_minute).unwrap_or(NonZeroU32::MIN);
        let total = usize::try_from(http.body_memory_bytes).unwrap_or(usize::MAX);
        let receiving = (total / 2).max(IN_MEMORY_PER_BODY);
        // At least one whole body, or no body could ever be assembled.
        let assembled_cap = (total / 2)
            .max(usize::try_from(max_stdin).unwrap_or(usize::MAX))
            .min(Semaphore::MAX_PERMITS);
        Front {
            long: Arc::new(Semaphore::new(long_cap)),
            long_cap,
            max_wait: http.max_wait,
            auth: RateLimiter::keyed(Quota::per_minute(per_minute)),
            auth_state: Mutex::new(AuthState::default()),
            receiving: Arc::new(Semaphore::new(receiving.min(Semaphore::MAX_PERMITS))),
            assembled: Arc::new(Semaphore::new(assembled_cap)),
            assembled_cap,
            spool_dir: data_dir.join("spool"),
            spool_io: Semaphore::new(SPOOL_THREADS),
        }
    }

    /// A place for a long request, or 503 when `long_request_cap` of them
    /// are running.
    pub fn long(&self) -> Result<LongPermit, ApiError> {
        Arc::clone(&self.long)
            .try_acquire_owned()
            .map(LongPermit)
            .map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too_many_long_requests",
                    format!(
                        "{} long requests (log follows, /sync, output waits) are open, the most the server takes; try again shortly",
                        self.long_cap
                    ),
                )
                .with_retry_after(5)
            })
    }

    fn auth_lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // Counters only: a panic elsewhere leaves nothing half-updated.
        self.auth_state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// 429 while `client` is blocked for failing to authenticate too often.
    pub fn check_blocked(&self, client: Option<ClientAddr>) -> Result<(), ApiError> {
        let Some(ClientAddr(ip)) = client else {
            return Ok(());
        };
        let key = AddressKey::of(ip);
        let now = Instant::now();
        let mut st = self.auth_lock();
        match st.blocked.get(&key) {
            Some(until) if *until > now => Err(too_many_failures(*until - now)),
            Some(_) => {
                st.blocked.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a failed authentication from `client`; past the per-minute
    /// budget the address is blocked until the bucket has a token again,
    /// and this answer is already a 429.
    pub fn auth_failed(&self, client: Option<ClientAddr>, failure: ApiError) -> ApiError {
        let Some(ClientAddr(ip)) = client else {
            return failure;
        };
        let key = AddressKey::of(ip);
        let now = Instant::now();
        let verdict = self.auth.check_key(&key);
        let mut st = self.auth_lock();
        st.failures += 1;
        *st.addresses.entry(key).or_insert(0) += 1;
        let start = *st.window_start.get_or_insert(now);
        if st.failures == 1 {
            // The first of a window is logged at once, with its address.
            tracing::info!(address = %key, "authentication failed");
        } else if now.duration_since(start) >= AUTH_LOG_EVERY {
            let (top, top_n) = st
                .addresses
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(a, n)| (a.to_string(), *n))
                .unwrap_or_default();
            tracing::info!(
                failures = st.failures,
                addresses = st.addresses.len(),
                blocked = st.blocked.len(),
                top_address = %top,
                top_address_failures = top_n,
                seconds = now.duration_since(start).as_secs(),
                "authentication failures"
            );
            st.failures = 0;
            st.addresses.clear();
            st.window_start = None;
        }
        if st
            .last_clean
            .is_none_or(|t| now.duration_since(t) >= AUTH_LOG_EVERY)
        {
            st.blocked.retain(|_, until| *until > now);
            self.auth.retain_recent();
            self.auth.shrink_to_fit();
            st.last_clean = Some(now);
        }
        match verdict {
            Ok(()) => failure,
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                if st.blocked.len() >= MAX_BLOCKED {
                    st.blocked.clear();
                }
                st.blocked.insert(key, now + wait);
                too_many_failures(wait)
            }
        }
    }

    /// Reads a call body of at most `limit` bytes (see the module doc for
    /// where its bytes are kept while it arrives), each chunk within the
    /// time `clock` gives it. Past the limit it stops reading and answers
    /// `TooLarge` with the bytes seen; the caller decides what to do with
    /// the rest.
    pub(super) async fn read_body(
        &self,
        limit: u64,
        body: &mut super::BodyStream,
        clock: &super::BodyClock,
    ) -> Result<Body, BodyError> {
        let mut memory = BytesMut::new();
        let mut held: Option<OwnedSemaphorePermit> = None;
        let mut spool: Option<std::fs::File> = None;
        let mut seen: u64 = 0;
        while let Some(chunk) = clock.next(body, seen).await? {
            seen += chunk.len() as u64;
            if seen > limit {
                return Err(BodyError::TooLarge { seen });
            }
            let file = match spool.take() {
                Some(f) => f,
                None => {
                    let fits = memory.len() + chunk.len() <= IN_MEMORY_PER_BODY;
                    let permit = u32::try_from(chunk.len())
                        .ok()
                        .filter(|_| fits)
                        .and_then(|n| Arc::clone(&self.receiving).try_acquire_many_owned(n).ok());
                    if let Some(p) = permit {
                        match &mut held {
                            Some(h) => h.merge(p),
                            None => held = Some(p),
                        }
                        memory.extend_from_slice(&chunk);
                        continue;
                    }
                    let file = self.spool_file().await?;
                    let file = self
                        .write_spool(file, std::mem::take(&mut memory).freeze())
                        .await?;
                    held = None;
                    file
                }
            };
            spool = Some(self.write_spool(file, chunk).await?);
        }
        let Some(file) = spool else {
            return Ok(Body {
                bytes: memory.freeze(),
                _held: held,
            });
        };
        // Whole bodies wait their turn to come back into memory; they are
        // complete, so the turn comes as soon as earlier ones are stored.
        let len = usize::try_from(seen).unwrap_or(usize::MAX);
        let permits = u32::try_from(len.min(self.assembled_cap)).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.assembled)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the server is stopping",
                )
            })?;
        let bytes = self
            .blocking(move || {
                use std::io::{Read, Seek};
                let mut file = file;
                let mut bytes = Vec::with_capacity(len);
                file.seek(std::io::SeekFrom::Start(0))?;
                file.read_to_end(&mut bytes)?;
                Ok(bytes)
            })
            .await?;
        Ok(Body {
            bytes: Bytes::from(bytes),
            _held: Some(permit),
        })
    }

    /// Appends `bytes` to a spool file.
    async fn write_spool(
        &self,
        file: std::fs::File,
        bytes: Bytes,
    ) -> Result<std::fs::File, ApiError> {
        if bytes.is_empty() {
            return Ok(file);
        }
        self.blocking(move || {
            use std::io::Write;
            let mut file = file;
            file.write_all(&bytes)?;
            Ok(file)
        })
        .await
    }

    /// Runs spool file I/O on a blocking thread, at most `SPOOL_THREADS` at
    /// once: hundreds of uploads must not mean hundreds of threads.
    async fn blocking<T: Send + 'static>(
        &self,
        io: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _turn = self.spool_io.acquire().await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is stopping",
            )
        })?;
        tokio::task::spawn_blocking(io)
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .map_err(spool_error)
    }

    async fn spool_file(&self) -> Result<std::fs::File, ApiError> {
        let dir = self.spool_dir.clone();
        self.blocking(move || {
            std::fs::create_dir_all(&dir)?;
            // Unnamed (O_TMPFILE where the filesystem has it): nothing is
            // left behind whatever happens to the daemon.
            tempfile::tempfile_in(&dir)
        })
        .await
    }
}

fn spool_error(e: std::io::Error) -> ApiError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        return ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            "no space left to receive the request body",
        );
    }
    tracing::error!(error = %e, "cannot spool a request body");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "cannot receive the request body",
    )
}

fn too_many_failures(wait: Duration) -> ApiError {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_auth_failures",
        "too many failed authentications from this address; try again later",
    )
    .with_retry_after(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn front(http: crate::config::HttpConfig, dir: &std::path::Path) -> Front {
        Front::new(&http, 5 << 20, dir.to_path_buf())
    }

    #[test]
    fn addresses_count_by_host_and_ipv6_by_its_64() {
        assert_eq!(
            AddressKey::of(ip("2001:db8::1")),
            AddressKey::of(ip("2001:db8::ffff:1"))
        );
        assert_ne!(
            AddressKey::of(ip("2001:db8:0:1::1")),
            AddressKey::of(ip("2001:db8::1"))
        );
        assert_eq!(
            AddressKey::of(ip("::ffff:10.0.0.1")),
            AddressKey::of(ip("10.0.0.1"))
        );
        assert_eq!(
            AddressKey::of(ip("2001:db8::1")).to_string(),
            "2001:db8::/64"
        );
    }

    #[tokio::test]
    async fn failed_authentications_past_the_budget_block_the_address_only() {
        let dir = tempfile::tempdir().unwrap();
        let http = crate::config::HttpConfig {
            auth_failures_per_minute: 3,
            ..Default::default()
        };
        let f = front(http, dir.path());
        let a = Some(ClientAddr(ip("192.0.2.1")));
        let unauthorized = || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "");
        for _ in 0..3 {
            f.check_blocked(a).unwrap();
            assert_eq!(
                f.auth_failed(a, unauthorized()).status,
                StatusCode::UNAUTHORIZED
            );
        }
        let e = f.auth_failed(a, unauthorized());
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            e.retry_after.is_some_and(|s| (1..=60).contains(&s)),
            "{e:?}"
        );
        let e = f.check_blocked(a).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        f.check_blocked(Some(ClientAddr(ip("192.0.2.2")))).unwrap();
    }

    #[tokio::test]
    async fn long_requests_are_capped_below_the_connections() {
        let dir = tempfile::tempdir().unwrap();
        let http = crate::config::HttpConfig {
            max_connections: 10,
            reserved_connections: 4,
            ..Default::default()
        };
        let f = front(http, dir.path());
        let held: Vec<_> = (0..6).map(|_| f.long().unwrap()).collect();
        let e = f.long().err().unwrap();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after, Some(5));
        drop(held);
        f.long().unwrap();
    }

    #[tokio::test]
    async fn a_large_body_goes_through_its_spool_file_byte_exact() {
        let dir = tempfile::tempdir().unwrap();
        let http = crate::config::HttpConfig {
            body_memory_bytes: 1 << 20,
            ..Default::default()
        };
        let f = front(http, dir.path());
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let stream = |data: &Vec<u8>| -> super::super::BodyStream {
            let chunks: Vec<Result<Bytes, warp::Error>> = data
                .chunks(16 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Box::pin(futures_util::stream::iter(chunks))
        };
        let clock = super::super::BodyClock::new(&Default::default());
        let body = f
            .read_body(5 << 20, &mut stream(&data), &clock)
            .await
            .unwrap();
        assert_eq!(body.bytes.len(), data.len());
        assert!(body.bytes == data[..]);
        // The spool file is unnamed: nothing is left in the directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
            0
        );
        // Over the limit: 413, whatever path the bytes took.
        let e = f
            .read_body(1 << 20, &mut stream(&data), &clock)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(e, BodyError::TooLarge { seen } if seen > 1 << 20),
            "{e:?}"
        );
    }
}
