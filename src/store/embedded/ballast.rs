//! The ballast: a file of `[store] ballast_bytes` that holds space on the
//! data dir's filesystem for the day it fills up. sled cannot open a
//! database on a full disk (it writes a snapshot and its log at open) and
//! fails for good on a write it could not flush; a daemon that stops there
//! cannot start again until someone frees space by hand. So the space is
//! set aside while there is plenty, and given back when there is none:
//!
//! - held while the filesystem goes under the reserve (`[store]
//!   min_free_bytes`), where intake is already refused: whatever else
//!   writes there (images, other processes) cannot take the ballast's space;
//! - released (deleted) when the filesystem is nearly full (under `low`:
//!   the reserve, but at most `CRITICAL` and at least `FLOOR`), found by a
//!   check every `EVERY`, by `check_space`, before the database opens, or
//!   when it cannot open; from then on writes that bring bytes (intake,
//!   records) also leave the ballast's size free (`owed`), so what it gave
//!   back goes to the writes that settle calls and to the next open;
//! - made again (allocated, not written: `posix_fallocate`) once the
//!   filesystem has the reserve *and* the ballast free, so making it never
//!   takes the filesystem under the reserve.
//!
//! What sled 0.34.7 writes at open, on a database of a few calls: it
//! zeroes the rest of the last log segment after the recovered tip (a
//! `pwrite` of up to a segment, 512 KiB, past the end of `db`: ENOSPC on a
//! full disk, "cannot open the database"), then writes a snapshot
//! (`snap.*.generating`, renamed). A ballast of a few MiB covers that.
//!
//! It never holds data: nothing reads it, and a crash at any point leaves
//! either no ballast, a ballast, or a `.tmp` that the next check removes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The ballast's file in the database directory.
pub const FILE: &str = "hf-ballast";
/// Free space under which the ballast goes even with no reserve configured.
pub const FLOOR: u64 = 1024 * 1024;
/// Free space under which the ballast goes however large the reserve: it
/// is kept for a disk that is nearly full, not merely under the reserve.
pub const CRITICAL: u64 = 8 * 1024 * 1024;
/// How often the watcher looks at the free space.
const EVERY: Duration = Duration::from_secs(1);

pub struct Ballast {
    path: PathBuf,
    bytes: u64,
    /// `[store] min_free_bytes`.
    reserve: u64,
    /// Free space (without the ballast) under which it is released.
    low: u64,
    /// Released by this process and not made again: writes that bring
    /// bytes leave its size free too.
    owed: AtomicBool,
}

impl Ballast {
    pub fn new(dir: &Path, bytes: u64, reserve: u64) -> Ballast {
        Ballast {
            path: dir.join(FILE),
            bytes,
            reserve,
            low: reserve.clamp(FLOOR, CRITICAL),
            owed: AtomicBool::new(false),
        }
    }

    /// Free space under which the ballast is released.
    pub fn low(&self) -> u64 {
        self.low
    }

    /// Bytes that writes must leave free besides the reserve: the
    /// ballast's, while it is given back.
    pub fn owed(&self) -> u64 {
        if self.owed.load(Ordering::Relaxed) {
            self.bytes
        } else {
            0
        }
    }

    pub fn present(&self) -> bool {
        self.bytes > 0 && self.path.exists()
    }

    /// Deletes the ballast; whether there was one to give back.
    pub fn release(&self) -> bool {
        // One a crash left half made holds space too.
        let _ = std::fs::remove_file(self.path.with_extension("tmp"));
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                self.owed.store(true, Ordering::Relaxed);
                tracing::warn!(
                    ballast = %self.path.display(),
                    bytes = self.bytes,
                    "the data dir's filesystem is full: released the ballast so the database can still write ([store] ballast_bytes)"
                );
                true
            }
            Err(_) => false,
        }
    }

    /// Releases or makes the ballast as `free` (the filesystem's free bytes,
    /// the ballast not counted) says.
    pub fn keep(&self, free: u64) {
        if self.bytes == 0 {
            return;
        }
        if free < self.low {
            self.release();
        } else if free >= self.reserve.max(self.low).saturating_add(self.bytes)
            && !self.path.exists()
        {
            match self.make() {
                // Routine on a first start; news after a release.
                Ok(()) if self.owed.swap(false, Ordering::Relaxed) => tracing::info!(
                    ballast = %self.path.display(),
                    bytes = self.bytes,
                    "there is room again: set the ballast aside again ([store] ballast_bytes)"
                ),
                Ok(()) => tracing::debug!(
                    ballast = %self.path.display(),
                    bytes = self.bytes,
                    "set aside the ballast for a full disk ([store] ballast_bytes)"
                ),
                Err(e) => {
                    tracing::warn!(ballast = %self.path.display(), error = %e, "cannot make the ballast")
                }
            }
        }
    }

    /// Allocates the ballast under a temporary name, then renames it: a
    /// file that was not wholly allocated is never taken for the ballast.
    fn make(&self) -> std::io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let tmp = self.path.with_extension("tmp");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let len = libc::off_t::try_from(self.bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: posix_fallocate on a descriptor we own, for its length.
        let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
        if r != 0 {
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            return Err(std::io::Error::from_raw_os_error(r));
        }
        std::fs::rename(&tmp, &self.path)
    }

    /// Checks the free space every `EVERY` until `stop` is set, on a thread
    /// of its own (statvfs and file I/O stay off the async runtime).
    pub fn watch(self: Arc<Self>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
        if self.bytes == 0 {
            return Ok(());
        }
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        std::thread::Builder::new()
            .name("hyperfuncd-ballast".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(free) = super::free_bytes(&dir) {
                        self.keep(free);
                    }
                    std::thread::sleep(EVERY);
                }
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_under_the_reserve_released_near_full_made_again_with_room() {
        const MIB: u64 = 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        // Reserve 128 MiB: released under 8 MiB (CRITICAL), not under 128.
        let b = Ballast::new(dir.path(), 4 * MIB, 128 * MIB);
        assert_eq!(b.low(), CRITICAL);
        b.keep(100 * MIB);
        assert!(!b.present(), "made without the reserve and itself free");
        b.keep(132 * MIB);
        assert!(b.present());
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE)).unwrap().len(),
            4 * MIB
        );
        b.keep(9 * MIB);
        assert!(b.present(), "under the reserve it is held");
        assert_eq!(b.owed(), 0);
        b.keep(CRITICAL - 1);
        assert!(!b.present());
        assert_eq!(b.owed(), 4 * MIB, "given back: writes leave its size free");
        b.keep(131 * MIB);
        assert!(!b.present());
        b.keep(132 * MIB);
        assert!(b.present());
        assert_eq!(b.owed(), 0);
        // A small reserve is the threshold; none at all, FLOOR.
        assert_eq!(Ballast::new(dir.path(), MIB, 2 * MIB).low(), 2 * MIB);
        assert_eq!(Ballast::new(dir.path(), MIB, 0).low(), FLOOR);
        // No ballast configured: nothing is made, nothing owed.
        let none = Ballast::new(dir.path(), 0, 0);
        none.keep(u64::MAX);
        assert_eq!(none.owed(), 0);
    }
}
