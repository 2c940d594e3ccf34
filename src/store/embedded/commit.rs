//! Group commit: one thread flushes sled's log for every writer that asked
//! since the last flush began, so concurrent accepts share one fsync. Files
//! whose markers a write dropped are deleted here, only after the flush that
//! made the drop durable succeeded.
//!
//! A flush error is fatal: sled refuses every write after a failed log
//! write, so the store reports itself failed and a restart recovers.

use super::super::{Result, StoreError};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::{oneshot, watch};

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

#[derive(Default)]
struct Pending {
    waiters: Vec<Waiter>,
    /// Files to delete once the flush that covers their marker's removal succeeded.
    deletes: Vec<PathBuf>,
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
    pub fn start(db: sled::Db) -> std::io::Result<Committer> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            failed: watch::channel(None).0,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("hyperfuncd-commit".into())
            .spawn(move || run(&db, &s))?;
        Ok(Committer {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Resolves once everything committed before this call is on disk, and
    /// then deletes `deletes`.
    pub async fn durable(&self, deletes: Vec<PathBuf>) -> Result<()> {
        let rx = {
            let mut p = lock(&self.shared.pending);
            if let Some(reason) = self.failure() {
                return Err(StoreError::Failed(reason));
            }
            if p.closed {
                return Err(StoreError::Failed("the store is closed".into()));
            }
            let (tx, rx) = oneshot::channel();
            p.waiters.push(tx);
            p.deletes.extend(deletes);
            rx
        };
        self.shared.wake.notify_one();
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(StoreError::Failed(reason)),
            Err(_) => Err(StoreError::Failed("the commit thread stopped".into())),
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

fn run(db: &sled::Db, shared: &Shared) {
    loop {
        let batch = {
            let mut p = lock(&shared.pending);
            while p.waiters.is_empty() && p.deletes.is_empty() && !p.closed {
                p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.waiters.is_empty() && p.deletes.is_empty() {
                return;
            }
            (
                std::mem::take(&mut p.waiters),
                std::mem::take(&mut p.deletes),
            )
        };
        let (waiters, deletes) = batch;
        // Everything the waiters committed happened before they queued, so
        // this flush covers it.
        let flushed = if shared.failed.borrow().is_some() {
            Err("an earlier write failed".to_string())
        } else {
            db.flush().map(drop).map_err(|e| e.to_string())
        };
        match &flushed {
            Ok(()) => {
                for path in &deletes {
                    // A file left behind is an orphan the next open collects.
                    let _ = std::fs::remove_file(path);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the database");
                shared.failed.send_if_modified(|f| {
                    let first = f.is_none();
                    if first {
                        *f = Some(e.clone());
                    }
                    first
                });
            }
        }
        for w in waiters {
            let _ = w.send(flushed.clone());
        }
    }
}
