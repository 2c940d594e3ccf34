//! `hyperfuncd bench` (DESIGN 6): hyperfuncd against raw `docker run --rm -i`,
//! measured in one run on the same Engine, image and network mode, printed
//! as one table on stdout (progress goes to stderr).
//!
//! It owns everything it measures: private daemons started from this very
//! executable on a temp data dir and a loopback port, raw `docker run`
//! containers labelled with this run's id, and the temp dir itself. It must
//! never touch the user's own daemon or data dir, never pull an image, and
//! never leave a container or a temp dir behind, whether it ends in success,
//! error or Ctrl-C. Unlike the rest of the CLI it runs the `docker` CLI: the
//! baseline is `docker run` itself.

use super::client::Client;
use super::Profile;
use crate::api::types::{
    CallAccepted, CallView, FunctionCreate, FunctionView, Health, StatusView, UserCreate, UserView,
};
use crate::runtime::{LABEL_CALL, LABEL_INSTANCE, LABEL_POOL};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
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
/// Longest `func rm --force` may take before the bench reports it as failed.
const RM_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Image to run; it must contain `cat` and `sleep` and be present locally
    /// (never pulled). Default: build hyperfuncd-bench/busybox:latest from the
    /// host's static busybox if it is absent
    #[arg(long)]
    pub image: Option<String>,
    /// Network mode of every container, hyperfuncd's and docker run's alike
    #[arg(long, default_value = "none")]
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
    /// Async calls submitted for the accepted-calls/s row (a few seconds'
    /// worth, so the first requests' TLS handshakes and the first call's
    /// container start do not weigh on the rate)
    #[arg(long, default_value_t = 10000)]
    pub accept: usize,
    /// Concurrent submitters (one keep-alive HTTPS client) for the accepted-calls/s row
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
        if self.network.is_empty() {
            bail!("--network must name a network mode, e.g. none or bridge");
        }
        if let Some(r) = &self.runtime {
            crate::model::validate_runtime_name(r).map_err(|e| anyhow!("--runtime: {e}"))?;
        }
        Ok(())
    }
}

