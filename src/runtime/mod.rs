//! Runs one call in one fresh container on the local Docker Engine, and the
//! few other Engine operations the platform needs (images, recovery, health).
//!
//! This is the only module that names bollard. It never keeps a container
//! after its call, never stops reading a held attach (the Engine hangs if we
//! do), and never lets a container write to the Engine's disk (log driver `none`).

mod firewall;

use crate::config::{ContainerConfig, DiskCap};
use crate::model::{human_bytes, CallId, CallState, Outcome, RegistryLogin};
use bollard::container::{AttachContainerResults, LogOutput};
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerCreateResponse, HostConfig, HostConfigLogConfig, Mount,
    MountType, NetworkCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, KillContainerOptions,
    ListContainersOptions, ListNetworksOptions, RemoveContainerOptions, RemoveImageOptions,
    RenameContainerOptions, UploadToContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

pub const LABEL_CALL: &str = "io.hyperfuncd.call";
pub const LABEL_FUNCTION: &str = "io.hyperfuncd.function";
/// The owner of the function: two users' functions of one name are told
/// apart by it.
pub const LABEL_OWNER: &str = "io.hyperfuncd.owner";
/// Which daemon (data directory) a container belongs to.
pub const LABEL_INSTANCE: &str = "io.hyperfuncd.instance";
/// A warm container, not yet given a call: the function it is for.
pub const LABEL_POOL: &str = "io.hyperfuncd.pool";
/// On a network hyperfuncd created (any daemon on the Engine may have).
pub const LABEL_NETWORK: &str = "io.hyperfuncd.network";
/// The bridge option that stops containers on one network from reaching
/// each other: a call must not reach another tenant's call.
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";
/// Where the init program lives inside a warm container.
const INIT_PATH: &str = "/.hyperfuncd-init";
/// The init's file in the data dir, bind-mounted read-only at `INIT_PATH`
/// into warm containers whose root is read-only (`write_init`).
pub const INIT_FILE: &str = "hyperfuncd-init";
/// How `init.c` begins the one line it prints when it cannot run the command.
const INIT_FAILURE: &str = "hyperfuncd-init: ";
/// The init program of warm containers, `init.c` built static by `build.rs`.
static INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hyperfuncd-init"));

/// How long the output stream may stay open after the process has exited.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);
/// Seconds a single Engine request may take to answer (a wait answers at once
/// and then streams, so this does not bound a call's run time).
const REQUEST_TIMEOUT_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The Engine did not answer; nothing was created.
    #[error("Docker Engine unreachable at {socket}: {message}")]
    Unavailable { socket: String, message: String },
    /// `message` is a few words of ours (`pull_summary`), never the
    /// Engine's text: that can carry what a registry host answered.
    #[error("image {image} is not present and could not be pulled: {message}")]
    Pull { image: String, message: String },
    /// The Engine refused the reference itself.
    #[error("{0}")]
    BadImage(String),
    #[error("Docker Engine error: {0}")]
    Engine(String),
    /// An OCI runtime the Engine has not registered; `known` are the ones
    /// it has, so the message says what would work.
    #[error("OCI runtime {wanted:?} is not registered with the Docker Engine (it has: {})", known.join(", "))]
    UnknownRuntime { wanted: String, known: Vec<String> },
    /// The rules that keep calls from the host (`[container] firewall`)
    /// cannot be installed; no call container is made without them.
    #[error("call firewall ([container] firewall): {0}")]
    Firewall(String),
}

impl RuntimeError {
    /// Whose fault, for `hyperfuncd_engine_errors_total`: the Engine's
    /// (unreachable, an error, a failed pull), or `None` for a refused
    /// image or runtime, which is the user's.
    pub fn engine_fault(&self) -> Option<crate::metrics::EngineFault> {
        use crate::metrics::EngineFault;
        match self {
            RuntimeError::Unavailable { .. } => Some(EngineFault::Unreachable),
            RuntimeError::Engine(_) => Some(EngineFault::Error),
            RuntimeError::Pull { .. } => Some(EngineFault::Pull),
            RuntimeError::BadImage(_)
            | RuntimeError::UnknownRuntime { .. }
            | RuntimeError::Firewall(_) => None,
        }
    }
}

/// Everything needed to run one call.
pub struct RunSpec {
    pub call_id: CallId,
    pub function: String,
    pub owner: String,
    pub image: String,
    /// Empty keeps the image's CMD.
    pub command: Vec<String>,
    /// `K=V` pairs, final (request variables already merged under the function's).
    pub env: Vec<String>,
    pub memory_bytes: u64,
    pub cpus: Option<f64>,
    /// The OCI runtime (the function's, else the daemon's default); `None`:
    /// the Engine's default.
    pub runtime: Option<String>,
    pub timeout: Option<Duration>,
    pub stdin: Bytes,
    pub max_stdout: u64,
    pub max_stderr: u64,
    /// Fired (or dropped) once the call has its container: created (cold)
    /// or framed (warm). The scheduler lets the owner's next call take its
    /// container only then, so containers are created in submission order
    /// while the Engine's starts overlap.
    pub started: Option<tokio::sync::oneshot::Sender<()>>,
}

pub struct Runtime {
    socket: String,
    instance: String,
    container: ContainerConfig,
    /// A negotiated client, made on first use and dropped when the Engine stops
    /// answering so the next use renegotiates.
    client: tokio::sync::Mutex<Option<Docker>>,
    /// The Engine host's CPUs and memory, asked once: function limits above
    /// them could never run.
    host: std::sync::OnceLock<HostResources>,
    /// The Engine's default OCI runtime as last seen, to say which runtime
    /// a function without one runs under.
    default_runtime: std::sync::Mutex<Option<String>>,
    /// Held while the call network is checked or made, so one daemon never
    /// races itself into two networks of one name.
    network: tokio::sync::Mutex<()>,
    /// With `[container] firewall` on a named network: the rules that keep
    /// calls from the host, installed by `ensure_network` for the bridge it
    /// finds, before any call container is made.
    firewall: Option<firewall::Firewall>,
    /// The init program's file on the Engine's host (`write_init`), which a
    /// warm container with a read-only root gets bind-mounted: the archive
    /// upload that puts it into a writable root is refused there.
    init_file: Option<std::path::PathBuf>,
    /// With `[container] disk = "auto"`: whether the Engine takes
    /// `--storage-opt size` (its storage driver has per-container quotas),
    /// learnt from the first create that asks for it; `None` until then.
    storage_opt: std::sync::Mutex<Option<bool>>,
}

/// How one container's disk is capped: `[container] disk` as it applies
/// to this Engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disk {
    /// A writable layer of this many bytes (`--storage-opt size`).
    StorageOpt(u64),
    /// A read-only root; `/tmp` a tmpfs of at most this many bytes.
    Tmpfs(u64),
    /// A writable root without a cap.
    Off,
}

impl Disk {
    fn read_only(self) -> bool {
        matches!(self, Disk::Tmpfs(_))
    }
}

/// What the Engine's host has to give a container.
#[derive(Debug, Clone, Copy)]
pub struct HostResources {
    pub cpus: f64,
    pub memory_bytes: u64,
}

impl Runtime {
    pub fn new(socket: String, instance: String, container: ContainerConfig) -> Runtime {
        let named = named_network(&container.network_mode).is_some();
        if container.firewall && !named && container.network_mode != "none" {
            tracing::warn!(
                network_mode = container.network_mode,
                "calls can reach the host: [container] firewall applies to a named network only (README \"Network\")"
            );
        }
        let firewall = (container.firewall && named)
            .then(|| firewall::Firewall::new(&instance, container.allow_host.clone()));
        Runtime {
            socket,
            instance,
            container,
            client: tokio::sync::Mutex::new(None),
            host: std::sync::OnceLock::new(),
            default_runtime: std::sync::Mutex::new(None),
            network: tokio::sync::Mutex::new(()),
            firewall,
            init_file: None,
            storage_opt: std::sync::Mutex::new(None),
        }
    }

