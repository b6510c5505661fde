//! The replicated-log service of the `shoal-raft-node` binary: a trivial state machine (the
//! count and a running hash of applied commands) and its client protocol. It exists to run a
//! real Raft node end to end in the real-process tests; real services (KV) bring their own.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use shoal_raft::LogIndex;

use crate::node::StateMachine;

/// A client request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DemoRequest {
    /// Append a command; answered once this node applied it.
    Propose {
        /// The command.
        data: Vec<u8>,
    },
    /// The node's Raft status and applied state.
    Status,
}

/// A reply to a [`DemoRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DemoResponse {
    /// The command was committed and applied at `index`.
    Applied {
        /// Its log index.
        index: u64,
        /// The term it was appended in.
        term: u64,
    },
    /// Ask another node.
    NotLeader {
        /// The leader this node knows of.
        leader: Option<u64>,
    },
    /// The request failed; retrying may help.
    Error(String),
    /// Answer to [`DemoRequest::Status`].
    Status(DemoStatus),
}

/// What [`DemoRequest::Status`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoStatus {
    /// The node.
    pub id: u64,
    /// Whether it is the leader.
    pub is_leader: bool,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Its current term.
    pub term: u64,
    /// Its commit index.
    pub commit: u64,
    /// The state machine's state.
    pub applied: AppliedLog,
}

/// The replicated state: how many commands were applied, up to which index, and a hash of
/// all of them in order (equal hashes: equal applied sequences, with high probability).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedLog {
    /// Commands applied.
    pub count: u64,
    /// Index of the last command applied.
    pub last_index: u64,
    /// FNV-1a (64-bit) over every applied `(index, command)`.
    pub hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl AppliedLog {
    fn absorb(&mut self, index: LogIndex, command: &[u8]) {
        if self.count == 0 {
            self.hash = FNV_OFFSET;
        }
        for b in index.0.to_le_bytes().iter().chain(command) {
            self.hash ^= u64::from(*b);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
        self.count += 1;
        self.last_index = index.0;
    }
}

/// The state machine: an [`AppliedLog`] shared with whoever serves status requests.
#[derive(Debug, Clone, Default)]
pub struct DemoStateMachine {
    /// The state, shared.
    pub state: Arc<Mutex<AppliedLog>>,
}

impl DemoStateMachine {
    /// The current state.
    pub fn get(&self) -> AppliedLog {
        match self.state.lock() {
            Ok(s) => *s,
            Err(p) => *p.into_inner(),
        }
    }

    fn set(&self, f: impl FnOnce(&mut AppliedLog)) {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

impl StateMachine for DemoStateMachine {
    fn apply(&mut self, index: LogIndex, command: &[u8]) {
        self.set(|s| s.absorb(index, command));
    }

    fn snapshot(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.get()).unwrap_or_default()
    }

    fn restore(&mut self, _index: LogIndex, data: &[u8]) -> Result<(), String> {
        let restored: AppliedLog = if data.is_empty() {
            AppliedLog::default()
        } else {
            postcard::from_bytes(data).map_err(|e| e.to_string())?
        };
        self.set(|s| *s = restored);
        Ok(())
    }
}
