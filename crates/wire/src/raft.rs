//! Raft message types (DESIGN.md §3–§4).
//!
//! Messages are one-way, as in etcd: a vote request and its response are two messages. Every
//! message carries the sender's current term (Raft paper §5.1: "if one server's current term is
//! smaller than the other's, then it updates its current term").
//!
//! The newtypes [`Term`], [`LogIndex`] and [`NodeId`] live here because they cross the wire; the
//! `shoal-raft` crate re-exports them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A Raft term (paper §5.1). Terms start at 0 on a fresh node and only increase.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Term(pub u64);

/// A position in the replicated log. Index 0 is the empty log's "previous" position; the first
/// real entry has index 1 (paper Figure 2).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogIndex(pub u64);

/// The identity of a Raft node within its cluster. 0 is never a valid node id.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct NodeId(pub u64);

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl LogIndex {
    /// The next index (saturating, so a corrupt `u64::MAX` cannot wrap around).
    pub fn next(self) -> LogIndex {
        LogIndex(self.0.saturating_add(1))
    }
    /// The previous index; `LogIndex(0).prev()` is `LogIndex(0)`.
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
}

/// What a log entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A command of the replicated state machine, opaque to Raft.
    Normal,
    /// The empty entry a new leader appends at the start of its term (paper §8), so that
    /// entries of earlier terms get committed (Figure 8).
    Noop,
    /// A membership change: `data` is a postcard-encoded [`ConfChange`] (Raft thesis §4).
    /// Appended last so that logs written before it still decode.
    ConfChange,
}

/// One step of a membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfChangeStep {
    /// Add a new voting member.
    AddVoter(NodeId),
    /// Add a non-voting member (a learner): it receives the log and snapshots but counts for
    /// no quorum and never campaigns.
    AddLearner(NodeId),
    /// Turn a learner into a voter.
    Promote(NodeId),
    /// Remove a voter or a learner.
    Remove(NodeId),
}

/// The voting and non-voting members of a Raft group (etcd's `ConfState`).
///
/// In a joint configuration (thesis §4.3) `voters_outgoing` is not empty, and every decision
/// (election, commit, check-quorum, read-index) needs a majority of `voters` **and** a
/// majority of `voters_outgoing`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The voters (of the incoming configuration while joint), sorted, without duplicates.
    pub voters: Vec<NodeId>,
    /// The voters of the outgoing configuration while joint; empty otherwise.
    pub voters_outgoing: Vec<NodeId>,
    /// The learners, sorted, never also voters.
    pub learners: Vec<NodeId>,
    /// While joint: the leader leaves the joint configuration on its own once it applied it.
    pub auto_leave: bool,
}

impl Membership {
    /// A simple (not joint) membership of these voters.
    pub fn of_voters(mut voters: Vec<NodeId>) -> Membership {
        voters.sort();
        voters.dedup();
        Membership {
            voters,
            ..Membership::default()
        }
    }

