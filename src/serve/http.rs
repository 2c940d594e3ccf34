//! The accept loop: TLS handshakes, the first request head within
//! `header_timeout`, the open connections' bounds (`conns.rs`), and
//! `warp::service` served over hyper-util.

use super::*;

/// The longest pause between two accepts that keep failing (out of file
/// descriptors, say): long enough not to spin, short enough to recover fast.
pub(super) const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A failing accept is logged at most this often; the rest are counted.
pub(super) const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves HTTP(S) on `listener` until `shutdown`. Every connection is bounded
/// in time (TLS handshake; a first request head within `header_timeout` of
/// the handshake; later heads, which also bounds keep-alive idleness; bodies
/// are timed by the API as they are read) and in number (`conns.rs`: a cap
/// in all, at which the longest-idle connection gives way, and a cap per
/// client address).
pub(super) async fn serve_http<F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    routes: F,
    http: &crate::config::HttpConfig,
    shutdown: CancellationToken,
) where
    F: warp::Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let cap = http.connection_cap();
    let per_address = usize::try_from(http.max_connections_per_address).unwrap_or(usize::MAX);
    tracing::info!(
        max_connections = cap,
        max_connections_per_address = per_address,
        "accepting connections"
    );
    let conns = conns::Conns::new(cap, per_address);
    let (handshake_timeout, header_timeout) = (http.handshake_timeout, http.header_timeout);
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = conns.room() => {}
        }
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.succeeded();
                    a
                }
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        // Dropping the socket closes it at once.
        let Ok(conn) = conns.admit(peer.ip()) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let svc = Tracked {
            inner: hyper_util::service::TowerToHyperService::new(warp::service(routes.clone())),
            conn: conn.clone(),
            client: api::ClientAddr(peer.ip()),
        };
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // HTTP/1.1 only (the TLS config offers no h2 either), so the
            // head timeout below covers every request.
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                // Above the API's own limit, so that a head between the two
                // is refused by the API, with a JSON body (hyper's own 431
                // has none).
                .max_headers(2 * api::MAX_HEADERS);
            let evicted = conn.evicted().clone();
            let served = async {
                match tls {
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))
                                .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return Ok(());
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return Ok(());
                                }
                            };
                        let conn_fut =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                        first_head_within(
                            header_timeout,
                            &conn,
                            watcher.watch(conn_fut.into_owned()),
                        )
                        .await
                    }
                    None => {
                        let conn_fut =
                            builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                        first_head_within(
                            header_timeout,
                            &conn,
                            watcher.watch(conn_fut.into_owned()),
                        )
                        .await
                    }
                }
            };
            let result = tokio::select! {
                r = served => r,
                () = evicted.cancelled() => Ok(()),
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // Give open requests a moment; long-polls and log follows are cut after it.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

pub(super) type ConnResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Serves `served` (one connection), but closes it if no request head has
/// been read within `header_timeout`: hyper times a head only once its first
/// byte has arrived, so a client that sends nothing after the handshake
/// would otherwise hold its connection forever. After the first request,
/// hyper's own head timeout covers the wait for the next.
pub(super) async fn first_head_within(
    header_timeout: Duration,
    conn: &conns::Conn,
    served: impl std::future::Future<Output = ConnResult>,
) -> ConnResult {
    tokio::pin!(served);
    tokio::select! {
        r = &mut served => return r,
        () = tokio::time::sleep(header_timeout) => {}
    }
    if conn.requests() == 0 {
        return Ok(());
    }
    served.await
}

/// The API's service for one connection: tells the API the client's
/// address, and marks the connection busy from a request's head to the end
/// of its answer's body, so only connections without a request in flight
/// are ever closed to make room.
#[derive(Clone)]
pub(super) struct Tracked<S> {
    inner: S,
    conn: conns::Conn,
    client: api::ClientAddr,
}

impl<S, B> hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Tracked<S>
where
    S: hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<B>,
    >,
    S::Future: Send + 'static,
{
    type Response = hyper::Response<conns::TrackedBody<B>>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn call(&self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let busy = self.conn.busy();
        req.extensions_mut().insert(self.client);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await?;
            Ok(r.map(|body| conns::TrackedBody::new(body, busy)))
        })
    }
}

/// Pauses after a failed accept (EMFILE, ENFILE, ENOBUFS...), doubling up to
/// `MAX_ACCEPT_BACKOFF`, and logs a run of failures once per
/// `ACCEPT_LOG_EVERY` instead of once per attempt.
#[derive(Default)]
pub(super) struct AcceptBackoff {
    delay: Duration,
    failures: u64,
    last_log: Option<tokio::time::Instant>,
}

impl AcceptBackoff {
    async fn failed(&mut self, e: &std::io::Error) {
        self.failures += 1;
        let now = tokio::time::Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(error = %e, failures = self.failures, "accept failed; backing off");
            self.last_log = Some(now);
        }
        self.delay = (self.delay * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
        tokio::time::sleep(self.delay).await;
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting again");
        }
        *self = AcceptBackoff::default();
    }
}
