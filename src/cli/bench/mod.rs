//! `hyperfuncd bench` (DESIGN 6): hyperfuncd against raw `docker run --rm -i`,
//! measured in one run on the same Engine, image and network mode, printed
//! as one table on stdout (progress goes to stderr).
//!
//! With `--cluster` it measures instead one sled daemon against two nodes
//! on a three-server NATS JetStream cluster it starts itself (`cluster.rs`).
//!
//! It owns everything it measures: private daemons started from this very
//! executable on a temp data dir and a loopback port, with `--cluster` the
//! `nats-server`s on loopback ports with their stores in that dir, raw
//! `docker run` containers labelled with this run's id, and the temp dir
//! itself. It must never touch the user's own daemon or data dir, never
//! pull an image, and never leave a container, a process or a temp dir
//! behind, whether it ends in success, error or Ctrl-C. Unlike the rest of
//! the CLI it runs the `docker` CLI: the baseline is `docker run` itself.

mod cluster;
mod daemon;
mod raw;
mod report;

use super::client::Client;
use crate::api::types::{
    CallAccepted, CallView, FunctionCreate, FunctionView, Health, StatusView, UserCreate, UserView,
};
use crate::cli::Profile;
use crate::runtime::{LABEL_CALL, LABEL_INSTANCE, LABEL_OWNER, LABEL_POOL};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use cluster::*;
use daemon::*;
use raw::*;
use report::*;
use std::fmt::Write as _;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;

/// The image built when `--image` is not given.
pub const DEFAULT_IMAGE: &str = "hyperfuncd-bench/busybox:latest";
/// Label on the raw `docker run` containers, valued with this run's id, so
/// the cleanup finds any that a timeout or Ctrl-C left behind.
const LABEL_BENCH: &str = "io.hyperfuncd.bench";
/// What every call sends on STDIN and must get back from `cat`.
const PAYLOAD: &[u8] = b"hyperfuncd bench payload\n";
/// Payload size of the accepted-calls/s row and the queue top-up.
const ACCEPT_PAYLOAD_BYTES: usize = 1024;
/// Untimed rounds before the timed latency rounds: the first calls pay for
/// cold page caches and lazily set-up state on every side.
const WARMUP: usize = 2;
/// The pool's default host-wide bound (`[pool] host_max`).
const POOL_HOST_MAX: usize = 16;
/// Longest one call (sync, or accepted then waited for) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// One `/wait` long-poll holds up to 60 s on the server.
const WAIT_REQUEST_TIMEOUT: Duration = Duration::from_secs(75);
/// Longest one `docker` CLI command other than `run`/`build` may take.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
/// A daemon must answer `/healthz` this soon after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// A daemon must exit this soon after SIGTERM, else it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a warm pool to be full again.
const POOL_FILL_TIMEOUT: Duration = Duration::from_secs(60);
/// Most users of the shared-host rows (`--users`).
const MAX_USERS: usize = 10;
/// Longest `func rm --force` may take before the bench reports it as failed.
const RM_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Image to run; it must contain `cat` and `sleep` and be present locally
    /// (never pulled). Default: build hyperfuncd-bench/busybox:latest from the
    /// host's static busybox if it is absent
    #[arg(long)]
    pub image: Option<String>,
    /// Network mode of every container, hyperfuncd's and docker run's alike.
    /// Default: what a daemon on its defaults gives calls, its own bridge
    /// network (`[container] network_mode`), so the bench measures what
    /// users run; `none` leaves the network out
    #[arg(long, default_value = crate::config::DEFAULT_NETWORK)]
    pub network: String,
    /// Sequential sync calls per latency row
    #[arg(long, default_value_t = 20)]
    pub calls: usize,
    /// Warm containers per function for the warm rows (`[pool] per_function`)
    #[arg(long, default_value_t = 8)]
    pub pool: usize,
    /// Calls per concurrency level in the finished-calls/s rows
    #[arg(long, default_value_t = 24)]
    pub batch: usize,
    /// Concurrency levels of the finished-calls/s rows
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub concurrency: Vec<usize>,
    /// Users sharing the host in the extra finished-calls/s rows: the bench
    /// adds them (default quota), each with its own bench-cat, and spreads
    /// each level's calls evenly over them (c=8 and 4 users: 2 of each at a
    /// time). 0 skips these rows
    #[arg(long, default_value_t = 4)]
    pub users: usize,
    /// Async calls submitted for the accepted-calls/s row (a few seconds'
    /// worth, so the first requests' TLS handshakes and the first call's
    /// container start do not weigh on the rate)
    #[arg(long, default_value_t = 10000)]
    pub accept: usize,
    /// Concurrent submitters (one keep-alive HTTPS client) for the accepted-calls/s row
    /// (and `--cluster`'s accept runs)
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Calls queued (the accepted ones count) when the daemon's RSS is read
    #[arg(long, default_value_t = 20000)]
    pub queued: usize,
    /// OCI runtime (e.g. runsc) for extra sync latency rows: cold and warm
    /// calls of a function with this runtime against `docker run --runtime`
    /// of the same image. The Engine must have it registered
    #[arg(long)]
    pub runtime: Option<String>,
    /// Instead of the default rows: one sled daemon against two nodes on a
    /// three-server NATS JetStream cluster (R3) that the bench starts on
    /// loopback; finished calls/s at each `--concurrency` (with docker run)
    /// and durable accepts/s for `--seconds`. Needs nats-server
    #[arg(long)]
    pub cluster: bool,
    /// The nats-server binary for `--cluster` (default: nats-server on PATH)
    #[arg(long, value_name = "PATH", requires = "cluster")]
    pub nats_server: Option<PathBuf>,
    /// Seconds each durable-accepts run of `--cluster` lasts
    #[arg(long, default_value_t = 10, requires = "cluster")]
    pub seconds: u64,
    /// The servers' JetStream `sync_interval` for `--cluster`: `always`
    /// (fsync before every acknowledgement: a 202 survives a power cut of
    /// every server) or an interval such as `2m` (NATS's default)
    #[arg(
        long,
        default_value = "always",
        value_name = "always|DURATION",
        requires = "cluster"
    )]
    pub nats_sync: String,
}

