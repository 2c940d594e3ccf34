//! Where the CLI finds its endpoint, key and CA: flags, then `HYPERFUNC_*`,
//! then a profile file, then the local daemon's admin profile.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A client profile file (TOML). The daemon writes one for the admin.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub endpoint: Option<String>,
    pub key: Option<String>,
    /// PEM file of the certificate (or CA) to trust for `endpoint`.
    pub ca: Option<PathBuf>,
}

impl Profile {
    pub fn load(path: &Path) -> anyhow::Result<Profile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read profile {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid profile {}", path.display()))
    }

    /// Fills the fields this profile lacks from `other`.
    pub fn or(self, other: Profile) -> Profile {
        Profile {
            endpoint: self.endpoint.or(other.endpoint),
            key: self.key.or(other.key),
            ca: self.ca.or(other.ca),
        }
    }
}

/// The settings in force, highest first: `flags`, the environment, the
/// profile file, the local admin profile.
pub fn resolve(flags: Profile, profile_flag: Option<PathBuf>) -> anyhow::Result<Profile> {
    let env = Profile {
        endpoint: std::env::var("HYPERFUNC_ENDPOINT")
            .ok()
            .filter(|s| !s.is_empty()),
        key: std::env::var("HYPERFUNC_KEY")
            .ok()
            .filter(|s| !s.is_empty()),
        ca: std::env::var_os("HYPERFUNC_CA")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
    };
    let explicit =
        profile_flag.or_else(|| std::env::var_os("HYPERFUNC_PROFILE").map(PathBuf::from));
    let file = match explicit {
        // A profile that was asked for must exist.
        Some(p) => Profile::load(&p)?,
        None => default_profile_path()
            .filter(|p| p.exists())
            .map(|p| Profile::load(&p))
            .transpose()?
            .unwrap_or_default(),
    };
    let mut merged = flags.or(env).or(file);
    if merged.endpoint.is_none() || merged.key.is_none() {
        let data_dir = crate::config::Config::load(None)
            .map(|c| c.data_dir())
            .unwrap_or_else(|_| crate::config::Config::default().data_dir());
        if let Ok(admin) = Profile::load(&data_dir.join("admin-profile.toml")) {
            merged = merged.or(admin);
        }
    }
    Ok(merged)
}

fn default_profile_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("hyperfuncd/profile.toml"))
}
