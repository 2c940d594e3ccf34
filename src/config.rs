//! The daemon's configuration: one serde schema for the config file, with every
//! default named here. Unknown keys are an error so a typo never goes unnoticed.
//! The annotated reference is `config/hyperfuncd.toml`; keep the two in step.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where the daemon looks for a config file when neither `--config` nor
/// `HYPERFUNCD_CONFIG` names one.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/hyperfuncd/config.toml";

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
pub const MIB: u64 = 1024 * 1024;
/// The network call containers use by default, which hyperfuncd creates.
pub const DEFAULT_NETWORK: &str = "hyperfuncd";
pub const DEFAULT_CALL_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(7 * 24 * 3600);
/// The timeout ceiling unless configured, and so the timeout of a function
/// that sets none: nothing runs forever by default, while an hour covers
/// batch work that a request-sized limit (Lambda's 15 minutes) would not.
pub const DEFAULT_MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port of the HTTPS API.
    pub listen: SocketAddr,
    /// Where sled, the TLS material and the admin profile live. `None` means the
    /// platform default: `/var/lib/hyperfuncd` as root, else `$XDG_DATA_HOME/hyperfuncd`.
    pub data_dir: Option<PathBuf>,
    /// Host name put in call URLs and in the certificate's SANs. `None`: the
    /// listen address if it is specific, else the machine's host name.
    pub public_host: Option<String>,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub scheduler: SchedulerConfig,
    pub container: ContainerConfig,
    pub pool: PoolConfig,
    pub docker: DockerConfig,
    pub store: StoreSection,
    pub http: HttpConfig,
    pub images: ImagesConfig,
    pub log: LogConfig,
    pub webhooks: WebhooksConfig,
}

/// Completion webhooks (`[webhooks]`): how deliveries are retried, where
/// they may go, and how much of the daemon they may hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// How long a delivery is retried after its call ended (or after a
    /// `func redeliver`), on timeouts, connection errors, 429 and 5xx.
    #[serde(with = "humantime_secs")]
    pub retry_for: std::time::Duration,
    /// The delay before the first retry; each later one doubles it, with
    /// jitter (half of it random), up to `max_backoff`.
    #[serde(with = "humantime_secs")]
    pub min_backoff: std::time::Duration,
    /// The longest delay between two attempts (a `Retry-After` included).
    #[serde(with = "humantime_secs")]
    pub max_backoff: std::time::Duration,
    /// How long a connection to a receiver may take (TLS included).
    #[serde(with = "humantime_secs")]
    pub connect_timeout: std::time::Duration,
    /// How long a receiver may take to answer, from the request's start.
    #[serde(with = "humantime_secs")]
    pub response_timeout: std::time::Duration,
    /// Hosts (names or addresses as the URL spells them) that webhooks may
    /// reach over plain `http://`; every other URL must be `https://`.
    pub allow_http_hosts: Vec<String>,
    /// Networks (CIDRs, e.g. `10.1.0.0/16`) that webhooks may reach although
    /// they are not public: loopback, private, link-local, ... are refused
    /// otherwise, at registration and again at every connection.
    pub allow_private: Vec<String>,
    /// When not empty, the only hosts webhooks may name: `hooks.example.com`,
    /// or `.example.com` for every name under it (an egress allow-list;
    /// a host outside it is refused when the webhook is set, before any
    /// lookup).
    pub allow_hosts: Vec<String>,
    /// A PEM file of CA certificates trusted for receivers, besides the
    /// system's (receivers with a private CA).
    pub ca_file: Option<PathBuf>,
    /// Deliveries in flight at once, over all receivers.
    pub max_in_flight: usize,
    /// Deliveries in flight at once to one receiver (scheme, host and
    /// port), so a slow receiver holds at most these.
    pub max_per_host: usize,
}

pub const DEFAULT_WEBHOOK_RETRY_FOR: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            retry_for: DEFAULT_WEBHOOK_RETRY_FOR,
            min_backoff: std::time::Duration::from_secs(10),
            max_backoff: std::time::Duration::from_secs(3600),
            connect_timeout: std::time::Duration::from_secs(5),
            response_timeout: std::time::Duration::from_secs(10),
            allow_http_hosts: Vec::new(),
            allow_private: Vec::new(),
            allow_hosts: Vec::new(),
            ca_file: None,
            max_in_flight: 64,
            max_per_host: 4,
        }
    }
}