impl BenchArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if self.calls == 0 || self.batch == 0 || self.clients == 0 {
            bail!("--calls, --batch and --clients must be at least 1");
        }
        if self.pool == 0 {
            bail!("--pool must be at least 1: the warm rows need a pool");
        }
        if self.concurrency.is_empty() || self.concurrency.iter().any(|&c| c == 0 || c > 10) {
            bail!("--concurrency takes levels from 1 to 10 (the admin user's default quota)");
        }
        if self.users == 1 || self.users > MAX_USERS {
            bail!("--users takes 0 (no rows) or 2 to {MAX_USERS}: one user is the admin's rows");
        }
        if self.network.is_empty() {
            bail!("--network must name a network mode, e.g. none or bridge");
        }
        if let Some(r) = &self.runtime {
            crate::model::validate_runtime_name(r).map_err(|e| anyhow!("--runtime: {e}"))?;
        }
        if self.cluster && self.runtime.is_some() {
            bail!("--runtime and --cluster measure different rows: give one of them");
        }
        if self.cluster
            && self.nats_sync != "always"
            && humantime::parse_duration(&self.nats_sync).is_err()
        {
            bail!(
                "--nats-sync {:?}: give always or a duration such as 2m",
                self.nats_sync
            );
        }
        if self.cluster && self.seconds == 0 {
            bail!("--seconds must be at least 1");
        }
        Ok(())
    }
}

