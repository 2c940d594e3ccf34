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
mod datadir;
mod http;
mod tls;

use datadir::*;
use http::*;
use tls::*;

const ADMIN: &str = "admin";
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
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let killer = Arc::clone(&runtime);
    let svc = Arc::new(Service::new(
        Arc::clone(&store),
        Arc::clone(&scheduler),
        runtime,
        Arc::clone(&config),
        base_url,
    ));
    // The schedules' ticks are accepted as calls, by the service.
    let sink: Arc<dyn crate::scheduler::TickSink> = Arc::clone(&svc) as _;
    scheduler.set_tick_sink(Arc::downgrade(&sink));
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
