//! The private daemons the bench measures: `hyperfuncd serve` started from
//! this executable on a temp data dir and a loopback port, stopped and
//! checked for leftover containers when dropped.

use super::*;

/// The bench daemons' budgets (`[scheduler]`), far above what one host
/// accepts or a run queues (100k calls), so the bench measures the daemon,
/// not its limits.
const BENCH_BUDGETS: &str = "default_rate = 1000000\ndefault_max_queued = 100000000\ndefault_max_queued_bytes = 1099511627776\n";

/// A function as the data plane sees it: its capability URLs.
pub(super) struct Function {
    pub(super) name: String,
    /// Its owner: warm containers are told apart by owner and name.
    pub(super) owner: String,
    /// `https://HOST:PORT/call/NAME/UUID`
    pub(super) call: String,
    /// `https://HOST:PORT/output/NAME/UUID`
    pub(super) output: String,
}

impl Function {
    pub(super) fn new(v: &FunctionView) -> anyhow::Result<Function> {
        let (base, rest) = v
            .address
            .rsplit_once("/call/")
            .ok_or_else(|| anyhow!("unexpected function address {}", v.address))?;
        Ok(Function {
            name: v.name.clone(),
            owner: v.owner.clone(),
            call: v.address.clone(),
            output: format!("{base}/output/{rest}"),
        })
    }

    /// The same function's URLs on another node of a shared store.
    pub(super) fn on(&self, node: &Daemon) -> anyhow::Result<Function> {
        let endpoint = node
            .profile
            .endpoint
            .as_deref()
            .ok_or_else(|| anyhow!("the daemon's profile names no endpoint"))?;
        let (_, rest) = self
            .call
            .rsplit_once("/call/")
            .ok_or_else(|| anyhow!("unexpected function address {}", self.call))?;
        Ok(Function {
            name: self.name.clone(),
            owner: self.owner.clone(),
            call: format!("{}/call/{rest}", endpoint.trim_end_matches('/')),
            output: format!("{}/output/{rest}", endpoint.trim_end_matches('/')),
        })
    }
}

/// `hyperfuncd serve` on its own data dir and port, with an admin client.
pub(super) struct Daemon {
    pub(super) process: Process,
    /// Warm containers per function in its config (0: no pool).
    pub(super) pool: usize,
    pub(super) profile: Profile,
    pub(super) admin: Client,
}

/// The daemon's process: stopped (SIGTERM) and its containers checked when
/// dropped, if `stop` was not called.
pub(super) struct Process {
    pub(super) child: Option<std::process::Child>,
    pub(super) pid: u32,
    pub(super) dir: PathBuf,
    /// The value of `io.hyperfuncd.instance` on its containers; empty until
    /// `/healthz` told it.
    pub(super) instance: String,
}

impl Daemon {
    /// A daemon whose pool (of `pool` per function, 0: none) has room for
    /// `functions` full pools at once (`[pool] host_max`, at least its default).
    pub(super) async fn start(
        root: &Path,
        name: &str,
        network: &str,
        pool: usize,
        functions: usize,
    ) -> anyhow::Result<Daemon> {
        Daemon::start_with(root, name, network, pool, functions, "", None).await
    }