/// Runs the benchmark and prints its table. Ctrl-C ends it through the same
/// cleanup as an error.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.validate()?;
    tokio::select! {
        r = async {
            if args.cluster {
                bench_cluster(&args).await
            } else {
                bench(&args).await
            }
        } => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

/// What every mode needs first.
struct Prepared {
    /// Removes the raw `docker run` leftovers of this run. Dropped before
    /// `tmp` (fields drop in order) and after the daemons, which every mode
    /// starts later.
    _raw_cleanup: LabelCleanup,
    tmp: TempDir,
    /// The Engine's version.
    engine: String,
    /// The image (built if it is the default and absent).
    image: String,
    /// The baseline, labelled with this run's id.
    raw: RawDocker,
}

async fn prepare(args: &BenchArgs) -> anyhow::Result<Prepared> {
    let engine = docker(
        &["version", "--format", "{{.Server.Version}}"],
        DOCKER_TIMEOUT,
    )
    .await
    .context("the Docker Engine does not answer")?;
    let tmp = TempDir::new()?;
    let image = match &args.image {
        Some(i) => {
            docker(
                &["image", "inspect", "--format", "{{.Id}}", i],
                DOCKER_TIMEOUT,
            )
            .await
            .with_context(|| format!("image {i} is not present locally (bench never pulls)"))?;
            i.clone()
        }
        None => default_image(&tmp.0).await?,
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    Ok(Prepared {
        _raw_cleanup: LabelCleanup(format!("{LABEL_BENCH}={run_id}")),
        tmp,
        engine: engine.trim().to_string(),
        raw: RawDocker {
            image: image.clone(),
            network: args.network.clone(),
            label: format!("{LABEL_BENCH}={run_id}"),
            runtime: None,
        },
        image,
    })
}

async fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    // Drops after the daemons (declared later), so raw leftovers go too.
    let p = prepare(args).await?;
    let (tmp, raw, image) = (&p.tmp, &p.raw, p.image.clone());
    let payload = Bytes::from_static(PAYLOAD);
    let mut report = Report {
        image: image.clone(),
        engine: p.engine.clone(),
        ..Report::default()
    };

    // Both daemons run side by side so that docker run, cold and warm calls
    // take turns: load from elsewhere on the host weighs on all three alike.
    progress(&format!(
        "starting two private daemons: cold (no pool) and warm (pool of {})",
        args.pool
    ));
    let mut cold = Daemon::start(&tmp.0, "cold", &args.network, 0, 0).await?;
    report.rss_fresh = cold.rss_mib()?;
    // Room for full pools of the main function, the `--runtime` rows' one
    // and each user's.
    let pooled = 2 + args.users;
    let mut warm = Daemon::start(&tmp.0, "warm", &args.network, args.pool, pooled).await?;
    let cold_f = cold.create_function("bench-cat", &image, &["cat"]).await?;
    let warm_f = warm.create_function("bench-cat", &image, &["cat"]).await?;
    warm.prime(&warm_f, args.pool, &payload).await?;

    progress(&format!(
        "sync latency: {} rounds (+{WARMUP} warm-up) of docker run, cold, warm",
        args.calls
    ));
    let mut samples: [Vec<Duration>; 3] = Default::default();
    let since = SystemTime::now();
    for round in 0..WARMUP + args.calls {
        let took = [
            timed(raw.call(&payload)).await?,
            timed(cold.sync_call(&cold_f, &payload)).await?,
            timed(warm.sync_call(&warm_f, &payload)).await?,
        ];
        // Making the used container's successor must not weigh on the next
        // round's calls, so the pool is full again before it starts.
        warm.wait_pool_full(&warm_f, args.pool).await;
        if round >= WARMUP {
            for (s, t) in samples.iter_mut().zip(took) {
                s.push(t);
            }
        }
    }
    report
        .warm
        .misses
        .push(warm.cold_starts(since, SystemTime::now()).await?);
    report.raw.latency = Latency::of(&samples[0]);
    report.cold.latency = Latency::of(&samples[1]);
    report.warm.latency = Latency::of(&samples[2]);
    if let Some(runtime) = &args.runtime {
        let rows = runtime_rows(args, runtime, raw, [&cold, &warm], &payload).await?;
        report.runtime = Some(rows);
    }

    // The users of the shared-host rows, on both daemons; their pools made
    // now, after the latency rounds, so that these weigh on nothing else.
    let (mut cold_users, mut warm_users) = (Vec::new(), Vec::new());
    if args.users > 0 {
        progress(&format!(
            "adding {} users, each with its own bench-cat, to both daemons",
            args.users
        ));
        // Each user's share of a level: what its pool is sized by.
        let share = args.batch.div_ceil(args.users).min(args.pool);
        for u in 1..=args.users {
            let owner = format!("bench-{u}");
            let cmd = &["cat"];
            cold_users.push(
                cold.add_user_function(&owner, "bench-cat", &image, cmd)
                    .await?,
            );
            let f = warm
                .add_user_function(&owner, "bench-cat", &image, cmd)
                .await?;
            warm.prime(&f, share, &payload).await?;
            warm_users.push(f);
        }
    }

    for &c in &args.concurrency {
        let users = if args.users > 0 {
            format!(", cold and warm with {} users", args.users)
        } else {
            String::new()
        };
        progress(&format!(
            "finished calls/s, {c} at a time: {} calls each of docker run, cold, warm{users}",
            args.batch
        ));
        let wall = parallel(args.batch, c, |_| raw.call(&payload)).await?;
        report.raw.throughput.push(rate(args.batch, wall));
        let one = (std::slice::from_ref(&cold_f), std::slice::from_ref(&warm_f));
        daemon_batch(&cold, one.0, &payload, args.batch, c, &mut report.cold).await?;
        daemon_batch(&warm, one.1, &payload, args.batch, c, &mut report.warm).await?;
        if args.users > 0 {
            let (b, p) = (args.batch, &payload);
            daemon_batch(&cold, &cold_users, p, b, c, &mut report.cold_users).await?;
            daemon_batch(&warm, &warm_users, p, b, c, &mut report.warm_users).await?;
        }
    }
    report.rss_after = cold.rss_mib()?;
    report.leftovers.push(("warm", warm.stop()?));

    queue_phase(args, &cold, &image, &payload, &mut report).await?;
    report.leftovers.push(("cold", cold.stop()?));

    print!("{}", report.render(args));
    Ok(())
}

/// `n` async calls to `d`, `c` at a time, waiting for each output: their
/// calls/s and the daemon's CPU time. The calls are spread evenly over the
/// functions `fs` (one per user, see `spread`). A pooled daemon's CPU
/// includes making the containers that replace the used ones (read once
/// each function's pool is full again).
async fn daemon_batch(
    d: &Daemon,
    fs: &[Function],
    payload: &Bytes,
    n: usize,
    c: usize,
    row: &mut Row,
) -> anyhow::Result<()> {
    let since = SystemTime::now();
    let before = d.cpu_ticks()?;
    let wall = spread(n, c, fs.len(), |u| d.async_call(&fs[u], payload)).await?;
    row.throughput.push(rate(n, wall));
    if d.pool > 0 {
        row.misses
            .push(d.cold_starts(since, SystemTime::now()).await?);
        // Each function's pool is sized by its calls of the last minute,
        // at least this batch's share of them.
        for f in fs {
            d.wait_pool_full(f, n / fs.len()).await;
        }
    }
    row.cpu_ticks += d.cpu_ticks()?.saturating_sub(before);
    row.finished += n;
    Ok(())
}

/// Accepted calls/s, RSS with calls queued, and `func rm --force` of them.
/// A user with a quota of 1 runs `sleep 600`: its first call holds the one
/// slot, so every later call stays queued.
async fn queue_phase(
    args: &BenchArgs,
    d: &Daemon,
    image: &str,
    payload: &Bytes,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (bench_user, f) = d.add_queue_holder("bench", "bench-queue", image).await?;
    let first = d.submit(&f, payload).await?;
    let payload = &Bytes::from(vec![b'x'; ACCEPT_PAYLOAD_BYTES]);
    wait_running(&bench_user, &first).await?;

    progress(&format!(
        "hyperfuncd: {} async calls accepted by {} clients over keep-alive",
        args.accept, args.clients
    ));
    let f = &f;
    let wall = parallel(args.accept, args.clients, |_| async move {
        d.submit(f, payload).await.map(drop)
    })
    .await?;
    report.accept = Some((args.accept, rate(args.accept, wall)));
    let more = args.queued.saturating_sub(args.accept);
    if more > 0 {
        progress(&format!("hyperfuncd: queueing {more} more calls"));
        let done = &AtomicUsize::new(0);
        let wall = parallel(more, args.clients, |_| async move {
            d.submit(f, payload).await?;
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 5000 == 0 {
                progress(&format!("hyperfuncd: {n} of {more} queued"));
            }
            Ok(())
        })
        .await?;
        report.topup = Some((more, rate(more, wall)));
    }
    let status: StatusView = bench_user
        .get_json("/v1/functions/bench-queue/status")
        .await?;
    report.queued = status.pending;
    report.rss_queued = d.rss_mib()?;

    progress(&format!(
        "hyperfuncd: func rm --force with {} calls queued",
        status.pending
    ));
    let start = Instant::now();
    let removed = tokio::time::timeout(
        RM_TIMEOUT,
        bench_user.delete("/v1/functions/bench-queue?force=true"),
    )
    .await;
    report.force_rm = Some(match removed {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(format!(
            "failed after {:.1} s: {e:#}",
            start.elapsed().as_secs_f64()
        )),
        Err(_) => Err(format!("no answer within {} s", RM_TIMEOUT.as_secs())),
    });
    Ok(())
}

async fn wait_running(client: &Client, id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let call: CallView = client.get_json(&format!("/v1/calls/{id}")).await?;
        match call.state.as_str() {
            "RUNNING" => return Ok(()),
            "CALL" | "PENDING" if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            "CALL" | "PENDING" => bail!("the first queue call did not start within 60 s"),
            other => bail!(
                "the first queue call ended {other}: {}",
                call.message.unwrap_or_default()
            ),
        }
    }
}

