//! A function: an image, a command and an environment, owned by one user and
//! reachable at a capability URL.

use super::ids::{FnKey, Name, Secret};
use serde::{Deserialize, Serialize};

/// One `K=V` of a function's environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

impl EnvVar {
    /// Parses `K=V`; `K` must be a usable variable name.
    pub fn parse(s: &str) -> Result<EnvVar, String> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("invalid environment variable {s:?}: expected K=V"))?;
        let valid = !name.is_empty()
            && !name.as_bytes()[0].is_ascii_digit()
            && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if !valid {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        if value.contains('\0') {
            return Err(format!("environment variable {name} contains a NUL byte"));
        }
        Ok(EnvVar {
            name: name.to_string(),
            value: value.to_string(),
        })
    }
}

/// The fewest CPUs a function may ask for (the Engine's minimum).
pub const MIN_CPUS: f64 = 0.01;
/// The least memory a function may ask for (the Engine's minimum).
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// What a user chooses about a function; everything else is the platform's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSpec {
    pub image: String,
    /// Replaces the image's CMD; empty keeps the image's own.
    pub command: Vec<String>,
    pub env: Vec<EnvVar>,
    /// Kill the call after this long; `None` lets it run as long as it likes.
    pub timeout_ms: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    /// The OCI runtime of its containers (`runsc` for gVisor); `None`
    /// follows the daemon's `[container] runtime`, then the Engine's default.
    /// Last, so a record of an older layout is this one minus a trailing
    /// field (the store migrates those on open).
    pub runtime: Option<String>,
}

/// The longest OCI runtime name accepted; the Engine's own are short words.
const MAX_RUNTIME_NAME: usize = 64;

/// Checks the shape of an OCI runtime name (whether the Engine has it is the
/// runtime module's question): what `dockerd --add-runtime` and
/// `daemon.json` accept in practice, nothing that could read as a path or
/// an option.
pub fn validate_runtime_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_RUNTIME_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid runtime name {name:?}: letters, digits, '.', '_' and '-', at most {MAX_RUNTIME_NAME}"
        ))
    }
}

impl FunctionSpec {
    /// The runtime its containers run under: its own, else `default` (the
    /// daemon's `[container] runtime`); `None` leaves it to the Engine.
    pub fn runtime_or<'a>(&'a self, default: Option<&'a str>) -> Option<&'a str> {
        self.runtime.as_deref().or(default)
    }