    /// The init's file (`write_init`) for warm containers with a read-only
    /// root; without one, such a container cannot be made.
    pub fn with_init_file(mut self, path: std::path::PathBuf) -> Runtime {
        self.init_file = Some(path);
        self
    }

    /// How the next container's disk is capped.
    fn disk(&self) -> Disk {
        let c = &self.container;
        let bytes = c.disk_cap_bytes();
        match c.disk_cap() {
            DiskCap::Off => Disk::Off,
            DiskCap::Tmpfs => Disk::Tmpfs(bytes),
            DiskCap::StorageOpt => Disk::StorageOpt(bytes),
            DiskCap::Auto => match *lock(&self.storage_opt) {
                Some(false) => Disk::Tmpfs(bytes),
                _ => Disk::StorageOpt(bytes),
            },
        }
    }

    /// Creates a container whose body `make` builds for a disk plan. With
    /// `disk = "auto"`, the first create asks for `--storage-opt size`; an
    /// Engine whose storage driver refuses it (`fuse-overlayfs`, overlay2
    /// without xfs project quotas, vfs) is remembered as such, and this and
    /// every later container gets the read-only root instead. Returns the
    /// plan the container was made with.
    async fn create(
        &self,
        docker: &Docker,
        options: CreateContainerOptions,
        make: &(dyn Fn(Disk) -> ContainerCreateBody + Sync),
    ) -> (Result<ContainerCreateResponse, DockerError>, Disk) {
        let disk = self.disk();
        let created = docker
            .create_container(Some(options.clone()), make(disk))
            .await;
        let auto = self.container.disk_cap() == DiskCap::Auto;
        match &created {
            Err(e) if auto && matches!(disk, Disk::StorageOpt(_)) && storage_opt_refused(e) => {
                // Creates racing on a new Engine all learn it; one says so.
                if lock(&self.storage_opt).replace(false) != Some(false) {
                    tracing::info!(
                        engine = %engine_message(e),
                        "the Docker Engine's storage driver has no per-container size: call containers get a read-only root and a tmpfs /tmp ([container] disk = \"auto\")"
                    );
                }
                let disk = self.disk();
                (
                    docker.create_container(Some(options), make(disk)).await,
                    disk,
                )
            }
            Ok(_) if auto && matches!(disk, Disk::StorageOpt(_)) => {
                let mut known = lock(&self.storage_opt);
                if known.is_none() {
                    tracing::info!("call containers get a writable layer of [container] disk_bytes (--storage-opt size)");
                    *known = Some(true);
                }
                (created, disk)
            }
            _ => (created, disk),
        }
    }

    /// Kills (SIGKILL) every running container of this instance, without
    /// removing any: for a daemon that stops because its store cannot
    /// write, so that no call or warm container runs on without it. The
    /// containers stay as evidence that their calls ran: the next start's
    /// recovery ends those FAILED and removes them.
    pub async fn kill_all(&self) -> usize {
        let Ok(containers) = self.containers().await else {
            return 0;
        };
        let Ok(docker) = self.docker().await else {
            return 0;
        };
        let mut killed = 0;
        for c in containers {
            let signal = KillContainerOptions {
                signal: "KILL".into(),
            };
            if docker.kill_container(&c.id, Some(signal)).await.is_ok() {
                killed += 1;
            }
        }
        killed
    }

    /// Removes the call firewall's rules (at stop, once no call runs).
    pub async fn close_firewall(&self) {
        if let Some(fw) = &self.firewall {
            fw.remove().await;
        }
    }

    /// With the firewall on, a container is made only once its rules are in
    /// place: if the Engine could not be asked at start, the network (and
    /// with it the firewall) is seen to now.
    async fn firewall_ready(&self) -> Result<(), RuntimeError> {
        match &self.firewall {
            Some(fw) if !fw.is_ready() => self.ensure_network().await,
            _ => Ok(()),
        }
    }

