//! The node's view of its log: the durable part (read through [`Storage`]) plus the unstable
//! part (entries and a snapshot handed to the driver but not yet reported durable), and the
//! commit and apply positions (etcd's `raftLog` + `unstable`).

use crate::storage::{limit_size, Storage, StorageError};
use crate::{Entry, LogIndex, Snapshot, Term};

pub(crate) struct RaftLog<S> {
    pub(crate) storage: S,
    /// A snapshot received from the leader, not yet durable.
    unstable_snapshot: Option<Snapshot>,
    /// Entries not yet durable; `unstable[0]` has index `offset`. They may replace a suffix of
    /// the durable log (a conflict, §5.3).
    unstable: Vec<Entry>,
    offset: LogIndex,
    /// Highest index known committed (Figure 2 `commitIndex`).
    pub(crate) committed: LogIndex,
    /// Highest index the state machine applied (Figure 2 `lastApplied`).
    pub(crate) applied: LogIndex,
}

impl<S: Storage> RaftLog<S> {
    pub(crate) fn new(storage: S, applied: LogIndex) -> RaftLog<S> {
        let hs = storage.hard_state();
        let first = storage.first_index();
        let last = storage.last_index();
        let mut committed = hs.commit.max(first.prev());
        if committed > last {
            // The hard state was written but the entries it covers were lost (they are written
            // first, so only a buggy driver does this); never claim to have what we lack.
            tracing::warn!(%committed, %last, "hard-state commit beyond the log; clamping");
            committed = last;
        }
        let applied = applied.max(first.prev()).min(committed);
        RaftLog {
            storage,
            unstable_snapshot: None,
            unstable: Vec::new(),
            offset: last.next(),
            committed,
            applied,
        }
    }

    pub(crate) fn first_index(&self) -> LogIndex {
        match &self.unstable_snapshot {
            Some(s) => s.meta.index.next(),
            None => self.storage.first_index(),
        }
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        if let Some(e) = self.unstable.last() {
            return e.index;
        }
        match &self.unstable_snapshot {
            Some(s) => s.meta.index,
            None => self.offset.prev().min(self.storage.last_index()),
        }
    }

    pub(crate) fn last_term(&self) -> Term {
        self.term(self.last_index()).unwrap_or_default()
    }

    /// The highest index that is durable on this node.
    pub(crate) fn persisted(&self) -> LogIndex {
        match &self.unstable_snapshot {
            Some(s) => s.meta.index.prev().min(self.storage.last_index()),
            None => self.storage.last_index().min(self.offset.prev()),
        }
    }