    /// As `start`, with a config that ends with `extra` (whole TOML tables). With
    /// `join`, it starts with a copy of that daemon's admin profile, as a
    /// second node of a shared store must (README, scale-out): it keeps the
    /// admin key the first node made.
    pub(super) async fn start_with(
        root: &Path,
        name: &str,
        network: &str,
        pool: usize,
        functions: usize,
        extra: &str,
        join: Option<&Daemon>,
    ) -> anyhow::Result<Daemon> {
        let dir = root.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let data = dir.join("data");
        // Port 0: the daemon picks a free port and writes it into its admin
        // profile, so no other process can take it between choice and bind.
        let extra = if extra.contains("[scheduler]\n") {
            extra.replacen("[scheduler]\n", &format!("[scheduler]\n{BENCH_BUDGETS}"), 1)
        } else {
            format!("{extra}\n[scheduler]\n{BENCH_BUDGETS}")
        };
        let config = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {}\n\n[container]\nnetwork_mode = {}\n\n[pool]\nper_function = {pool}\nhost_max = {}\n{extra}",
            toml::Value::String(data.to_string_lossy().into_owned()),
            toml::Value::String(network.to_string()),
            (functions * pool).max(POOL_HOST_MAX),
        );
        // The copied profile names the first node's endpoint until this one
        // rewrites it with its own.
        let stale_endpoint = match join {
            Some(first) => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&data)
                    .with_context(|| format!("cannot create {}", data.display()))?;
                let from = first.process.dir.join("data").join("admin-profile.toml");
                std::fs::copy(&from, data.join("admin-profile.toml"))
                    .with_context(|| format!("cannot copy {}", from.display()))?;
                first.profile.endpoint.clone()
            }
            None => None,
        };
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
        let profile = process.wait_profile(&data, stale_endpoint).await?;
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

    pub(super) fn stop(&mut self) -> anyhow::Result<usize> {
        self.process.stop()
    }

    pub(super) async fn create_function(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> anyhow::Result<Function> {
        self.create_function_under(name, image, command, None).await
    }

    /// A function with its own OCI runtime (`None`: the daemon's default).
    pub(super) async fn create_function_under(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
        runtime: Option<&str>,
    ) -> anyhow::Result<Function> {
        create_function_as(&self.admin, name, image, command, runtime).await
    }

    /// A user with quota `max_concurrency` (`None`: `[scheduler]
    /// default_max_concurrency`): a client with its key.
    pub(super) async fn add_user(
        &self,
        name: &str,
        max_concurrency: Option<u32>,
    ) -> anyhow::Result<Client> {
        let user: UserView = self
            .admin
            .post_json(
                "/v1/users",
                &UserCreate {
                    name: name.into(),
                    max_concurrency,
                    max_queued: None,
                    max_queued_bytes: None,
                    max_functions: None,
                    rate: None,
                    reserved: None,
                    admin: false,
                },
            )
            .await
            .with_context(|| format!("cannot add user {name}"))?;
        let key = user.key.ok_or_else(|| anyhow!("the server sent no key"))?;
        Client::new(&Profile {
            key: Some(key),
            ..self.profile.clone()
        })
    }

    /// Adds user `owner` (default quota) and its function `name`.
    pub(super) async fn add_user_function(
        &self,
        owner: &str,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> anyhow::Result<Function> {
        let client = self.add_user(owner, None).await?;
        create_function_as(&client, name, image, command, None).await
    }

    /// User `owner` with a quota of 1 and its function `name` running
    /// `sleep 600`: once its first call holds the one slot, every later call
    /// stays queued, so intake alone is measured.
    pub(super) async fn add_queue_holder(
        &self,
        owner: &str,
        name: &str,
        image: &str,
    ) -> anyhow::Result<(Client, Function)> {
        let client = self.add_user(owner, Some(1)).await?;
        let f = create_function_as(&client, name, image, &["sleep", "600"], None).await?;
        Ok((client, f))
    }

    /// `POST /call/NAME/UUID/sync`; checks the output is the payload.
    pub(super) async fn sync_call(&self, f: &Function, payload: &Bytes) -> anyhow::Result<()> {
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
    pub(super) async fn submit(&self, f: &Function, payload: &Bytes) -> anyhow::Result<String> {
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
    pub(super) async fn post(
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
    pub(super) async fn async_call(&self, f: &Function, payload: &Bytes) -> anyhow::Result<()> {
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

    /// Makes `n` calls of `f` at once, untimed, then waits for its pool of
    /// `n` (at most `pool`): the adaptive pool gives a function warm
    /// containers only once it has been called, as many as its calls in the
    /// last minute.
    pub(super) async fn prime(
        &self,
        f: &Function,
        n: usize,
        payload: &Bytes,
    ) -> anyhow::Result<()> {
        parallel(n, n, |_| self.async_call(f, payload)).await?;
        self.wait_pool_full(f, n).await;
        Ok(())
    }

    /// Waits (bounded) until the function's pool holds `want` containers
    /// (at most `pool`). Its target is its calls of the last minute, so a
    /// function called `n` times just now reaches `n.min(pool)`.
    pub(super) async fn wait_pool_full(&self, f: &Function, want: usize) {
        let want = want.min(self.pool);
        let deadline = Instant::now() + POOL_FILL_TIMEOUT;
        loop {
            let have = self.pool_size(f).await.unwrap_or(0);
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

    /// Running warm containers of `f` (none is serving a call between
    /// measurements). The pool label holds the name only: two users' functions
    /// of one name are told apart by the owner label.
    pub(super) async fn pool_size(&self, f: &Function) -> anyhow::Result<usize> {
        let instance = format!("label={LABEL_INSTANCE}={}", self.process.instance);
        let pool = format!("label={LABEL_POOL}={}", f.name);
        let owner = format!("label={LABEL_OWNER}={}", f.owner);
        let out = docker(
            &[
                "ps", "-q", "--filter", &instance, "--filter", &pool, "--filter", &owner,
            ],
            DOCKER_TIMEOUT,
        )
        .await?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
    }

    /// Calls of this daemon that created their own container between `since`
    /// and `until` instead of taking one from the pool (warm containers carry
    /// no call label when they are created).
    pub(super) async fn cold_starts(
        &self,
        since: SystemTime,
        until: SystemTime,
    ) -> anyhow::Result<usize> {
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

    pub(super) fn rss_mib(&self) -> anyhow::Result<f64> {
        self.process.rss_mib()
    }

    pub(super) fn cpu_ticks(&self) -> anyhow::Result<u64> {
        self.process.cpu_ticks()
    }
}

/// Function `name`, created by (and owned by) the user of `client`.
pub(super) async fn create_function_as(
    client: &Client,
    name: &str,
    image: &str,
    command: &[&str],
    runtime: Option<&str>,
) -> anyhow::Result<Function> {
    let v: FunctionView = client
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
                webhook: None,
                webhook_on: None,
                schedule: None,
            },
        )
        .await
        .with_context(|| format!("cannot create function {name}"))?;
    Function::new(&v)
}

/// Polls `/healthz` until it reports the Engine up; answers the instance id.
pub(super) async fn wait_healthy(admin: &Client, profile: &Profile) -> anyhow::Result<String> {
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
    /// A profile still naming `stale` (the endpoint of the node whose
    /// profile was copied here) is not this daemon's yet.
    pub(super) async fn wait_profile(
        &mut self,
        data: &Path,
        stale: Option<String>,
    ) -> anyhow::Result<Profile> {
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
                if p.endpoint.is_some()
                    && p.key.is_some()
                    && (stale.is_none() || p.endpoint != stale)
                {
                    return Ok(p);
                }
            }
            if Instant::now() > deadline {
                bail!("the daemon did not start: {}", self.last_log_line());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn last_log_line(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        log.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no log output")
            .to_string()
    }

    /// VmRSS of the daemon, in MiB.
    pub(super) fn rss_mib(&self) -> anyhow::Result<f64> {
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
    pub(super) fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("unexpected format of {path}"))
    }

    /// SIGTERM without waiting, so that several daemons stop at once;
    /// `stop` then waits.
    pub(super) fn terminate(&self) {
        if self.child.is_some() {
            // SAFETY: as in `stop`: our own child, not reaped yet.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }

    /// SIGTERM, wait for the exit, then remove any container of this daemon
    /// that is still there; answers how many had to be removed.
    pub(super) fn stop(&mut self) -> anyhow::Result<usize> {
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
pub(super) fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is fields[n - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}