    pub fn socket(&self) -> &str {
        &self.socket
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    async fn docker(&self) -> Result<Docker, RuntimeError> {
        let mut guard = self.client.lock().await;
        if let Some(d) = guard.as_ref() {
            return Ok(d.clone());
        }
        let unavailable = |e: DockerError| RuntimeError::Unavailable {
            socket: self.socket.clone(),
            message: e.to_string(),
        };
        let docker = Docker::connect_with_unix(
            &self.socket,
            REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(unavailable)?
        .negotiate_version()
        .await
        .map_err(unavailable)?;
        *guard = Some(docker.clone());
        Ok(docker)
    }

    /// Classifies an Engine error; a transport failure forgets the client.
    async fn classify(&self, e: DockerError) -> RuntimeError {
        if is_transport(&e) {
            *self.client.lock().await = None;
            RuntimeError::Unavailable {
                socket: self.socket.clone(),
                message: e.to_string(),
            }
        } else {
            RuntimeError::Engine(engine_message(&e))
        }
    }

    /// Whether the Engine answers a ping.
    pub async fn ping(&self) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        match docker.ping().await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// The Engine host's CPUs and memory; `None` while the Engine does not answer.
    pub async fn host_resources(&self) -> Option<HostResources> {
        if let Some(h) = self.host.get() {
            return Some(*h);
        }
        let info = self.docker().await.ok()?.info().await.ok()?;
        let h = HostResources {
            cpus: info.ncpu? as f64,
            memory_bytes: u64::try_from(info.mem_total?).ok()?,
        };
        Some(*self.host.get_or_init(|| h))
    }

    /// Checks the configured default OCI runtime (`[container] runtime`)
    /// against the Engine's, at start.
    pub async fn check_oci_runtime(&self) -> Result<(), RuntimeError> {
        match &self.container.runtime {
            Some(wanted) => self.check_runtime(wanted).await,
            None => {
                // Only to learn the Engine's default, for `func inspect`:
                // nothing to refuse, so an Engine that cannot answer yet
                // does not hold up the start.
                let _ = self.runtimes().await;
                Ok(())
            }
        }
    }

    /// Makes sure the network of `[container] network_mode` exists when it
    /// names one (not `bridge`, `host`, `none`, `container:...`): if missing,
    /// it is created as a bridge with inter-container traffic disabled, so a
    /// call reaches neither another call nor any container on it. Called at
    /// start and again when a create or start finds it gone (`docker network prune`
    /// removes it while no container uses it). With `[container] firewall`,
    /// it then installs the rules for the network's bridge (again, if the
    /// network was made anew), and says first what installing would lack.
    pub async fn ensure_network(&self) -> Result<(), RuntimeError> {
        let Some(name) = named_network(&self.container.network_mode) else {
            return Ok(());
        };
        if let Some(fw) = &self.firewall {
            fw.check().map_err(RuntimeError::Firewall)?;
        }
        let _held = self.network.lock().await;
        let docker = self.docker().await?;
        let mut found = self.networks_named(&docker, name).await?;
        if found.is_empty() {
            let request = NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                options: Some(HashMap::from([(
                    ICC_OPTION.to_string(),
                    "false".to_string(),
                )])),
                labels: Some(HashMap::from([(
                    LABEL_NETWORK.to_string(),
                    "1".to_string(),
                )])),
                ..Default::default()
            };
            if let Err(e) = docker.create_network(request).await {
                return Err(self.classify(e).await);
            }
            tracing::info!(
                network = name,
                "created the call network (bridge, inter-container traffic disabled)"
            );
            found = self.networks_named(&docker, name).await?;
        }
        // Engines before API 1.44 do not refuse a second network of the same
        // name, so two daemons starting together may both have made one; a
        // name that means two networks fails every create. Every daemon keeps
        // the same one (the lowest id) and removes the other ones hyperfuncd
        // made; none has a container yet, since no create could name them.
        found.sort_by(|a, b| a.id.cmp(&b.id));
        for extra in found.iter().skip(1) {
            if let (Some(id), true) = (&extra.id, is_ours(extra)) {
                match docker.remove_network(id).await {
                    Ok(())
                    | Err(DockerError::DockerResponseServerError {
                        status_code: 404, ..
                    }) => {}
                    Err(e) => {
                        tracing::warn!(network = name, id, error = %e, "cannot remove a duplicate call network")
                    }
                }
            }
        }
        if let Some(kept) = found.first() {
            let icc = kept
                .options
                .as_ref()
                .and_then(|o| o.get(ICC_OPTION))
                .map(String::as_str);
            if icc != Some("false") {
                tracing::warn!(
                    network = name,
                    "the call network lets containers reach each other (it was not made by hyperfuncd with {ICC_OPTION}=false)"
                );
            }
            if let Some(fw) = &self.firewall {
                let bridge = bridge_of(kept).ok_or_else(|| {
                    RuntimeError::Firewall(format!("the network {name} is not a Linux bridge"))
                })?;
                fw.apply(&bridge, kept.enable_ipv6.unwrap_or(false))
                    .await
                    .map_err(RuntimeError::Firewall)?;
            }
        }
        Ok(())
    }

    /// The networks called exactly `name` (the Engine's filter matches parts of names).
    async fn networks_named(
        &self,
        docker: &Docker,
        name: &str,
    ) -> Result<Vec<bollard::models::Network>, RuntimeError> {
        let filters = HashMap::from([("name".to_string(), vec![name.to_string()])]);
        match docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
        {
            Ok(list) => Ok(list
                .into_iter()
                .filter(|n| n.name.as_deref() == Some(name))
                .collect()),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// Whether the Engine has registered the OCI runtime `wanted` (asked
    /// each time: an operator may register one and reload the Engine).
    pub async fn check_runtime(&self, wanted: &str) -> Result<(), RuntimeError> {
        let known = self.runtimes().await?;
        if known.iter().any(|k| k == wanted) {
            Ok(())
        } else {
            Err(RuntimeError::UnknownRuntime {
                wanted: wanted.to_string(),
                known,
            })
        }
    }

    /// The names of the Engine's OCI runtimes, sorted (GET /info `Runtimes`).
    pub async fn runtimes(&self) -> Result<Vec<String>, RuntimeError> {
        let docker = self.docker().await?;
        let info = match docker.info().await {
            Ok(i) => i,
            Err(e) => return Err(self.classify(e).await),
        };
        if let Some(d) = info.default_runtime {
            *self
                .default_runtime
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(d);
        }
        let mut names: Vec<String> = info.runtimes.unwrap_or_default().into_keys().collect();
        names.sort();
        Ok(names)
    }

    /// The runtime a container made with `runtime` runs under: that one, or
    /// the Engine's default as last seen (`None` before the Engine answered).
    pub fn effective_runtime(&self, runtime: Option<&str>) -> Option<String> {
        runtime.map(str::to_string).or_else(|| {
            self.default_runtime
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// Makes sure `image` is present locally, pulling it if not. With
    /// `progress`, a pull is told there: `PullEvent::Started` once the image
    /// is known to be missing, then each layer's state as the Engine reports
    /// it (in our words; a full channel drops a line rather than slow the pull).
    /// With `pull.always`, the image is pulled even when the Engine has it:
    /// for images of a private registry, so that the Engine asks the
    /// registry whether these credentials may read it (only the manifest is
    /// fetched when the layers are local) instead of handing one user an
    /// image another user's login pulled.
    pub async fn ensure_image(
        &self,
        image: &str,
        pull_timeout: Duration,
        progress: Option<&PullProgress>,
        pull: &PullAuth<'_>,
    ) -> Result<Resolved, RuntimeError> {
        let docker = self.docker().await?;
        let before = match docker.inspect_image(image).await {
            Ok(i) if !pull.always => return resolved(image, i, false),
            Ok(i) => i.id,
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => None,
            Err(DockerError::DockerResponseServerError {
                status_code: 400, ..
            }) => {
                return Err(RuntimeError::BadImage(format!(
                    "invalid image reference {image:?}"
                )))
            }
            Err(e) => return Err(self.classify(e).await),
        };
        let (from_image, tag) = split_reference(image);
        tracing::info!(image, "pulling image");
        let tell = |e: PullEvent| {
            if let Some(tx) = progress {
                let _ = tx.try_send(e);
            }
        };
        tell(PullEvent::Started {
            image: image.to_string(),
        });
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag: Some(tag),
            ..Default::default()
        };
        let credentials = pull.login.map(|l| bollard::auth::DockerCredentials {
            username: Some(l.username.clone()),
            password: Some(l.password.clone()),
            serveraddress: Some(l.host.clone()),
            ..Default::default()
        });
        let pull = async {
            let mut stream = docker.create_image(Some(options), None, credentials);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        if let Some(detail) = info.error_detail {
                            return Err(detail.message.unwrap_or_else(|| "pull failed".into()));
                        }
                        if let Some(status) = &info.status {
                            tracing::debug!(image, status, "pull progress");
                        }
                        if let Some(e) = layer_event(&info) {
                            tell(e);
                        }
                    }
                    Err(e) => return Err(engine_message(&e)),
                }
            }
            Ok(())
        };
        let result = match tokio::time::timeout(pull_timeout, pull).await {
            Ok(r) => r,
            Err(_) => Err(PULL_TIMED_OUT.to_string()),
        };
        let failed = |raw: String| {
            // The operator may need the details; the caller gets a summary.
            tracing::warn!(image, error = %raw, "image pull failed");
            RuntimeError::Pull {
                image: image.to_string(),
                message: pull_summary(&raw).to_string(),
            }
        };
        result.map_err(failed)?;
        // A pull that "succeeds" without the image is still a failure.
        match docker.inspect_image(image).await {
            Ok(i) => {
                // Brought by this pull unless the reference named the same
                // image before it (the tag did not move).
                let fresh = i.id.is_some() && i.id != before;
                resolved(image, i, fresh)
            }
            Err(e) => Err(failed(engine_message(&e))),
        }
    }

    /// What the local image `image` is (`Resolved`), `None` if the Engine
    /// does not have it. No pull.
    pub async fn resolve(&self, image: &str) -> Result<Option<Resolved>, RuntimeError> {
        let docker = self.docker().await?;
        match docker.inspect_image(image).await {
            Ok(i) => resolved(image, i, false).map(Some),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// The local image `id`'s size in bytes and the tags naming it; `None`
    /// if the Engine does not have it.
    pub async fn image_size(&self, id: &str) -> Result<Option<(u64, Vec<String>)>, RuntimeError> {
        let docker = self.docker().await?;
        match docker.inspect_image(id).await {
            Ok(i) => Ok(Some((
                i.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                i.repo_tags.unwrap_or_default(),
            ))),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// Removes the image `id` that hyperfuncd pulled for `repository`: the
    /// references to it of that repository (tags and digests), after which
    /// the Engine deletes the image unless another reference (someone's own
    /// tag) still names it. Never forced: a container made from it, of any
    /// daemon, keeps it (`ImageRemoval::InUse`).
    pub async fn remove_image(
        &self,
        id: &str,
        repository: &str,
    ) -> Result<ImageRemoval, RuntimeError> {
        let docker = self.docker().await?;
        let filters = HashMap::from([("ancestor".to_string(), vec![id.to_string()])]);
        let users = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await;
        match users {
            Ok(u) if !u.is_empty() => return Ok(ImageRemoval::InUse),
            Ok(_) => {}
            Err(e) => return Err(self.classify(e).await),
        }
        let image = match docker.inspect_image(id).await {
            Ok(i) => i,
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(ImageRemoval::Gone),
            Err(e) => return Err(self.classify(e).await),
        };
        let refs: Vec<String> = image
            .repo_tags
            .unwrap_or_default()
            .into_iter()
            .chain(image.repo_digests.unwrap_or_default())
            .filter(|r| repository_of(r).as_deref() == Some(repository))
            .collect();
        let mut kept = false;
        for r in refs.iter().map(String::as_str).chain(
            // An image without references left (or never tagged) goes by id.
            std::iter::once(id),
        ) {
            match docker
                .remove_image(r, None::<RemoveImageOptions>, None)
                .await
            {
                Ok(_) => {}
                Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                // Another reference still names it, or a container was
                // made from it meanwhile: it stays.
                Err(DockerError::DockerResponseServerError {
                    status_code: 409, ..
                }) => kept = true,
                Err(e) => return Err(self.classify(e).await),
            }
        }
        Ok(if kept {
            ImageRemoval::Kept
        } else {
            ImageRemoval::Removed
        })
    }

    /// Asks the Engine to log in to `login.host` (`POST /auth`), as `docker
    /// login` does, so the check trusts what the Engine's pulls trust
    /// (its CAs, its insecure registries). bollard has no call for it, so
    /// this is one HTTP/1.1 request on the Engine's socket. The Engine's
    /// answer is logged for the operator (it holds no password) and
    /// summed up for the caller.
    pub async fn check_login(&self, login: &RegistryLogin) -> Result<(), LoginError> {
        let body = serde_json::json!({
            "username": login.username,
            "password": login.password,
            "serveraddress": login.host,
        })
        .to_string();
        let ask = async {
            use tokio::io::AsyncReadExt;
            let mut conn = tokio::net::UnixStream::connect(&self.socket).await?;
            let head = format!(
                "POST /auth HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).await?;
            conn.write_all(body.as_bytes()).await?;
            let mut answer = Vec::new();
            (&mut conn)
                .take(LOGIN_ANSWER_MAX)
                .read_to_end(&mut answer)
                .await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = match tokio::time::timeout(LOGIN_TIMEOUT, ask).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                return Err(LoginError::Engine(format!(
                    "Docker Engine unreachable at {}: {e}",
                    self.socket
                )))
            }
            Err(_) => return Err(LoginError::Unreachable("the login timed out")),
        };
        let text = String::from_utf8_lossy(&answer);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if status == 200 {
            return Ok(());
        }
        let raw = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        tracing::warn!(host = %login.host, status, error = %raw, "registry login refused");
        Err(login_summary(status, raw))
    }

    /// This instance's containers. Used by recovery (a container is the
    /// evidence that a call ran) and the sweep.
    pub async fn containers(&self) -> Result<Vec<Listed>, RuntimeError> {
        let docker = self.docker().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_INSTANCE}={}", self.instance)],
        )]);
        let list = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await;
        let list = match list {
            Ok(l) => l,
            Err(e) => return Err(self.classify(e).await),
        };
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let name = c
                    .names
                    .unwrap_or_default()
                    .into_iter()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string();
                // A warm container that took a call carries it in its name.
                let call = c
                    .labels
                    .and_then(|mut l| l.remove(LABEL_CALL))
                    .or_else(|| {
                        name.strip_prefix("hyperfuncd-")
                            .filter(|rest| CallId::parse(rest).is_ok())
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                c.id.map(|id| Listed { id, call, name })
            })
            .collect())
    }

    /// Runs one call to its end. `Err(Unavailable)` means the Engine refused
    /// before any container existed, so the call may be retried; every other
    /// ending is an `Outcome`. The container, if one was made, is left for the
    /// caller to `remove` once the outcome is durable: a crash in between then
    /// leaves evidence that the call ran.
    pub async fn run(
        &self,
        mut spec: RunSpec,
        cancel: CancellationToken,
    ) -> Result<Ran, RuntimeError> {
        let docker = self.docker().await?;
        self.firewall_ready().await?;
        let make = |disk| self.container_body(&spec, disk);
        let name = format!("hyperfuncd-{}", spec.call_id);
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let (mut created, _) = self.create(&docker, options.clone(), &make).await;
        if let Err(DockerError::DockerResponseServerError {
            status_code: 409, ..
        }) = created
        {
            // A create whose answer was lost (the call was then requeued): that
            // container was never started, so it is replaced.
            remove(&docker, &name).await;
            created = self.create(&docker, options.clone(), &make).await.0;
        }
        if matches!(&created, Err(e) if network_missing(e)) {
            if let Err(e @ (RuntimeError::Unavailable { .. } | RuntimeError::Firewall(_))) =
                self.ensure_network().await
            {
                return Err(e);
            }
            created = self.create(&docker, options, &make).await.0;
        }
        let id = match created {
            Ok(r) => r.id,
            Err(DockerError::DockerResponseServerError {
                status_code: 404,
                message,
            }) if !message.contains("network") => {
                return Ok(Ran {
                    outcome: Outcome::failed(format!(
                        "image {} is not present on the Docker Engine",
                        spec.image
                    )),
                    container: None,
                })
            }
            Err(e) => {
                return match self.classify(e).await {
                    RuntimeError::Engine(m) => Ok(Ran {
                        outcome: Outcome::failed(format!("cannot create container: {m}")),
                        container: None,
                    }),
                    other => Err(other),
                }
            }
        };
        tracing::debug!(call = %spec.call_id, container = %id, "created");
        if let Some(tx) = spec.started.take() {
            let _ = tx.send(());
        }
        let outcome = self.drive(&docker, &id, spec, cancel).await;
        Ok(Ran {
            outcome,
            container: Some(id),
        })
    }

    /// Removes a call's container (already gone is fine).
    pub async fn remove(&self, container: &str) {
        if let Ok(docker) = self.docker().await {
            remove(&docker, container).await;
        }
    }

    fn container_body(&self, spec: &RunSpec, disk: Disk) -> ContainerCreateBody {
        let labels = HashMap::from([
            (LABEL_CALL.to_string(), spec.call_id.to_string()),
            (LABEL_FUNCTION.to_string(), spec.function.clone()),
            (LABEL_OWNER.to_string(), spec.owner.clone()),
            (LABEL_INSTANCE.to_string(), self.instance.clone()),
        ]);
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(spec.env.clone()),
            labels: Some(labels),
            host_config: Some(self.host_config(
                spec.memory_bytes,
                spec.cpus,
                spec.runtime.clone(),
                disk,
            )),
            ..attachable()
        }
    }

