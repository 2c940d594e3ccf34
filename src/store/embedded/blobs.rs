//! Payload and output bytes. Small ones live inside the database record
//! (`Marker::Inline`), so they share the group commit; large ones are plain
//! files beside it (`Marker::File`), because sled's log keeps growing under
//! megabyte values that come and go while a deleted file gives its space
//! back at once.
//!
//! The trees stay the truth: a file is written, fsynced and renamed (then the
//! directory fsynced) before the transaction that commits its marker, and
//! deleted only after the transaction that drops its marker is durable. A
//! file without a marker is an orphan, removed on open. A marker whose file
//! is missing or short is an error, never empty bytes.
//!
//! Only that is a loss. Any other error of a file operation (no file
//! descriptor left, an interrupted call, an I/O error that may pass) is
//! tried again with back-off (`RETRIES`) before it is returned, and then
//! as what it is: a failure of the disk, not a lost payload.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::StoreError;
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

    fn what(self) -> &'static str {
        match self {
            Kind::Payload => "payload",
            Kind::Output => "output",
        }
    }
}

const INLINE: u8 = 0;
const FILE: u8 = 1;

/// What a `payloads`/`outputs` tree holds for a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    Inline(Vec<u8>),
    /// The bytes are in a file of this length.
    File(u64),
}

impl Marker {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Marker::Inline(b) => {
                let mut v = Vec::with_capacity(b.len() + 1);
                v.push(INLINE);
                v.extend_from_slice(b);
                v
            }
            Marker::File(len) => {
                let mut v = vec![FILE];
                v.extend_from_slice(&len.to_be_bytes());
                v
            }
        }
    }

    pub fn decode(v: &[u8]) -> Result<Marker, StoreError> {
        match v.split_first() {
            Some((&INLINE, rest)) => Ok(Marker::Inline(rest.to_vec())),
            Some((&FILE, rest)) if rest.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(rest);
                Ok(Marker::File(u64::from_be_bytes(b)))
            }
            _ => Err(StoreError::Corrupt("damaged blob marker".into())),
        }
    }

    /// Bytes this marker accounts for.
    pub fn len(&self) -> u64 {
        match self {
            Marker::Inline(b) => b.len() as u64,
            Marker::File(len) => *len,
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

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, kind: Kind, id: &CallId) -> PathBuf {
        self.dir.join(format!("{}{id}", kind.prefix()))
    }

    /// Writes a blob durably before its marker is committed: temp file,
    /// fsync, rename, directory fsync. A transient error is tried again
    /// (`RETRIES`); a full disk is not.
    pub fn write(&self, kind: Kind, id: &CallId, bytes: &[u8]) -> std::io::Result<()> {
        retrying(|| self.write_once(kind, id, bytes))
    }

    fn write_once(&self, kind: Kind, id: &CallId, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path(kind, id);
        let tmp = path.with_extension("tmp");
        let written = (|| {
            match kind {
                Kind::Payload => crate::io_fault!("payload-write"),
                Kind::Output => crate::io_fault!("output-write"),
            }
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            super::durable::sync_dir(&self.dir)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&path);
        }
        written
    }

    /// The bytes `marker` stands for. A missing or short file is lost
    /// (`Corrupt`); any other error is tried again (`RETRIES`) and then
    /// `Unavailable`: the bytes are still there, the disk would not give
    /// them now.
    pub fn read(&self, kind: Kind, id: &CallId, marker: Marker) -> Result<Vec<u8>, StoreError> {
        let len = match marker {
            Marker::Inline(b) => return Ok(b),
            Marker::File(len) => len,
        };
        let lost = |why: String| {
            StoreError::Corrupt(format!("the {} of call {id} is lost: {why}", kind.what()))
        };
        let path = self.path(kind, id);
        let read = retrying(|| {
            match kind {
                Kind::Payload => crate::io_fault!("payload-read"),
                Kind::Output => crate::io_fault!("output-read"),
            }
            std::fs::read(&path)
        });
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(lost(e.to_string())),
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot read the {} of call {id} now (it is not lost; try again): {e}",
                    kind.what()
                )))
            }
        };
        if bytes.len() as u64 != len {
            return Err(lost(format!(
                "its file holds {} of {len} bytes",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Removes a file whose marker never committed.
    pub fn remove_uncommitted(&self, kind: Kind, id: &CallId) {
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

/// The pauses before each new try of a file operation that failed with a
/// transient error: about 1.3 s in all, so a moment without file
/// descriptors passes and a disk that keeps failing is reported soon.
const RETRIES: [Duration; 4] = [
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_millis(1000),
];

/// Errors that may pass: out of file descriptors or memory, interrupted,
/// busy, or an I/O error (a sick disk may answer the next time). Not a
/// missing file, not a full disk.
pub fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::EINTR
                | libc::EAGAIN
                | libc::ENOMEM
                | libc::EBUSY
                | libc::EIO
        )
    ) || e.kind() == std::io::ErrorKind::Interrupted
}

/// Runs `op`, trying again after each of `RETRIES` while it fails with a
/// transient error; returns its last result. Runs on a blocking thread.
fn retrying<T>(mut op: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut pauses = RETRIES.iter();
    loop {
        match op() {
            Err(e) if transient(&e) => match pauses.next() {
                Some(p) => {
                    tracing::debug!(error = %e, "file operation failed; trying again");
                    std::thread::sleep(*p);
                }
                None => return Err(e),
            },
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_lost_files_are_errors() {
        for m in [
            Marker::Inline(vec![]),
            Marker::Inline(b"abc".to_vec()),
            Marker::File(5 << 20),
        ] {
            assert_eq!(Marker::decode(&m.encode()).unwrap(), m);
        }
        assert!(Marker::decode(&[]).is_err());
        assert!(Marker::decode(&[FILE, 1]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path().to_path_buf()).unwrap();
        let id = CallId::new();
        assert!(blobs.read(Kind::Payload, &id, Marker::File(0)).is_err());
        blobs.write(Kind::Payload, &id, b"12345").unwrap();
        assert_eq!(
            blobs.read(Kind::Payload, &id, Marker::File(5)).unwrap(),
            b"12345"
        );
        let short = blobs.read(Kind::Payload, &id, Marker::File(6)).unwrap_err();
        assert!(short.to_string().contains("5 of 6 bytes"), "{short}");
        // A read that fails otherwise is not a loss: the bytes may be there.
        let other = CallId::new();
        std::fs::create_dir(blobs.path(Kind::Output, &other)).unwrap();
        let e = blobs
            .read(Kind::Output, &other, Marker::File(3))
            .unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    }
}
