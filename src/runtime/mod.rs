//! Runs one call in one fresh container on the local Docker Engine, and the
//! few other Engine operations the platform needs (images, recovery, health).
//!
//! This is the only module that names bollard. It never keeps a container
//! after its call, never stops reading a held attach (the Engine hangs if we
//! do), and never lets a container write to the Engine's disk (log driver `none`).

mod cold;
mod exchange;
mod firewall;
mod images;
mod network;
mod warm;

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

use exchange::*;
pub use images::*;
pub use network::*;
pub use warm::*;

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

    /// Removes a call's container (already gone is fine).
    pub async fn remove(&self, container: &str) {
        if let Ok(docker) = self.docker().await {
            remove(&docker, container).await;
        }
    }
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

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; keep going if it did.
    m.lock().unwrap_or_else(|p| p.into_inner())
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