    /// The hardened host side of every container, warm or cold (DESIGN 4),
    /// its disk capped as `disk` says.
    fn host_config(
        &self,
        memory_bytes: u64,
        cpus: Option<f64>,
        runtime: Option<String>,
        disk: Disk,
    ) -> HostConfig {
        let c = &self.container;
        // A tmpfs is memory: one larger than the call's memory limit could
        // never be filled, the call would be killed first.
        let tmp = match disk {
            Disk::Tmpfs(bytes) => Some(bytes.min(memory_bytes)),
            _ => None,
        };
        HostConfig {
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            network_mode: Some(c.network_mode.clone()),
            runtime,
            memory: Some(i64::try_from(memory_bytes).unwrap_or(i64::MAX)),
            // No swap beyond the memory limit: the Engine's default doubles it.
            memory_swap: Some(i64::try_from(memory_bytes).unwrap_or(i64::MAX)),
            nano_cpus: cpus.map(|c| (c * 1e9) as i64),
            cpu_shares: Some(c.cpu_shares),
            readonly_rootfs: Some(disk.read_only()),
            // noexec, nosuid, nodev are the Engine's defaults for a tmpfs.
            tmpfs: tmp.map(|bytes| HashMap::from([("/tmp".to_string(), format!("size={bytes}"))])),
            storage_opt: match disk {
                Disk::StorageOpt(bytes) => {
                    Some(HashMap::from([("size".to_string(), bytes.to_string())]))
                }
                _ => None,
            },
            pids_limit: Some(c.pids_limit),
            security_opt: Some(vec!["no-new-privileges".into()]),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: (!c.cap_add.is_empty()).then(|| c.cap_add.clone()),
            ..Default::default()
        }
    }