// ---- measuring ----

/// p50 and p95 of one way of calling.
#[derive(Debug, Default, Clone, Copy)]
struct Latency {
    p50: Duration,
    p95: Duration,
}

impl Latency {
    fn of(samples: &[Duration]) -> Latency {
        Latency {
            p50: percentile(samples, 50.0).unwrap_or_default(),
            p95: percentile(samples, 95.0).unwrap_or_default(),
        }
    }
}

async fn timed(
    call: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    call.await?;
    Ok(start.elapsed())
}

/// Nearest-rank percentile (the smallest sample with at least `p`% of the
/// samples at or below it); `None` without samples.
fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Runs `total` calls with `workers` at a time; the wall time until all ended.
async fn parallel<F, Fut>(total: usize, workers: usize, call: F) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let next = AtomicUsize::new(0);
    let (next, call) = (&next, &call);
    let start = Instant::now();
    // The first error ends the run; the other workers' futures are dropped.
    futures_util::future::try_join_all((0..workers.min(total)).map(|_| async move {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= total {
                return Ok::<(), anyhow::Error>(());
            }
            call(i).await?;
        }
    }))
    .await?;
    Ok(start.elapsed())
}

/// Runs `total` calls spread evenly over `users` (`call(u)` calls user
/// `u`'s function), `workers` at a time; the wall time until all ended.
/// User `u` has `total / users` calls (the first `total % users` one more);
/// worker `w` calls user `w % users` while it has calls left, then helps
/// the next ones, so at `workers` = k × `users` each user has k calls
/// running at a time until the last calls of the batch.
async fn spread<F, Fut>(
    total: usize,
    workers: usize,
    users: usize,
    call: F,
) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let users = users.max(1);
    let left: Vec<AtomicUsize> = (0..users)
        .map(|u| AtomicUsize::new(total / users + usize::from(u < total % users)))
        .collect();
    let (left, call) = (&left, &call);
    // Takes one of user `u`'s calls, if it has any left.
    let take = |u: usize| {
        left[u]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    };
    let start = Instant::now();
    futures_util::future::try_join_all((0..workers.min(total)).map(|w| async move {
        loop {
            let Some(u) = (0..users).map(|i| (w + i) % users).find(|&u| take(u)) else {
                return Ok::<(), anyhow::Error>(());
            };
            call(u).await?;
        }
    }))
    .await?;
    Ok(start.elapsed())
}

