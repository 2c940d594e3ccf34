//! Image references as the Engine reads them (`[host[:port]/]path[:tag][@digest]`),
//! so the registry a reference would make the Engine contact is known
//! before the Engine is asked, and a reference the Engine would resolve as
//! an image ID instead of a name is told apart.

/// Docker Hub, the registry of a reference without a host.
pub const DOCKER_HUB: &str = "docker.io";

/// The algorithms of the Engine's image IDs and digests (go-digest's):
/// `ALG:HEX` alone is a digest, which the Engine looks up as an image ID.
const DIGEST_ALGORITHMS: [&str; 3] = ["sha256", "sha384", "sha512"];

/// A parsed image reference: only what the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A reference that names a repository.
    Named {
        /// `host[:port]` in lower case, `docker.io` for Docker Hub (also when absent).
        registry: String,
        /// `registry/path[:tag][@digest]`, with Docker Hub's `library/` and
        /// the default `:latest` filled in: one spelling for every way of
        /// writing the same name (`busybox` is `docker.io/library/busybox:latest`).
        canonical: String,
    },
    /// A reference that names no repository, which the Engine resolves as
    /// a local image's ID: all hex (a full ID or any prefix of one, e.g.
    /// `08f4fb868a41`), or a digest alone (`sha256:08f4...`, any length).
    /// Its registry is unknowable: it reaches whatever image the Engine has.
    IdOnly,
}

impl ImageRef {
    /// Parses `s` with the Engine's grammar (distribution/reference): the
    /// first component is a registry host when it holds a `.` or a `:`, is
    /// `localhost`, or has upper case letters; path components are lower
    /// case; a tag is at most 128 of `[A-Za-z0-9_.-]`; a digest is
    /// `algorithm:hex`. A reference the grammar accepts but the Engine
    /// would read as an image ID (verified on Engine 20.10: it looks a
    /// string up as a name first, then as an ID prefix, so `0fb` finds
    /// image `sha256:0fba...` when no image is named `0fb`) is `IdOnly`.
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        let bad = |why: &str| format!("invalid image reference {:?}: {why}", truncate(s));
        if s.is_empty() || s.len() > 255 {
            return Err(bad("empty or longer than 255 bytes"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            let (alg, hex) = d.split_once(':').ok_or_else(|| bad("bad digest"))?;
            let alg_ok = alg.starts_with(|c: char| c.is_ascii_alphabetic())
                && alg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c));
            if !alg_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad("bad digest"));
            }
        }
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && !t.starts_with(['.', '-'])
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !ok {
                return Err(bad("bad tag"));
            }
        }
        let (host, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (Some(first), path)
            }
            _ => (None, name),
        };
        if path.is_empty() || !path.split('/').all(path_component_ok) {
            return Err(bad(
                "repository names are lower case letters, digits and separators",
            ));
        }
        let registry = match host {
            None => DOCKER_HUB.to_string(),
            Some(h) => {
                if !host_ok(h) {
                    return Err(bad("bad registry host"));
                }
                normalize_registry(h)
            }
        };
        // Only a string without '/', tag-less and all hex, or `ALG:HEX`,
        // reaches the Engine's ID lookup (`docker.io/library/0fb` and
        // `0fb:latest` do not): such a string names no repository here.
        let all_hex = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_hexdigit());
        if host.is_none() && digest.is_none() && !path.contains('/') {
            let id_prefix = tag.is_none() && all_hex(path);
            let digest_alone = DIGEST_ALGORITHMS.contains(&path) && tag.is_some_and(all_hex);
            if id_prefix || digest_alone {
                return Ok(ImageRef::IdOnly);
            }
        }
        let path = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let mut canonical = format!("{registry}/{path}");
        match (tag, digest) {
            (Some(t), _) => canonical = format!("{canonical}:{t}"),
            (None, None) => canonical.push_str(":latest"),
            (None, Some(_)) => {}
        }
        if let Some(d) = digest {
            canonical = format!("{canonical}@{d}");
        }
        Ok(ImageRef::Named {
            registry,
            canonical,
        })
    }

    /// The registry host a named reference makes the Engine contact.
    pub fn registry(&self) -> Option<&str> {
        match self {
            ImageRef::Named { registry, .. } => Some(registry),
            ImageRef::IdOnly => None,
        }
    }

    /// The canonical spelling of a named reference (see `Named::canonical`).
    pub fn canonical(&self) -> Option<&str> {
        match self {
            ImageRef::Named { canonical, .. } => Some(canonical),
            ImageRef::IdOnly => None,
        }
    }
}

/// An image hyperfuncd's pull brought onto one daemon's Engine: the only
/// kind it ever removes (once no function uses it for `[images] gc_after`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PulledImage {
    /// The daemon (its Engine) that pulled it: `Store::instance_id`.
    pub instance: String,
    /// The image ID, `sha256:...`.
    pub id: String,
    /// The canonical repository it was pulled from: only its references
    /// of that repository are removed, never someone's own tag.
    pub repository: String,
    pub pulled_ms: u64,
    /// Since when no function has used it, as the image sweep saw it;
    /// `None` while one does. Stored, so a pending removal survives a restart.
    pub unused_since_ms: Option<u64>,
}

/// `host[:port]` as the allow-list compares it: lower case, Docker Hub's
/// aliases folded into `docker.io`.
pub fn normalize_registry(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => h,
    }
}

