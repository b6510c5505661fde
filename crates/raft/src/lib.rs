//! Shoal's Raft core: a deterministic, sans-IO implementation of the Raft consensus algorithm
//! (Ongaro & Ousterhout, 2014) in the shape of etcd's `RawNode` (DESIGN.md §4).
//!
//! **What this crate owns:** the protocol — terms, elections (with pre-vote and check-quorum),
//! log replication with fast backtracking, pipelining and flow control, the commit rule of
//! Figure 8, snapshots and InstallSnapshot, read-index and lease reads, leadership transfer,
//! membership changes (learners, single-voter and joint changes: [`RawNode::propose_conf_change`],
//! `docs/raft.md` "Membership changes").
//!
//! **What it must never do:** I/O of any kind, read a clock, spawn, use a global or unseeded
//! RNG, or iterate a `std` hash map. Time is [`RawNode::tick`]; randomness comes from
//! [`Config::rng_seed`]; durability is the driver's job, described by each [`Ready`]. The same
//! code therefore runs in the simulator and in the tokio runtime, and a simulation seed replays
//! a run bit for bit.
//!
//! The core reads its log through the [`Storage`] trait; [`MemStorage`] is an in-memory
//! implementation, and `shoal-storage` provides the durable one.
//!
//! # Driving a node
//!
//! A driver carries out each [`Ready`] in the order its documentation states, with the
//! reasons; the steps in the example below are numbered as there. Services do not drive a
//! `RawNode` themselves: they host their state machine in the replica shell
//! (`shoal_replica::Replica`), which does it for the tokio driver and the simulator's alike
//! (`docs/architecture.md`). This bare loop is what the core's own tests use.
//!
//! ```
//! use shoal_raft::{Config, MemStorage, NodeId, RawNode, Ready};
//!
//! // A single-node cluster: it elects itself and commits on its own.
//! let mut node = RawNode::new(Config::new(NodeId(1), vec![NodeId(1)]), MemStorage::new())
//!     .unwrap();
//! node.campaign();
//! let mut applied = Vec::new();
//! let mut proposed = false;
//! for _ in 0..10 {
//!     if node.status().leader == Some(NodeId(1)) && !proposed {
//!         node.propose(b"set x = 1".to_vec()).unwrap();
//!         proposed = true;
//!     }
//!     if !node.has_ready() {
//!         node.tick();
//!         continue;
//!     }
//!     let rd: Ready = node.ready();
//!     // 1. send rd.messages (none here: no peers)
//!     // 2. persist, with one fsync
//!     if let Some(s) = rd.snapshot.clone() { node.storage_mut().apply_snapshot(s); }
//!     node.storage_mut().append(&rd.entries);
//!     if let Some(hs) = rd.hard_state { node.storage_mut().set_hard_state(hs); }
//!     // 3. send rd.persisted_messages
//!     // 4. apply
//!     for e in &rd.committed_entries {
//!         if !e.data.is_empty() { applied.push(e.data.clone()); }
//!     }
//!     // 5. rd.compact, 6. rd.read_states: nothing here
//!     node.advance();
//! }
//! assert_eq!(applied, vec![b"set x = 1".to_vec()]);
//! ```

#![warn(missing_docs)]

mod config;
mod log;
mod membership;
mod progress;
mod raft;
mod raw_node;
mod storage;

pub use config::{
    Config, ReadOnlyOption, DEFAULT_ELECTION_TICK, DEFAULT_HEARTBEAT_TICK,
    DEFAULT_MAX_COMMITTED_BYTES_PER_READY, DEFAULT_MAX_ENTRIES_BYTES_PER_APPEND,
    DEFAULT_MAX_INFLIGHT_APPENDS, DEFAULT_MAX_LEARNER_LAG_ENTRIES, DEFAULT_MAX_PENDING_READS,
    DEFAULT_MAX_UNCOMMITTED_ENTRIES,
};
pub use progress::{Progress, ProgressState};
pub use raft::Role;
pub use raw_node::{PeerStatus, RawNode, ReadState, Ready, SoftState, Status};
pub use shoal_wire::raft::{
    ConfChange, ConfChangeStep, Entry, EntryKind, HardState, LogIndex, Membership, Message,
    MessageBody, NodeId, RejectHint, Snapshot, SnapshotMeta, Term,
};
pub use storage::{limit_size, window_entries, window_term, MemStorage, Storage, StorageError};

/// Errors returned to the driver or service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Only the leader accepts this request; `leader` is who to ask instead, if known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// The request was refused, e.g. a limit was reached or a transfer is in progress.
    #[error("proposal dropped: {0}")]
    ProposalDropped(&'static str),
    /// A message named a node outside the cluster.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// `snapshot` at an index already compacted.
    #[error("snapshot at {index} is older than the log start")]
    SnapshotOutOfDate {
        /// The requested index.
        index: LogIndex,
    },
    /// `snapshot` at an index the state machine has not applied.
    #[error("snapshot at {index} is beyond the applied index {applied}")]
    SnapshotNotApplied {
        /// The requested index.
        index: LogIndex,
        /// The applied index.
        applied: LogIndex,
    },
    /// A membership change is already in flight (proposed and not yet committed), or this
    /// leader has not yet committed an entry of its own term (its no-op at `pending`): only
    /// one change at a time, and none before that (the 2015 single-server-change bug). Retry
    /// once the commit index reaches `pending`.
    #[error(
        "a membership change is in flight: entry {pending} must be committed first \
         (committed: {committed}); retry shortly"
    )]
    ConfChangeInFlight {
        /// The index that must be committed first.
        pending: LogIndex,
        /// The leader's commit index.
        committed: LogIndex,
    },
    /// Promotion refused: the learner's log is more than
    /// [`Config::max_learner_lag_entries`] behind the leader's. Retry once it caught up.
    #[error(
        "learner is behind: it holds the log up to {match_index}, the leader up to \
         {last_index}; promote it once it has caught up"
    )]
    LearnerBehind {
        /// The learner's match index.
        match_index: LogIndex,
        /// The leader's last index.
        last_index: LogIndex,
    },
    /// The membership change makes no sense for the current membership (the message says
    /// why: an unknown node, a node already a member, removing the last voter, ...).
    #[error("membership change refused: {0}")]
    InvalidConfChange(String),
    /// The configuration is unusable.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}
