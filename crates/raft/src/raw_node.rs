//! [`RawNode`]: the driver-facing API (etcd's `RawNode`), and [`Ready`], the batch of work the
//! driver carries out between two calls.

use crate::raft::{Raft, Role};
use crate::storage::Storage;
use crate::{
    ConfChangeStep, Config, Entry, Error, HardState, LogIndex, Membership, Message, NodeId,
    ProgressState, Snapshot, Term,
};

/// A read that is now safe to serve (thesis §6.4): the state machine has applied at least
/// `index`, and leadership was confirmed after the read arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadState {
    /// The commit index the read waited for.
    pub index: LogIndex,
    /// The context passed to [`RawNode::read_index`].
    pub context: Vec<u8>,
}

/// Volatile state worth telling the driver about when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftState {
    /// The node's role.
    pub role: Role,
    /// The leader this node knows of, if any.
    pub leader: Option<NodeId>,
}

/// Work for the driver, to be carried out **in this order**, then [`RawNode::advance`].
///
/// This is the one authoritative statement of the contract; every other doc (the replica
/// shell `shoal_replica`, the drivers, `docs/raft.md`, `docs/runtime.md`, `docs/kv.md`)
/// refers here instead of restating it.
///
/// 1. **Send [`Ready::messages`] at once.** Only a leader's appends, heartbeats, snapshots,
///    `TimeoutNow` and read-index answers go here: they depend only on its term, which it
///    made durable before it could win. So a leader's appends go out while its own fsync runs
///    (thesis §10.2.1); it counts itself towards a commit only once step 7 reports its
///    entries durable.
/// 2. **Write** [`Ready::snapshot`] (it replaces the whole log), then [`Ready::entries`]
///    (replacing any stored entry at or after `entries[0].index`), then
///    [`Ready::hard_state`] (entries before the hard state whose commit index covers them),
///    and make them durable with **one fsync** (group commit: one per file written). That
///    fsync is **the durability barrier**: everything below waits for it, and nothing above
///    depends on it.
/// 3. **Send [`Ready::persisted_messages`]** (everything else: votes, vote requests, append
///    acknowledgements, forwarded requests) only after the barrier: they promise what step 2
///    made durable. Sent earlier, a crash could forget a vote already granted or a
///    candidate's new term (two leaders in one term), or an entry already counted towards a
///    commit (a committed entry lost).
/// 4. **Restore** the state machine from `snapshot` (now durable), then **apply**
///    [`Ready::committed_entries`] in order. They never go past this node's durable log: the
///    core hands out committed entries only up to the index the last `advance` reported
///    durable, and none in a `Ready` that carries a snapshot.
/// 5. **Persist [`Ready::compact`]** and discard the log up to and including its index. It
///    is filled only by [`RawNode::snapshot`], a snapshot of state already applied, so it
///    comes after step 4. Services no longer use it: the replica shell
///    (`shoal_replica::Replica`) takes [`RawNode::snapshot_meta`] and the state machine's
///    copy as a *snapshot job*, which its driver serializes and writes off its loop and
///    installs later, between two `Ready`s (`DurableStorage::install_prepared_releasing`:
///    a rename and a directory fsync), so that tens of megabytes are never written inside
///    the loop. `compact` remains for drivers of a bare `RawNode` (the core's own tests,
///    the example in the crate docs); Raft needs nothing back from either path, since it
///    reads its first index from the storage.
/// 6. **Serve [`Ready::read_states`]**: each is a read whose leadership was confirmed after
///    it arrived; answer it from the state machine once it has applied at least
///    [`ReadState::index`] (already true when the `Ready` is handed out).
/// 7. **Call [`RawNode::advance`]**: the core learns that step 2 is durable (a leader may
///    now count itself towards commits, so its next `Ready` may commit more) and that step 4
///    is applied. Do not call [`RawNode::ready`] again before (it panics).
///
/// Steps 3 to 6 all follow the barrier; among themselves only the order stated matters
/// (restore before apply, apply before `compact` and before serving reads), so a driver may
/// send the persisted messages after applying, as the replica shell does. A crash anywhere
/// is safe: before the barrier it loses or tears only writes that nothing sent or applied
/// depends on; after it, a restart recovers them from the disk. The simulator's driver
/// completes the fsync on a timer, so crashes do land between step 2 and the barrier.
///
/// [`Ready::soft_state`] asks for nothing durable: it reports a role or leader change, for the
/// driver's log and for the state machine (the replica shell tells it before applying the
/// entries of the same `Ready`).
#[derive(Debug, Default)]
#[must_use = "a Ready must be carried out and then advanced"]
pub struct Ready {
    /// Role or leader changed.
    pub soft_state: Option<SoftState>,
    /// Term, vote or commit changed; persist.
    pub hard_state: Option<HardState>,
    /// Log entries to persist.
    pub entries: Vec<Entry>,
    /// A snapshot from the leader: persist it (replacing the whole log) and restore the state
    /// machine from it.
    pub snapshot: Option<Snapshot>,
    /// Messages that can be sent at once (step 1).
    pub messages: Vec<Message>,
    /// Messages to send only after step 2 is durable (step 3).
    pub persisted_messages: Vec<Message>,
    /// Committed entries to apply, in order.
    pub committed_entries: Vec<Entry>,
    /// A snapshot the service asked for with [`RawNode::snapshot`]: persist it, then discard
    /// the log up to and including its index (step 5; empty under the replica shell, which
    /// uses snapshot jobs instead).
    pub compact: Option<Snapshot>,
    /// Reads that are now safe to serve.
    pub read_states: Vec<ReadState>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.soft_state.is_none()
            && self.hard_state.is_none()
            && self.entries.is_empty()
            && self.snapshot.is_none()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.committed_entries.is_empty()
            && self.compact.is_none()
            && self.read_states.is_empty()
    }
}