    /// In a joint configuration (thesis §4.3).
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Votes in the incoming or the outgoing configuration.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.voters_outgoing.contains(&id)
    }

    /// A learner (never also a voter).
    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id)
    }

    /// A voter (incoming or outgoing) or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    /// No members at all: a server that joins and has not yet learned the membership.
    pub fn is_empty(&self) -> bool {
        self.voters.is_empty() && self.voters_outgoing.is_empty() && self.learners.is_empty()
    }

    /// Every member, sorted, without duplicates.
    pub fn members(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self
            .voters
            .iter()
            .chain(&self.voters_outgoing)
            .chain(&self.learners)
            .copied()
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Every voter (incoming and outgoing), sorted, without duplicates.
    pub fn all_voters(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self
            .voters
            .iter()
            .chain(&self.voters_outgoing)
            .copied()
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = |v: &[NodeId]| {
            v.iter()
                .map(|n| n.0.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(f, "voters=({})", ids(&self.voters))?;
        if self.is_joint() {
            write!(f, "&&({})", ids(&self.voters_outgoing))?;
        }
        if !self.learners.is_empty() {
            write!(f, " learners=({})", ids(&self.learners))?;
        }
        if self.auto_leave {
            write!(f, " autoleave")?;
        }
        Ok(())
    }
}

/// The payload of an [`EntryKind::ConfChange`] entry.
///
/// It carries the resulting membership as well as the steps, so a node applying it needs
/// nothing else: a server that joins with an empty log learns the whole membership from the
/// first change it applies (the bootstrap membership is not in the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfChange {
    /// The steps requested; empty means "leave the joint configuration".
    pub steps: Vec<ConfChangeStep>,
    /// The membership once this entry is applied.
    pub result: Membership,
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Term of the leader that created the entry.
    pub term: Term,
    /// Position in the log.
    pub index: LogIndex,
    /// What the entry carries.
    pub kind: EntryKind,
    /// The command bytes (empty for [`EntryKind::Noop`]).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Fixed per-entry overhead counted by byte limits (term, index, kind, length prefix).
pub const ENTRY_OVERHEAD_BYTES: usize = 24;

impl Entry {
    /// The size the entry counts for in byte limits (payload plus a fixed overhead).
    pub fn size_bytes(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD_BYTES
    }
}

/// State that must be durable before any message that depends on it is sent (Figure 2,
/// "Persistent state on all servers"; `commit` is kept too so that a restart re-applies less).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// Latest term this node has seen.
    pub term: Term,
    /// Candidate this node voted for in `term`, if any.
    pub vote: Option<NodeId>,
    /// Highest log index known to be committed.
    pub commit: LogIndex,
}

/// Describes what a snapshot replaces: the log up to and including `index`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Index of the last entry the snapshot covers.
    pub index: LogIndex,
    /// Term of that entry.
    pub term: Term,
    /// The voting members at that point (of the incoming configuration, if joint).
    pub voters: Vec<NodeId>,
    /// The learners at that point (empty in snapshots written before membership changes).
    pub learners: Vec<NodeId>,
    /// The outgoing voters, if the snapshot was taken in a joint configuration.
    pub voters_outgoing: Vec<NodeId>,
    /// The joint configuration is left automatically ([`Membership::auto_leave`]).
    pub auto_leave: bool,
}

impl SnapshotMeta {
    /// The membership the snapshot records.
    pub fn membership(&self) -> Membership {
        Membership {
            voters: self.voters.clone(),
            voters_outgoing: self.voters_outgoing.clone(),
            learners: self.learners.clone(),
            auto_leave: self.auto_leave,
        }
    }
}

/// A state-machine snapshot (paper §7).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// What the snapshot covers.
    pub meta: SnapshotMeta,
    /// The service's serialized state, opaque to Raft.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// One Raft message: sender, receiver, the sender's term, and what it says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Receiver.
    pub to: NodeId,
    /// The sender's current term; for a pre-vote request, the term it would campaign in.
    pub term: Term,
    /// The message proper.
    pub body: MessageBody,
}

/// Why a follower rejected an AppendEntries, so the leader can skip back a whole term at a time
/// (the "fast backtracking" optimisation of paper §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectHint {
    /// The term of the follower's entry at the rejected `prev_log_index`, or `None` if its log
    /// is shorter than that.
    pub conflict_term: Option<Term>,
    /// The first index of `conflict_term` in the follower's log; if `conflict_term` is `None`,
    /// the follower's last index + 1.
    pub conflict_index: LogIndex,
}

