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

const ADMIN: &str = "admin";
/// The longest pause between two accepts that keep failing (out of file
/// descriptors, say): long enough not to spin, short enough to recover fast.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// A failing accept is logged at most this often; the rest are counted.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Exit status when the store fails for good (EX_IOERR); systemd restarts the daemon.
pub const EXIT_STORE_FAILED: i32 = 74;

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
    let data_dir = config.data_dir();
    create_private_dir(&data_dir)?;
    let store = crate::store::open(&data_dir.join("db"), config.store())
        .with_context(|| format!("cannot open the database in {}", data_dir.display()))?;
    let instance = store.instance_id().await?;
    let runtime = Arc::new(Runtime::new(
        config.docker_socket(),
        instance,
        config.container.clone(),
    ));
    match runtime.check_oci_runtime().await {
        Err(
            e @ (crate::runtime::RuntimeError::Engine(_)
            | crate::runtime::RuntimeError::UnknownRuntime { .. }),
        ) => return Err(anyhow::Error::new(e).context("[container] runtime")),
        Err(e) => tracing::warn!(error = %e, "Docker Engine not reachable yet; calls will queue"),
        Ok(()) => check_function_runtimes(store.as_ref(), &runtime).await?,
    }
    match runtime.ensure_network().await {
        Err(e @ crate::runtime::RuntimeError::Engine(_)) => {
            return Err(anyhow::Error::new(e).context("[container] network_mode"))
        }
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

    let scheduler = Scheduler::new(
        Arc::clone(&store),
        Arc::clone(&runtime),
        Arc::clone(&config),
    );
    let svc = Arc::new(Service {
        store: Arc::clone(&store),
        scheduler: Arc::clone(&scheduler),
        runtime,
        config: Arc::clone(&config),
        base_url,
    });
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
    let profile_path = ensure_admin(&svc, &data_dir, profile).await?;
    println!(
        "hyperfuncd listening on {callable}{}; admin profile written to {}",
        if local.ip().is_unspecified() {
            format!(" (all addresses; call URLs use {})", svc.base_url)
        } else {
            String::new()
        },
        profile_path.display()
    );

    let dispatcher = tokio::spawn(Arc::clone(&scheduler).run(shutdown.clone()));
    // sled refuses every write after a failed one: stop at once, as a
    // kill -9 would, and let the restart's recovery settle every call.
    let watched = Arc::clone(&store);
    tokio::spawn(async move {
        let reason = watched.failed().await;
        tracing::error!(
            reason = %reason,
            "the store cannot write; stopping so that a restart recovers every accepted call"
        );
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
            if !c.exists() || !k.exists() {
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
                let made = rcgen::generate_simple_self_signed(sans)
                    .map_err(|e| anyhow!("cannot make a TLS certificate: {e}"))?;
                write_private(&k, made.signing_key.serialize_pem().as_bytes())?;
                write_private(&c, made.cert.pem().as_bytes())?;
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
    let key = match (svc.store.get_user(&admin).await?, old_key) {
        (None, _) => svc
            .create_user(admin, None, true)
            .await?
            .1
            .as_str()
            .to_string(),
        (Some(_), Some(k)) if old_ok => k,
        (Some(mut user), _) => {
            let key = crate::model::ApiKey::generate();
            user.key_hash = key.hash();
            user.admin = true;
            svc.store.update_user(&user).await?;
            key.as_str().to_string()
        }
    };
    profile.key = Some(key);
    let text = toml::to_string(&profile)?;
    write_private(&path, text.as_bytes())?;
    Ok(path)
}

/// Serves HTTP(S) on `listener` until `shutdown`. Every connection is bounded
/// in time (TLS handshake, request head, which also bounds keep-alive idleness;
/// bodies are timed by the API as they are read) and in number: at the cap
/// the server stops accepting, so new clients wait in the listen backlog for
/// at most about the timeouts instead of being refused or starving the
/// daemon of file descriptors.
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
    tracing::info!(max_connections = cap, "accepting connections");
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let (handshake_timeout, header_timeout) = (http.handshake_timeout, http.header_timeout);
    let mut backoff = AcceptBackoff::default();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
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
        let _ = tcp.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // Held for the connection's lifetime: its file descriptor.
            let _slot = slot;
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
            let result = match tls {
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                    watcher.watch(conn.into_owned()).await
                }
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