/// Runs the benchmark and prints its table. Ctrl-C ends it through the same
/// cleanup as an error.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.validate()?;
    tokio::select! {
        r = bench(&args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

async fn bench(args: &BenchArgs) -> anyhow::Result<()> {
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
    // Drops after the daemons (declared later), so raw leftovers go too.
    let _raw_cleanup = LabelCleanup(format!("{LABEL_BENCH}={run_id}"));
    let raw = RawDocker {
        image: image.clone(),
        network: args.network.clone(),
        label: format!("{LABEL_BENCH}={run_id}"),
        runtime: None,
    };
    let payload = Bytes::from_static(PAYLOAD);
    let mut report = Report {
        image: image.clone(),
        engine: engine.trim().to_string(),
        ..Report::default()
    };

    // Both daemons run side by side so that docker run, cold and warm calls
    // take turns: load from elsewhere on the host weighs on all three alike.
    progress(&format!(
        "starting two private daemons: cold (no pool) and warm (pool of {})",
        args.pool
    ));
    let mut cold = Daemon::start(&tmp.0, "cold", &args.network, 0).await?;
    report.rss_fresh = cold.rss_mib()?;
    let mut warm = Daemon::start(&tmp.0, "warm", &args.network, args.pool).await?;
    let cold_f = cold.create_function("bench-cat", &image, &["cat"]).await?;
    let warm_f = warm.create_function("bench-cat", &image, &["cat"]).await?;
    warm.wait_pool_full(&warm_f.name).await;

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
        warm.wait_pool_full(&warm_f.name).await;
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
        let rows = runtime_rows(args, runtime, &raw, [&cold, &warm], &payload).await?;
        report.runtime = Some(rows);
    }

    for &c in &args.concurrency {
        progress(&format!(
            "finished calls/s, {c} at a time: {} calls each of docker run, cold, warm",
            args.batch
        ));
        let wall = parallel(args.batch, c, |_| raw.call(&payload)).await?;
        report.raw.throughput.push(rate(args.batch, wall));
        daemon_batch(&cold, &cold_f, &payload, args.batch, c, &mut report.cold).await?;
        daemon_batch(&warm, &warm_f, &payload, args.batch, c, &mut report.warm).await?;
    }
    report.rss_after = cold.rss_mib()?;
    report.leftovers.push(("warm", warm.stop()?));

    queue_phase(args, &cold, &image, &payload, &mut report).await?;
    report.leftovers.push(("cold", cold.stop()?));

    print!("{}", report.render(args));
    Ok(())
}

/// `n` async calls to `d`, `c` at a time, waiting for each output: their
/// calls/s and the daemon's CPU time. A pooled daemon's CPU includes making
/// the containers that replace the used ones (read once the pool is full).
async fn daemon_batch(
    d: &Daemon,
    f: &Function,
    payload: &Bytes,
    n: usize,
    c: usize,
    row: &mut Row,
) -> anyhow::Result<()> {
    let since = SystemTime::now();
    let before = d.cpu_ticks()?;
    let wall = parallel(n, c, |_| d.async_call(f, payload)).await?;
    row.throughput.push(rate(n, wall));
    if d.pool > 0 {
        row.misses
            .push(d.cold_starts(since, SystemTime::now()).await?);
        d.wait_pool_full(&f.name).await;
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
    let user: UserView = d
        .admin
        .post_json(
            "/v1/users",
            &UserCreate {
                name: "bench".into(),
                max_concurrency: Some(1),
                admin: false,
            },
        )
        .await
        .context("cannot add the bench user")?;
    let key = user.key.ok_or_else(|| anyhow!("the server sent no key"))?;
    let bench_user = Client::new(&Profile {
        key: Some(key),
        ..d.profile.clone()
    })?;
    let created: FunctionView = bench_user
        .post_json(
            "/v1/functions",
            &FunctionCreate {
                name: "bench-queue".into(),
                image: image.to_string(),
                command: vec!["sleep".into(), "600".into()],
                env: vec![],
                timeout: None,
                memory: None,
                cpus: None,
                runtime: None,
            },
        )
        .await
        .context("cannot create the queue function")?;
    let f = Function::new(&created)?;
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
    warm.wait_pool_full(&warm_f.name).await;
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
        warm.wait_pool_full(&warm_f.name).await;
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

// ---- raw docker run ----

struct RawDocker {
    image: String,
    network: String,
    label: String,
    /// `docker run --runtime`, for the `--runtime` rows.
    runtime: Option<String>,
}

impl RawDocker {
    /// `docker run --rm -i` of `cat`, payload on STDIN, timed by the caller
    /// from spawn to exit.
    async fn call(&self, payload: &Bytes) -> anyhow::Result<()> {
        let mut child = tokio::process::Command::new("docker")
            .args(["run", "--rm", "-i", "--network", &self.network])
            .args(self.runtime.iter().flat_map(|r| ["--runtime", r.as_str()]))
            .args(["--label", &self.label, &self.image, "cat"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run the docker CLI")?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no STDIN pipe to docker run"))?;
        let write = async move {
            // A write error shows up as a wrong output below.
            let _ = stdin.write_all(payload).await;
        };
        let ran = tokio::time::timeout(CALL_TIMEOUT, async {
            let (_, out) = tokio::join!(write, child.wait_with_output());
            out
        })
        .await
        .map_err(|_| anyhow!("docker run took over {} s", CALL_TIMEOUT.as_secs()))?
        .context("docker run failed")?;
        if !ran.status.success() {
            bail!(
                "docker run failed: {}",
                first_line(&String::from_utf8_lossy(&ran.stderr))
            );
        }
        if ran.stdout != payload.as_ref() {
            bail!(
                "docker run printed {} bytes, not the {}-byte payload",
                ran.stdout.len(),
                payload.len()
            );
        }
        Ok(())
    }
}

/// Runs the docker CLI; its STDOUT, or an error with its first STDERR line.
async fn docker(args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    // `docker image inspect`: the command without its options, for messages.
    let what: Vec<&str> = args
        .iter()
        .copied()
        .take_while(|a| !a.starts_with('-'))
        .collect();
    let what = format!("docker {}", what.join(" "));
    let out = tokio::time::timeout(
        timeout,
        tokio::process::Command::new("docker")
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("{what} took over {} s", timeout.as_secs()))?
    .context("cannot run the docker CLI (is Docker installed?)")?;
    if !out.status.success() {
        bail!(
            "{what}: {}",
            first_line(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message")
        .to_string()
}

/// Builds `DEFAULT_IMAGE` unless present: `FROM scratch` plus the host's
/// static busybox (Debian `busybox-static`), as the tests build theirs.
async fn default_image(tmp: &Path) -> anyhow::Result<String> {
    let present = docker(
        &["image", "inspect", "--format", "{{.Id}}", DEFAULT_IMAGE],
        DOCKER_TIMEOUT,
    )
    .await
    .is_ok();
    if present {
        return Ok(DEFAULT_IMAGE.to_string());
    }
    progress(&format!("building {DEFAULT_IMAGE} from the host's busybox"));
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            anyhow!(
                "no busybox to build {DEFAULT_IMAGE} from: install busybox-static, or pass --image"
            )
        })?;
    let ctx = tmp.join("image");
    std::fs::create_dir(&ctx).with_context(|| format!("cannot create {}", ctx.display()))?;
    std::fs::copy(busybox, ctx.join("busybox"))
        .with_context(|| format!("cannot copy {busybox}"))?;
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\n",
    )
    .context("cannot write the Dockerfile")?;
    let ctx_arg = ctx.to_string_lossy();
    docker(
        &["build", "-q", "-t", DEFAULT_IMAGE, &ctx_arg],
        BUILD_TIMEOUT,
    )
    .await
    .with_context(|| format!("cannot build {DEFAULT_IMAGE}"))?;
    Ok(DEFAULT_IMAGE.to_string())
}

// ---- the private daemon ----

/// A function as the data plane sees it: its capability URLs.
struct Function {
    name: String,
    /// `https://HOST:PORT/call/NAME/UUID`
    call: String,
    /// `https://HOST:PORT/output/NAME/UUID`
    output: String,
}

impl Function {
    fn new(v: &FunctionView) -> anyhow::Result<Function> {
        let (base, rest) = v
            .address
            .rsplit_once("/call/")
            .ok_or_else(|| anyhow!("unexpected function address {}", v.address))?;
        Ok(Function {
            name: v.name.clone(),
            call: v.address.clone(),
            output: format!("{base}/output/{rest}"),
        })
    }
}

/// `hyperfuncd serve` on its own data dir and port, with an admin client.
struct Daemon {
    process: Process,
    /// Warm containers per function in its config (0: no pool).
    pool: usize,
    profile: Profile,
    admin: Client,
}

/// The daemon's process: stopped (SIGTERM) and its containers checked when
/// dropped, if `stop` was not called.
struct Process {
    child: Option<std::process::Child>,
    pid: u32,
    dir: PathBuf,
    /// The value of `io.hyperfuncd.instance` on its containers; empty until
    /// `/healthz` told it.
    instance: String,
}

impl Daemon {
    async fn start(root: &Path, name: &str, network: &str, pool: usize) -> anyhow::Result<Daemon> {
        let dir = root.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let data = dir.join("data");
        // Port 0: the daemon picks a free port and writes it into its admin
        // profile, so no other process can take it between choice and bind.
        let config = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {}\n\n[container]\nnetwork_mode = {}\n\n[pool]\nper_function = {pool}\nhost_max = {}\n",
            toml::Value::String(data.to_string_lossy().into_owned()),
            toml::Value::String(network.to_string()),
            // Room for the `--runtime` rows' function beside the main one.
            (2 * pool).max(POOL_HOST_MAX),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log = std::fs::File::create(dir.join("daemon.log"))
            .context("cannot create the daemon log")?;
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let child = std::process::Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("HYPERFUNCD_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().context("cannot share the daemon log")?)
            .stderr(log)
            // Its own process group: Ctrl-C reaches the bench, which stops it.
            .process_group(0)
            .spawn()
            .context("cannot start hyperfuncd serve")?;
        let mut process = Process {
            pid: child.id(),
            child: Some(child),
            dir,
            instance: String::new(),
        };
        let profile = process.wait_profile(&data).await?;
        let admin = Client::new(&profile)?;
        process.instance = wait_healthy(&admin, &profile).await?;
        progress(&format!(
            "daemon {} (pid {}, instance {}) is up",
            profile.endpoint.as_deref().unwrap_or_default(),
            process.pid,
            process.instance
        ));
        Ok(Daemon {
            process,
            pool,
            profile,
            admin,
        })
    }

    fn stop(&mut self) -> anyhow::Result<usize> {
        self.process.stop()
    }

    async fn create_function(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> anyhow::Result<Function> {
        self.create_function_under(name, image, command, None).await
    }

    /// A function with its own OCI runtime (`None`: the daemon's default).
    async fn create_function_under(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
        runtime: Option<&str>,
    ) -> anyhow::Result<Function> {
        let v: FunctionView = self
            .admin
            .post_json(
                "/v1/functions",
                &FunctionCreate {
                    name: name.into(),
                    image: image.into(),
                    command: command.iter().map(|s| s.to_string()).collect(),
                    env: vec![],
                    timeout: None,
                    memory: None,
                    cpus: None,
                    runtime: runtime.map(str::to_string),
                },
            )
            .await
            .with_context(|| format!("cannot create function {name}"))?;
        Function::new(&v)
    }

    /// `POST /call/NAME/UUID/sync`; checks the output is the payload.
    async fn sync_call(&self, f: &Function, payload: &Bytes) -> anyhow::Result<()> {
        let url = format!("{}/sync", f.call);
        let body = self
            .post(&url, payload, reqwest::StatusCode::OK, "sync call")
            .await?;
        if body != *payload {
            bail!("sync call returned {} bytes, not the payload", body.len());
        }
        Ok(())
    }

    /// `POST /call/NAME/UUID`: the call id once the call is on disk.
    async fn submit(&self, f: &Function, payload: &Bytes) -> anyhow::Result<String> {
        let body = self
            .post(
                &f.call,
                payload,
                reqwest::StatusCode::ACCEPTED,
                "async call",
            )
            .await?;
        let a: CallAccepted =
            serde_json::from_slice(&body).context("unexpected answer to an async call")?;
        Ok(a.call_id)
    }

    /// POSTs `payload` to a capability URL; the body if it answered `want`.
    async fn post(
        &self,
        url: &str,
        payload: &Bytes,
        want: reqwest::StatusCode,
        what: &str,
    ) -> anyhow::Result<Bytes> {
        let resp = self
            .admin
            .http()
            .post(url)
            .body(payload.clone())
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("{what} failed"))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("{what} failed"))?;
        if status != want {
            bail!("{what} answered {status}: {}", snippet(&body));
        }
        Ok(body)
    }

    /// Submits a call, then long-polls its output until it is there.
    async fn async_call(&self, f: &Function, payload: &Bytes) -> anyhow::Result<()> {
        let id = self.submit(f, payload).await?;
        let url = format!("{}/{id}/wait", f.output);
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let resp = self
                .admin
                .http()
                .get(&url)
                .timeout(WAIT_REQUEST_TIMEOUT)
                .send()
                .await
                .context("waiting for an output failed")?;
            let status = resp.status();
            let body = resp.bytes().await.context("waiting for an output failed")?;
            match status.as_u16() {
                200 if body == *payload => return Ok(()),
                200 => bail!("call {id} returned {} bytes, not the payload", body.len()),
                // Still running or queued: ask again.
                201 | 202 if Instant::now() < deadline => {}
                201 | 202 => bail!("call {id} took over {} s", CALL_TIMEOUT.as_secs()),
                _ => bail!("output of call {id} answered {status}: {}", snippet(&body)),
            }
        }
    }

    /// Waits (bounded) until the function's pool holds every container it may.
    async fn wait_pool_full(&self, function: &str) {
        let want = self.pool;
        let deadline = Instant::now() + POOL_FILL_TIMEOUT;
        loop {
            let have = self.pool_size(function).await.unwrap_or(0);
            if have >= want {
                return;
            }
            if Instant::now() > deadline {
                progress(&format!(
                    "warning: the pool holds {have} of {want} containers after {} s; measuring anyway",
                    POOL_FILL_TIMEOUT.as_secs()
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Running warm containers of `function` (none is serving a call between measurements).
    async fn pool_size(&self, function: &str) -> anyhow::Result<usize> {
        let instance = format!("label={LABEL_INSTANCE}={}", self.process.instance);
        let pool = format!("label={LABEL_POOL}={function}");
        let out = docker(
            &["ps", "-q", "--filter", &instance, "--filter", &pool],
            DOCKER_TIMEOUT,
        )
        .await?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
    }

    /// Calls of this daemon that created their own container between `since`
    /// and `until` instead of taking one from the pool (warm containers carry
    /// no call label when they are created).
    async fn cold_starts(&self, since: SystemTime, until: SystemTime) -> anyhow::Result<usize> {
        let ts = |t: SystemTime| {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
        };
        let (since, until) = (ts(since), ts(until));
        let instance = format!("label={LABEL_INSTANCE}={}", self.process.instance);
        let format = format!("{{{{index .Actor.Attributes \"{LABEL_CALL}\"}}}}");
        let out = docker(
            &[
                "events",
                "--since",
                &since,
                "--until",
                &until,
                "--filter",
                &instance,
                "--filter",
                "event=create",
                "--format",
                &format,
            ],
            DOCKER_TIMEOUT,
        )
        .await
        .context("cannot read the Engine's events")?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "<no value>")
            .count())
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        self.process.rss_mib()
    }

    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        self.process.cpu_ticks()
    }
}

/// Polls `/healthz` until it reports the Engine up; answers the instance id.
async fn wait_healthy(admin: &Client, profile: &Profile) -> anyhow::Result<String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let endpoint = profile.endpoint.clone().unwrap_or_default();
    loop {
        let health = admin
            .http()
            .get(format!("{endpoint}/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(resp) = health {
            if let Ok(h) = resp.json::<Health>().await {
                if h.engine == "up" && !h.instance.is_empty() {
                    return Ok(h.instance);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the daemon at {endpoint} did not report the Docker Engine up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Process {
    /// Waits for the admin profile the daemon writes once it listens.
    async fn wait_profile(&mut self, data: &Path) -> anyhow::Result<Profile> {
        let deadline = Instant::now() + START_TIMEOUT;
        let path = data.join("admin-profile.toml");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!("the daemon exited ({status}): {}", self.last_log_line());
                }
            }
            if let Ok(p) = Profile::load(&path) {
                if p.endpoint.is_some() && p.key.is_some() {
                    return Ok(p);
                }
            }
            if Instant::now() > deadline {
                bail!("the daemon did not start: {}", self.last_log_line());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn last_log_line(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        log.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no log output")
            .to_string()
    }

    /// VmRSS of the daemon, in MiB.
    fn rss_mib(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/status", self.pid);
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no VmRSS in {path}"))?;
        Ok(kb as f64 / 1024.0)
    }

    /// utime + stime of the daemon, in clock ticks.
    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("unexpected format of {path}"))
    }

    /// SIGTERM, wait for the exit, then remove any container of this daemon
    /// that is still there; answers how many had to be removed.
    fn stop(&mut self) -> anyhow::Result<usize> {
        let Some(mut child) = self.child.take() else {
            return Ok(0);
        };
        // SAFETY: kill(2) on the pid of our own child, which has not been
        // reaped yet (try_wait/wait below reap it), so the pid is still ours.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut clean = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                clean = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !clean {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Without an instance id there is no label to look for (and an
        // empty value must not select anything else's containers).
        let left = if self.instance.is_empty() {
            Vec::new()
        } else {
            remove_labelled(&format!("{LABEL_INSTANCE}={}", self.instance))?
        };
        if !left.is_empty() {
            progress(&format!(
                "warning: {} container(s) of the {} daemon remained after it stopped; removed them: {}",
                left.len(),
                self.dir.file_name().unwrap_or_default().to_string_lossy(),
                left.join(" ")
            ));
        }
        if !clean {
            bail!(
                "the daemon did not stop within {} s of SIGTERM and was killed",
                STOP_TIMEOUT.as_secs()
            );
        }
        Ok(left.len())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command
/// name (field 2) may hold spaces and parentheses, so count from its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is fields[n - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Removes every container carrying `label` (`KEY=VALUE`); answers the
/// names of those it found. Blocking: it runs from `Drop` as well.
fn remove_labelled(label: &str) -> anyhow::Result<Vec<String>> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-a", "--format", "{{.ID}} {{.Names}}"])
        .args(["--filter", &format!("label={label}")])
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run docker ps")?;
    if !out.status.success() {
        bail!(
            "docker ps: {}",
            first_line(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let found: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .map(|(id, name)| (id.to_string(), name.to_string()))
        .collect();
    if !found.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f"])
            .args(found.iter().map(|(id, _)| id))
            .stdin(std::process::Stdio::null())
            .output();
    }
    Ok(found.into_iter().map(|(_, name)| name).collect())
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

/// Removes the raw `docker run` containers of this run that remain (a
/// timeout or Ctrl-C killed their CLI before `--rm` could act).
struct LabelCleanup(String);

impl Drop for LabelCleanup {
    fn drop(&mut self) {
        let _ = remove_labelled(&self.0);
    }
}

// ---- the table ----

#[derive(Default)]
struct Row {
    latency: Latency,
    /// Calls/s per `--concurrency` level.
    throughput: Vec<f64>,
    /// Daemon CPU (user + system, clock ticks) and calls of the throughput runs.
    cpu_ticks: u64,
    finished: usize,
    /// Pooled daemon only: calls that started their own container, for the
    /// latency run then each throughput run.
    misses: Vec<usize>,
}

/// The `--runtime` rows.
struct RuntimeRows {
    runtime: String,
    raw: Latency,
    cold: Latency,
    warm: Latency,
    /// Warm calls that started their own container.
    misses: usize,
}

#[derive(Default)]
struct Report {
    image: String,
    engine: String,
    raw: Row,
    cold: Row,
    warm: Row,
    rss_fresh: f64,
    rss_after: f64,
    rss_queued: f64,
    /// (calls, calls/s) of the measured accept run.
    accept: Option<(usize, f64)>,
    /// (calls, calls/s) of the unmeasured top-up to `--queued`.
    topup: Option<(usize, f64)>,
    /// Pending calls when the RSS was read.
    queued: u64,
    force_rm: Option<Result<Duration, String>>,
    /// Containers found after each daemon stopped.
    leftovers: Vec<(&'static str, usize)>,
    /// The sync latency rows under `--runtime`, if asked.
    runtime: Option<RuntimeRows>,
}

impl Report {
    fn render(&self, args: &BenchArgs) -> String {
        let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut out = format!(
            "hyperfuncd bench — image {}, network {}, {} calls, pool {}, Docker Engine {}, {cpus} CPUs\n\n",
            self.image, args.network, args.calls, args.pool, self.engine
        );

        let raw_p50 = self.raw.latency.p50.as_secs_f64();
        let lat = |name: &str, r: &Row| {
            vec![
                name.to_string(),
                ms(r.latency.p50),
                ms(r.latency.p95),
                ratio(r.latency.p50.as_secs_f64(), raw_p50),
            ]
        };
        out += &section(
            &["sync latency (ms)", "p50", "p95", "p50 vs docker run"],
            vec![
                lat("docker run --rm -i", &self.raw),
                lat("hyperfuncd cold", &self.cold),
                lat("hyperfuncd warm", &self.warm),
            ],
        );
        out.push('\n');
        if let Some(r) = &self.runtime {
            let base = r.raw.p50.as_secs_f64();
            let lat = |name: String, l: &Latency| {
                vec![name, ms(l.p50), ms(l.p95), ratio(l.p50.as_secs_f64(), base)]
            };
            let rt = &r.runtime;
            let header = format!("sync latency under {rt} (ms)");
            let vs = format!("p50 vs docker run --runtime {rt}");
            out += &section(
                &[&header, "p50", "p95", &vs],
                vec![
                    lat(format!("docker run --rm -i --runtime {rt}"), &r.raw),
                    lat(format!("hyperfuncd cold, {rt}"), &r.cold),
                    lat(format!("hyperfuncd warm, {rt}"), &r.warm),
                ],
            );
            let _ = writeln!(
                out,
                "  warm calls under {rt} that started their own container: {}/{}",
                r.misses, args.calls
            );
            out.push('\n');
        }

        let mut header = vec![format!("finished calls/s ({} calls)", args.batch)];
        header.extend(args.concurrency.iter().map(|c| format!("c={c}")));
        header.push("daemon CPU ms/call".into());
        let tp = |name: &str, r: &Row| {
            let mut row = vec![name.to_string()];
            row.extend(r.throughput.iter().map(|t| format!("{t:.1}")));
            row.push(if r.finished > 0 {
                format!("{:.1}", ticks_to_ms(r.cpu_ticks) / r.finished as f64)
            } else {
                "-".into()
            });
            row
        };
        let tp_ratio = |name: &str, r: &Row| {
            let mut row = vec![name.to_string()];
            row.extend(
                r.throughput
                    .iter()
                    .zip(&self.raw.throughput)
                    .map(|(h, d)| ratio(*h, *d)),
            );
            row.push(String::new());
            row
        };
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        out += &section(
            &header,
            vec![
                tp("docker run --rm -i", &self.raw),
                tp("hyperfuncd cold", &self.cold),
                tp("hyperfuncd warm", &self.warm),
                tp_ratio("cold vs docker run", &self.cold),
                tp_ratio("warm vs docker run", &self.warm),
            ],
        );
        out.push('\n');

        let mut rows = Vec::new();
        if let Some((n, r)) = self.accept {
            rows.push(vec![
                format!("{n} calls, {} clients", args.clients),
                format!("{r:.0}"),
            ]);
        }
        if let Some((n, r)) = self.topup {
            rows.push(vec![format!("{n} more (queue top-up)"), format!("{r:.0}")]);
        }
        out += &section(
            &[
                "accepted async calls/s (1 KiB payloads, HTTPS keep-alive, 202 = durable)",
                "",
            ],
            rows,
        );
        out.push('\n');

        out += &section(
            &["daemon RSS (MiB)", ""],
            vec![
                vec!["idle, fresh start".into(), format!("{:.1}", self.rss_fresh)],
                vec![
                    "idle, after the calls above".into(),
                    format!("{:.1}", self.rss_after),
                ],
                vec![
                    format!("{} calls queued", self.queued),
                    format!("{:.1}", self.rss_queued),
                ],
            ],
        );
        out.push('\n');

        let rm = match &self.force_rm {
            Some(Ok(d)) => format!("{:.1} s", d.as_secs_f64()),
            Some(Err(e)) => e.clone(),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "func rm --force with {} calls queued: {rm}",
            self.queued
        );
        let misses = &self.warm.misses;
        if let Some((first, rest)) = misses.split_first() {
            let rest: Vec<String> = rest
                .iter()
                .zip(&args.concurrency)
                .map(|(m, c)| format!("{m}/{} at c={c}", args.batch))
                .collect();
            let _ = writeln!(
                out,
                "warm calls that started their own container: {first}/{} sync, {}",
                args.calls,
                rest.join(", ")
            );
        }
        let left: Vec<String> = self
            .leftovers
            .iter()
            .map(|(d, n)| format!("{d} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "containers left after SIGTERM (removed by bench): {}",
            left.join(", ")
        );
        out
    }
}

/// A header and rows: the first column left-aligned, the rows' indented
/// under the header's; the other columns right-aligned.
fn section(header: &[&str], rows: Vec<Vec<String>>) -> String {
    const INDENT: usize = 2;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, (w, c)) in widths.iter_mut().zip(r).enumerate() {
            let indent = if i == 0 { INDENT } else { 0 };
            *w = (*w).max(c.chars().count() + indent);
        }
    }
    let line = |cells: Vec<&str>, indent: usize| {
        let mut s = " ".repeat(indent);
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(s, "{c:<w$}", w = w - indent);
            } else {
                let _ = write!(s, "  {c:>w$}");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec(), 0);
    for r in &rows {
        out += &line(r.iter().map(String::as_str).collect(), INDENT);
    }
    out
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
