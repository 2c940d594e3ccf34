//! `hyperfuncd serve`: first start (data dir, TLS material, admin user and
//! profile), then the HTTPS server and the scheduler until SIGTERM/SIGINT.
//! This is the daemon's edge, so like `main.rs` it reports with `anyhow`.

use crate::api;
use crate::cli::Profile;
use crate::config::Config;
use crate::model::Name;
use crate::runtime::Runtime;
use crate::scheduler::Scheduler;
use crate::service::Service;
use anyhow::{anyhow, Context};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod conns;

const ADMIN: &str = "admin";
/// The longest pause between two accepts that keep failing (out of file
/// descriptors, say): long enough not to spin, short enough to recover fast.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// A failing accept is logged at most this often; the rest are counted.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Exit status when the store fails for good (EX_IOERR); systemd restarts the daemon.
pub const EXIT_STORE_FAILED: i32 = 74;
/// How long a daemon whose store failed keeps answering before it exits
/// (at least): enough for the answers of the writes in flight to go out.
const STORE_FAILED_GRACE: Duration = Duration::from_millis(500);
/// How long a daemon stopping on a store failure waits for the Engine to
/// kill its containers.
const KILL_ON_FAILURE: Duration = Duration::from_secs(10);

/// Says which stored functions name an OCI runtime the Engine no longer
/// has: their calls will fail until it is registered again or the function
/// is updated. Not fatal: the daemon is how the function gets fixed.
async fn check_function_runtimes(
    store: &dyn crate::store::Store,
    runtime: &Runtime,
) -> anyhow::Result<()> {
    let Ok(known) = runtime.runtimes().await else {
        return Ok(());
    };
    for f in store.list_functions(None).await? {
        if let Some(r) = f
            .spec
            .runtime
            .as_deref()
            .filter(|r| !known.iter().any(|k| k == r))
        {
            tracing::warn!(
                function = %f.name,
                owner = %f.owner,
                runtime = r,
                registered = %known.join(", "),
                "the function's OCI runtime is not registered with the Docker Engine; its calls will fail"
            );
        }
    }
    Ok(())
}