impl WebhooksConfig {
    /// `allow_private`, parsed.
    pub fn private_networks(&self) -> Result<Vec<ipnet::IpNet>, String> {
        self.allow_private
            .iter()
            .map(|n| {
                n.parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("webhooks.allow_private: {n:?} is not a CIDR network"))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key`, replaces the self-signed certificate.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS. Refused unless `listen` is a loopback
    /// address: keys and capability URLs never cross a network in clear text.
    pub disable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body (the call's STDIN), in bytes.
    pub max_stdin_bytes: u64,
    /// Largest STDOUT a call may produce, in bytes; beyond it the call fails.
    pub max_stdout_bytes: u64,
    /// STDERR kept per call, in bytes; the rest is discarded (the call does not fail).
    pub max_stderr_bytes: u64,
    /// Finished outputs kept per function, in bytes; the oldest are evicted.
    pub output_cache_bytes: u64,
    /// Log events kept per function, in bytes; the oldest are evicted.
    pub log_cache_bytes: u64,
    /// How long the record of an ended call is kept (humantime, e.g. "7d");
    /// after that it is deleted with any output it still holds, and asking
    /// for it answers 404.
    #[serde(with = "humantime_secs")]
    pub call_retention: std::time::Duration,
    /// Ceiling on a function's memory limit, in bytes; also bounds
    /// `container.memory_bytes`. `None`: half of the Engine host's memory
    /// (but not below `container.memory_bytes`), so calls leave the host
    /// room (`memory_ceiling`).
    pub max_memory_bytes: Option<u64>,
    /// Ceiling on a function's CPUs. `None`: half of the Engine host's
    /// CPUs (`cpus_ceiling`).
    pub max_cpus: Option<f64>,
    /// Ceiling on a function's timeout (humantime); a function without one
    /// gets this one. `"none"` lifts it: calls may then run as long as
    /// they like unless their function sets a timeout.
    #[serde(with = "humantime_opt")]
    pub max_timeout: Option<std::time::Duration>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_stdin_bytes: 5 * MIB,
            max_stdout_bytes: 5 * MIB,
            max_stderr_bytes: MIB,
            output_cache_bytes: 50 * MIB,
            log_cache_bytes: 50 * MIB,
            call_retention: DEFAULT_CALL_RETENTION,
            max_memory_bytes: None,
            max_cpus: None,
            max_timeout: Some(DEFAULT_MAX_TIMEOUT),
        }
    }
}

impl LimitsConfig {
    /// The memory ceiling in force: `max_memory_bytes`, else half of the
    /// Engine host's `host_memory` (`None` while unknown), but never below
    /// `default_memory` (`container.memory_bytes`), which a function that
    /// sets none gets and must always be allowed.
    pub fn memory_ceiling(&self, host_memory: Option<u64>, default_memory: u64) -> Option<u64> {
        self.max_memory_bytes
            .or_else(|| host_memory.map(|m| (m / 2).max(default_memory)))
    }

    /// The CPU ceiling in force: `max_cpus`, else half of the Engine
    /// host's `host_cpus` (`None` while unknown).
    pub fn cpus_ceiling(&self, host_cpus: Option<f64>) -> Option<f64> {
        self.max_cpus
            .or_else(|| host_cpus.map(|c| (c / 2.0).max(crate::model::MIN_CPUS)))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Concurrency quota given to new users unless `user add --max-concurrency` says otherwise.
    pub default_max_concurrency: u32,
    /// Containers running at once on this host, across all users.
    pub host_max_running: u32,
    /// On SIGTERM, seconds running calls may take to finish; the rest are
    /// then killed and FAILED, so a stopped daemon leaves no container.
    pub shutdown_grace_secs: u64,
    /// Per user unless `user add/update --max-queued` says otherwise: calls
    /// accepted and not yet started; past it, a call is answered 429.
    pub default_max_queued: u64,
    /// Per user (`--max-queued-bytes`): STDIN bytes of those calls.
    pub default_max_queued_bytes: u64,
    /// Per user (`--max-functions`): functions they may own.
    pub default_max_functions: u32,
    /// Per user (`--rate`): requests per second per API key and per call
    /// URL, a token bucket that holds one second's worth (the burst).
    pub default_rate: u32,
    /// Slots of `host_max_running` kept for each admin who sets none of
    /// their own (`user update --reserved`): no other user's call takes
    /// them while unused, so the admin's calls start at once on a full host.
    pub admin_reserved: u32,
    /// Likewise for every other user who sets none. All users' reservations
    /// together must leave at least one slot unreserved (README "Sharing
    /// the host").
    pub default_reserved: u32,
}

/// 1 GiB: a full queue of the default 10,000 calls at 100 KiB each.
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 1 << 30;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            default_max_concurrency: 10,
            host_max_running: 64,
            shutdown_grace_secs: 10,
            default_max_queued: 10_000,
            default_max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            default_max_functions: 100,
            default_rate: 100,
            admin_reserved: 1,
            default_reserved: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerConfig {
    /// Docker network mode of call containers: a network name, or `bridge`
    /// (the Engine's default bridge, shared with every container on the
    /// host), `none`, `host`. A named network that does not exist is created
    /// at start as a bridge with inter-container traffic disabled; the
    /// default, `hyperfuncd`, is one.
    pub network_mode: String,
    /// OCI runtime of every function that names none (`runsc` for gVisor,
    /// `kata-runtime`); must be one the Engine has registered, checked at
    /// start. `None`: the Engine's default (usually `runc`).
    pub runtime: Option<String>,
    /// OCI runtimes a non-admin may choose for a function (`func create
    /// --runtime`) besides the default (`runtime`, else the Engine's),
    /// which is always allowed: the isolation is the operator's choice,
    /// so by default a tenant cannot leave gVisor for `runc`. Admins may
    /// choose any runtime the Engine has.
    pub allowed_runtimes: Vec<String>,
    /// Memory limit of a call container unless the function sets one, in bytes.
    pub memory_bytes: u64,
    /// Process limit of a call container.
    pub pids_limit: i64,
    /// CPU weight of a call container when the host's CPUs are contended
    /// (`docker run --cpu-shares`; a container gets 1024 by default), so
    /// calls yield to the host's other containers. 2 to 262144.
    pub cpu_shares: i64,
    /// How a call's disk is capped at `disk_bytes` (README "Container
    /// disk"): `auto` (the default) asks the Engine for a writable layer of
    /// that size (`--storage-opt size`) where its storage driver supports
    /// it, and otherwise (`fuse-overlayfs`, overlay2 without xfs project
    /// quotas, vfs) does what `tmpfs` does; `tmpfs`: a read-only root with
    /// `/tmp` a tmpfs of `disk_bytes`, which is memory, not disk; `storage-opt`:
    /// only the Engine's size option (a driver without it fails every call's
    /// create, so the daemon warns); `off`: a writable root without a cap.
    pub disk: DiskCap,
    /// What a call may write, in bytes: its writable layer (`storage-opt`)
    /// or its `/tmp` (`tmpfs`). A tmpfs counts against the call's memory
    /// limit, so this must leave room under `memory_bytes`; a function with
    /// less memory than this gets a `/tmp` of its memory limit.
    pub disk_bytes: u64,
    /// Former switch of the read-only root: `true` is `disk = "tmpfs"`.
    /// `false` changes nothing (the root is read-only by default now,
    /// unless `disk` says otherwise).
    pub read_only_root: bool,
    /// Former name of `disk_bytes`; when set it is the cap.
    pub tmp_bytes: Option<u64>,
    /// Capabilities added back after dropping all of them.
    pub cap_add: Vec<String>,
    /// Keep call containers on a named bridge network (`network_mode`, not
    /// `bridge`, `host` or `none`) away from the host: iptables rules the
    /// daemon installs at start and removes at stop drop their traffic to
    /// any address of the host (the bridge gateway, the daemon's port) and
    /// to link-local addresses (169.254.0.0/16, fe80::/10, the metadata
    /// service's fd00:ec2::254), and to ports the host publishes for other
    /// containers. Needs root (CAP_NET_ADMIN) and `iptables`; without them
    /// the start fails. README "Network".
    pub firewall: bool,
    /// Destinations the firewall lets calls reach after all: `ADDR`,
    /// `ADDR/PREFIX`, `ADDR:PORT`, `ADDR/PREFIX:PORT`, `[V6ADDR]:PORT`
    /// (a port: TCP and UDP), e.g. a database on the host's private network.
    pub allow_host: Vec<HostAllow>,
}

/// A destination `[container] allow_host` lets calls reach: an address or
/// network, and optionally one port (TCP and UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostAllow {
    pub addr: std::net::IpAddr,
    /// Prefix length: 32 (v4) or 128 (v6) for one address.
    pub prefix: u8,
    pub port: Option<u16>,
}

impl std::str::FromStr for HostAllow {
    type Err = String;

