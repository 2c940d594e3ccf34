//! `hyperfuncd bench --cluster` (issue 12): one sled daemon beside two nodes
//! on a three-server NATS JetStream cluster (R3) that the bench starts on
//! loopback in its temp dir, measured in one run on the same Engine, image
//! and network mode: finished calls/s (with raw `docker run` as the
//! baseline) and durable accepts/s. Everything it starts is stopped and
//! removed as in the default mode, the `nats-server`s last, once the nodes
//! that use them have stopped.

use super::*;
use std::process::Stdio;

/// A `nats-server` must answer `/healthz` this soon after it was started.
const NATS_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Three `nats-server`s with JetStream, clustered on loopback; killed and
/// reaped when dropped (their store dirs are in the bench's temp dir).
pub(super) struct NatsCluster {
    servers: Vec<NatsServer>,
}

struct NatsServer {
    child: Option<std::process::Child>,
    log: PathBuf,
    client_port: u16,
    http_port: u16,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl NatsServer {
    fn last_log_line(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no log output")
            .to_string()
    }
}

/// `n` distinct free loopback ports: all bound at once, so none is handed
/// out twice, then let go for the servers (which need to know each other's
/// route ports before they start, so port 0 does not do).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot find free loopback ports for nats-server")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<Result<Vec<u16>, std::io::Error>>()
        .context("cannot find free loopback ports for nats-server")
}

