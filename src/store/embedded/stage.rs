//! Staged writes: how the commit thread stores a short write without a
//! sled transaction. Every sled transaction rolls sled's I/O buffer and
//! wakes sled's I/O threads, which cost more than an accept's own work; a
//! staged write costs plain inserts.
//!
//! The write's body runs against `Staged` trees: its reads see sled plus
//! its own earlier writes, and its writes are only recorded. If the body
//! aborts, nothing was written. Otherwise the recorded writes are stored
//! as one intent record (`meta` key `intent`, a single insert), applied to
//! their trees in the body's order, and the intent is removed.
//!
//! sled recovers a prefix of its log, so after a crash at most the last
//! staged write is partly applied, and then its intent is still there:
//! `replay_intent` applies it again on open. No later write can be in the
//! prefix, because every write to the trees (these, and every transaction
//! through `Inner::tx`) holds `Inner::writing`; replaying the intent can
//! therefore never undo a newer value.

use super::{Inner, Kv, Result, StoreError, TxResult, WriteGuard, META};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::IVec;
use std::cell::RefCell;

const INTENT: &str = "intent";

/// One recorded write: tree index, key, new value (`None`: removed).
#[derive(Serialize, Deserialize)]
pub(super) struct Write(u8, Vec<u8>, Option<Vec<u8>>);

impl Kv for TransactionalTree {
    fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<IVec>> {
        Ok(TransactionalTree::get(self, key)?)
    }

    fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> TxResult<()> {
        TransactionalTree::insert(self, key.as_ref(), value)?;
        Ok(())
    }
}

/// A tree as a staged write's body sees it.
pub(super) struct Staged<'a> {
    index: u8,
    tree: super::trees::Reader<'a>,
    writes: &'a RefCell<Vec<Write>>,
}

impl Staged<'_> {
    fn staged(&self, key: &[u8]) -> Option<Option<IVec>> {
        self.writes
            .borrow()
            .iter()
            .rev()
            .find(|w| w.0 == self.index && w.1 == key)
            .map(|w| w.2.as_deref().map(IVec::from))
    }
}

fn storage(e: sled::Error) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Storage(e)
}

impl Kv for Staged<'_> {
    fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<IVec>> {
        match self.staged(key.as_ref()) {
            Some(v) => Ok(v),
            None => self.tree.get(key).map_err(storage),
        }
    }

    fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> TxResult<()> {
        let value: IVec = value.into();
        self.writes.borrow_mut().push(Write(
            self.index,
            key.as_ref().to_vec(),
            Some(value.to_vec()),
        ));
        Ok(())
    }
}

impl Inner {
    /// Runs `body` as a staged write (module doc): all of it or none of it
    /// is in the trees when this returns, durable at the next flush.
    pub(super) fn staged<T>(&self, body: impl FnOnce(&[Staged]) -> TxResult<T>) -> Result<T> {
        let w = self.write_lock();
        let (value, writes) = self.record(body)?;
        if !writes.is_empty() {
            self.apply(&w, &writes)?;
        }
        Ok(value)
    }

    /// Runs `body` against staged trees: its answer and what it would write.
    pub(super) fn record<T>(
        &self,
        body: impl FnOnce(&[Staged]) -> TxResult<T>,
    ) -> Result<(T, Vec<Write>)> {
        let writes = RefCell::new(Vec::new());
        let trees: Vec<Staged> = self
            .trees
            .readers()
            .enumerate()
            .map(|(i, tree)| Staged {
                index: i as u8,
                tree,
                writes: &writes,
            })
            .collect();
        let value = match body(&trees) {
            Ok(v) => v,
            Err(ConflictableTransactionError::Abort(e)) => return Err(e),
            Err(ConflictableTransactionError::Storage(e)) => return Err(e.into()),
            Err(e) => return Err(StoreError::Failed(format!("staged write: {e:?}"))),
        };
        drop(trees);
        Ok((value, writes.into_inner()))
    }

    /// The intent and the first `n` writes: what a crash mid-apply leaves.
    #[cfg(test)]
    pub(super) fn apply_partly(&self, writes: &[Write], n: usize) -> Result<()> {
        let w = self.write_lock();
        w.tree(META).insert(INTENT, super::encode(&writes)?)?;
        for Write(tree, key, value) in &writes[..n] {
            let tree = w.tree(usize::from(*tree));
            match value {
                Some(v) => tree.insert(key, v.as_slice())?,
                None => tree.remove(key)?,
            };
        }
        Ok(())
    }

    fn apply(&self, w: &WriteGuard, writes: &[Write]) -> Result<()> {
        let meta = w.tree(META);
        meta.insert(INTENT, super::encode(&writes)?)?;
        for (i, Write(tree, key, value)) in writes.iter().enumerate() {
            if i == 1 {
                crate::crash_point!("staged-write-applying");
            }
            if usize::from(*tree) >= self.trees.len() {
                return Err(StoreError::Corrupt(format!("intent names tree {tree}")));
            }
            let tree = w.tree(usize::from(*tree));
            match value {
                Some(v) => tree.insert(key, v.as_slice())?,
                None => tree.remove(key)?,
            };
        }
        meta.remove(INTENT)?;
        Ok(())
    }

    /// Finishes a staged write that a crash interrupted (module doc).
    pub(super) fn replay_intent(&self) -> Result<bool> {
        let w = self.write_lock();
        let Some(bytes) = w.tree(META).get(INTENT)? else {
            return Ok(false);
        };
        let writes: Vec<Write> = super::decode(&bytes)?;
        self.apply(&w, &writes)?;
        Ok(true)
    }
}
