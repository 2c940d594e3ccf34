//! Payloads and outputs as plain files beside the database. sled's log keeps
//! growing under megabyte values that come and go; a deleted file gives its
//! space back at once. The trees hold only a length marker for each blob, in
//! the same transactions as the records, so the trees stay the truth: a file
//! without a marker is an orphan and removed on open.

use std::io::Write;
use std::path::PathBuf;

use crate::model::CallId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Payload,
    Output,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Payload => "payload-",
            Kind::Output => "output-",
        }
    }
}

pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    pub fn open(dir: PathBuf) -> std::io::Result<Blobs> {
        std::fs::create_dir_all(&dir)?;
        Ok(Blobs { dir })
    }

    fn path(&self, kind: Kind, id: &CallId) -> PathBuf {
        self.dir.join(format!("{}{id}", kind.prefix()))
    }

    /// Writes a blob durably (temp file, fsync, rename) before its marker is committed.
    pub fn write(&self, kind: Kind, id: &CallId, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path(kind, id);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// A blob's bytes; a missing file reads as empty (its marker says whether one is owed).
    pub fn read(&self, kind: Kind, id: &CallId) -> std::io::Result<Vec<u8>> {
        match std::fs::read(self.path(kind, id)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            other => other,
        }
    }

    /// Removes a blob; already gone is fine, and a failure only leaves an
    /// orphan for the next open to collect.
    pub fn remove(&self, kind: Kind, id: &CallId) {
        let _ = std::fs::remove_file(self.path(kind, id));
    }

    /// Every blob file as (kind, call id); temp and foreign files are removed
    /// or skipped.
    pub fn list(&self) -> std::io::Result<Vec<(Kind, CallId)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            for kind in [Kind::Payload, Kind::Output] {
                if let Some(id) = name
                    .strip_prefix(kind.prefix())
                    .and_then(|s| CallId::parse(s).ok())
                {
                    out.push((kind, id));
                }
            }
        }
        Ok(out)
    }
}

/// The marker stored in the tree for a blob: its length.
pub fn marker(len: usize) -> [u8; 8] {
    (len as u64).to_be_bytes()
}

pub fn marker_len(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if v.len() == 8 {
        b.copy_from_slice(v);
    }
    u64::from_be_bytes(b)
}
