//! The sled trees and the write lock, as types: anyone may read a tree
//! (`Reader`), but a tree can only be written through a `Writer`, and a
//! `Writer` only comes from a `WriteGuard`, which holds the lock. So a write
//! to the trees without `Inner::writing` held does not compile, and the rule
//! that makes intent replay safe (`stage.rs`: nothing newer follows an
//! intent in the log) is kept by the compiler, not by a comment.
//!
//! Nothing here hands out a `sled::Tree`: one could be cloned and written
//! after its guard is gone.

use sled::transaction::{TransactionResult, TransactionalTree};
use sled::{IVec, Transactional};
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

pub(super) struct Trees {
    trees: Vec<sled::Tree>,
    /// Held by every write to the trees (through `WriteGuard`), and by the
    /// commit thread from its flush to its fdatasync (`durable.rs`).
    writing: Arc<Mutex<()>>,
}

impl Trees {
    pub(super) fn new(trees: Vec<sled::Tree>) -> Trees {
        Trees {
            trees,
            writing: Arc::new(Mutex::new(())),
        }
    }

    pub(super) fn read(&self, i: usize) -> Reader<'_> {
        Reader(&self.trees[i])
    }

    /// Every tree, in index order, for reading.
    pub(super) fn readers(&self) -> impl Iterator<Item = Reader<'_>> {
        self.trees.iter().map(Reader)
    }

    pub(super) fn len(&self) -> usize {
        self.trees.len()
    }

    /// Takes the write lock: from now until the guard drops, this thread
    /// alone writes the trees.
    pub(super) fn write(&self) -> WriteGuard<'_> {
        WriteGuard {
            trees: &self.trees,
            _held: super::lock(&self.writing),
        }
    }

    /// The lock itself, for the commit thread only: it holds it over a
    /// flush and its syncs, and writes no tree.
    pub(super) fn lock_for_commits(&self) -> Arc<Mutex<()>> {
        Arc::clone(&self.writing)
    }
}

/// The write lock, held: the only way to a `Writer`.
pub(super) struct WriteGuard<'a> {
    trees: &'a [sled::Tree],
    _held: MutexGuard<'a, ()>,
}

impl WriteGuard<'_> {
    /// Tree `i`, for writing while this guard lives.
    pub(super) fn tree(&self, i: usize) -> Writer<'_> {
        Writer(Reader(&self.trees[i]))
    }

    /// A sled transaction over every tree, under this guard.
    pub(super) fn transaction<T, E>(
        &self,
        f: impl Fn(&[TransactionalTree]) -> sled::transaction::ConflictableTransactionResult<T, E>,
    ) -> TransactionResult<T, E> {
        self.trees.transaction(|t| f(t))
    }
}

/// A tree, read only.
#[derive(Clone, Copy)]
pub(super) struct Reader<'a>(&'a sled::Tree);

impl Reader<'_> {
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.0.get(key)
    }

    pub(super) fn contains_key(&self, key: impl AsRef<[u8]>) -> sled::Result<bool> {
        self.0.contains_key(key)
    }

    pub(super) fn iter(&self) -> sled::Iter {
        self.0.iter()
    }

    pub(super) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> sled::Iter {
        self.0.scan_prefix(prefix)
    }

    pub(super) fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> sled::Iter {
        self.0.range(range)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A tree, writable while the `WriteGuard` it came from lives.
pub(super) struct Writer<'g>(Reader<'g>);

impl<'g> std::ops::Deref for Writer<'g> {
    type Target = Reader<'g>;
    fn deref(&self) -> &Reader<'g> {
        &self.0
    }
}

impl Writer<'_> {
    pub(super) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<IVec>,
    ) -> sled::Result<Option<IVec>> {
        self.0 .0.insert(key, value)
    }

    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.0 .0.remove(key)
    }

    pub(super) fn apply_batch(&self, batch: sled::Batch) -> sled::Result<()> {
        self.0 .0.apply_batch(batch)
    }

    pub(super) fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        old: Option<impl AsRef<[u8]>>,
        new: Option<impl Into<IVec>>,
    ) -> sled::Result<Result<(), sled::CompareAndSwapError>> {
        self.0 .0.compare_and_swap(key, old, new)
    }
}