    pub fn validate(&self) -> Result<(), String> {
        super::ImageRef::parse(&self.image)?;
        if let Some(r) = &self.runtime {
            validate_runtime_name(r)?;
        }
        if self.timeout_ms == Some(0) {
            return Err("timeout must be greater than zero".into());
        }
        if let Some(c) = self.cpus {
            // The Engine's smallest quota; below it a rounded-down NanoCpus
            // of 0 would mean no limit at all.
            if !(c.is_finite() && c >= MIN_CPUS) {
                return Err(format!("invalid cpus {c}: at least {MIN_CPUS}"));
            }
        }
        if let Some(m) = self.memory_bytes {
            // The Engine refuses less than 6 MiB.
            if m < MIN_MEMORY {
                return Err(format!("memory {m} is too small: at least 6 MiB"));
            }
            if i64::try_from(m).is_err() {
                return Err(format!("memory {m} is too large"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: Name,
    pub owner: Name,
    pub spec: FunctionSpec,
    /// The UUID of the call URL; `--refresh` replaces it, killing the old URL.
    pub secret: Secret,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The content `spec.image` named when it was resolved (create, an
    /// update of the image, `update --pull`): `repo@sha256:...` for an
    /// image the Engine has from a registry, else the local image's ID
    /// `sha256:...`. Every call runs this, whatever the tag names later.
    /// `None` only for a function stored before digests were pinned (it
    /// runs its tag until it is pinned: at the daemon's start, or its next
    /// update). Last, and read with `trailing`, so such records read as
    /// they are.
    #[serde(default, deserialize_with = "super::trailing")]
    pub image_digest: Option<String>,
    /// Its completion webhook and signing secret (`None`: neither). After
    /// `image_digest`, read with `trailing` like it: older records read as
    /// `None`.
    #[serde(default, deserialize_with = "super::trailing")]
    pub webhook: Option<super::FunctionWebhook>,
    /// Its schedule: one call per tick (`scheduler/ticks.rs`). Trailing,
    /// read with `trailing`: a record stored before schedules reads as
    /// having none.
    #[serde(default, deserialize_with = "super::trailing")]
    pub schedule: Option<super::Schedule>,
}

impl Function {
    /// Its identity: owner and name.
    pub fn key(&self) -> FnKey {
        FnKey::new(self.owner.clone(), self.name.clone())
    }

    /// The reference its containers are made from: the pinned digest,
    /// else (not pinned yet) the image as given.
    pub fn run_image(&self) -> &str {
        self.image_digest.as_deref().unwrap_or(&self.spec.image)
    }
}

#[cfg(test)]
impl Function {
    /// A function of the unit tests: `owner/name` running `img`, nothing
    /// else set.
    pub(crate) fn for_test(owner: &str, name: &str) -> Function {
        Function {
            name: Name::parse(name).expect("test name"),
            owner: Name::parse(owner).expect("test owner"),
            spec: FunctionSpec {
                image: "img".into(),
                command: vec![],
                env: vec![],
                timeout_ms: None,
                memory_bytes: None,
                cpus: None,
                runtime: None,
            },
            secret: Secret::new(),
            created_ms: 0,
            updated_ms: 0,
            image_digest: None,
            webhook: None,
            schedule: None,
        }
    }
}

/// The digest part of a pinned reference (`repo@sha256:...` or an image
/// ID `sha256:...`): what the CLI and the dashboard show as `ImageDigest`'s
/// short form and what images are keyed by.
pub fn digest_of(pinned: &str) -> &str {
    pinned.rsplit_once('@').map_or(pinned, |(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonsensical_limits_are_refused() {
        let spec = |memory_bytes, cpus| FunctionSpec {
            image: "busybox".into(),
            command: vec![],
            env: vec![],
            timeout_ms: None,
            memory_bytes,
            cpus,
            runtime: None,
        };
        assert!(spec(Some(64 << 20), Some(0.5)).validate().is_ok());
        for (m, c) in [
            (None, Some(1e-9)),
            (None, Some(0.0)),
            (None, Some(-1.0)),
            (None, Some(f64::NAN)),
            (None, Some(f64::INFINITY)),
            (Some(4096), None),
            (Some(u64::MAX), None),
        ] {
            assert!(spec(m, c).validate().is_err(), "{m:?} {c:?}");
        }
    }

    #[test]
    fn runtime_names() {
        for good in [
            "runsc",
            "runc",
            "kata-runtime",
            "io.containerd.runc.v2",
            "runsc_kvm",
        ] {
            assert!(validate_runtime_name(good).is_ok(), "{good}");
        }
        let long = "r".repeat(MAX_RUNTIME_NAME + 1);
        for bad in [
            "",
            "-x",
            "../runsc",
            "run sc",
            "runsc\0",
            "/usr/bin/runsc",
            &long,
        ] {
            assert!(validate_runtime_name(bad).is_err(), "{bad:?}");
        }
        let spec = Function::for_test("alice", "f").spec;
        assert_eq!(spec.runtime_or(Some("runsc")), Some("runsc"));
        assert_eq!(spec.runtime_or(None), None);
        let own = FunctionSpec {
            runtime: Some("runc".into()),
            ..spec
        };
        assert_eq!(own.runtime_or(Some("runsc")), Some("runc"));
        assert!(FunctionSpec {
            runtime: Some("a b".into()),
            ..own
        }
        .validate()
        .is_err());
    }

    #[test]
    fn records_stored_before_schedules_read_without_one() {
        use bincode::Options;
        let strict = || {
            bincode::DefaultOptions::new()
                .with_fixint_encoding()
                .with_big_endian()
        };
        let f = Function {
            created_ms: 1,
            updated_ms: 2,
            image_digest: Some("busybox@sha256:ab".into()),
            schedule: Some(
                crate::model::Schedule::new("@every 5m", None, b"hi".to_vec(), 3).unwrap(),
            ),
            ..Function::for_test("alice", "f")
        };
        let new = strict().serialize(&f).unwrap();
        assert_eq!(strict().deserialize::<Function>(&new).unwrap(), f);
        // A schema-7 record is this one minus its trailing `webhook` and
        // `schedule` (one tag byte each when both are `None`).
        let old_shape = Function {
            schedule: None,
            ..f.clone()
        };
        let none = strict().serialize(&old_shape).unwrap();
        let read: Function = strict().deserialize(&none[..none.len() - 2]).unwrap();
        assert_eq!(read, old_shape);
        let plain = bincode::serialize(&old_shape).unwrap();
        let read: Function = bincode::deserialize(&plain[..plain.len() - 2]).unwrap();
        assert_eq!(read, old_shape);
    }

    #[test]
    fn env_vars() {
        assert_eq!(
            EnvVar::parse("A_1=x=y").unwrap(),
            EnvVar {
                name: "A_1".into(),
                value: "x=y".into()
            }
        );
        assert!(EnvVar::parse("A=").is_ok());
        for bad in ["A", "=x", "1A=x", "A-B=x", "A B=x"] {
            assert!(EnvVar::parse(bad).is_err(), "{bad}");
        }
    }
}
