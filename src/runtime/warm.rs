//! Warm containers: made and started ahead of their call with the init
//! (`init.c`) as entrypoint, handed one call frame, renamed to the call
//! before anything is written to them.

use super::*;

/// Where the init program lives inside a warm container.
pub(super) const INIT_PATH: &str = "/.hyperfuncd-init";

/// The init's file in the data dir, bind-mounted read-only at `INIT_PATH`
/// into warm containers whose root is read-only (`write_init`).
pub const INIT_FILE: &str = "hyperfuncd-init";

/// How `init.c` begins the one line it prints when it cannot run the command.
pub(super) const INIT_FAILURE: &str = "hyperfuncd-init: ";

/// The init program of warm containers, `init.c` built static by `build.rs`.
pub(super) static INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hyperfuncd-init"));

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
pub(super) fn call_frame(env: &[String]) -> Bytes {
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
pub(super) static INIT_ARCHIVE: LazyLock<Bytes> = LazyLock::new(init_archive);

pub(super) fn init_archive() -> Bytes {
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

impl Runtime {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
