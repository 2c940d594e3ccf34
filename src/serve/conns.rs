//! The daemon's open client connections: how many there are, from which
//! address, and which of them are idle (no request in flight). It bounds
//! them: `[http] max_connections` in all, `max_connections_per_address` from
//! one client address (an IPv6 client counts by its /64). At the global cap
//! the longest-idle connection is closed to make room (as nginx frees
//! keep-alive connections when it runs out), so connections that hold a
//! slot without asking anything cannot lock newcomers out; only when every
//! connection has a request in flight does the accept loop wait.
//!
//! It never decides what a request may do: the API's long-request gate and
//! failed-authentication limit live in `api/`.

use crate::api::AddressKey;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Refused connections are logged at most this often; the rest are counted.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

struct Entry {
    address: AddressKey,
    /// Requests in flight (a request counts until its answer's body is sent).
    busy: u32,
    /// Since when the connection has had no request in flight.
    idle_since: Instant,
    /// Cancelled to close the connection (eviction).
    evict: CancellationToken,
}

#[derive(Default)]
struct Table {
    next: u64,
    open: HashMap<u64, Entry>,
    by_address: HashMap<AddressKey, usize>,
    /// An evicted connection that has not closed yet: no second one is
    /// evicted before it has.
    evicting: Option<u64>,
    refused: u64,
    last_refusal_log: Option<Instant>,
}