/// Runs the daemon until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    // Before anything is created or asked of the Engine.
    if let (false, Some(key)) = (config.tls.disable, &config.tls.key) {
        refuse_readable_key(key)?;
    }
    if let Some(file) = &config.images.credentials_file {
        crate::registry::check_file(file)
            .map_err(|e| anyhow::anyhow!("[images] credentials_file: {e}"))?;
    }
    // Everything the daemon creates from here on (sled's files, blobs, TLS
    // material) is its own: 0600 files, 0700 directories.
    // SAFETY: umask(2) cannot fail; it only sets this process's mask.
    unsafe { libc::umask(0o077) };
    let data_dir = config.data_dir();
    create_private_dir(&data_dir)?;
    restrict_tree(&data_dir)?;
    let store = match config.store.backend {
        crate::config::StoreBackend::Sled => crate::store::open(
            &data_dir.join("db"),
            crate::store::StoreConfig::from_config(&config),
        )
        .with_context(|| format!("cannot open the database in {}", data_dir.display()))?,
        crate::config::StoreBackend::Nats => crate::store::open_nats(
            &data_dir,
            crate::store::StoreConfig::from_config(&config),
            crate::store::NatsConfig::from_config(&config),
        )
        .await
        .context("cannot open the shared store ([store] backend = \"nats\")")?,
    };
    crate::activity::install(&data_dir.join("activity.json"));
    let instance = store.instance_id().await?;
    let mut runtime = Runtime::new(config.docker_socket(), instance, config.container.clone());
    // Not fatal (a full disk on the first start of a new version): only
    // warm containers with a read-only root need it, and they say so.
    match crate::runtime::write_init(&data_dir) {
        Ok(init) => runtime = runtime.with_init_file(init),
        Err(e) => tracing::error!(
            data_dir = %data_dir.display(),
            error = %e,
            "cannot write the warm pool's init; warm containers with a read-only root cannot be made"
        ),
    }
    let runtime = Arc::new(runtime);
    match runtime.check_oci_runtime().await {
        Err(
            e @ (crate::runtime::RuntimeError::Engine(_)
            | crate::runtime::RuntimeError::UnknownRuntime { .. }),
        ) => return Err(anyhow::Error::new(e).context("[container] runtime")),
        Err(e) => tracing::warn!(error = %e, "Docker Engine not reachable yet; calls will queue"),
        Ok(()) => check_function_runtimes(store.as_ref(), &runtime).await?,
    }
    match runtime.ensure_network().await {
        Err(
            e @ (crate::runtime::RuntimeError::Engine(_)
            | crate::runtime::RuntimeError::Firewall(_)),
        ) => return Err(anyhow::Error::new(e).context("[container] network_mode")),
        // Made at the first call's create instead.
        Err(e) => tracing::warn!(error = %e, "cannot make the call network yet"),
        Ok(()) => {}
    }

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local = listener.local_addr()?;
    let scheme = if config.tls.disable { "http" } else { "https" };
    let public_host = config.public_host();
    let base_url = format!("{scheme}://{public_host}:{}", local.port());
    let tls = if config.tls.disable {
        None
    } else {
        Some(tls_acceptor(&config, &data_dir, &public_host, local)?)
    };

    let firewall = Arc::clone(&runtime);
    let scheduler = Scheduler::new(
        Arc::clone(&store),
        Arc::clone(&runtime),
        Arc::clone(&config),
    );
    let killer = Arc::clone(&runtime);
    let svc = Arc::new(Service::new(
        Arc::clone(&store),
        Arc::clone(&scheduler),
        runtime,
        Arc::clone(&config),
        base_url,
    ));
    let local_ip = if local.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if local.ip().is_ipv6() {
        format!("[{}]", local.ip())
    } else {
        local.ip().to_string()
    };
    let profile = Profile {
        endpoint: Some(format!("{scheme}://{local_ip}:{}", local.port())),
        key: None,
        ca: tls.as_ref().map(|t| t.ca.clone()),
    };
    // An address clients can use: 0.0.0.0 is not one.
    let callable = profile.endpoint.clone().unwrap_or_default();
    let profile_path = ensure_admin(&svc, store.as_ref(), &data_dir, profile).await?;
    println!(
        "hyperfuncd listening on {callable}{}; admin profile written to {}",
        if local.ip().is_unspecified() {
            format!(" (all addresses; call URLs use {})", svc.base_url())
        } else {
            String::new()
        },
        profile_path.display()
    );

    let dispatcher = tokio::spawn(Arc::clone(&scheduler).run(shutdown.clone()));
    // sled refuses every write after a failed one: stop at once, as a
    // kill -9 would, and let the restart's recovery settle every call. No
    // outcome can be stored any more, so the containers are killed first
    // (not removed: recovery reads them), or they would run on without a
    // daemon for as long as it stays down.
    let watched = Arc::clone(&store);
    tokio::spawn(async move {
        let reason = watched.failed().await;
        tracing::error!(
            reason = %reason,
            "the store cannot write; stopping so that a restart recovers every accepted call"
        );
        // The writes of the failed round are being answered (503, outcome
        // unknown): let those answers out before exiting. Later writes are
        // refused.
        let answered = tokio::time::sleep(STORE_FAILED_GRACE);
        match tokio::time::timeout(KILL_ON_FAILURE, killer.kill_all()).await {
            Ok(n) => tracing::info!(killed = n, "killed this daemon's containers"),
            Err(_) => {
                tracing::warn!("the Docker Engine did not kill this daemon's containers in time")
            }
        }
        answered.await;
        std::process::exit(EXIT_STORE_FAILED);
    });
    serve_http(
        listener,
        tls.map(|t| t.acceptor),
        api::routes(svc),
        &config.http,
        shutdown,
    )
    .await;
    let _ = dispatcher.await;
    crate::activity::save().await;
    // No call runs any more: the rules that kept them from the host go.
    firewall.close_firewall().await;
    tracing::info!("stopped");
    Ok(())
}

struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// The PEM a client should trust: the self-signed certificate, or the configured chain.
    ca: PathBuf,
}

fn tls_acceptor(
    config: &Config,
    data_dir: &Path,
    public_host: &str,
    local: SocketAddr,
) -> anyhow::Result<Tls> {
    let (cert_path, key_path) = match (&config.tls.cert, &config.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = data_dir.join("tls");
            create_private_dir(&dir)?;
            let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
            let mut sans = vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
            ];
            sans.push(gethostname::gethostname().to_string_lossy().into_owned());
            sans.push(public_host.trim_matches(['[', ']']).to_string());
            if !local.ip().is_unspecified() {
                sans.push(local.ip().to_string());
            }
            sans.sort();
            sans.dedup();
            if !c.exists() || !k.exists() {
                self_signed(&c, &k, sans)?;
            } else {
                let left = not_after(&c)
                    .map(|t| Duration::from_secs(t).saturating_sub(unix_now()))
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "unreadable self-signed certificate; making a new one");
                        Duration::ZERO
                    });
                // Also longer than a fresh one: made by a version that
                // signed them until the year 4096.
                if left < RENEW_BEFORE || left > SELF_SIGNED_VALIDITY + Duration::from_secs(86_400)
                {
                    self_signed(&c, &k, sans)?;
                    tracing::info!(
                        cert = %c.display(),
                        days_left = left.as_secs() / 86_400,
                        valid_days = SELF_SIGNED_VALIDITY.as_secs() / 86_400,
                        "renewed the self-signed TLS certificate (same key)"
                    );
                }
            }
            (c, k)
        }
    };
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&cert_path)
            .with_context(|| format!("cannot read {}", cert_path.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("invalid certificate PEM {}", cert_path.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?,
    ))
    .with_context(|| format!("invalid key PEM {}", key_path.display()))?
    .ok_or_else(|| anyhow!("no private key in {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    // HTTP/1.1 only: over h2, answering 413 before an oversized body has been
    // read resets the stream and curl reports a framing error instead of the 413.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        ca: cert_path,
    })
}