    fn from_str(s: &str) -> Result<HostAllow, String> {
        let bad = || format!("{s:?}: expected ADDR, ADDR/PREFIX, ADDR:PORT or [V6ADDR]:PORT");
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, port) = rest.split_once("]:").ok_or_else(bad)?;
            (net, Some(port))
        } else if s.matches(':').count() == 1 {
            let (net, port) = s.split_once(':').ok_or_else(bad)?;
            (net, Some(port))
        } else {
            (s, None)
        };
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?),
            None => None,
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (net, None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(HostAllow { addr, prefix, port })
    }
}

impl TryFrom<String> for HostAllow {
    type Error = String;
    fn try_from(s: String) -> Result<HostAllow, String> {
        s.parse()
    }
}

impl From<HostAllow> for String {
    fn from(a: HostAllow) -> String {
        a.to_string()
    }
}

impl std::fmt::Display for HostAllow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.addr, self.port) {
            (std::net::IpAddr::V6(a), Some(p)) => write!(f, "[{a}/{}]:{p}", self.prefix),
            (a, Some(p)) => write!(f, "{a}/{}:{p}", self.prefix),
            (a, None) => write!(f, "{a}/{}", self.prefix),
        }
    }
}

/// What a call may write unless configured: as much as Lambda's smallest
/// `/tmp` would be too much for a tmpfs counted against the default 512 MiB
/// of memory, so an eighth of it.
pub const DEFAULT_DISK_BYTES: u64 = 64 * MIB;

/// How a call container's disk is capped (`[container] disk`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskCap {
    /// `storage-opt` where the Engine's storage driver takes it, else `tmpfs`.
    #[default]
    Auto,
    /// A read-only root; `/tmp` is a tmpfs of `disk_bytes`.
    Tmpfs,
    /// A writable layer of `disk_bytes` (`docker run --storage-opt size=`).
    StorageOpt,
    /// A writable root on the Engine's disk, without a cap.
    Off,
}

