//! A cold call: its container created from the call's spec (the disk
//! cap, the limits, the log driver `none`), attached before start, run,
//! removed.

use super::*;

impl Runtime {
    /// Creates a container whose body `make` builds for a disk plan. With
    /// `disk = "auto"`, the first create asks for `--storage-opt size`; an
    /// Engine whose storage driver refuses it (`fuse-overlayfs`, overlay2
    /// without xfs project quotas, vfs) is remembered as such, and this and
    /// every later container gets the read-only root instead. Returns the
    /// plan the container was made with.
    pub(super) async fn create(
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

    pub(super) fn container_body(&self, spec: &RunSpec, disk: Disk) -> ContainerCreateBody {
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
    pub(super) fn host_config(
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
}
