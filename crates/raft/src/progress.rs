//! What a leader knows about each follower (Figure 2 `nextIndex`/`matchIndex`) plus flow
//! control: probe, replicate (pipelined, bounded in-flight appends) and snapshot states, as in
//! etcd's `tracker` package.

use crate::LogIndex;
use std::collections::VecDeque;

/// Replication state of one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressState {
    /// Where the follower's log diverges is unknown: one append at a time.
    Probe,
    /// The follower's log matches up to `match_index`: stream appends, up to the in-flight limit.
    Replicate,
    /// A snapshot is on its way; nothing else is sent until it is acknowledged.
    Snapshot,
}

/// The leader's record of one follower.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Highest index known replicated on the follower.
    pub match_index: LogIndex,
    /// Index of the next entry to send.
    pub next_index: LogIndex,
    /// Flow-control state.
    pub state: ProgressState,
    /// In [`ProgressState::Probe`], an append was sent and not yet answered.
    pub(crate) probe_sent: bool,
    /// Last index of each append in flight, oldest first.
    pub(crate) inflight: VecDeque<LogIndex>,
    /// In [`ProgressState::Snapshot`], the index of the snapshot sent.
    pub(crate) pending_snapshot: LogIndex,
    /// Heard from since the last check-quorum round.
    pub(crate) recent_active: bool,
    /// Heartbeat responses since the match index last moved while entries were outstanding.
    pub(crate) idle_heartbeats: u32,
}

impl Progress {
    pub(crate) fn new(next_index: LogIndex) -> Progress {
        Progress {
            match_index: LogIndex(0),
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            pending_snapshot: LogIndex(0),
            recent_active: false,
            idle_heartbeats: 0,
        }
    }

    pub(crate) fn is_paused(&self, max_inflight: usize) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflight.len() >= max_inflight,
            ProgressState::Snapshot => true,
        }
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.state = state;
        self.probe_sent = false;
        self.inflight.clear();
        self.pending_snapshot = LogIndex(0);
    }

    pub(crate) fn become_probe(&mut self) {
        let next = if self.state == ProgressState::Snapshot {
            self.pending_snapshot.max(self.match_index).next()
        } else {
            self.match_index.next()
        };
        self.reset_state(ProgressState::Probe);
        self.next_index = next;
    }

    pub(crate) fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.next_index = self.match_index.next();
    }

    pub(crate) fn become_snapshot(&mut self, snapshot_index: LogIndex) {
        self.reset_state(ProgressState::Snapshot);
        self.pending_snapshot = snapshot_index;
    }

    /// An append ending at `last` was sent.
    pub(crate) fn sent_append(&mut self, last: LogIndex, n_entries: usize) {
        match self.state {
            ProgressState::Replicate => {
                if n_entries > 0 {
                    self.next_index = last.next();
                    self.inflight.push_back(last);
                }
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot => {}
        }
    }

    /// The follower acknowledged everything up to `index`. Returns whether it was news.
    pub(crate) fn maybe_update(&mut self, index: LogIndex) -> bool {
        while self.inflight.front().is_some_and(|&i| i <= index) {
            self.inflight.pop_front();
        }
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
            self.idle_heartbeats = 0;
        }
        if self.next_index < index.next() {
            self.next_index = index.next();
        }
        updated
    }
}
