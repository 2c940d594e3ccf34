//! What sled writes reaches stable storage: the gap between sled's flush
//! and a power cut.
//!
//! sled 0.34.7's `flush()` ends in `sync_file_range` (`pagecache/iobuf.rs`),
//! which starts and waits for the writeback of the log's pages but neither
//! flushes the drive's write cache nor the file's size, and no directory is
//! ever fsynced; sled calls a real `sync_all` only from its periodic flusher
//! (every 500 ms by default). Its blob files (a log record over
//! `segment_size / 4` = 128 KiB, which a consolidated tree node of a few
//! inline payloads is) are written and never fsynced at all. A flush
//! survives a crash of the process, not of the machine.
//!
//! `Syncer` closes that gap for each commit round, after sled's flush and
//! before any write of the round is answered: every blob file sled created
//! or grew since the last round is fdatasynced, the blobs directory is
//! fsynced so that their names survive, and then the log (`db`) is
//! fdatasynced. One round costs one log fdatasync, plus one per new blob
//! and one directory fsync when there are new blobs; concurrent writes
//! share it (group commit).
//!
//! Blob creations must be durable before the log that refers to them, and
//! sled's blob *deletions* only after the log that replaced them, yet both
//! change the one directory that a single fsync makes durable. sled deletes
//! a replaced blob as soon as it thinks the replacing record is stable (its
//! `sync_file_range`), so a directory fsync could make a deletion durable
//! before the record that replaced it. Therefore every blob has a second
//! name (a hard link in `hf-blob-links/`) from the round that first sees
//! it, and a blob that sled deleted is given its name back before the
//! directory is fsynced; only after the round's log fdatasync, when the
//! replacing record is durable, is it removed for good (that removal
//! becomes durable with a later round's directory fsync). A power cut in
//! between leaves such a blob behind, unreferenced: sled never reads it.
//!
//! The round runs while the store's write lock is held (`Inner::writing`),
//! and sled's own periodic flusher is off, so sled writes nothing to disk
//! between the listing of the blobs and the log fdatasync: no blob appears
//! or goes unseen meanwhile.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The second names of sled's blobs (module doc), inside sled's directory.
const LINKS: &str = "hf-blob-links";

pub struct Syncer {
    /// sled's `blobs/` directory.
    blobs: PathBuf,
    /// Where every blob sled made has its second name.
    links: PathBuf,
    /// sled's log, opened again for its fdatasync.
    log: File,
    /// sled's blob files as the last round saw them, with the length that
    /// is on stable storage.
    known: HashMap<OsString, u64>,
    /// Blobs sled deleted that were given their name back this round:
    /// removed once the round's log is durable.
    revived: Vec<OsString>,
}

impl Syncer {
    /// Makes everything sled has written so far in `dir` durable (its
    /// files, its blobs, and the directories that name them, up to `dir`'s
    /// parent, the data dir) and starts tracking its blobs.
    pub fn open(dir: &Path) -> io::Result<Syncer> {
        let blobs = dir.join("blobs");
        let links = dir.join(LINKS);
        // The second names of an earlier run are stale: its revived blobs
        // were either removed or are unreferenced leftovers now.
        match std::fs::remove_dir_all(&links) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir(&links)?;
        let log = File::open(dir.join("db"))?;
        let mut syncer = Syncer {
            blobs,
            links,
            log,
            known: HashMap::new(),
            revived: Vec::new(),
        };
        syncer.sync_blobs()?;
        sync_data(&dir.join("conf"))?;
        syncer.log.sync_data()?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(syncer)
    }

    /// After sled's flush, with the write lock held: the round's blobs,
    /// then the log, on stable storage (module doc).
    pub fn round(&mut self) -> io::Result<()> {
        self.sync_blobs()?;
        crate::io_fault!("log-fdatasync");
        self.log.sync_data()?;
        // The records that replaced the revived blobs are durable now.
        for name in std::mem::take(&mut self.revived) {
            self.known.remove(&name);
            // A name left behind is an unreferenced file sled never reads.
            let _ = std::fs::remove_file(self.blobs.join(&name));
            let _ = std::fs::remove_file(self.links.join(&name));
        }
        Ok(())
    }

    /// fdatasyncs every blob that is new or longer than last seen, gives
    /// deleted ones their name back, and fsyncs the directory if its names
    /// changed.
    fn sync_blobs(&mut self) -> io::Result<()> {
        let mut seen: HashMap<OsString, u64> = HashMap::new();
        for entry in std::fs::read_dir(&self.blobs)? {
            let entry = entry?;
            let len = match entry.metadata() {
                Ok(m) if m.is_file() => m.len(),
                Ok(_) => continue,
                // Removed by sled between the listing and now: seen below
                // as deleted, if it was known.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            seen.insert(entry.file_name(), len);
        }
        let mut renamed = false;
        for (name, &len) in &seen {
            let known = self.known.get(name).copied();
            if known == Some(len) {
                continue;
            }
            let path = self.blobs.join(name);
            if known.is_none() {
                second_name(&path, &self.links.join(name))?;
                renamed = true;
            }
            crate::io_fault!("blob-fdatasync");
            sync_data(&path)?;
            self.known.insert(name.clone(), len);
        }
        let deleted: Vec<OsString> = self
            .known
            .keys()
            .filter(|name| !seen.contains_key(*name))
            .cloned()
            .collect();
        for name in deleted {
            if self.revived.contains(&name) {
                continue;
            }
            second_name(&self.links.join(&name), &self.blobs.join(&name))?;
            self.revived.push(name);
        }
        if renamed {
            sync_dir(&self.blobs)?;
        }
        Ok(())
    }
}

/// Gives the file `from` the name `to` too: a hard link, or a copy on a
/// filesystem without them. A name already there is left as it is.
fn second_name(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        Err(_) => {
            std::fs::copy(from, to)?;
            sync_data(to)
        }
    }
}

fn sync_data(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_data()
}

/// fsync of a directory: the names in it, as they are now, are durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    crate::io_fault!("dir-fsync");
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_sled_deletes_comes_back_until_the_log_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        std::fs::write(dir.path().join("conf"), b"conf").unwrap();
        let mut s = Syncer::open(dir.path()).unwrap();
        let blob = dir.path().join("blobs").join("1234");
        std::fs::write(&blob, b"node").unwrap();
        s.sync_blobs().unwrap();
        assert!(dir.path().join(LINKS).join("1234").exists());
        // sled replaces the node and deletes its blob.
        std::fs::remove_file(&blob).unwrap();
        s.sync_blobs().unwrap();
        assert_eq!(std::fs::read(&blob).unwrap(), b"node", "revived");
        // Once the log is durable it goes for good.
        s.round().unwrap();
        assert!(!blob.exists());
        assert!(!dir.path().join(LINKS).join("1234").exists());
        assert!(s.known.is_empty());
    }
}