fn rate(calls: usize, wall: Duration) -> f64 {
    calls as f64 / wall.as_secs_f64().max(1e-9)
}

fn ticks_to_ms(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions; a failure answers -1, handled below.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_sec = if per_sec > 0 { per_sec as f64 } else { 100.0 };
    ticks as f64 * 1000.0 / per_sec
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// The sync latency rows under `--runtime`, measured as the main ones (the
/// three take turns, the pool is full before each round) with a function of
/// that runtime on each daemon, removed afterwards so that its idle warm
/// containers weigh on nothing else.
async fn runtime_rows(
    args: &BenchArgs,
    runtime: &str,
    raw: &RawDocker,
    [cold, warm]: [&Daemon; 2],
    payload: &Bytes,
) -> anyhow::Result<RuntimeRows> {
    let raw = RawDocker {
        image: raw.image.clone(),
        network: raw.network.clone(),
        label: raw.label.clone(),
        runtime: Some(runtime.to_string()),
    };
    let name = "bench-cat-runtime";
    let cold_f = cold
        .create_function_under(name, &raw.image, &["cat"], Some(runtime))
        .await?;
    let warm_f = warm
        .create_function_under(name, &raw.image, &["cat"], Some(runtime))
        .await?;
    warm.prime(&warm_f, args.pool, payload).await?;
    progress(&format!(
        "sync latency under {runtime}: {} rounds (+{WARMUP} warm-up) of docker run, cold, warm",
        args.calls
    ));
    let mut samples: [Vec<Duration>; 3] = Default::default();
    let since = SystemTime::now();
    for round in 0..WARMUP + args.calls {
        let took = [
            timed(raw.call(payload)).await?,
            timed(cold.sync_call(&cold_f, payload)).await?,
            timed(warm.sync_call(&warm_f, payload)).await?,
        ];
        warm.wait_pool_full(&warm_f, args.pool).await;
        if round >= WARMUP {
            for (s, t) in samples.iter_mut().zip(took) {
                s.push(t);
            }
        }
    }
    let misses = warm.cold_starts(since, SystemTime::now()).await?;
    for d in [cold, warm] {
        d.admin
            .delete(&format!("/v1/functions/{name}"))
            .await
            .with_context(|| format!("cannot remove function {name}"))?;
    }
    Ok(RuntimeRows {
        runtime: runtime.to_string(),
        raw: Latency::of(&samples[0]),
        cold: Latency::of(&samples[1]),
        warm: Latency::of(&samples[2]),
        misses,
    })
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]);
    s.replace(['\n', '\r'], " ")
}