    /// Creates and starts a warm container for `spec.function` named `name`:
    /// the function's real entrypoint and command run under the init program
    /// of `init.c`, which waits for one call. Returns the container's id.
    pub async fn warm(
        &self,
        spec: &WarmSpec,
        name: &str,
    ) -> Result<(String, String), RuntimeError> {
        let docker = self.docker().await?;
        self.firewall_ready().await?;
        let image = match docker.inspect_image(&spec.image).await {
            Ok(i) => i,
            Err(e) => return Err(self.classify(e).await),
        };
        // Made from the id, so a re-tag cannot slip in after the inspect.
        let image_id = image.id.unwrap_or_else(|| spec.image.clone());
        let config = image.config.unwrap_or_default();
        let mut argv = config.entrypoint.unwrap_or_default();
        if spec.command.is_empty() {
            argv.extend(config.cmd.unwrap_or_default());
        } else {
            argv.extend(spec.command.iter().cloned());
        }
        if argv.is_empty() {
            return Err(RuntimeError::Engine(format!(
                "image {} has no command and the function sets none",
                spec.image
            )));
        }
        // No call label: it cannot be added later. The call goes in the name.
        let labels = HashMap::from([
            (LABEL_POOL.to_string(), spec.function.clone()),
            (LABEL_FUNCTION.to_string(), spec.function.clone()),
            (LABEL_OWNER.to_string(), spec.owner.clone()),
            (LABEL_INSTANCE.to_string(), self.instance.clone()),
        ]);
        // A read-only root takes no upload: the init is bind-mounted there,
        // read-only, the only host path a call container ever sees.
        let make = |disk: Disk| {
            let mut host =
                self.host_config(spec.memory_bytes, spec.cpus, spec.runtime.clone(), disk);
            if disk.read_only() {
                host.mounts = self.init_file.as_ref().map(|f| {
                    vec![Mount {
                        target: Some(INIT_PATH.to_string()),
                        source: Some(f.display().to_string()),
                        typ: Some(MountType::BIND),
                        read_only: Some(true),
                        ..Default::default()
                    }]
                });
            }
            ContainerCreateBody {
                image: Some(image_id.clone()),
                entrypoint: Some(vec![INIT_PATH.to_string()]),
                cmd: Some(argv.clone()),
                env: Some(spec.env.clone()),
                labels: Some(labels.clone()),
                host_config: Some(host),
                ..attachable()
            }
        };
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let (mut created, mut disk) = self.create(&docker, options.clone(), &make).await;
        if matches!(&created, Err(e) if network_missing(e)) {
            self.ensure_network().await?;
            (created, disk) = self.create(&docker, options, &make).await;
        }
        if disk.read_only() && self.init_file.is_none() {
            if let Ok(r) = &created {
                remove(&docker, &r.id).await;
            }
            return Err(RuntimeError::Engine(
                "the warm pool's init could not be written to the data dir at start, and a read-only container cannot get it otherwise".into(),
            ));
        }
        let id = match created {
            Ok(r) => r.id,
            Err(e) if disk.read_only() && bind_source_missing(&e) => {
                // The Engine does not see this host's files: it runs
                // elsewhere (a forwarded socket) or in another mount
                // namespace.
                return Err(RuntimeError::Engine(format!(
                    "the warm pool's init {} cannot be bind-mounted into a read-only container: \
                     the Docker Engine does not see that file (is it on another host?); \
                     set [pool] per_function = 0, or [container] disk = \"off\": {}",
                    self.init_file
                        .as_ref()
                        .map(|f| f.display().to_string())
                        .unwrap_or_default(),
                    engine_message(&e)
                )));
            }
            Err(e) => return Err(self.classify(e).await),
        };
        let mut ready = if disk.read_only() {
            Ok(())
        } else {
            let upload = UploadToContainerOptions {
                path: "/".into(),
                ..Default::default()
            };
            docker
                .upload_to_container(&id, Some(upload), bollard::body_full(INIT_ARCHIVE.clone()))
                .await
        };
        if ready.is_ok() {
            ready = docker.start_container(&id, None).await;
            if matches!(&ready, Err(e) if network_missing(e)) {
                self.ensure_network().await?;
                ready = docker.start_container(&id, None).await;
            }
        }
        if let Err(e) = ready {
            remove(&docker, &id).await;
            return Err(self.classify(e).await);
        }
        Ok((id, image_id))
    }