/// Makes sure the `admin` user exists and `DATA_DIR/admin-profile.toml` holds
/// a working key for it. Keys are stored hashed, so a lost profile means a new key.
async fn ensure_admin(
    svc: &Service,
    store: &dyn crate::store::Store,
    data_dir: &Path,
    mut profile: Profile,
) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("admin-profile.toml");
    let admin = Name::parse(ADMIN)?;
    let old_key = Profile::load(&path).ok().and_then(|p| p.key);
    let old_ok = match &old_key {
        Some(k) => svc.authenticate(k).await.is_ok_and(|u| u.admin),
        None => false,
    };
    let key = match (store.get_user(&admin).await?, old_key) {
        (None, _) => svc
            .create_user(admin, None, true)
            .await?
            .1
            .as_str()
            .to_string(),
        (Some(_), Some(k)) if old_ok => k,
        // Another node made the admin: rotating its key here would lock
        // out the others. The operator copies that node's profile instead.
        (Some(_), _) if store.shared() => {
            tracing::warn!(
                profile = %path.display(),
                "the shared store already has an admin: copy admin-profile.toml from the node that made it to use this node's CLI as admin"
            );
            return Ok(path);
        }
        (Some(mut user), _) => {
            let key = crate::model::ApiKey::generate();
            user.key_hash = key.hash();
            user.admin = true;
            store.update_user(&user).await?;
            key.as_str().to_string()
        }
    };
    profile.key = Some(key);
    let text = toml::to_string(&profile)?;
    // Written only when it changes: a start on a full disk must not fail
    // for a file that already says the same.
    if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(path);
    }
    write_private(&path, text.as_bytes())?;
    Ok(path)
}