impl ContainerConfig {
    /// The cap: `disk_bytes`, or its former name `tmp_bytes` when set.
    pub fn disk_cap_bytes(&self) -> u64 {
        self.tmp_bytes.unwrap_or(self.disk_bytes)
    }

    /// How the disk is capped, with the former `read_only_root = true`
    /// read as `tmpfs`.
    pub fn disk_cap(&self) -> DiskCap {
        match (self.disk, self.read_only_root) {
            (DiskCap::Auto, true) => DiskCap::Tmpfs,
            (d, _) => d,
        }
    }
}

impl Default for ContainerConfig {
    fn default() -> Self {
        Self {
            network_mode: DEFAULT_NETWORK.into(),
            runtime: None,
            allowed_runtimes: Vec::new(),
            memory_bytes: 512 * MIB,
            pids_limit: 256,
            cpu_shares: 512,
            disk: DiskCap::Auto,
            disk_bytes: DEFAULT_DISK_BYTES,
            read_only_root: false,
            tmp_bytes: None,
            cap_add: Vec::new(),
            firewall: true,
            allow_host: Vec::new(),
        }
    }
}

/// The warm pool (DESIGN 6): containers started ahead of their call, so a call
/// costs an attach instead of a container start. Each still serves one call.
/// On by default and adaptive: a function gets warm containers only once it
/// has been called, as many as it had calls in the last minute, within
/// `per_function`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most warm containers kept per function; 0 turns the pool off.
    pub per_function: usize,
    /// Warm containers on this host, across all functions; at the bound the
    /// least recently called functions' idle ones give way. 0 turns the pool off.
    pub host_max: usize,
    /// Seconds after its last call (and the refill after it) that a
    /// function's warm containers are removed.
    pub idle_secs: u64,
}

/// Warm containers per function unless configured: enough for a burst of
/// four calls at the latency of an attach.
pub const DEFAULT_POOL_PER_FUNCTION: usize = 4;

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            per_function: DEFAULT_POOL_PER_FUNCTION,
            host_max: 16,
            idle_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The Engine's API socket. `None`: `DOCKER_HOST` if it is a `unix://` URL, else `/var/run/docker.sock`.
    pub socket: Option<String>,
    /// Seconds a pull on `func create` may take before it is given up.
    pub pull_timeout_secs: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: None,
            pull_timeout_secs: 600,
        }
    }
}

/// How state is stored (`[store]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Payloads and outputs up to this size are kept inside the database
    /// and share its group commit (one fsync for many calls); larger ones
    /// are files of their own.
    pub inline_max_bytes: u64,
    /// Free space kept on the data dir's filesystem. Intake answers 507
    /// rather than eat into it, and an output that does not fit ends its
    /// call FAILED, so state changes always have room.
    pub min_free_bytes: u64,
    /// A file of this many bytes kept in the data dir (`db/hf-ballast`,
    /// sled only) while the filesystem has room, and deleted when it has
    /// less than `min_free_bytes` free: the space the database needs to
    /// open and settle calls on a disk that something else filled. Made
    /// again once the filesystem has `min_free_bytes` plus this free. 0:
    /// none.
    pub ballast_bytes: u64,
    /// `sled`: the embedded store in the data dir, for one node. `nats`:
    /// a NATS JetStream cluster (`[store.nats]`) shared by several nodes.
    pub backend: StoreBackend,
    pub nats: NatsSection,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            inline_max_bytes: 64 * 1024,
            min_free_bytes: 128 * MIB,
            ballast_bytes: 64 * MIB,
            backend: StoreBackend::Sled,
            nats: NatsSection::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    Sled,
    Nats,
}

/// The JetStream cluster of `backend = "nats"` (`[store.nats]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// Server URLs, e.g. `nats://10.0.0.1:4222`; any one of them is enough
    /// to find the rest of the cluster.
    pub servers: Vec<String>,
    /// A `.creds` file (JWT and NKey seed), if the servers require one.
    pub credentials: Option<PathBuf>,
    /// CA certificate to verify the servers' TLS certificates (TLS is then required).
    pub ca: Option<PathBuf>,
    /// Copies of every stream and bucket: 3 for a three-server cluster.
    pub replicas: usize,
    /// The most bytes the shared queue stream holds (every user's queued
    /// payloads, and the calls that run), per copy. A call that would go
    /// past it is refused with 507 and nothing stored (the stream discards
    /// new messages, never old ones), so the queue cannot fill the
    /// servers' storage that state changes need. Default 1 GiB.
    pub queue_max_bytes: u64,
}

/// Default `[store.nats] queue_max_bytes`: 1 GiB.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 1 << 30;

impl Default for NatsSection {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            credentials: None,
            ca: None,
            replicas: 3,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
        }
    }
}

