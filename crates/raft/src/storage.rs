//! The log as the core reads it: the [`Storage`] trait, and [`MemStorage`] for tests.
//!
//! As in etcd's raft, the core never writes storage: it hands the driver entries, hard state and
//! snapshots in a [`crate::Ready`], and the driver makes them durable and then makes them visible
//! through this trait. The core only reads.

use crate::{Entry, HardState, LogIndex, Snapshot, SnapshotMeta, Term};

/// Why storage could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The requested index is before the first index (it was compacted into a snapshot).
    #[error("log index compacted into a snapshot")]
    Compacted,
    /// The requested index is after the last index.
    #[error("log index not available")]
    Unavailable,
    /// The storage failed; the node cannot go on safely.
    #[error("storage failure: {0}")]
    Other(String),
}

/// Read access to the durable part of a node's log (etcd's `Storage` interface).
///
/// Invariants an implementation keeps: entries are contiguous from `first_index()` to
/// `last_index()`; `term(first_index() - 1)` is the snapshot's term (the "dummy" entry); an
/// empty log has `first_index() == last_index() + 1`.
pub trait Storage {
    /// The hard state last persisted (`HardState::default()` on a fresh node).
    fn hard_state(&self) -> HardState;
    /// Entries in `[lo, hi)`, stopping after `max_bytes` (but always at least one entry).
    fn entries(
        &self,
        lo: LogIndex,
        hi: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError>;
    /// The term of the entry at `index`, for `first_index() - 1 <= index <= last_index()`.
    fn term(&self, index: LogIndex) -> Result<Term, StorageError>;
    /// The index of the first entry still in the log (snapshot index + 1).
    fn first_index(&self) -> LogIndex;
    /// The index of the last entry (the snapshot index if the log is empty).
    fn last_index(&self) -> LogIndex;
    /// The latest snapshot (an empty one at index 0 if none was taken): what the leader's
    /// `InstallSnapshot` carries. A storage whose driver sends snapshots out of band (the
    /// runtime streams the snapshot file) may return the metadata with empty data: the core
    /// only copies what it gets here into the message, and never reads the data itself.
    fn snapshot(&self) -> Result<Snapshot, StorageError>;
    /// The latest snapshot's metadata (read at start for the membership). The default clones
    /// the whole snapshot; implementations that hold it should answer without the data.
    fn snapshot_metadata(&self) -> Result<SnapshotMeta, StorageError> {
        Ok(self.snapshot()?.meta)
    }
}

/// An in-memory [`Storage`] for tests and for drivers that keep the log in memory. "Persisting"
/// is calling its mutators.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    hard_state: HardState,
    snapshot: Snapshot,
    /// `entries[0]` has index `snapshot.meta.index + 1`.
    entries: Vec<Entry>,
}

impl MemStorage {
    /// An empty log.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Records a new hard state.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Appends entries, first discarding any existing entry at or after `entries[0].index`
    /// (a conflicting suffix). Entries before the first index are skipped.
    pub fn append(&mut self, entries: &[Entry]) {
        let first = self.first_index();
        let entries: Vec<&Entry> = entries.iter().filter(|e| e.index >= first).collect();
        let Some(head) = entries.first() else { return };
        assert!(
            head.index <= self.last_index().next(),
            "append would leave a gap: last {} new first {}",
            self.last_index(),
            head.index
        );
        let keep = (head.index.0 - first.0) as usize;
        self.entries.truncate(keep);
        self.entries.extend(entries.into_iter().cloned());
    }

    /// Replaces the whole log by a snapshot received from the leader.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) {
        self.entries.clear();
        if self.hard_state.commit < snapshot.meta.index {
            self.hard_state.commit = snapshot.meta.index;
        }
        self.snapshot = snapshot;
    }

    /// Records the service's own snapshot and discards the log up to its index (keeping the
    /// entries after it).
    pub fn compact(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        if index < self.first_index() {
            return;
        }
        assert!(index <= self.last_index(), "compact beyond the last index");
        let drop = (index.0 + 1 - self.first_index().0) as usize;
        self.entries.drain(..drop);
        self.snapshot = snapshot;
    }

    /// The snapshot metadata.
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        &self.snapshot.meta
    }
}

impl Storage for MemStorage {
    fn hard_state(&self) -> HardState {
        self.hard_state
    }

    fn entries(
        &self,
        lo: LogIndex,
        hi: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        window_entries(&self.snapshot.meta, &self.entries, lo, hi, max_bytes)
    }

    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        window_term(&self.snapshot.meta, &self.entries, index)
    }

    fn first_index(&self) -> LogIndex {
        self.snapshot.meta.index.next()
    }

    fn last_index(&self) -> LogIndex {
        LogIndex(self.snapshot.meta.index.0 + self.entries.len() as u64)
    }

    fn snapshot(&self) -> Result<Snapshot, StorageError> {
        Ok(self.snapshot.clone())
    }

    fn snapshot_metadata(&self) -> Result<SnapshotMeta, StorageError> {
        Ok(self.snapshot.meta.clone())
    }
}

/// [`Storage::entries`] for a log kept in memory as a snapshot followed by `entries` (the
/// entries at indexes `snapshot.index + 1 ..`): the entries in `[lo, hi)`, at most `max_bytes`
/// of them but at least one. Shared by [`MemStorage`] and the durable storage's cache.
pub fn window_entries(
    snapshot: &SnapshotMeta,
    entries: &[Entry],
    lo: LogIndex,
    hi: LogIndex,
    max_bytes: usize,
) -> Result<Vec<Entry>, StorageError> {
    let first = snapshot.index.next();
    let last = LogIndex(snapshot.index.0 + entries.len() as u64);
    if lo < first {
        return Err(StorageError::Compacted);
    }
    if hi > last.next() || lo > hi {
        return Err(StorageError::Unavailable);
    }
    let slice = &entries[(lo.0 - first.0) as usize..(hi.0 - first.0) as usize];
    Ok(limit_size(slice, max_bytes))
}

/// [`Storage::term`] for the same in-memory layout as [`window_entries`].
pub fn window_term(
    snapshot: &SnapshotMeta,
    entries: &[Entry],
    index: LogIndex,
) -> Result<Term, StorageError> {
    if index == snapshot.index {
        return Ok(snapshot.term);
    }
    if index < snapshot.index {
        return Err(StorageError::Compacted);
    }
    let offset = (index.0 - snapshot.index.0 - 1) as usize;
    entries
        .get(offset)
        .map(|e| e.term)
        .ok_or(StorageError::Unavailable)
}

/// The longest prefix of `entries` within `max_bytes`, but at least one entry.
pub fn limit_size(entries: &[Entry], max_bytes: usize) -> Vec<Entry> {
    let mut total = 0usize;
    let mut n = 0;
    for e in entries {
        total += e.size_bytes();
        if n > 0 && total > max_bytes {
            break;
        }
        n += 1;
    }
    entries[..n].to_vec()
}