/// Serves HTTP(S) on `listener` until `shutdown`. Every connection is bounded
/// in time (TLS handshake; a first request head within `header_timeout` of
/// the handshake; later heads, which also bounds keep-alive idleness; bodies
/// are timed by the API as they are read) and in number (`conns.rs`: a cap
/// in all, at which the longest-idle connection gives way, and a cap per
/// client address).
async fn serve_http<F>(
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

type ConnResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Serves `served` (one connection), but closes it if no request head has
/// been read within `header_timeout`: hyper times a head only once its first
/// byte has arrived, so a client that sends nothing after the handshake
/// would otherwise hold its connection forever. After the first request,
/// hyper's own head timeout covers the wait for the next.
async fn first_head_within(
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
struct Tracked<S> {
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
struct AcceptBackoff {
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

/// How long the self-signed certificate made at first start is valid.
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A self-signed certificate with less left than this is renewed at start.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Makes (or renews) the self-signed certificate `cert` for `sans`, signed
/// with the key in `key` if there is one (so clients pinning the key, or
/// trusting the old certificate as their CA, keep working), else a new key.
fn self_signed(cert: &Path, key: &Path, sans: Vec<String>) -> anyhow::Result<()> {
    let key_pair = if key.exists() {
        let pem = std::fs::read_to_string(key)
            .with_context(|| format!("cannot read {}", key.display()))?;
        rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| anyhow!("invalid key PEM {}: {e}", key.display()))?
    } else {
        let made = rcgen::KeyPair::generate().map_err(|e| anyhow!("cannot make a TLS key: {e}"))?;
        write_private(key, made.serialize_pem().as_bytes())?;
        made
    };
    let mut params = rcgen::CertificateParams::new(sans)
        .map_err(|e| anyhow!("cannot make a TLS certificate: {e}"))?;
    let now = unix_now();
    // A day back, for clients whose clock is a little behind.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(24 * 3600));
    params.not_after = epoch + now + SELF_SIGNED_VALIDITY;
    // A fresh serial each time: browsers refuse two certificates with one
    // issuer and serial.
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let made = params
        .self_signed(&key_pair)
        .map_err(|e| anyhow!("cannot make a TLS certificate: {e}"))?;
    write_private(cert, made.pem().as_bytes())
}

fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// When the first certificate of the PEM file `path` expires (Unix seconds).
fn not_after(path: &Path) -> anyhow::Result<u64> {
    let pem =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let first = rustls_pemfile::certs(&mut std::io::BufReader::new(pem))
        .next()
        .ok_or_else(|| anyhow!("no certificate in {}", path.display()))?
        .with_context(|| format!("invalid certificate PEM {}", path.display()))?;
    der_not_after(first.as_ref()).ok_or_else(|| {
        anyhow!(
            "cannot read the validity of the certificate in {}",
            path.display()
        )
    })
}

/// One DER element: its tag, its contents and what follows it.
fn der_next(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, &d| (l << 8) | usize::from(d));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The notAfter of an X.509 certificate (RFC 5280 4.1), in Unix seconds.
fn der_not_after(der: &[u8]) -> Option<u64> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, cert, _) = der_next(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der_next(cert)? else {
        return None;
    };
    let (mut tag, _, mut rest) = der_next(tbs)?;
    if tag == 0xa0 {
        // [0] version, then the serial number.
        (tag, _, rest) = der_next(rest)?;
    }
    if tag != 0x02 {
        return None;
    }
    let (_, _, rest) = der_next(rest)?; // signature algorithm
    let (_, _, rest) = der_next(rest)?; // issuer
    let (SEQUENCE, validity, _) = der_next(rest)? else {
        return None;
    };
    let (_, _, validity) = der_next(validity)?; // notBefore
    let (tag, time, _) = der_next(validity)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        // UTCTime: two-digit years, 1950-2049.
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let days = days_from_civil(year, field(0)?, field(2)?);
    let secs = days * 86_400 + field(4)? * 3600 + field(6)? * 60 + field(8)?;
    u64::try_from(secs).ok()
}

/// Days from 1970-01-01 to the given date (proleptic Gregorian; Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Refuses a configured TLS key that its group or others can read: anyone
/// who can read it can impersonate the daemon and read every key sent to it.
fn refuse_readable_key(key: &Path) -> anyhow::Result<()> {
    let mode = std::fs::metadata(key)
        .with_context(|| format!("cannot read {}", key.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(anyhow!(
            "the TLS key {} can be read by its group or by others (mode {:o}); \
             make it private with: chmod 600 {}",
            key.display(),
            mode & 0o777,
            key.display()
        ));
    }
    Ok(())
}

/// Takes group and other permissions off everything under the data dir
/// (left by an older version, a restore or a copy); the umask covers what
/// is created from now on. Symbolic links are not followed.
fn restrict_tree(dir: &Path) -> anyhow::Result<()> {
    let mut fixed = 0u64;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot read {}", d.display()))?
                .path();
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.is_dir() {
                dirs.push(path.clone());
            } else if !meta.is_file() || path == dir.join(crate::runtime::INIT_FILE) {
                // The warm pool's init is public (it is in this binary) and
                // must be runnable by any container user.
                continue;
            }
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                    .with_context(|| format!("cannot restrict {}", path.display()))?;
                fixed += 1;
            }
        }
    }
    if fixed > 0 {
        tracing::info!(
            data_dir = %dir.display(),
            fixed,
            "took group and other permissions off files in the data dir"
        );
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    Ok(())
}

/// Writes a file only its owner can read (keys, profiles).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_from_civil_counts_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(4096, 1, 1), 776_506);
    }

    #[test]
    fn a_self_signed_certificate_is_valid_a_year_and_renewal_keeps_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        self_signed(&cert, &key, vec!["localhost".into()]).unwrap();
        let year = not_after(&cert).unwrap();
        let expected = (unix_now() + SELF_SIGNED_VALIDITY).as_secs();
        assert!(year.abs_diff(expected) < 60, "{year} vs {expected}");
        let first_key = std::fs::read(&key).unwrap();
        let first_cert = std::fs::read(&cert).unwrap();
        self_signed(&cert, &key, vec!["localhost".into()]).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), first_key);
        assert_ne!(std::fs::read(&cert).unwrap(), first_cert);
        // rcgen's own default, GeneralizedTime past 2049.
        let kp = rcgen::KeyPair::generate().unwrap();
        let old = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        assert_eq!(
            der_not_after(old.der()),
            Some(776_506 * 86_400),
            "rcgen's default ends 4096-01-01"
        );
        assert_eq!(der_not_after(b"\x30\x03\x02\x01\x00"), None);
    }
}
