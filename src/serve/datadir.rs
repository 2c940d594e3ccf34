//! The data dir is private: made 0700, what an older one holds taken to
//! owner-only, files written 0600 and synced.

use super::*;

/// Takes group and other permissions off everything under the data dir
/// (left by an older version, a restore or a copy); the umask covers what
/// is created from now on. Symbolic links are not followed.
pub(super) fn restrict_tree(dir: &Path) -> anyhow::Result<()> {
    let mut fixed = 0u64;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot read {}", d.display()))?
                .path();
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.is_dir() {
                dirs.push(path.clone());
            } else if !meta.is_file() || path == dir.join(crate::runtime::INIT_FILE) {
                // The warm pool's init is public (it is in this binary) and
                // must be runnable by any container user.
                continue;
            }
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                    .with_context(|| format!("cannot restrict {}", path.display()))?;
                fixed += 1;
            }
        }
    }
    if fixed > 0 {
        tracing::info!(
            data_dir = %dir.display(),
            fixed,
            "took group and other permissions off files in the data dir"
        );
    }
    Ok(())
}

pub(super) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    Ok(())
}

/// Writes a file only its owner can read (keys, profiles).
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