    /// The id of the local image `image`, if present.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        let docker = self.docker().await?;
        match docker.inspect_image(image).await {
            Ok(i) => Ok(i.id),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// Runs a call in the warm container `container`. The container is first
    /// renamed after the call, so from then on the Engine holds the evidence
    /// that the call may have run (recovery fails it rather than run it
    /// twice). `Unusable` hands the spec back when the container is gone or
    /// stopped: nothing ran, and the caller runs the call cold.
    pub async fn run_warm(
        &self,
        container: &str,
        spec: RunSpec,
        frame_env: &[String],
        cancel: CancellationToken,
    ) -> Result<Warm, RuntimeError> {
        let docker = self.docker().await?;
        let running = match docker.inspect_container(container, None).await {
            Ok(i) => i.state.and_then(|s| s.running).unwrap_or(false),
            Err(e) if is_transport(&e) => return Err(self.classify(e).await),
            Err(_) => false,
        };
        let renamed = match running {
            false => None,
            true => Some(
                docker
                    .rename_container(
                        container,
                        RenameContainerOptions {
                            name: format!("hyperfuncd-{}", spec.call_id),
                        },
                    )
                    .await,
            ),
        };
        match renamed {
            Some(Ok(())) => {}
            Some(Err(e)) if is_transport(&e) => return Err(self.classify(e).await),
            _ => {
                remove(&docker, container).await;
                return Ok(Warm::Unusable(Box::new(spec)));
            }
        }
        let ran = |outcome| {
            Ok(Warm::Ran(Ran {
                outcome,
                container: Some(container.to_string()),
            }))
        };
        let attach = match attach(&docker, container, &cancel).await {
            Ok(a) => a,
            Err(failed) => return ran(failed),
        };
        let frame = call_frame(frame_env);
        let mut outcome = self
            .exchange(&docker, container, attach, spec, cancel, frame)
            .await;
        // The init could not run the command: say so as a cold start would.
        let init_line = outcome
            .stderr
            .strip_prefix(INIT_FAILURE.as_bytes())
            .map(|rest| String::from_utf8_lossy(rest.split(|&b| b == b'\n').next().unwrap_or(b"")));
        if let (Some(line), Some(127)) = (init_line, outcome.exit_code) {
            outcome.message = Some(format!("cannot start the container: {line}"));
            outcome.exit_code = None;
        }
        ran(outcome)
    }

    async fn drive(
        &self,
        docker: &Docker,
        id: &str,
        spec: RunSpec,
        cancel: CancellationToken,
    ) -> Outcome {
        let mut attached = match attach(docker, id, &cancel).await {
            Ok(a) => a,
            Err(failed) => return failed,
        };
        let mut started = docker.start_container(id, None).await;
        // Engine 20.10 looks the network up at start, not at create. The
        // failed start ended the attach, so a second start needs a new one.
        if matches!(&started, Err(e) if network_missing(e)) && self.ensure_network().await.is_ok() {
            drop(attached);
            attached = match attach(docker, id, &cancel).await {
                Ok(a) => a,
                Err(failed) => return failed,
            };
            started = docker.start_container(id, None).await;
        }
        tracing::debug!(call = %spec.call_id, ok = started.is_ok(), "started");
        if let Err(e) = started {
            return Outcome::failed(stage_failure("start", &e));
        }

        self.exchange(docker, id, attached, spec, cancel, Bytes::new())
            .await
    }

    /// Feeds an attached, running container its STDIN (after `frame`, which
    /// only a warm container's init reads), collects its output and waits for
    /// its end, killing it on timeout, cancellation or too much output.
    async fn exchange(
        &self,
        docker: &Docker,
        id: &str,
        attach: AttachContainerResults,
        mut spec: RunSpec,
        cancel: CancellationToken,
        frame: Bytes,
    ) -> Outcome {
        let mut input = attach.input;
        let stdin = spec.stdin.clone();
        // A warm call starts when its frame is written; a cold one fired this at start.
        let started = spec.started.take();
        // A process may exit without reading STDIN; the writer then blocks
        // forever, so it is aborted once the container has stopped.
        let writer = tokio::spawn(async move {
            let framed = input.write_all(&frame).await.is_ok();
            if let Some(tx) = started {
                let _ = tx.send(());
            }
            if framed && input.write_all(&stdin).await.is_ok() {
                let _ = input.shutdown().await;
            }
            // Held until aborted: dropping a half could close the stream.
            std::future::pending::<()>().await;
        });

        let exceeded = CancellationToken::new();
        let reader = tokio::spawn(read_output(
            attach.output,
            spec.max_stdout,
            spec.max_stderr,
            exceeded.clone(),
        ));

        let mut wait = docker.wait_container(
            id,
            Some(WaitContainerOptions {
                condition: "not-running".into(),
            }),
        );
        let deadline = async {
            match spec.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        enum Stop {
            Exited(Option<Result<bollard::models::ContainerWaitResponse, DockerError>>),
            Timeout,
            Cancelled,
            TooMuchOutput,
        }
        let mut stop = tokio::select! {
            w = wait.next() => Stop::Exited(w),
            _ = deadline => Stop::Timeout,
            _ = cancel.cancelled() => Stop::Cancelled,
            _ = exceeded.cancelled() => Stop::TooMuchOutput,
        };
        let exit = match stop {
            Stop::Exited(ref mut w) => w.take(),
            _ => {
                // Keep reading while the kill lands: an unread attach hangs the Engine.
                let _ = docker
                    .kill_container(
                        id,
                        Some(KillContainerOptions {
                            signal: "KILL".into(),
                        }),
                    )
                    .await;
                tokio::time::timeout(Duration::from_secs(30), wait.next())
                    .await
                    .ok()
                    .flatten()
            }
        };
        writer.abort();
        let output = match tokio::time::timeout(DRAIN_AFTER_EXIT, reader).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => Captured::broken(format!("output reader failed: {e}")),
            Err(_) => {
                Captured::broken("the output stream did not end after the process exited".into())
            }
        };

        let code = match exit {
            Some(Ok(r)) => Some(r.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Some(code),
            Some(Err(e)) => {
                return Outcome {
                    stdout: output.stdout.freeze(),
                    stderr: output.stderr.freeze(),
                    ..Outcome::failed(format!(
                        "lost the Docker Engine while the call ran: {}",
                        engine_message(&e)
                    ))
                }
            }
            None => None,
        };
        let message = match stop {
            Stop::Timeout => Some(format!(
                "timeout after {}",
                humantime::format_duration(spec.timeout.unwrap_or_default())
            )),
            Stop::Cancelled => Some("cancelled".to_string()),
            Stop::TooMuchOutput => {
                Some(format!("stdout exceeded {}", human_bytes(spec.max_stdout)))
            }
            Stop::Exited(_) if output.exceeded => {
                Some(format!("stdout exceeded {}", human_bytes(spec.max_stdout)))
            }
            Stop::Exited(_) => match (&output.error, code) {
                (Some(e), _) => Some(e.clone()),
                (None, Some(0)) => None,
                (None, Some(c)) => Some(self.exit_message(docker, id, c).await),
                (None, None) => {
                    Some("lost the Docker Engine while the call ran: no exit code".into())
                }
            },
        };
        Outcome {
            state: if message.is_none() {
                CallState::Finished
            } else {
                CallState::Failed
            },
            exit_code: code,
            message,
            stdout: output.stdout.freeze(),
            stderr: output.stderr.freeze(),
            // The scheduler knows which image the container was made from.
            image_digest: None,
        }
    }

    async fn exit_message(&self, docker: &Docker, id: &str, code: i64) -> String {
        let oom = docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|i| i.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false);
        if oom {
            format!("exit code {code}: killed for exceeding its memory limit")
        } else {
            format!("exit code {code}")
        }
    }
}

/// What a warm container is made of: everything but the call.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmSpec {
    pub function: String,
    pub owner: String,
    pub image: String,
    /// Empty keeps the image's CMD.
    pub command: Vec<String>,
    /// The function's own `K=V` pairs.
    pub env: Vec<String>,
    pub memory_bytes: u64,
    pub cpus: Option<f64>,
    /// The OCI runtime: a container is handed only to a call of the same one.
    pub runtime: Option<String>,
}

impl WarmSpec {
    /// `owner/function`: what the pool keys its containers by, so two
    /// users' functions of one name never share one.
    pub fn key(&self) -> String {
        format!("{}/{}", self.owner, self.function)
    }
}

/// How a call in a warm container went.
pub enum Warm {
    Ran(Ran),
    /// The container could not take the call; nothing ran.
    Unusable(Box<RunSpec>),
}

/// The frame `init.c` reads before it execs the function: a big-endian
/// length, then `K=V` entries each ended by NUL.
fn call_frame(env: &[String]) -> Bytes {
    let mut body = Vec::new();
    for e in env.iter().filter(|e| !e.contains('\0')) {
        body.extend_from_slice(e.as_bytes());
        body.push(0);
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&body);
    Bytes::from(frame)
}

/// A tar archive holding the init program at `INIT_PATH`, for the Engine's
/// archive upload into a created container.
static INIT_ARCHIVE: LazyLock<Bytes> = LazyLock::new(init_archive);

fn init_archive() -> Bytes {
    let mut header = tar::Header::new_ustar();
    header.set_size(INIT.len() as u64);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    let mut builder = tar::Builder::new(Vec::with_capacity(INIT.len() + 2048));
    let name = INIT_PATH.trim_start_matches('/');
    // Writing to a Vec cannot fail, and the name is a short constant.
    let _ = builder.append_data(&mut header, name, INIT);
    Bytes::from(builder.into_inner().unwrap_or_default())
}

/// One of this instance's containers on the Engine.
pub struct Listed {
    pub id: String,
    /// The call it ran or runs; empty for a warm container not yet used.
    pub call: String,
    pub name: String,
}

/// A call that reached the Engine.
pub struct Ran {
    pub outcome: Outcome,
    /// The container to remove once the outcome is stored.
    pub container: Option<String>,
}

/// What the output reader collected.
struct Captured {
    stdout: BytesMut,
    stderr: BytesMut,
    exceeded: bool,
    error: Option<String>,
}

impl Captured {
    fn broken(error: String) -> Captured {
        Captured {
            stdout: BytesMut::new(),
            stderr: BytesMut::new(),
            exceeded: false,
            error: Some(error),
        }
    }
}

/// Reads the attach stream to its end. Past the STDOUT cap it keeps draining
/// (discarding) and signals `exceeded` so the container gets killed.
async fn read_output(
    mut output: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<LogOutput, DockerError>> + Send>,
    >,
    max_stdout: u64,
    max_stderr: u64,
    exceeded: CancellationToken,
) -> Captured {
    let mut c = Captured {
        stdout: BytesMut::new(),
        stderr: BytesMut::new(),
        exceeded: false,
        error: None,
    };
    while let Some(item) = output.next().await {
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                if c.exceeded {
                    continue;
                }
                if (c.stdout.len() + message.len()) as u64 > max_stdout {
                    c.exceeded = true;
                    c.stdout.clear();
                    exceeded.cancel();
                } else {
                    c.stdout.extend_from_slice(&message);
                }
            }
            Ok(LogOutput::StdErr { message }) => {
                let room = (max_stderr as usize).saturating_sub(c.stderr.len());
                c.stderr
                    .extend_from_slice(&message[..message.len().min(room)]);
            }
            Ok(LogOutput::StdIn { .. }) => {}
            Err(e) => {
                c.error = Some(format!("output stream broke: {}", engine_message(&e)));
                break;
            }
        }
    }
    c
}