/// What [`RawNode::ready`] handed out, so [`RawNode::advance`] knows what became durable.
struct Handed {
    last_entry: Option<(LogIndex, Term)>,
    snapshot_index: Option<LogIndex>,
    applied_to: Option<LogIndex>,
}

/// What a leader knows of one member, for `member list` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    /// The member.
    pub id: NodeId,
    /// A voter (else a learner).
    pub voter: bool,
    /// Highest index known replicated on it.
    pub match_index: LogIndex,
    /// Flow-control state.
    pub state: ProgressState,
}

/// A snapshot of the node's state for tests, metrics and the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Current term.
    pub term: Term,
    /// Vote in the current term.
    pub vote: Option<NodeId>,
    /// Role.
    pub role: Role,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit: LogIndex,
    /// Last index handed to the state machine and advanced.
    pub applied: LogIndex,
    /// First index still in the log.
    pub first_index: LogIndex,
    /// Last index in the log (durable or not).
    pub last_index: LogIndex,
    /// Last index known durable.
    pub persisted: LogIndex,
    /// The membership in effect (of the newest configuration entry in the log).
    pub membership: Membership,
    /// A committed membership no longer includes this node: it was removed and no longer
    /// campaigns (the shell reports it; a restarted server with this set should refuse to
    /// serve).
    pub removed: bool,
    /// Leader only: every member's replication progress, by id (empty on other nodes).
    pub peers: Vec<PeerStatus>,
}

/// A Raft node without I/O: feed it ticks, messages and requests; take [`Ready`]s.
pub struct RawNode<S: Storage> {
    raft: Raft<S>,
    prev_hard_state: HardState,
    prev_soft_state: SoftState,
    /// Highest index handed out as a committed entry (applied once advanced).
    applying: LogIndex,
    handed: Option<Handed>,
}

impl<S: Storage> RawNode<S> {
    /// Builds a node from its configuration and its durable state (fresh or restarted).
    pub fn new(config: Config, storage: S) -> Result<RawNode<S>, Error> {
        let raft = Raft::new(config, storage)?;
        let prev_hard_state = raft.hard_state();
        let prev_soft_state = SoftState {
            role: raft.role,
            leader: raft.leader,
        };
        let applying = raft.log.applied;
        Ok(RawNode {
            raft,
            prev_hard_state,
            prev_soft_state,
            applying,
            handed: None,
        })
    }

    /// Advances the logical clock by one tick (the driver calls it at a fixed interval).
    pub fn tick(&mut self) {
        self.raft.tick();
    }

    /// Handles a message from a peer. Bad input (unknown sender, wrong receiver) is an error the
    /// driver may log; stale or impossible messages are dropped and logged internally.
    pub fn step(&mut self, message: Message) -> Result<(), Error> {
        self.raft.step(message)
    }