/// How the daemon writes its log to stderr (`[log]`). The level is
/// `HYPERFUNCD_LOG` (default `info`, which includes the audit trail).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (for people; colours only on a terminal) or `json` (one
    /// object per line, for log shippers). `HYPERFUNCD_LOG_FORMAT` overrides it.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where function images may come from (`[images]`). A reference makes the
/// Engine connect to its registry host, so an unchecked one lets any tenant
/// probe hosts and ports the Engine can reach, loopback included.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Registry hosts (`host[:port]`, as written in image references)
    /// functions may use images from, local or pulled (a local image counts
    /// as from the host its name says). `docker.io` is Docker Hub, which a
    /// reference without a host names. A user may also keep using the image
    /// of a function of their own (`Service::check_image`).
    pub registries: Vec<String>,
    /// Admins may use any reference: any registry, and image IDs or
    /// digests alone, which are refused otherwise.
    pub admin_any: bool,
    /// Registry credentials for every user's pulls, in Docker's
    /// `config.json` format (`{"auths": {"HOST": {"auth": "base64(user:pass)"}}}`,
    /// so a file `docker login` wrote works). Read at each pull; a user's
    /// own `registry login` to a host comes first. Keep it readable only by
    /// the daemon's user.
    pub credentials_file: Option<std::path::PathBuf>,
    /// How long an image hyperfuncd pulled stays on the Engine once no
    /// function uses it (humantime, e.g. "1h"); then it is removed, unless
    /// a container uses it. Images it did not pull are never removed.
    #[serde(with = "humantime_secs")]
    pub gc_after: std::time::Duration,
}

/// `[images] gc_after`'s default: a function moved back to its previous
/// image within the hour finds it still there.
pub const DEFAULT_IMAGE_GC_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            registries: vec![crate::model::DOCKER_HUB.to_string()],
            admin_any: false,
            credentials_file: None,
            gc_after: DEFAULT_IMAGE_GC_AFTER,
        }
    }
}

impl ImagesConfig {
    /// Whether images of `registry` (normalised, as `ImageRef` gives it) may be used.
    pub fn allows(&self, registry: &str) -> bool {
        self.registries
            .iter()
            .any(|r| crate::model::normalize_registry(r) == registry)
    }
}

/// How long and how many clients the HTTPS server gives (`[http]`): every
/// connection is bounded in time at each stage and in number (DESIGN 4).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A client that has not finished its TLS handshake by then is dropped.
    #[serde(with = "humantime_secs")]
    pub handshake_timeout: std::time::Duration,
    /// From the moment a connection can take a request (after the handshake,
    /// or after the previous response) to the end of the request's headers.
    /// It is therefore also the keep-alive idle timeout: hyper counts the
    /// wait for the next request in the same timer.
    #[serde(with = "humantime_secs")]
    pub header_timeout: std::time::Duration,
    /// A request body gets this long, plus one second per `body_min_rate`
    /// bytes received; a slower body is answered 408 and the connection closed.
    #[serde(with = "humantime_secs")]
    pub body_timeout: std::time::Duration,
    /// Average rate, in bytes per second, a body must keep after `body_timeout`.
    pub body_min_rate: u64,
    /// Open connections at most. At the cap the connection idle longest
    /// (no request in flight) is closed to make room; when every connection
    /// has a request in flight, newcomers wait in the kernel's backlog. 0:
    /// the process's file descriptor limit (RLIMIT_NOFILE) minus `fd_reserve`.
    pub max_connections: u64,
    /// Open connections at most from one client address (an IPv6 client
    /// counts by its /64); more are closed at once.
    pub max_connections_per_address: u64,
    /// Connections that long requests (a log follow, `/sync`, an output
    /// `/wait`) may never take, so that short requests (the admin's
    /// management requests, `/healthz`) always find one: at most
    /// `max_connections - reserved_connections` long requests run at once
    /// (the reserve is at most half the cap); more are answered 503.
    pub reserved_connections: u64,
    /// Longest a single long request holds: a log follow ends (the CLI
    /// reconnects), `/sync` answers 201/202 with the call id as an output
    /// `/wait` does.
    #[serde(with = "humantime_secs")]
    pub max_wait: std::time::Duration,
    /// Request bodies being received are kept in memory up to
    /// `body_memory_bytes` in all; what would go beyond is written to an
    /// unnamed temporary file in the data dir until the body is complete,
    /// so slow uploads cost disk, not memory.
    pub body_memory_bytes: u64,
    /// Failed authentications one client address may make per minute;
    /// past it, requests with a key from that address answer 429.
    pub auth_failures_per_minute: u32,
    /// File descriptors kept for everything but client connections (the
    /// database, blob files, the Engine's socket) when `max_connections` is 0.
    pub fd_reserve: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: std::time::Duration::from_secs(10),
            header_timeout: std::time::Duration::from_secs(30),
            body_timeout: std::time::Duration::from_secs(30),
            body_min_rate: 16 * 1024,
            max_connections: 0,
            max_connections_per_address: 64,
            reserved_connections: 32,
            max_wait: std::time::Duration::from_secs(15 * 60),
            body_memory_bytes: 64 * 1024 * 1024,
            auth_failures_per_minute: 60,
            fd_reserve: 128,
        }
    }
}