/// A private directory under the system temp dir, removed with everything in it.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!(
            "hyperfuncd-bench-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let twenty = ms(&(1..=20).rev().collect::<Vec<_>>());
        assert_eq!(percentile(&twenty, 50.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&twenty, 95.0), Some(Duration::from_millis(19)));
        assert_eq!(percentile(&twenty, 100.0), Some(Duration::from_millis(20)));
        assert_eq!(percentile(&ms(&[7]), 95.0), Some(Duration::from_millis(7)));
        assert_eq!(
            percentile(&ms(&[3, 1]), 0.0),
            Some(Duration::from_millis(1))
        );
        assert_eq!(percentile(&[], 50.0), None);
    }

    /// Per user: calls made, and most calls in flight at once.
    async fn spread_counts(total: usize, workers: usize, users: usize) -> Vec<(usize, usize)> {
        let state = std::sync::Mutex::new(vec![(0usize, 0usize, 0usize); users]);
        let state = &state;
        spread(total, workers, users, |u| async move {
            if let Ok(mut s) = state.lock() {
                let (made, now, most) = &mut s[u];
                *made += 1;
                *now += 1;
                *most = (*most).max(*now);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Ok(mut s) = state.lock() {
                s[u].1 -= 1;
            }
            Ok(())
        })
        .await
        .unwrap();
        let s = state.lock().unwrap().clone();
        s.into_iter().map(|(made, _, most)| (made, most)).collect()
    }

    /// Every call taking as long (paused clock), the workers go in step: at
    /// c = k × users each user has exactly k calls running at a time.
    #[tokio::test(start_paused = true)]
    async fn spread_gives_each_user_its_share_of_calls_and_of_concurrency() {
        assert_eq!(spread_counts(24, 8, 4).await, vec![(6, 2); 4]);
        assert_eq!(spread_counts(24, 4, 4).await, vec![(6, 1); 4]);
        assert_eq!(spread_counts(24, 1, 4).await, vec![(6, 1); 4]);
        assert_eq!(spread_counts(24, 8, 1).await, vec![(24, 8)]);
        // A remainder goes to the first users.
        let uneven = spread_counts(10, 4, 4).await;
        let made: Vec<usize> = uneven.iter().map(|(m, _)| *m).collect();
        assert_eq!(made, vec![3, 3, 2, 2]);
        assert_eq!(
            spread_counts(2, 8, 4)
                .await
                .iter()
                .map(|p| p.0)
                .sum::<usize>(),
            2
        );
    }

    #[test]
    fn cpu_ticks_of_a_proc_stat_line() {
        let line =
            "4242 (hyper (f) d) S 1 4242 4242 0 -1 4194560 900 0 0 0 37 5 0 0 20 0 9 0 100 1 2";
        assert_eq!(parse_cpu_ticks(line), Some(42));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn function_urls_from_its_address() {
        let v: FunctionView = serde_json::from_value(serde_json::json!({
            "Name": "f", "Owner": "admin", "Image": "i", "Command": [], "Env": [],
            "Timeout": null, "Memory": null, "Cpus": null,
            "Address": "https://127.0.0.1:8443/call/f/1b4e28ba-2fa1-41d2-883f-0016d3cca427",
            "Created": "", "Updated": "", "OutputCacheBytes": 0, "OutputCacheBudget": 0,
            "LogCacheBytes": 0, "LogCacheBudget": 0
        }))
        .unwrap();
        let f = Function::new(&v).unwrap();
        assert_eq!(
            f.output,
            "https://127.0.0.1:8443/output/f/1b4e28ba-2fa1-41d2-883f-0016d3cca427"
        );
    }
}