    /// Proposes a command. Returns the log index it will have if committed. Fails on a
    /// non-leader (with a leader hint) or when a limit is reached.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<LogIndex, Error> {
        self.raft.propose(data)
    }

    /// Proposes a membership change (Raft thesis §4). Returns the index of its configuration
    /// entry, which takes effect on each node as soon as it is in its log (thesis §4.1). One step that adds or
    /// removes at most one voter changes the membership directly; several enter a joint
    /// configuration that the leader leaves on its own once applied; no steps leave a joint
    /// configuration by hand.
    ///
    /// Refused with [`Error::ConfChangeInFlight`] while a change (or, on a new leader, its
    /// term's first entry) is not yet committed, [`Error::LearnerBehind`] for a promotion of a
    /// learner more than [`Config::max_learner_lag_entries`] behind, and
    /// [`Error::InvalidConfChange`] for a change that makes no sense (the message says why).
    pub fn propose_conf_change(&mut self, steps: Vec<ConfChangeStep>) -> Result<LogIndex, Error> {
        self.raft.propose_conf_change(steps)
    }

    /// The membership in effect: that of the newest configuration entry in the log.
    pub fn membership(&self) -> &Membership {
        self.raft.membership()
    }

    /// Requests a linearizable read: a [`ReadState`] with this `context` appears in a later
    /// [`Ready`] once it is safe to serve. Contexts should be unique among outstanding reads.
    pub fn read_index(&mut self, context: Vec<u8>) -> Result<(), Error> {
        self.raft.read_index(context)
    }

    /// Asks the leader to hand leadership to `to` (thesis §3.10).
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), Error> {
        self.raft.transfer_leader(to)
    }

    /// The driver could not deliver the snapshot sent to `to` (etcd's `ReportSnapshot` with
    /// a failure): a leader whose progress for `to` waits on a snapshot probes it again, so
    /// the next rejection sends a snapshot anew. Nothing happens on another node or state.
    pub fn report_snapshot_failed(&mut self, to: NodeId) {
        self.raft.report_snapshot_failed(to);
    }

    /// Starts an election now.
    pub fn campaign(&mut self) {
        self.raft.campaign_now();
    }

    /// The service snapshotted its state up to `index` (which it has applied). The next
    /// [`Ready`] asks the driver to persist it and compact the log.
    pub fn snapshot(&mut self, index: LogIndex, data: Vec<u8>) -> Result<(), Error> {
        let meta = self.snapshot_meta(index)?;
        self.raft.local_snapshot = Some(Snapshot { meta, data });
        Ok(())
    }

    /// The metadata a snapshot of the service's state at `index` carries (applied, not yet
    /// compacted), with the same checks as [`RawNode::snapshot`]. For a driver that serializes
    /// and writes the snapshot itself, off its loop, and then compacts its storage directly
    /// instead of through [`Ready::compact`].
    pub fn snapshot_meta(&self, index: LogIndex) -> Result<crate::SnapshotMeta, Error> {
        let first = self.raft.log.first_index();
        if index < first {
            return Err(Error::SnapshotOutOfDate { index });
        }
        if index > self.raft.log.applied {
            return Err(Error::SnapshotNotApplied {
                index,
                applied: self.raft.log.applied,
            });
        }
        let term = self.raft.log.term(index)?;
        let m = self.raft.membership_at(index);
        Ok(crate::SnapshotMeta {
            index,
            term,
            voters: m.voters,
            learners: m.learners,
            voters_outgoing: m.voters_outgoing,
            auto_leave: m.auto_leave,
        })
    }

    /// Whether [`RawNode::ready`] would return work.
    pub fn has_ready(&mut self) -> bool {
        if self.handed.is_some() {
            return false;
        }
        self.raft.flush();
        let r = &self.raft;
        r.hard_state() != self.prev_hard_state
            || r.role != self.prev_soft_state.role
            || r.leader != self.prev_soft_state.leader
            || !r.log.unstable_entries().is_empty()
            || r.log.unstable_snapshot().is_some()
            || !r.msgs.is_empty()
            || !r.msgs_after_persist.is_empty()
            || r.local_snapshot.is_some()
            || r.read_states.iter().any(|s| s.index <= r.log.applied)
            || (r.log.unstable_snapshot().is_none()
                && r.log.committed.min(r.log.persisted()) > self.applying)
    }

    /// Takes the work to do. Call [`RawNode::advance`] after carrying it out, before the next
    /// `ready`.
    pub fn ready(&mut self) -> Ready {
        assert!(
            self.handed.is_none(),
            "ready() called twice without advance()"
        );
        self.raft.flush();
        let r = &mut self.raft;
        let mut rd = Ready::default();
        let soft = SoftState {
            role: r.role,
            leader: r.leader,
        };
        if soft != self.prev_soft_state {
            rd.soft_state = Some(soft);
            self.prev_soft_state = soft;
        }
        let hs = r.hard_state();
        if hs != self.prev_hard_state {
            rd.hard_state = Some(hs);
            self.prev_hard_state = hs;
        }
        rd.entries = r.log.unstable_entries().to_vec();
        rd.snapshot = r.log.unstable_snapshot().cloned();
        rd.messages = std::mem::take(&mut r.msgs);
        rd.persisted_messages = std::mem::take(&mut r.msgs_after_persist);
        rd.committed_entries = r
            .log
            .next_committed_entries(self.applying, r.config().max_committed_bytes_per_ready);
        rd.compact = r.local_snapshot.take();
        let applied = r.log.applied;
        let (ready_reads, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut r.read_states)
            .into_iter()
            .partition(|s| s.index <= applied);
        r.read_states = waiting;
        rd.read_states = ready_reads;
        let handed = Handed {
            last_entry: rd.entries.last().map(|e| (e.index, e.term)),
            snapshot_index: rd.snapshot.as_ref().map(|s| s.meta.index),
            applied_to: rd.committed_entries.last().map(|e| e.index),
        };
        if let Some(i) = handed.applied_to {
            self.applying = i;
        }
        if let Some(i) = handed.snapshot_index {
            self.applying = self.applying.max(i);
        }
        self.handed = Some(handed);
        rd
    }

    /// The driver finished the last [`Ready`]: its entries and snapshot are durable and its
    /// committed entries applied.
    pub fn advance(&mut self) {
        let Some(h) = self.handed.take() else {
            return;
        };
        let log = &mut self.raft.log;
        if let Some(i) = h.snapshot_index {
            log.stable_snapshot_to(i);
        }
        if let Some((i, t)) = h.last_entry {
            log.stable_to(i, t);
        }
        if let Some(i) = h.applied_to {
            debug_assert!(i <= log.committed, "applied beyond commit");
            if i > log.applied {
                log.applied = i;
            }
        }
        self.applying = self.applying.max(log.applied);
        self.raft.on_persisted();
    }

    /// The node's state.
    pub fn status(&self) -> Status {
        let r = &self.raft;
        Status {
            id: r.id,
            term: r.term,
            vote: r.vote,
            role: r.role,
            leader: r.leader,
            commit: r.log.committed,
            applied: r.log.applied,
            first_index: r.log.first_index(),
            last_index: r.log.last_index(),
            persisted: r.log.persisted(),
            membership: r.membership().clone(),
            removed: r.is_removed(),
            peers: r
                .progress
                .iter()
                .map(|(&id, p)| PeerStatus {
                    id,
                    voter: r.membership().is_voter(id),
                    match_index: p.match_index,
                    state: p.state,
                })
                .collect(),
        }
    }

    /// The current term (what [`RawNode::status`] says, without copying the membership and
    /// the peers' progress: for hot paths).
    pub fn term(&self) -> Term {
        self.raft.term
    }

    /// This node's role (what [`RawNode::status`] says, without the copies).
    pub fn role(&self) -> Role {
        self.raft.role
    }

    /// The leader this node knows of (what [`RawNode::status`] says, without the copies).
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.leader
    }

    /// The highest index known committed (what [`RawNode::status`] says, without the copies:
    /// for the drivers' metrics).
    pub fn commit(&self) -> LogIndex {
        self.raft.log.committed
    }

    /// The term of the entry at `index`, if the log (durable or not) holds it.
    pub fn log_term(&self, index: LogIndex) -> Option<Term> {
        self.raft.log.term(index).ok()
    }

    /// Entries in `[lo, hi)` held by the log (durable or not), for tests and diagnostics.
    pub fn log_entries(&self, lo: LogIndex, hi: LogIndex) -> Result<Vec<Entry>, Error> {
        Ok(self.raft.log.entries(lo, hi, usize::MAX)?)
    }

    /// Read access to the storage.
    pub fn storage(&self) -> &S {
        &self.raft.log.storage
    }

    /// Write access to the storage, for a driver that persists through it (as with
    /// [`crate::MemStorage`]).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.raft.log.storage
    }

    /// The leader's replication record of a follower (leader only).
    pub fn progress(&self, id: NodeId) -> Option<crate::Progress> {
        self.raft.progress.get(&id).cloned()
    }
}
