//! The baseline: raw `docker run --rm -i` of the same image and network
//! mode, the bench image, and the removal of what a run labelled.

use super::*;

pub(super) struct RawDocker {
    pub(super) image: String,
    pub(super) network: String,
    pub(super) label: String,
    /// `docker run --runtime`, for the `--runtime` rows.
    pub(super) runtime: Option<String>,
}

impl RawDocker {
    /// `docker run --rm -i` of `cat`, payload on STDIN, timed by the caller
    /// from spawn to exit.
    pub(super) async fn call(&self, payload: &Bytes) -> anyhow::Result<()> {
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
pub(super) async fn docker(args: &[&str], timeout: Duration) -> anyhow::Result<String> {
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

pub(super) fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message")
        .to_string()
}

/// Builds `DEFAULT_IMAGE` unless present: `FROM scratch` plus the host's
/// static busybox (Debian `busybox-static`), as the tests build theirs.
pub(super) async fn default_image(tmp: &Path) -> anyhow::Result<String> {
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

/// Removes every container carrying `label` (`KEY=VALUE`); answers the
/// names of those it found. Blocking: it runs from `Drop` as well.
pub(super) fn remove_labelled(label: &str) -> anyhow::Result<Vec<String>> {
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

/// Removes the raw `docker run` containers of this run that remain (a
/// timeout or Ctrl-C killed their CLI before `--rm` could act).
pub(super) struct LabelCleanup(pub(super) String);

impl Drop for LabelCleanup {
    fn drop(&mut self) {
        let _ = remove_labelled(&self.0);
    }
}