/// The table of open connections (see the module doc).
pub struct Conns {
    table: Mutex<Table>,
    /// Woken when a connection closes or becomes idle.
    changed: Notify,
    cap: usize,
    per_address: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections_per_address` connections from this address are open.
    TooManyFromAddress,
}

impl Conns {
    pub fn new(cap: usize, per_address: usize) -> Arc<Conns> {
        Arc::new(Conns {
            table: Mutex::new(Table::default()),
            changed: Notify::new(),
            cap: cap.max(1),
            per_address: per_address.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves counts that are still
        // consistent (every update is a single statement), so go on with them.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a connection may be accepted: below the cap, or at it
    /// once the longest-idle connection has been closed to make room.
    /// Returns at once below the cap.
    pub async fn room(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut t = self.lock();
                if t.open.len() < self.cap {
                    return;
                }
                if t.evicting.is_none() {
                    let oldest = t
                        .open
                        .iter()
                        .filter(|(_, e)| e.busy == 0)
                        .min_by_key(|(_, e)| e.idle_since)
                        .map(|(id, e)| (*id, e.evict.clone()));
                    if let Some((id, evict)) = oldest {
                        tracing::debug!(
                            open = t.open.len(),
                            "at the connection cap; closing the longest-idle connection"
                        );
                        evict.cancel();
                        t.evicting = Some(id);
                    }
                }
            }
            // A connection that becomes idle wakes this too; the timer only
            // covers a wake-up lost between the check and the wait.
            let _ = tokio::time::timeout(Duration::from_millis(250), changed).await;
        }
    }

    /// Admits a connection from `peer`, or refuses it when its address
    /// already holds `max_connections_per_address`.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Conn, Refused> {
        let address = AddressKey::of(peer);
        let mut t = self.lock();
        let n = t.by_address.get(&address).copied().unwrap_or(0);
        if n >= self.per_address {
            t.refused += 1;
            let now = Instant::now();
            if t.last_refusal_log
                .is_none_or(|l| now.duration_since(l) >= REFUSAL_LOG_EVERY)
            {
                tracing::warn!(
                    address = %address,
                    max_connections_per_address = self.per_address,
                    refused_since_last_line = t.refused,
                    "refusing connections over the per-address cap"
                );
                t.last_refusal_log = Some(now);
                t.refused = 0;
            }
            return Err(Refused::TooManyFromAddress);
        }
        t.by_address.insert(address, n + 1);
        let id = t.next;
        t.next += 1;
        let evict = CancellationToken::new();
        t.open.insert(
            id,
            Entry {
                address,
                busy: 0,
                idle_since: Instant::now(),
                evict: evict.clone(),
            },
        );
        Ok(Conn {
            inner: Arc::new(ConnInner {
                conns: Arc::clone(self),
                id,
                evict,
                requests: AtomicU64::new(0),
            }),
        })
    }
}

struct ConnInner {
    conns: Arc<Conns>,
    id: u64,
    evict: CancellationToken,
    /// Requests started on this connection.
    requests: AtomicU64,
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        let mut t = self.conns.lock();
        if let Some(e) = t.open.remove(&self.id) {
            if let Some(n) = t.by_address.get_mut(&e.address) {
                *n -= 1;
                if *n == 0 {
                    t.by_address.remove(&e.address);
                }
            }
        }
        if t.evicting == Some(self.id) {
            t.evicting = None;
        }
        drop(t);
        self.conns.changed.notify_waiters();
    }
}

/// One admitted connection; it leaves the table when the last clone (the
/// connection's task, its requests' busy marks) is dropped.
#[derive(Clone)]
pub struct Conn {
    inner: Arc<ConnInner>,
}

impl Conn {
    /// Cancelled when the connection is closed to make room for another.
    pub fn evicted(&self) -> &CancellationToken {
        &self.inner.evict
    }

    /// Requests started on this connection so far.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Marks a request in flight until the returned mark is dropped.
    pub fn busy(&self) -> Busy {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let mut t = self.inner.conns.lock();
        if let Some(e) = t.open.get_mut(&self.inner.id) {
            e.busy += 1;
        }
        Busy { conn: self.clone() }
    }
}

/// A request in flight on a connection (see `Conn::busy`).
pub struct Busy {
    conn: Conn,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let inner = &self.conn.inner;
        let mut t = inner.conns.lock();
        if let Some(e) = t.open.get_mut(&inner.id) {
            e.busy = e.busy.saturating_sub(1);
            if e.busy == 0 {
                e.idle_since = Instant::now();
            }
        }
        drop(t);
        inner.conns.changed.notify_waiters();
    }
}

/// A response body that keeps its request marked in flight until hyper has
/// sent all of it (or dropped it): a long answer is not idle.
pub struct TrackedBody<B> {
    inner: B,
    _busy: Busy,
}

impl<B> TrackedBody<B> {
    pub fn new(inner: B, busy: Busy) -> TrackedBody<B> {
        TrackedBody { inner, _busy: busy }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn the_per_address_cap_refuses_and_a_close_frees_a_place() {
        let conns = Conns::new(10, 2);
        let a = conns.admit(ip("127.0.0.1")).unwrap();
        let _b = conns.admit(ip("127.0.0.1")).unwrap();
        assert_eq!(
            conns.admit(ip("127.0.0.1")).err(),
            Some(Refused::TooManyFromAddress)
        );
        let _c = conns.admit(ip("127.0.0.2")).unwrap();
        drop(a);
        assert!(conns.admit(ip("127.0.0.1")).is_ok());
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_connection_is_evicted_never_a_busy_one() {
        let conns = Conns::new(2, 10);
        let busy = conns.admit(ip("127.0.0.1")).unwrap();
        let mark = busy.busy();
        let idle = conns.admit(ip("127.0.0.1")).unwrap();
        let room = tokio::spawn({
            let conns = Arc::clone(&conns);
            async move { conns.room().await }
        });
        tokio::time::timeout(Duration::from_secs(5), idle.evicted().cancelled())
            .await
            .expect("the idle connection is evicted");
        assert!(!busy.evicted().is_cancelled());
        drop(idle);
        tokio::time::timeout(Duration::from_secs(5), room)
            .await
            .expect("room once the evicted connection closed")
            .unwrap();
        // Both busy now: no room until one ends its request.
        let other = conns.admit(ip("127.0.0.2")).unwrap();
        let _other_mark = other.busy();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), conns.room())
                .await
                .is_err(),
            "every connection is busy: wait"
        );
        drop(mark);
        let _room = tokio::spawn({
            let conns = Arc::clone(&conns);
            async move { conns.room().await }
        });
        tokio::time::timeout(Duration::from_secs(5), busy.evicted().cancelled())
            .await
            .expect("once idle, it can be evicted");
    }
}