/// A container body whose STDIN, STDOUT and STDERR we attach to, with STDIN
/// closed after the one attach (the DESIGN's Engine facts), no TTY.
fn attachable() -> ContainerCreateBody {
    ContainerCreateBody {
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(true),
        stdin_once: Some(true),
        tty: Some(false),
        ..Default::default()
    }
}

/// Attaches to all three streams of `id`; a failure, or a cancellation
/// while the call waited its turn (then it never starts), is the outcome.
async fn attach(
    docker: &Docker,
    id: &str,
    cancel: &CancellationToken,
) -> Result<AttachContainerResults, Outcome> {
    let options = AttachContainerOptions {
        stdin: true,
        stdout: true,
        stderr: true,
        stream: true,
        logs: false,
        detach_keys: None,
    };
    let attached = docker
        .attach_container(id, Some(options))
        .await
        .map_err(|e| Outcome::failed(stage_failure("attach to", &e)))?;
    if cancel.is_cancelled() {
        return Err(Outcome::failed("cancelled"));
    }
    Ok(attached)
}

async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(id, Some(options)).await {
        Ok(())
        | Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => tracing::warn!(container = id, error = %e, "cannot remove container"),
    }
}

/// Why a call failed before its process ran.
fn stage_failure(stage: &str, e: &DockerError) -> String {
    if is_transport(e) {
        format!("lost the Docker Engine while the call ran: cannot {stage} the container: {e}")
    } else {
        format!("cannot {stage} the container: {}", engine_message(e))
    }
}

/// Whether a create failed because the Engine's storage driver has no
/// per-container size: fuse-overlayfs says "--storage-opt is not supported",
/// overlay2 "--storage-opt is supported only for overlay over xfs with
/// 'pquota' mount option", vfs and others speak of quotas.
fn storage_opt_refused(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. } if {
        let m = message.to_ascii_lowercase();
        m.contains("storage-opt") || m.contains("storage opt") || m.contains("quota")
    })
}

/// Whether a create failed because a bind mount's source is missing on the
/// Engine's host.
fn bind_source_missing(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. }
        if message.contains("bind source path does not exist"))
}

/// Writes the warm containers' init program to `dir/INIT_FILE` (mode
/// 0555: any container user may run it, nobody may change it), unless it
/// is there already with these bytes; returns its path. A file replaced
/// here does not change a running container's: a bind mount holds the
/// file it was made with.
pub fn write_init(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(INIT_FILE);
    let mode = std::fs::Permissions::from_mode(0o555);
    if std::fs::read(&path).is_ok_and(|b| b == INIT) {
        std::fs::set_permissions(&path, mode)?;
        return Ok(path);
    }
    let tmp = dir.join(format!("{INIT_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(INIT)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, mode)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; keep going if it did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether an error means the Engine could not be reached at all.
/// The network `mode` names, if it names one rather than a mode of its own
/// (the Engine's `bridge`, `host`, `none`, `default`, `container:ID`).
pub fn named_network(mode: &str) -> Option<&str> {
    let builtin = matches!(mode, "" | "bridge" | "host" | "none" | "default")
        || mode.starts_with("container:");
    (!builtin).then_some(mode)
}

/// The Linux bridge of a bridge network: the name it was given, else the
/// Engine's `br-` and the first 12 characters of its id.
fn bridge_of(n: &bollard::models::Network) -> Option<String> {
    if n.driver.as_deref() != Some("bridge") {
        return None;
    }
    if let Some(name) = n
        .options
        .as_ref()
        .and_then(|o| o.get("com.docker.network.bridge.name"))
    {
        return Some(name.clone());
    }
    Some(format!("br-{}", n.id.as_deref()?.get(..12)?))
}

fn is_ours(n: &bollard::models::Network) -> bool {
    n.labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_NETWORK))
}

/// Whether a create or start failed because the network it names is gone,
/// which the Engine says with the same 404 as a missing image.
fn network_missing(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code: 404, message }
        if message.contains("network"))
}

fn is_transport(e: &DockerError) -> bool {
    !matches!(
        e,
        DockerError::DockerResponseServerError { .. }
            | DockerError::DockerContainerWaitError { .. }
            | DockerError::JsonDataError { .. }
            | DockerError::JsonSerdeError { .. }
    )
}

fn engine_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        other => other.to_string(),
    }
}

/// Where `ensure_image` tells how a pull goes (`PullEvent`s).
pub type PullProgress = tokio::sync::mpsc::Sender<PullEvent>;

/// One step of an image pull, as `ensure_image` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The image is not on the Engine: the pull of `image` begins.
    Started { image: String },
    /// A layer's state; bytes while it downloads or extracts.
    Layer {
        /// The Engine's short layer ID (hex).
        id: String,
        status: &'static str,
        current: Option<u64>,
        total: Option<u64>,
    },
}

/// The layer states of the Engine's pull stream, passed on in these words;
/// anything else (a registry's text, a digest line) is not.
pub const LAYER_STATES: &[&str] = &[
    "Pulling fs layer",
    "Waiting",
    "Downloading",
    "Verifying Checksum",
    "Download complete",
    "Extracting",
    "Pull complete",
    "Already exists",
    "Retrying",
];

/// A pull stream item as a `PullEvent::Layer`, if it is about a layer (a hex
/// ID) in one of `LAYER_STATES`. A retry's "Retrying in 5 seconds" is "Retrying".
fn layer_event(info: &bollard::models::CreateImageInfo) -> Option<PullEvent> {
    let id = info.id.as_deref()?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let raw = info.status.as_deref()?;
    let status = LAYER_STATES
        .iter()
        .find(|s| raw == **s || (**s == "Retrying" && raw.starts_with("Retrying in ")))?;
    let detail = info.progress_detail.as_ref();
    let bytes = |v: Option<i64>| v.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0);
    Some(PullEvent::Layer {
        id: id.to_string(),
        status,
        current: bytes(detail.and_then(|d| d.current)),
        total: bytes(detail.and_then(|d| d.total)),
    })
}

/// Our own words for a pull that took longer than `docker.pull_timeout_secs`.
const PULL_TIMED_OUT: &str = "the pull timed out";

/// How long `check_login` waits for the Engine (which waits for the registry).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of the Engine's `/auth` answer read: a status and a short JSON.
const LOGIN_ANSWER_MAX: u64 = 64 * 1024;

/// What a reference names on the Engine, resolved once (create, update).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// What a function pins (`Function::image_digest`): `repo@sha256:...`
    /// when the Engine has the image from the reference's own repository
    /// (a `RepoDigests` entry), so it can be pulled again by digest; else
    /// the image ID `sha256:...` (an image built or loaded locally), which
    /// names the same content but cannot be pulled again.
    pub pinned: String,
    /// The image ID.
    pub id: String,
    /// This pull brought the image onto the Engine (the reference named
    /// no image, or another one, before): hyperfuncd may remove it later.
    pub fresh: bool,
}

/// What `remove_image` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageRemoval {
    Removed,
    /// The Engine had no such image.
    Gone,
    /// A container uses it: it stays, and may go once that is removed.
    InUse,
    /// Its references of the repository are gone, but the image stays:
    /// another reference (not hyperfuncd's) names it, or a container was
    /// made from it meanwhile.
    Kept,
}

