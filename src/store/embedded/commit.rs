//! Group commit: one thread applies the writes queued since its last flush,
//! flushes sled's log once for all of them, and only then answers each, so
//! concurrent accepts share one fsync and a write is never acknowledged
//! before it is durable. Files whose markers a write dropped are deleted
//! here, only after the flush that made the drop durable succeeded.
//!
//! Batched writes (`Op::Tx`) of one round share one sled transaction as
//! well: every sled transaction rolls sled's I/O buffer and hands a write to
//! sled's I/O threads, which costs more than the transaction's own work.
//! If any body aborts, the round's transaction is dropped and each body
//! runs again in a transaction of its own, so one write's refusal never
//! undoes another's.
//!
//! A flush error is fatal: sled refuses every write after a failed log
//! write, so the store reports itself failed and a restart recovers.

use super::super::{Result, StoreError};
use super::TxResult;
use sled::transaction::{TransactionError, TransactionalTree};
use sled::Transactional;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::{oneshot, watch};

/// How a queued write ends: files to delete once durable, and the answer to
/// send with the flush's result.
pub struct Done {
    pub deletes: Vec<PathBuf>,
    pub reply: Box<dyn FnOnce(std::result::Result<(), String>) + Send>,
}

/// A write that runs in the round's shared transaction.
pub trait Batched: Send {
    /// Checks and id allocation before the transaction; an error answers
    /// the write without running `body`.
    fn prepare(&mut self) -> Result<()>;
    /// The transaction's work. sled re-runs it on a conflict, and an abort
    /// re-runs it alone, so it keeps nothing but the last run's results.
    fn body(&self, t: &[TransactionalTree]) -> TxResult<()>;
    /// After the transaction (or the refusal), before the flush.
    fn finish(self: Box<Self>, committed: Result<()>) -> Done;
}

/// A write run on the commit thread, in the batch of its flush.
pub enum Op {
    /// Runs as is, before the round's transaction.
    Run(Box<dyn FnOnce() -> Done + Send>),
    /// Joins the round's transaction.
    Tx(Box<dyn Batched>),
}

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
    pub fn start(db: sled::Db, trees: Vec<sled::Tree>) -> std::io::Result<Committer> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            failed: watch::channel(None).0,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("hyperfuncd-commit".into())
            .spawn(move || {
                let ran =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&db, &trees, &s)));
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
        self.submit(Op::Run(Box::new(move || Done {
            deletes,
            reply: Box::new(move |flushed| {
                let _ = tx.send(flushed);
            }),
        })))?;
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

fn run(db: &sled::Db, trees: &[sled::Tree], shared: &Shared) {
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
        let mut done = Vec::with_capacity(ops.len());
        let mut batch = Vec::new();
        for op in ops {
            match op {
                Op::Run(f) => done.push(f()),
                Op::Tx(mut b) => match b.prepare() {
                    Ok(()) => batch.push(b),
                    Err(e) => done.push(b.finish(Err(e))),
                },
            }
        }
        let results = transact(trees, &batch);
        done.extend(batch.into_iter().zip(results).map(|(b, r)| b.finish(r)));
        let flushed = match shared.failed.borrow().clone() {
            Some(reason) => Err(reason),
            None => db.flush().map(drop).map_err(|e| e.to_string()),
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

/// Runs every body of `batch` in one transaction; if one aborts, each in its
/// own, so each gets its own result.
fn transact(trees: &[sled::Tree], batch: &[Box<dyn Batched>]) -> Vec<Result<()>> {
    let one = |b: &dyn Batched| -> Result<()> { Ok(trees.transaction(|t| b.body(t))?) };
    match batch {
        [] => Vec::new(),
        [b] => vec![one(b.as_ref())],
        _ => match trees.transaction(|t| batch.iter().try_for_each(|b| b.body(t))) {
            Ok(()) => batch.iter().map(|_| Ok(())).collect(),
            Err(TransactionError::Abort(_)) => batch.iter().map(|b| one(b.as_ref())).collect(),
            Err(TransactionError::Storage(e)) => batch
                .iter()
                .map(|_| Err(StoreError::from(e.clone())))
                .collect(),
        },
    }
}