/// A user's login to one registry host (`registry login`): what the
/// daemon sends the Engine (`X-Registry-Auth`) when it pulls that user's
/// images from `host`. The password has to be recoverable in clear for
/// that, so it is kept as given; it never leaves the daemon: `Debug` hides
/// it, and nothing else prints this record.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegistryLogin {
    /// `host[:port]` as `normalize_registry` spells it, the key of the login.
    pub host: String,
    pub username: String,
    pub password: String,
    pub created_ms: u64,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryLogin")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Checks a registry host as `registry login` takes it (`host[:port]`, no
/// scheme, no path) and gives its normalised spelling.
pub fn parse_registry_host(host: &str) -> Result<String, String> {
    let h = host
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    if h.is_empty() || h.len() > 255 || !host_ok(h) {
        return Err(format!(
            "invalid registry host {:?}: expected HOST[:PORT]",
            truncate(host)
        ));
    }
    Ok(normalize_registry(h))
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(&b[0]) || !alnum(&b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(&b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or any number of '-'.
        let start = i;
        while i < b.len() && !alnum(&b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// A DNS name or IPv4 address with an optional port, or `[IPv6]:port`.
fn host_ok(h: &str) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, tail)) => {
                if ip.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, tail.strip_prefix(':'))
            }
            None => return false,
        }
    } else {
        match h.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(h), None),
        }
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = host.is_none_or(|host| {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    });
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_of_references() {
        let reg = |s: &str| ImageRef::parse(s).map(|r| r.registry().map(str::to_string));
        for (s, r) in [
            ("busybox", "docker.io"),
            ("busybox:1.36", "docker.io"),
            ("library/busybox:latest", "docker.io"),
            ("hyperfuncd-test/busybox:latest", "docker.io"),
            ("docker.io/library/busybox", "docker.io"),
            ("index.docker.io/a/b", "docker.io"),
            ("ghcr.io/o/x:v1", "ghcr.io"),
            ("127.0.0.1:28443/probe/x:latest", "127.0.0.1:28443"),
            ("localhost/x", "localhost"),
            ("LOCALHOST:5000/x", "localhost:5000"),
            ("[::1]:5000/x", "[::1]:5000"),
            (
                "reg:5000/a/b@sha256:0123456789abcdef0123456789abcdef",
                "reg:5000",
            ),
            ("a__b/c-d.e_f/g---h:t_1.2-x", "docker.io"),
        ] {
            assert_eq!(reg(s), Ok(Some(r.to_string())), "{s}");
        }
        for bad in [
            "",
            "UPPER/X",
            "Busybox",
            "a b",
            "a//b",
            "a:",
            "a:-x",
            "/a",
            "a/",
            "a@sha256:xyz",
            "-a",
            "a..b",
            "reg:port/x",
            "[zz]:1/x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    /// What the Engine would resolve as an image ID, from `docker image
    /// inspect` of an imported image on Engine 20.10: every hex prefix of
    /// the ID, and `sha256:` with any hex prefix, found the image; the
    /// same hex with a tag, a namespace or a host did not.
    #[test]
    fn ids_and_digests_alone_name_no_repository() {
        let full = "0fba263722f0b1f2d55d0fe38d40264e1a9569e5266e51b8b7bef1db37e89ecc";
        for s in [
            "08f4fb868a41",
            "0fb",
            "a",
            "cafe",
            full,
            &format!("sha256:{full}"),
            "sha256:08f4fb868a41",
            "sha256:0",
            "sha512:abcdef",
            "sha256:ABCDEF",
        ] {
            assert_eq!(ImageRef::parse(s), Ok(ImageRef::IdOnly), "{s}");
        }
        // Names that only look like one.
        for (s, canonical) in [
            ("cafe:latest", "docker.io/library/cafe:latest"),
            ("08f4fb868a41:1", "docker.io/library/08f4fb868a41:1"),
            ("docker.io/library/0fb", "docker.io/library/0fb:latest"),
            ("deadbeef/app", "docker.io/deadbeef/app:latest"),
            ("sha256", "docker.io/library/sha256:latest"),
            ("sha256:v1", "docker.io/library/sha256:v1"),
            ("busybox:123", "docker.io/library/busybox:123"),
            ("localhost/0fb", "localhost/0fb:latest"),
            (
                "cafe@sha256:0123456789abcdef0123456789abcdef",
                "docker.io/library/cafe@sha256:0123456789abcdef0123456789abcdef",
            ),
        ] {
            assert_eq!(
                ImageRef::parse(s)
                    .ok()
                    .as_ref()
                    .and_then(ImageRef::canonical),
                Some(canonical),
                "{s}"
            );
        }
    }

    #[test]
    fn one_canonical_spelling_per_name() {
        let canon = |s: &str| {
            ImageRef::parse(s)
                .ok()
                .and_then(|r| r.canonical().map(str::to_string))
        };
        for same in [
            ["busybox", "busybox:latest", "docker.io/library/busybox"],
            [
                "index.docker.io/library/busybox:latest",
                "library/busybox",
                "docker.io/busybox",
            ],
        ] {
            for s in same {
                assert_eq!(
                    canon(s).as_deref(),
                    Some("docker.io/library/busybox:latest"),
                    "{s}"
                );
            }
        }
        assert_eq!(
            canon("127.0.0.1:5000/Other/x").as_deref(),
            None,
            "path components are lower case"
        );
        assert_eq!(
            canon("LOCALHOST:5000/other/private:1").as_deref(),
            Some("localhost:5000/other/private:1")
        );
        assert_ne!(canon("127.0.0.1:5000/a/x:1"), canon("127.0.0.1:5000/a/x:2"));
        assert_ne!(canon("127.0.0.1:5000/a/x"), canon("localhost:5000/a/x"));
    }
}