impl HttpConfig {
    /// The connection cap actually used, from the configured value or the fd limit.
    pub fn connection_cap(&self) -> usize {
        if self.max_connections > 0 {
            return usize::try_from(self.max_connections).unwrap_or(usize::MAX);
        }
        let limit = nofile_limit();
        // A small limit still leaves half of it to clients and half to the
        // daemon's own files and Engine connections.
        let cap = limit.saturating_sub(self.fd_reserve).max(limit / 2).max(1);
        usize::try_from(cap).unwrap_or(usize::MAX)
    }

    /// How many long requests may run at once: the cap less the reserve,
    /// which is at most half the cap.
    pub fn long_request_cap(&self) -> usize {
        let cap = self.connection_cap();
        let reserve = usize::try_from(self.reserved_connections)
            .unwrap_or(usize::MAX)
            .min(cap / 2);
        (cap - reserve).max(1)
    }
}

/// The soft RLIMIT_NOFILE of this process (1024 if it cannot be read).
pub fn nofile_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; RLIMIT_NOFILE is valid.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0;
    if !ok || rl.rlim_cur == libc::RLIM_INFINITY {
        return if ok { 1 << 20 } else { 1024 };
    }
    rl.rlim_cur
}

/// A `Duration` written as a humantime string ("7d", "12h 30m").
mod humantime_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

/// An optional `Duration` written as a humantime string; `"none"` is `None`
/// (so a field whose default is a duration can be turned off).
mod humantime_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&humantime::format_duration(*d).to_string()),
            // Not `serialize_none`: TOML would omit the key, which reads back as the default.
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "none" {
            return Ok(None);
        }
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // The literal is a valid socket address; a test below parses it.
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 8443))),
            data_dir: None,
            public_host: None,
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            scheduler: SchedulerConfig::default(),
            container: ContainerConfig::default(),
            pool: PoolConfig::default(),
            docker: DockerConfig::default(),
            store: StoreSection::default(),
            http: HttpConfig::default(),
            images: ImagesConfig::default(),
            log: LogConfig::default(),
            webhooks: WebhooksConfig::default(),
        }
    }
}

