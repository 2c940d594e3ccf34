//! Images: presence and pulls (with a registry login, progress passed on
//! in the Engine's own layer words only), pinned digests, removal of images
//! hyperfuncd pulled, and checking a registry login.

use super::*;

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
pub(super) fn layer_event(info: &bollard::models::CreateImageInfo) -> Option<PullEvent> {
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
pub(super) const PULL_TIMED_OUT: &str = "the pull timed out";

/// How long `check_login` waits for the Engine (which waits for the registry).
pub(super) const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The most of the Engine's `/auth` answer read: a status and a short JSON.
pub(super) const LOGIN_ANSWER_MAX: u64 = 64 * 1024;

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
pub(super) fn resolved(
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

pub(super) fn login_summary(status: u16, raw: &str) -> LoginError {
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
pub(super) fn pull_summary(raw: &str) -> &'static str {
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
pub(super) fn split_reference(image: &str) -> (String, String) {
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

impl Runtime {
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