    pub(crate) fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if let Some(s) = &self.unstable_snapshot {
            if index == s.meta.index {
                return Ok(s.meta.term);
            }
            if index < s.meta.index {
                return Err(StorageError::Compacted);
            }
        }
        if index >= self.offset {
            let i = (index.0 - self.offset.0) as usize;
            return match self.unstable.get(i) {
                Some(e) => Ok(e.term),
                None => Err(StorageError::Unavailable),
            };
        }
        self.storage.term(index)
    }

    pub(crate) fn match_term(&self, index: LogIndex, term: Term) -> bool {
        self.term(index) == Ok(term)
    }

    /// Paper §5.4.1: a log is at least as up to date if its last term is higher, or equal with
    /// an index at least as high.
    pub(crate) fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        let my_term = self.last_term();
        last_term > my_term || (last_term == my_term && last_index >= self.last_index())
    }

    /// Entries in `[lo, hi)`, at most `max_bytes` (at least one).
    pub(crate) fn entries(
        &self,
        lo: LogIndex,
        hi: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        if lo < self.first_index() {
            return Err(StorageError::Compacted);
        }
        if hi > self.last_index().next() || lo > hi {
            return Err(StorageError::Unavailable);
        }
        if lo == hi {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if lo < self.offset {
            let stable_hi = hi.min(self.offset);
            out = self.storage.entries(lo, stable_hi, max_bytes)?;
            if (out.len() as u64) < stable_hi.0 - lo.0 || hi <= self.offset {
                return Ok(out);
            }
        }
        let from = lo.max(self.offset);
        let a = (from.0 - self.offset.0) as usize;
        let b = (hi.0 - self.offset.0) as usize;
        let used: usize = out.iter().map(Entry::size_bytes).sum();
        if out.is_empty() {
            return Ok(limit_size(&self.unstable[a..b], max_bytes));
        }
        for e in &self.unstable[a..b] {
            if used + e.size_bytes() > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    /// Appends entries after `entries[0].index - 1`, discarding any conflicting suffix.
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let Some(head) = entries.first() else { return };
        assert!(
            head.index > self.committed,
            "truncating committed entries (head {} commit {})",
            head.index,
            self.committed
        );
        assert!(
            head.index <= self.last_index().next(),
            "append leaves a gap"
        );
        if head.index >= self.offset {
            let keep = (head.index.0 - self.offset.0) as usize;
            self.unstable.truncate(keep);
        } else {
            // Replacing part of the durable log: everything from head.index is now unstable and
            // the driver truncates the durable suffix when it persists these entries.
            self.unstable.clear();
            self.offset = head.index;
        }
        self.unstable.extend_from_slice(entries);
    }

    /// The first entry that is new or conflicts with the log, if any (Figure 2, AppendEntries
    /// step 3).
    pub(crate) fn find_conflict(&self, entries: &[Entry]) -> Option<usize> {
        entries
            .iter()
            .position(|e| !self.match_term(e.index, e.term))
    }

    pub(crate) fn commit_to(&mut self, index: LogIndex) {
        // Callers clamp network input; committing past the log would apply entries we lack.
        assert!(
            index <= self.last_index(),
            "commit {index} beyond last index {}",
            self.last_index()
        );
        if index > self.committed {
            self.committed = index;
        }
    }

    /// Replaces the log by a snapshot (paper §7).
    pub(crate) fn restore(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        self.committed = index;
        self.unstable.clear();
        self.offset = index.next();
        self.unstable_snapshot = Some(snapshot);
    }

    pub(crate) fn unstable_entries(&self) -> &[Entry] {
        &self.unstable
    }

    pub(crate) fn unstable_snapshot(&self) -> Option<&Snapshot> {
        self.unstable_snapshot.as_ref()
    }

    /// Committed, durable entries not yet handed to the state machine.
    pub(crate) fn next_committed_entries(&self, since: LogIndex, max_bytes: usize) -> Vec<Entry> {
        if self.unstable_snapshot.is_some() {
            return Vec::new();
        }
        let hi = self.committed.min(self.persisted());
        if hi <= since {
            return Vec::new();
        }
        match self.entries(since.next(), hi.next(), max_bytes) {
            Ok(e) => e,
            Err(err) => {
                tracing::error!(%err, %since, %hi, "cannot read committed entries");
                Vec::new()
            }
        }
    }

    /// The driver made entries up to `(index, term)` durable.
    pub(crate) fn stable_to(&mut self, index: LogIndex, term: Term) {
        if index < self.offset {
            return;
        }
        let i = (index.0 - self.offset.0) as usize;
        if self.unstable.get(i).map(|e| e.term) != Some(term) {
            return; // replaced meanwhile by a conflicting append
        }
        self.unstable.drain(..=i);
        self.offset = index.next();
    }

    pub(crate) fn stable_snapshot_to(&mut self, index: LogIndex) {
        if self.unstable_snapshot.as_ref().map(|s| s.meta.index) == Some(index) {
            self.unstable_snapshot = None;
            if self.applied < index {
                self.applied = index;
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Result<Snapshot, StorageError> {
        match &self.unstable_snapshot {
            Some(s) => Ok(s.clone()),
            None => self.storage.snapshot(),
        }
    }
}