/// The body of a Raft message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// RequestVote (Figure 2), or a pre-vote (thesis §9.6) when `pre_vote` is set.
    RequestVote {
        /// A pre-vote: the receiver does not change its term or vote.
        pre_vote: bool,
        /// Index of the candidate's last log entry.
        last_log_index: LogIndex,
        /// Term of the candidate's last log entry.
        last_log_term: Term,
        /// Sent because the leader handed leadership over (thesis §3.10): the receiver must not
        /// refuse it because it recently heard from a leader.
        leadership_transfer: bool,
    },
    /// The answer to a [`MessageBody::RequestVote`].
    RequestVoteResponse {
        /// Answers a pre-vote.
        pre_vote: bool,
        /// Whether the vote is granted.
        granted: bool,
    },
    /// AppendEntries (Figure 2).
    AppendEntries {
        /// Index of the entry just before `entries`.
        prev_log_index: LogIndex,
        /// Term of that entry.
        prev_log_term: Term,
        /// Entries to append (empty for a bare commit update).
        entries: Vec<Entry>,
        /// The leader's commit index.
        leader_commit: LogIndex,
    },
    /// The answer to an [`MessageBody::AppendEntries`] or [`MessageBody::InstallSnapshot`].
    AppendEntriesResponse {
        /// On success, the highest index known to match the leader's log. On rejection, the
        /// rejected request's `prev_log_index` (so the leader can tell stale rejections apart).
        index: LogIndex,
        /// `None` on success; the backtracking hint on rejection.
        reject: Option<RejectHint>,
    },
    /// A leader's heartbeat (paper §5.2), kept separate from AppendEntries as in etcd so it is
    /// small and can carry a read-index context (thesis §6.4).
    Heartbeat {
        /// `min(leader commit, follower's match index)`, always safe for the follower to apply.
        commit: LogIndex,
        /// The read-index request this round confirms, if any.
        #[serde(with = "serde_bytes")]
        read_context: Option<Vec<u8>>,
    },
    /// The answer to a [`MessageBody::Heartbeat`].
    HeartbeatResponse {
        /// Echo of the heartbeat's context.
        #[serde(with = "serde_bytes")]
        read_context: Option<Vec<u8>>,
    },
    /// InstallSnapshot (paper §7), sent whole (snapshots are bounded by the service).
    InstallSnapshot {
        /// The snapshot.
        snapshot: Snapshot,
    },
    /// Sent by a leader handing over leadership: campaign now (thesis §3.10).
    TimeoutNow,
    /// A follower forwards a read-index request to its leader.
    ReadIndex {
        /// The caller's context, echoed in the answer.
        #[serde(with = "serde_bytes")]
        context: Vec<u8>,
    },
    /// The leader's answer to a forwarded [`MessageBody::ReadIndex`].
    ReadIndexResponse {
        /// The caller's context.
        #[serde(with = "serde_bytes")]
        context: Vec<u8>,
        /// The commit index the read must wait for.
        index: LogIndex,
    },
}

impl MessageBody {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            MessageBody::RequestVote { pre_vote: true, .. } => "PreVote",
            MessageBody::RequestVote { .. } => "RequestVote",
            MessageBody::RequestVoteResponse { pre_vote: true, .. } => "PreVoteResponse",
            MessageBody::RequestVoteResponse { .. } => "RequestVoteResponse",
            MessageBody::AppendEntries { .. } => "AppendEntries",
            MessageBody::AppendEntriesResponse { .. } => "AppendEntriesResponse",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResponse { .. } => "HeartbeatResponse",
            MessageBody::InstallSnapshot { .. } => "InstallSnapshot",
            MessageBody::TimeoutNow => "TimeoutNow",
            MessageBody::ReadIndex { .. } => "ReadIndex",
            MessageBody::ReadIndexResponse { .. } => "ReadIndexResponse",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte fields use `serde_bytes` (a memcpy, not a call per byte) with the same bytes
    /// as the plain sequence encoding: logs and snapshots written before still read back.
    #[test]
    fn byte_fields_keep_the_sequence_encoding() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct PlainEntry {
            term: Term,
            index: LogIndex,
            kind: EntryKind,
            data: Vec<u8>,
        }
        let data: Vec<u8> = (0..=255).chain(0..7).collect();
        let fast = Entry {
            term: Term(3),
            index: LogIndex(9),
            kind: EntryKind::Normal,
            data: data.clone(),
        };
        let plain = PlainEntry {
            term: Term(3),
            index: LogIndex(9),
            kind: EntryKind::Normal,
            data,
        };
        let a = postcard::to_stdvec(&fast).unwrap();
        assert_eq!(a, postcard::to_stdvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<PlainEntry>(&a).unwrap(), plain);
        assert_eq!(postcard::from_bytes::<Entry>(&a).unwrap(), fast);
    }

    #[test]
    fn message_round_trips_through_a_frame() {
        let m = Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(3),
            body: MessageBody::AppendEntries {
                prev_log_index: LogIndex(4),
                prev_log_term: Term(2),
                entries: vec![Entry {
                    term: Term(3),
                    index: LogIndex(5),
                    kind: EntryKind::Normal,
                    data: b"x".to_vec(),
                }],
                leader_commit: LogIndex(4),
            },
        };
        let mut frame = Vec::new();
        crate::encode_frame(&m, crate::DEFAULT_MAX_FRAME_BYTES, &mut frame).unwrap();
        let (back, used): (Message, usize) =
            crate::decode_frame(&frame, crate::DEFAULT_MAX_FRAME_BYTES)
                .unwrap()
                .unwrap();
        assert_eq!(back, m);
        assert_eq!(used, frame.len());
    }
}