/// `image`'s `Resolved` from its inspect.
fn resolved(
    image: &str,
    i: bollard::models::ImageInspect,
    fresh: bool,
) -> Result<Resolved, RuntimeError> {
    let id = i.id.ok_or_else(|| {
        RuntimeError::Engine(format!("the Docker Engine gave image {image} no ID"))
    })?;
    let wanted = repository_of(image);
    let pinned = i
        .repo_digests
        .unwrap_or_default()
        .into_iter()
        .find(|d| wanted.is_some() && repository_of(d) == wanted)
        .unwrap_or_else(|| id.clone());
    Ok(Resolved { pinned, id, fresh })
}

/// The canonical repository of a named reference, without tag or digest
/// (`busybox:1` and `docker.io/library/busybox@sha256:..` are both
/// `docker.io/library/busybox`); `None` for an image ID.
pub fn repository_of(reference: &str) -> Option<String> {
    let canonical = crate::model::ImageRef::parse(reference)
        .ok()?
        .canonical()?
        .to_string();
    let name = canonical.split('@').next().unwrap_or(&canonical);
    let last = name.rsplit('/').next().unwrap_or(name);
    Some(match last.rsplit_once(':') {
        Some((_, tag)) => name[..name.len() - tag.len() - 1].to_string(),
        None => name.to_string(),
    })
}

/// How an image is pulled: whose login, and whether a local copy is enough.
#[derive(Default)]
pub struct PullAuth<'a> {
    /// Sent as `X-Registry-Auth`; `None` pulls anonymously.
    pub login: Option<&'a RegistryLogin>,
    /// Pull even when the Engine has the image (see `ensure_image`).
    pub always: bool,
}

/// Why `check_login` refused a login. The words are ours, never the
/// registry's.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("wrong username or password")]
    Denied,
    #[error("the registry could not be reached: {0}")]
    Unreachable(&'static str),
    #[error("{0}")]
    Engine(String),
}

fn login_summary(status: u16, raw: &str) -> LoginError {
    let r = raw.to_ascii_lowercase();
    if status == 401
        || [
            "unauthorized",
            "incorrect username",
            "authentication required",
            "denied",
        ]
        .iter()
        .any(|w| r.contains(w))
    {
        return LoginError::Denied;
    }
    match pull_summary(raw) {
        "its registry could not be reached" => {
            LoginError::Unreachable("connection refused, no such host, or a TLS failure")
        }
        PULL_TIMED_OUT => LoginError::Unreachable("the login timed out"),
        _ => LoginError::Unreachable("it did not answer as a registry"),
    }
}

/// A few words on why a pull failed, chosen from the Engine's text but never
/// quoting it: a registry's answer (or any service's on the host named in
/// the reference) must not reach the caller.
fn pull_summary(raw: &str) -> &'static str {
    let r = raw.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| r.contains(w));
    if r.contains(PULL_TIMED_OUT) {
        PULL_TIMED_OUT
    } else if any(&["toomanyrequests", "rate limit"]) {
        "the registry is rate limiting pulls"
    } else if any(&[
        "unauthorized",
        "authentication required",
        "denied",
        "no basic auth credentials",
        // An insecure registry (127.0.0.0/8 by the Engine's default)
        // answered over TLS with a refusal, the Engine fell back to plain
        // HTTP, and reports only that: the TLS answer was a 401 or a 404.
        "http request to an https server",
    ]) {
        "not found, or access denied"
    } else if any(&["manifest unknown", "not found", "does not exist"]) {
        "not found in its registry"
    } else if any(&[
        "connection refused",
        "no such host",
        "dial tcp",
        "i/o timeout",
        "network is unreachable",
        "timeout",
        "lookup",
        "tls",
        "x509",
        "certificate",
        "server gave http response",
    ]) {
        "its registry could not be reached"
    } else {
        "the registry refused it"
    }
}

/// `repo[:tag]` → (`repo`, `tag`); a digest reference is passed whole. An
/// empty tag would make the Engine pull every tag, so it defaults to `latest`.
fn split_reference(image: &str) -> (String, String) {
    if image.contains('@') {
        return (image.to_string(), String::new());
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, tag)) => {
            let repo = &image[..image.len() - tag.len() - 1];
            (repo.to_string(), tag.to_string())
        }
        None => (image.to_string(), "latest".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(split_reference("busybox"), s("busybox", "latest"));
        assert_eq!(split_reference("busybox:1.36"), s("busybox", "1.36"));
        assert_eq!(split_reference("reg:5000/a/b"), s("reg:5000/a/b", "latest"));
        assert_eq!(split_reference("reg:5000/a/b:v2"), s("reg:5000/a/b", "v2"));
        assert_eq!(split_reference("a@sha256:00"), s("a@sha256:00", ""));
    }

    #[test]
    fn call_frame_is_length_then_nul_ended_entries() {
        let env = vec!["A=1".to_string(), "B=x\0y".to_string(), "C=".to_string()];
        let frame = call_frame(&env);
        assert_eq!(&frame[..], b"\0\0\0\x07A=1\0C=\0");
        assert_eq!(&call_frame(&[])[..], b"\0\0\0\0");
    }

    #[test]
    fn init_archive_holds_the_executable_init() {
        assert_eq!(&INIT[..4], b"\x7fELF");
        let archive = init_archive();
        let mut tar = tar::Archive::new(&archive[..]);
        let entries: Vec<_> = tar
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let h = e.header();
                (
                    e.path().expect("path").display().to_string(),
                    h.mode().expect("mode"),
                    h.size().expect("size"),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [(".hyperfuncd-init".to_string(), 0o755, INIT.len() as u64)]
        );
    }

    #[test]
    fn pull_progress_passes_on_layer_states_only() {
        use bollard::models::{CreateImageInfo, ProgressDetail};
        let info =
            |id: &str, status: &str, current: Option<i64>, total: Option<i64>| CreateImageInfo {
                id: Some(id.into()),
                status: Some(status.into()),
                progress_detail: Some(ProgressDetail { current, total }),
                ..Default::default()
            };
        assert_eq!(
            layer_event(&info(
                "1af6936d28e1",
                "Downloading",
                Some(16384),
                Some(1500000)
            )),
            Some(PullEvent::Layer {
                id: "1af6936d28e1".into(),
                status: "Downloading",
                current: Some(16384),
                total: Some(1500000),
            })
        );
        assert_eq!(
            layer_event(&info(
                "1af6936d28e1",
                "Retrying in 5 seconds",
                None,
                Some(-1)
            )),
            Some(PullEvent::Layer {
                id: "1af6936d28e1".into(),
                status: "Retrying",
                current: None,
                total: None,
            })
        );
        // The tag line, a registry's words, a digest line: not passed on.
        assert_eq!(
            layer_event(&info("latest", "Pulling from x/y", None, None)),
            None
        );
        assert_eq!(
            layer_event(&info("1af6936d28e1", "<html>canary", None, None)),
            None
        );
        let digest = CreateImageInfo {
            status: Some("Digest: sha256:00".into()),
            ..Default::default()
        };
        assert_eq!(layer_event(&digest), None);
    }

    #[test]
    fn pull_errors_are_summarised_without_quoting() {
        let leak = "error parsing HTTP 404 response body: <html>secret page</html>";
        assert_eq!(pull_summary(leak), "the registry refused it");
        assert_eq!(
            pull_summary(
                "Get \"https://127.0.0.1:22/v2/\": dial tcp 127.0.0.1:22: connection refused"
            ),
            "its registry could not be reached"
        );
        assert_eq!(
            pull_summary("pull access denied for x, repository does not exist"),
            "not found, or access denied"
        );
        assert_eq!(
            pull_summary("manifest for a:b not found: manifest unknown"),
            "not found in its registry"
        );
        assert_eq!(pull_summary("something else"), "the registry refused it");
    }
}