impl Config {
    /// Loads `explicit` if given, else `HYPERFUNCD_CONFIG`, else the system file
    /// if present, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os("HYPERFUNCD_CONFIG").map(PathBuf::from);
        let path = match explicit.map(Path::to_path_buf).or(from_env) {
            Some(p) => Some(p),
            None => Some(PathBuf::from(SYSTEM_CONFIG_PATH)).filter(|p| p.exists()),
        };
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path,
                    message: e.message().to_string(),
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let w = &self.webhooks;
        w.private_networks().map_err(ConfigError::Invalid)?;
        if w.min_backoff.is_zero()
            || w.max_backoff < w.min_backoff
            || w.connect_timeout.is_zero()
            || w.response_timeout.is_zero()
            || w.max_in_flight == 0
            || w.max_per_host == 0
        {
            return Err(ConfigError::Invalid(
                "webhooks: min_backoff, timeouts, max_in_flight and max_per_host must be above zero, and max_backoff at least min_backoff".into(),
            ));
        }
        if self.tls.disable && !self.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(
                "tls.disable is only allowed when listen is a loopback address".into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key must be set together".into(),
            ));
        }
        let h = &self.http;
        if h.handshake_timeout.is_zero() || h.header_timeout.is_zero() || h.body_min_rate == 0 {
            return Err(ConfigError::Invalid(
                "http timeouts and body_min_rate must be above zero".into(),
            ));
        }
        if h.max_wait.is_zero()
            || h.max_connections_per_address == 0
            || h.auth_failures_per_minute == 0
        {
            return Err(ConfigError::Invalid(
                "http.max_wait, max_connections_per_address and auth_failures_per_minute must be above zero".into(),
            ));
        }
        let l = &self.limits;
        if l.max_memory_bytes
            .is_some_and(|m| m < self.container.memory_bytes)
        {
            return Err(ConfigError::Invalid(
                "container.memory_bytes is above limits.max_memory_bytes".into(),
            ));
        }
        if l.max_cpus.is_some_and(|c| !(c >= 0.01 && c.is_finite())) {
            return Err(ConfigError::Invalid(
                "limits.max_cpus must be at least 0.01".into(),
            ));
        }
        if l.max_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::Invalid(
                "limits.max_timeout must be above zero".into(),
            ));
        }
        if let Some(r) = &self.container.runtime {
            crate::model::validate_runtime_name(r)
                .map_err(|e| ConfigError::Invalid(format!("container.runtime: {e}")))?;
        }
        for r in &self.container.allowed_runtimes {
            crate::model::validate_runtime_name(r)
                .map_err(|e| ConfigError::Invalid(format!("container.allowed_runtimes: {e}")))?;
        }
        let c = &self.container;
        if !(2..=262_144).contains(&c.cpu_shares) {
            return Err(ConfigError::Invalid(
                "container.cpu_shares must be between 2 and 262144".into(),
            ));
        }
        if c.read_only_root && matches!(c.disk, DiskCap::StorageOpt | DiskCap::Off) {
            return Err(ConfigError::Invalid(
                "container.read_only_root = true asks for a read-only root, which container.disk \
                 does not give: set only container.disk"
                    .into(),
            ));
        }
        if c.tmp_bytes.is_some_and(|t| t != c.disk_bytes) && c.disk_bytes != DEFAULT_DISK_BYTES {
            return Err(ConfigError::Invalid(
                "container.tmp_bytes is the former name of container.disk_bytes: set only disk_bytes"
                    .into(),
            ));
        }
        let disk = c.disk_cap_bytes();
        if c.disk_cap() != DiskCap::Off && disk == 0 {
            return Err(ConfigError::Invalid(
                "container.disk_bytes must be above zero (container.disk = \"off\" lifts the cap)"
                    .into(),
            ));
        }
        // A tmpfs is memory: a cap at or above the memory limit is never
        // reached, the call is killed for its memory first.
        if matches!(c.disk_cap(), DiskCap::Auto | DiskCap::Tmpfs) && disk >= c.memory_bytes {
            return Err(ConfigError::Invalid(format!(
                "container.disk_bytes ({disk}) must be below container.memory_bytes ({}): \
                 a call's /tmp is a tmpfs, which counts against its memory limit \
                 (set disk_bytes lower, or disk = \"off\" for no cap)",
                c.memory_bytes
            )));
        }
        let s = &self.scheduler;
        if s.default_max_concurrency == 0
            || s.host_max_running == 0
            || s.default_max_queued == 0
            || s.default_max_queued_bytes == 0
            || s.default_max_functions == 0
            || s.default_rate == 0
        {
            return Err(ConfigError::Invalid(
                "scheduler limits must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The data directory actually used.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        if is_root() {
            return PathBuf::from("/var/lib/hyperfuncd");
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("hyperfuncd")
    }

    /// The Engine socket path actually used.
    pub fn docker_socket(&self) -> String {
        if let Some(s) = &self.docker.socket {
            return s.trim_start_matches("unix://").to_string();
        }
        match std::env::var("DOCKER_HOST") {
            Ok(h) if h.starts_with("unix://") => h.trim_start_matches("unix://").to_string(),
            _ => "/var/run/docker.sock".to_string(),
        }
    }

    /// Host name used in call URLs.
    pub fn public_host(&self) -> String {
        if let Some(h) = &self.public_host {
            return h.clone();
        }
        let ip = self.listen.ip();
        if ip.is_unspecified() {
            gethostname::gethostname().to_string_lossy().into_owned()
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_host_entries_parse_and_print_back() {
        for (text, shown) in [
            ("10.0.0.5:5432", "10.0.0.5/32:5432"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.168.1.0/24:53", "192.168.1.0/24:53"),
            ("169.254.169.254", "169.254.169.254/32"),
            ("fd00::1", "fd00::1/128"),
            ("[fd00::1]:443", "[fd00::1/128]:443"),
            ("[fd00::/64]:443", "[fd00::/64]:443"),
        ] {
            let a: HostAllow = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(a.to_string(), shown);
            assert_eq!(shown.parse::<HostAllow>(), Ok(a));
        }
        for bad in [
            "",
            "host:5432",
            "10.0.0.5:0",
            "10.0.0.5:99999",
            "10.0.0.5/33",
            "fd00::1:443x",
            "[fd00::1]",
            "[fd00::1]:",
            "10.0.0.5:80:81",
            "::1/129",
        ] {
            assert!(bad.parse::<HostAllow>().is_err(), "{bad}");
        }
        let c: Config = toml::from_str("[container]\nallow_host = [\"10.0.0.5:5432\"]").unwrap();
        assert_eq!(c.container.allow_host[0].port, Some(5432));
        assert!(c.container.firewall);
        assert!(toml::from_str::<Config>("[container]\nallow_host = [\"x\"]").is_err());
    }

    #[test]
    fn default_listen_parses() {
        assert!(DEFAULT_LISTEN.parse::<SocketAddr>().is_ok());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("listne = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.message().contains("listne"), "{err}");
        let err = toml::from_str::<Config>("[limits]\nmax_stdin = 3").unwrap_err();
        assert!(err.message().contains("max_stdin"), "{err}");
    }

    #[test]
    fn reference_config_parses_and_matches_defaults() {
        let text = include_str!("../config/hyperfuncd.toml");
        let parsed: Config = toml::from_str(text).expect("reference config parses");
        let defaults = Config::default();
        assert_eq!(
            serde_json::to_value(&parsed).ok(),
            serde_json::to_value(&defaults).ok(),
            "config/hyperfuncd.toml must show the embedded defaults"
        );
    }

    #[test]
    fn connection_cap_follows_the_fd_limit() {
        let mut h = HttpConfig::default();
        let limit = nofile_limit();
        assert_eq!(
            h.connection_cap() as u64,
            limit.saturating_sub(128).max(limit / 2).max(1)
        );
        h.max_connections = 7;
        assert_eq!(h.connection_cap(), 7);
    }

    #[test]
    fn ceilings_parse_and_bound_the_default_memory() {
        let c: Config = toml::from_str(
            "[limits]\nmax_memory_bytes = 1073741824\nmax_cpus = 1.5\nmax_timeout = \"5m\"",
        )
        .unwrap();
        assert_eq!(
            c.limits.max_timeout,
            Some(std::time::Duration::from_secs(300))
        );
        assert!(c.validate().is_ok());
        let c: Config = toml::from_str("[limits]\nmax_memory_bytes = 1048576").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn container_defaults_and_what_they_refuse() {
        let c = ContainerConfig::default();
        assert_eq!(c.network_mode, DEFAULT_NETWORK);
        assert_eq!(c.cpu_shares, 512);
        assert_eq!(c.disk_cap(), DiskCap::Auto);
        assert_eq!(c.disk_cap_bytes(), 64 * MIB);
        for bad in [
            "[container]\ncpu_shares = 1",
            "[container]\ncpu_shares = 262145",
            "[container]\ndisk_bytes = 0",
            "[container]\nread_only_root = true\ntmp_bytes = 0",
            "[container]\ndisk = \"storage-opt\"\nread_only_root = true",
            "[container]\ntmp_bytes = 1048576\ndisk_bytes = 2097152",
            // A tmpfs is memory: the cap must be under the memory limit.
            "[container]\ndisk_bytes = 536870912",
            "[container]\ndisk = \"tmpfs\"\nmemory_bytes = 33554432",
            "[container]\ndisk = \"bogus\"",
        ] {
            let c: Result<Config, _> = toml::from_str(bad);
            assert!(c.map_or(true, |c| c.validate().is_err()), "{bad}");
        }
        // The warm pool works with a read-only root (its init is bind-mounted),
        // and the former keys still read as they did.
        for (good, cap, bytes) in [
            (
                "[container]\nread_only_root = true\n[pool]\nper_function = 1",
                DiskCap::Tmpfs,
                64 * MIB,
            ),
            (
                "[container]\nread_only_root = true\ntmp_bytes = 8388608",
                DiskCap::Tmpfs,
                8 * MIB,
            ),
            (
                "[container]\ndisk = \"storage-opt\"\ndisk_bytes = 1073741824",
                DiskCap::StorageOpt,
                1 << 30,
            ),
            (
                "[container]\ndisk = \"off\"\ndisk_bytes = 0",
                DiskCap::Off,
                0,
            ),
        ] {
            let c: Config = toml::from_str(good).unwrap();
            assert!(c.validate().is_ok(), "{good}");
            assert_eq!(
                (c.container.disk_cap(), c.container.disk_cap_bytes()),
                (cap, bytes),
                "{good}"
            );
        }
    }

    #[test]
    fn default_ceilings_leave_the_host_room() {
        let l = LimitsConfig::default();
        assert_eq!(l.max_timeout, Some(DEFAULT_MAX_TIMEOUT));
        // Half of the host, never below the default a function gets.
        assert_eq!(
            l.memory_ceiling(Some(25_276_194_816), 512 * MIB),
            Some(12_638_097_408)
        );
        assert_eq!(
            l.memory_ceiling(Some(512 * MIB), 512 * MIB),
            Some(512 * MIB)
        );
        assert_eq!(l.memory_ceiling(None, 512 * MIB), None);
        assert_eq!(l.cpus_ceiling(Some(2.0)), Some(1.0));
        assert_eq!(l.cpus_ceiling(None), None);
        // Configured ceilings win, whatever the host.
        let c: Config = toml::from_str(
            "[limits]\nmax_memory_bytes = 1073741824\nmax_cpus = 3.0\nmax_timeout = \"none\"",
        )
        .unwrap();
        assert_eq!(c.limits.memory_ceiling(Some(100), 0), Some(1 << 30));
        assert_eq!(c.limits.cpus_ceiling(Some(2.0)), Some(3.0));
        assert_eq!(c.limits.max_timeout, None);
        // "none" survives a round trip through TOML.
        let text = toml::to_string(&c).unwrap();
        let again: Config = toml::from_str(&text).unwrap();
        assert_eq!(again.limits.max_timeout, None, "{text}");
    }

    #[test]
    fn allowed_runtimes_are_runtime_names() {
        assert!(ContainerConfig::default().allowed_runtimes.is_empty());
        let c: Config =
            toml::from_str("[container]\nallowed_runtimes = [\"runc\", \"runsc\"]").unwrap();
        assert!(c.validate().is_ok());
        let c: Config = toml::from_str("[container]\nallowed_runtimes = [\"../x\"]").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn plain_http_only_on_loopback() {
        let mut c = Config::default();
        c.tls.disable = true;
        assert!(c.validate().is_err());
        c.listen = "127.0.0.1:8080".parse().unwrap();
        assert!(c.validate().is_ok());
    }
}
