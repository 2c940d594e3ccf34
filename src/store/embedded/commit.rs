//! Group commit: one thread applies the writes queued since its last flush,
//! flushes sled's log once for all of them, makes what sled wrote reach
//! stable storage (`durable.rs`: the blobs, then one fdatasync of the log),
//! and only then answers each, so concurrent accepts share one fsync and a
//! write is never acknowledged before it would survive a power cut. Files
//! whose markers a write dropped are deleted here, only after the round
//! that made the drop durable succeeded.
//!
//! A failed round is fatal: sled refuses every write after a failed log
//! write, and after a failed fsync the kernel may have dropped the pages it
//! could not write, so nothing can be retried. The writes of that round
//! may or may not be on disk: they are answered "outcome unknown"
//! (`StoreError::Unsure`), the store reports itself failed, and a restart
//! recovers.

use super::super::{Result, StoreError};
use super::durable::Syncer;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::{oneshot, watch};

/// How a queued write ends: files to delete once durable, and the answer to
/// send with the flush's result.
pub struct Done {
    pub deletes: Vec<PathBuf>,
    pub reply: Box<dyn FnOnce(std::result::Result<(), String>) + Send>,
}

/// A write run on the commit thread, in the batch of its flush.
pub type Op = Box<dyn FnOnce() -> Done + Send>;

#[derive(Default)]
struct Pending {
    ops: Vec<Op>,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// `Some(reason)` once a flush failed.
    failed: watch::Sender<Option<String>>,
}

pub struct Committer {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Committer {
    /// Starts the commit thread of `db`, whose files are in `dir`. Every
    /// write to the trees holds `writing`; the thread holds it from its
    /// flush to its fdatasync, so sled writes nothing meanwhile.
    pub fn start(db: sled::Db, dir: &Path, writing: Arc<Mutex<()>>) -> std::io::Result<Committer> {
        let mut syncer = Syncer::open(dir)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            failed: watch::channel(None).0,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("hyperfuncd-commit".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&db, &mut syncer, &writing, &s)
                }));
                if ran.is_err() {
                    fail(&s, "the commit thread panicked".into());
                }
            })?;
        Ok(Committer {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `op` for the next batch; it runs on the commit thread.
    pub fn submit(&self, op: Op) -> Result<()> {
        {
            let mut p = lock(&self.shared.pending);
            if let Some(reason) = self.failure() {
                return Err(StoreError::Failed(reason));
            }
            if p.closed {
                return Err(StoreError::Failed("the store is closed".into()));
            }
            p.ops.push(op);
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Resolves once everything committed before this call is on disk, and
    /// then deletes `deletes`.
    pub async fn durable(&self, deletes: Vec<PathBuf>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        // The write this covers is in sled already: refused now, it may
        // still be on disk after a restart.
        self.submit(Box::new(move || Done {
            deletes,
            reply: Box::new(move |flushed| {
                let _ = tx.send(flushed);
            }),
        }))
        .map_err(|e| StoreError::Unsure(e.to_string()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(StoreError::Unsure(reason)),
            Err(_) => Err(StoreError::Unsure("the commit thread stopped".into())),
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.shared.failed.borrow().clone()
    }

    pub fn subscribe_failure(&self) -> watch::Receiver<Option<String>> {
        self.shared.failed.subscribe()
    }

    /// Flushes what is pending and stops the thread.
    pub fn close(&self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; keep going if it did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fail(shared: &Shared, reason: String) {
    tracing::error!(error = %reason, "cannot write the database");
    shared.failed.send_if_modified(|f| {
        let first = f.is_none();
        if first {
            *f = Some(reason);
        }
        first
    });
}

/// sled's flush, then what it wrote on stable storage (`durable.rs`), with
/// the write lock held so that sled writes nothing in between.
fn flush(
    db: &sled::Db,
    syncer: &mut Syncer,
    writing: &Mutex<()>,
) -> std::result::Result<(), String> {
    let _quiet = lock(writing);
    sled_flush(db).map_err(|e| format!("flushing the database: {e}"))?;
    syncer
        .round()
        .map_err(|e| format!("syncing the database to disk: {e}"))
}

fn sled_flush(db: &sled::Db) -> std::io::Result<()> {
    crate::io_fault!("sled-flush");
    db.flush().map(drop).map_err(std::io::Error::from)
}

fn run(db: &sled::Db, syncer: &mut Syncer, writing: &Mutex<()>, shared: &Shared) {
    loop {
        let ops = {
            let mut p = lock(&shared.pending);
            while p.ops.is_empty() && !p.closed {
                p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.ops.is_empty() {
                return;
            }
            std::mem::take(&mut p.ops)
        };
        // Every op of the batch commits before the flush begins, so the
        // flush covers them all (and whatever other threads committed
        // before they queued a `durable`).
        let done: Vec<Done> = ops.into_iter().map(|op| op()).collect();
        let flushed = match shared.failed.borrow().clone() {
            Some(reason) => Err(reason),
            None => flush(db, syncer, writing),
        };
        match &flushed {
            Ok(()) => {
                for path in done.iter().flat_map(|d| &d.deletes) {
                    // A file left behind is an orphan the next open collects.
                    let _ = std::fs::remove_file(path);
                }
            }
            Err(e) => fail(shared, e.clone()),
        }
        for d in done {
            (d.reply)(flushed.clone());
        }
    }
}