/// `nats-server --version`, or why it cannot be run.
pub(super) async fn nats_version(bin: &Path) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        DOCKER_TIMEOUT,
        tokio::process::Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("{} --version did not answer", bin.display()))?
    .with_context(|| {
        format!(
            "cannot run {} (--cluster needs nats-server: on PATH, or --nats-server PATH; scripts/deps installs it)",
            bin.display()
        )
    })?;
    if !out.status.success() {
        bail!("{} --version failed ({})", bin.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl NatsCluster {
    pub(super) async fn start(bin: &Path, root: &Path, sync: &str) -> anyhow::Result<NatsCluster> {
        let dir = root.join("nats");
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let p = free_ports(9)?;
        let routes: Vec<String> = (0..3)
            .map(|i| format!("\"nats://127.0.0.1:{}\"", p[3 * i + 1]))
            .collect();
        let mut cluster = NatsCluster {
            servers: Vec::new(),
        };
        for i in 0..3 {
            let (client_port, route_port, http_port) = (p[3 * i], p[3 * i + 1], p[3 * i + 2]);
            let store = dir.join(format!("js{i}"));
            // max_payload: room for a 5 MiB payload and its headers.
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{http_port}\n\
                 max_payload: 8MB\n\
                 jetstream {{ store_dir: {}, sync_interval: {sync} }}\n\
                 cluster {{ name: bench, listen: 127.0.0.1:{route_port}, routes: [{}] }}\n",
                serde_json::Value::String(store.to_string_lossy().into_owned()),
                routes.join(", ")
            );
            let conf_path = dir.join(format!("n{i}.conf"));
            std::fs::write(&conf_path, conf)
                .with_context(|| format!("cannot write {}", conf_path.display()))?;
            let log = dir.join(format!("n{i}.log"));
            let file = std::fs::File::create(&log).context("cannot create a nats-server log")?;
            let child = std::process::Command::new(bin)
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(file.try_clone().context("cannot share a nats-server log")?)
                .stderr(file)
                // Its own process group: Ctrl-C reaches the bench, which
                // stops the nodes first and then the servers.
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            cluster.servers.push(NatsServer {
                child: Some(child),
                log,
                client_port,
                http_port,
            });
        }
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// Until every server's `/healthz` (JetStream included) answers 200.
    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("cannot make an HTTP client")?;
        let deadline = Instant::now() + NATS_START_TIMEOUT;
        for s in &mut self.servers {
            loop {
                if let Some(child) = s.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        s.child = None;
                        bail!("nats-server exited ({status}): {}", s.last_log_line());
                    }
                }
                let url = format!("http://127.0.0.1:{}/healthz", s.http_port);
                if let Ok(resp) = http.get(&url).send().await {
                    if resp.status().is_success() {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!(
                        "the JetStream cluster was not healthy within {} s: {}",
                        NATS_START_TIMEOUT.as_secs(),
                        s.last_log_line()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// The `[store]` tables of a node of this cluster.
    pub(super) fn store_config(&self) -> String {
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("\"nats://127.0.0.1:{}\"", s.client_port))
            .collect();
        format!(
            "\n[store]\nbackend = \"nats\"\n\n[store.nats]\nservers = [{}]\nreplicas = 3\n",
            servers.join(", ")
        )
    }
}

/// What `--cluster` measured.
#[derive(Default)]
pub(super) struct ClusterReport {
    pub(super) image: String,
    pub(super) engine: String,
    pub(super) nats: String,
    pub(super) raw: Row,
    pub(super) sled: Row,
    pub(super) cluster: Row,
    /// (calls accepted, calls/s, daemon CPU ticks) of each accept run.
    pub(super) accept_sled: Option<(usize, f64, u64)>,
    pub(super) accept_one: Option<(usize, f64, u64)>,
    pub(super) accept_cluster: Option<(usize, f64, u64)>,
    pub(super) leftovers: Vec<(&'static str, usize)>,
}

/// The cluster mode's phases; the default mode's are in `bench`.
pub(super) async fn bench_cluster(args: &BenchArgs) -> anyhow::Result<()> {
    let nats_bin = args
        .nats_server
        .clone()
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    let nats = nats_version(&nats_bin).await?;
    // Drops after the daemons and the servers (declared later).
    let p = prepare(args).await?;
    let (tmp, raw, image) = (&p.tmp, &p.raw, p.image.clone());
    let payload = Bytes::from_static(PAYLOAD);
    let mut report = ClusterReport {
        image: image.clone(),
        engine: p.engine.clone(),
        nats,
        ..ClusterReport::default()
    };

    progress("starting a three-server JetStream cluster (R3) on loopback");
    // Declared before the daemons, so dropped after them: a node stops
    // cleanly only while its store answers.
    let servers = NatsCluster::start(&nats_bin, &tmp.0, &args.nats_sync).await?;
    // No pool anywhere, so every call takes the same path on every daemon;
    // a short grace, so the accept runs' `sleep 600` does not hold up stop.
    let common = "\n[scheduler]\nshutdown_grace_secs = 1\n";
    let nats_config = format!("{common}{}", servers.store_config());
    progress("starting three private daemons: one on sled, two nodes on the cluster");
    let mut sled = Daemon::start_with(&tmp.0, "sled", &args.network, 0, 0, common, None).await?;
    let mut a =
        Daemon::start_with(&tmp.0, "node-a", &args.network, 0, 0, &nats_config, None).await?;
    let mut b = Daemon::start_with(
        &tmp.0,
        "node-b",
        &args.network,
        0,
        0,
        &nats_config,
        Some(&a),
    )
    .await?;

    let sled_f = sled.create_function("bench-cat", &image, &["cat"]).await?;
    let a_f = a.create_function("bench-cat", &image, &["cat"]).await?;
    let b_f = a_f.on(&b)?;
    let nodes = [(&a, &a_f), (&b, &b_f)];
    // Untimed: the first call on each side pays for lazily set-up state.
    progress("warm-up: one call of docker run and of each daemon");
    raw.call(&payload).await?;
    sled.async_call(&sled_f, &payload).await?;
    for (d, f) in nodes {
        d.async_call(f, &payload).await?;
    }

    for &c in &args.concurrency {
        progress(&format!(
            "finished calls/s, {c} at a time: {} calls each of docker run, sled, the two nodes",
            args.batch
        ));
        let wall = parallel(args.batch, c, |_| raw.call(&payload)).await?;
        report.raw.throughput.push(rate(args.batch, wall));
        daemon_batch(
            &sled,
            std::slice::from_ref(&sled_f),
            &payload,
            args.batch,
            c,
            &mut report.sled,
        )
        .await
        .context("a call to the sled daemon")?;
        let before = cpu_of(&[&a, &b])?;
        // Call i goes to node i % 2 and is waited for on the same node; where
        // it runs is up to the cluster.
        let wall = parallel(args.batch, c, |i| {
            let (d, f) = nodes[i % nodes.len()];
            let node = ["A", "B"][i % nodes.len()];
            let payload = &payload;
            async move {
                d.async_call(f, payload)
                    .await
                    .with_context(|| format!("a call submitted to node {node}"))
            }
        })
        .await?;
        report.cluster.throughput.push(rate(args.batch, wall));
        report.cluster.cpu_ticks += cpu_of(&[&a, &b])?.saturating_sub(before);
        report.cluster.finished += args.batch;
    }

    let body = Bytes::from(vec![b'x'; ACCEPT_PAYLOAD_BYTES]);
    progress(&format!(
        "durable accepts/s into sled: {} clients for {} s",
        args.clients, args.seconds
    ));
    report.accept_sled = Some(accept_run(args, "sled", &[&sled], &image, &body).await?);
    progress(&format!(
        "durable accepts/s into node A alone: {} clients for {} s",
        args.clients, args.seconds
    ));
    report.accept_one = Some(accept_run(args, "one", &[&a], &image, &body).await?);
    progress(&format!(
        "durable accepts/s into the two nodes: {} clients for {} s, spread over both",
        args.clients, args.seconds
    ));
    report.accept_cluster = Some(accept_run(args, "two", &[&a, &b], &image, &body).await?);

    // Both nodes at once: stopped one after the other, the second would
    // start the queued calls the first let go of.
    a.process.terminate();
    b.process.terminate();
    report.leftovers.push(("node A", a.stop()?));
    report.leftovers.push(("node B", b.stop()?));
    report.leftovers.push(("sled", sled.stop()?));
    drop(servers);

    print!("{}", report.render(args));
    Ok(())
}

/// utime + stime of these daemons together, in clock ticks.
fn cpu_of(daemons: &[&Daemon]) -> anyhow::Result<u64> {
    daemons.iter().map(|d| d.cpu_ticks()).sum()
}

/// Durable accepts into `nodes` for `--seconds`: (calls, calls/s, daemon CPU
/// ticks), with a user and function named after `tag`. As in the default mode's accepted-calls/s row, a user with a
/// quota of 1 runs `sleep 600`: its first call holds the one slot (cluster
/// wide on NATS), so every later call stays queued and only intake is
/// measured. Client `w` submits to node `w % nodes.len()`.
async fn accept_run(
    args: &BenchArgs,
    tag: &str,
    nodes: &[&Daemon],
    image: &str,
    body: &Bytes,
) -> anyhow::Result<(usize, f64, u64)> {
    let first = nodes
        .first()
        .ok_or_else(|| anyhow!("no daemon to measure"))?;
    let (bench_user, f) = first
        .add_queue_holder(
            &format!("bench-{tag}"),
            &format!("bench-queue-{tag}"),
            image,
        )
        .await?;
    let fs = nodes
        .iter()
        .map(|d| f.on(d))
        .collect::<anyhow::Result<Vec<Function>>>()?;
    let held = first.submit(&f, body).await?;
    wait_running(&bench_user, &held).await?;

    let before = cpu_of(nodes)?;
    let (fs, n) = (&fs, nodes.len());
    let (calls, wall) = during(
        Duration::from_secs(args.seconds),
        args.clients,
        |w| async move { nodes[w % n].submit(&fs[w % n], body).await.map(drop) },
    )
    .await?;
    let ticks = cpu_of(nodes)?.saturating_sub(before);
    Ok((calls, rate(calls, wall), ticks))
}

/// `workers` loops calling `call(worker)` until `limit` has passed (the calls
/// under way then are let finish): how many calls ended and the wall time.
async fn during<F, Fut>(
    limit: Duration,
    workers: usize,
    call: F,
) -> anyhow::Result<(usize, Duration)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let done = AtomicUsize::new(0);
    let (done, call) = (&done, &call);
    let start = Instant::now();
    futures_util::future::try_join_all((0..workers).map(|w| async move {
        while start.elapsed() < limit {
            call(w).await?;
            done.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<(), anyhow::Error>(())
    }))
    .await?;
    Ok((done.load(Ordering::Relaxed), start.elapsed()))
}

impl ClusterReport {
    pub(super) fn render(&self, args: &BenchArgs) -> String {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        let per_call = |ticks: u64, calls: usize| {
            if calls > 0 {
                format!("{:.2}", ticks_to_ms(ticks) / calls as f64)
            } else {
                "-".into()
            }
        };
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut out = format!(
            "hyperfuncd bench --cluster — image {}, network {}, Docker Engine {}, {}, sync_interval {}, {cpus} CPUs\n\
             sled: one daemon; NATS: two nodes on a three-server JetStream cluster on loopback (R3),\n\
             requests alternating between them; no warm pool anywhere\n\n",
            self.image, args.network, self.engine, self.nats, args.nats_sync
        );

        const SLED: &str = "hyperfuncd, sled, one node";
        const NATS: &str = "hyperfuncd, NATS R3, two nodes";
        let mut header = vec![format!("finished calls/s ({} calls)", args.batch)];
        header.extend(args.concurrency.iter().map(|c| format!("c={c}")));
        header.push("daemon CPU ms/call".into());
        let tp = |name: &str, r: &Row| {
            let mut row = vec![name.to_string()];
            row.extend(r.throughput.iter().map(|t| format!("{t:.1}")));
            row.push(per_call(r.cpu_ticks, r.finished));
            row
        };
        let vs = |name: &str, r: &Row, base: &Row| {
            let mut row = vec![name.to_string()];
            row.extend(
                r.throughput
                    .iter()
                    .zip(&base.throughput)
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
                tp(SLED, &self.sled),
                tp(NATS, &self.cluster),
                vs("sled vs docker run", &self.sled, &self.raw),
                vs("NATS vs docker run", &self.cluster, &self.raw),
                vs("NATS vs sled", &self.cluster, &self.sled),
            ],
        );
        out.push('\n');

        let accept = |name: &str, a: &Option<(usize, f64, u64)>| match a {
            Some((n, r, ticks)) => vec![
                name.to_string(),
                n.to_string(),
                format!("{r:.0}"),
                per_call(*ticks, *n),
            ],
            None => vec![name.to_string(), "-".into(), "-".into(), "-".into()],
        };
        let title = format!(
            "durable accepts ({} clients, {} s, 1 KiB payloads, 202 = durable)",
            args.clients, args.seconds
        );
        out += &section(
            &[title.as_str(), "calls", "calls/s", "daemon CPU ms/call"],
            vec![
                accept(SLED, &self.accept_sled),
                accept("hyperfuncd, NATS R3, node A alone", &self.accept_one),
                accept(NATS, &self.accept_cluster),
            ],
        );
        if let (Some((_, s, _)), Some((_, n, _))) = (self.accept_sled, self.accept_cluster) {
            let _ = writeln!(out, "  two nodes vs sled: {}", ratio(n, s));
        }
        out.push('\n');

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
