//! The replica shell: everything one replica of a Raft group does between its driver (tokio's
//! or the simulator's) and its state machine, written once and sans-IO.
//!
//! A [`Replica`] owns the Raft core ([`RawNode`]) with its [`DurableStorage`], the state machine
//! (anything implementing [`StateMachine`]), the proposals and reads waiting for an answer, and
//! the snapshot policy — including snapshots serialized and written off the driver's loop and
//! installed later. It does no I/O of its own: the driver hands it a [`Disk`] for each call,
//! sends the messages it returns, and decides when an fsync happens. That is what lets the
//! simulator run exactly the code production runs (`docs/architecture.md`).
//!
//! # The loop of a driver
//!
//! ```text
//!   tick() / step(msg) / propose(data, tag) / read(tag)        (any number, then:)
//!   while let Some(u) = write_ready(disk)? {     // takes a Ready, writes it, no fsync
//!       send u.messages                          // they promise nothing unpersisted
//!       sync(disk)?                              // THE BARRIER: one fsync covers the Ready
//!       let s = on_synced(disk, u)?;             // apply, answer, advance
//!       send s.messages                          // votes, acks: they promise the fsync
//!       if let Some(job) = s.snapshot { start it off the loop }
//!   }
//!   take_done() → answer the callers
//!   later, when a job finished: job.prepare(other disk) → install_snapshot(disk, result)
//! ```
//!
//! The order of a `Ready`'s steps and why is stated once, on [`shoal_raft::Ready`]. The tokio
//! driver runs `sync` at once; the simulator's (module `sim`, feature `sim`) runs it after a
//! simulated fsync latency, so that a crash can land between the write and the barrier, and
//! runs a snapshot job as two later events (prepare, install), so that a crash can land at
//! every step of the snapshot pipeline.
//!
//! # Faults
//!
//! One policy for every driver: a storage error, or a committed snapshot or entry the state
//! machine cannot use, is an [`Error`] that stops the replica (the driver reports it naming its
//! data directory and exits). Nothing here panics on what is on the disk or the network.

#![warn(missing_docs)]

use std::collections::BTreeMap;

use shoal_raft::{
    ConfChangeStep, Config, Entry, EntryKind, LogIndex, Message, NodeId, RawNode, Ready, Role,
    SnapshotMeta, SoftState, Status, Term,
};
use shoal_storage::{Disk, DurableStorage, PreparedSnapshot};

#[cfg(feature = "sim")]
pub mod sim;

/// What a replica hosts: the deterministic state that committed entries build.
pub trait StateMachine {
    /// What applying a proposal gives back to its proposer.
    type Output;
    /// A snapshot in the making: a cheap copy of the state taken on the loop, serialized later
    /// (perhaps on another thread) by [`SnapshotData::into_bytes`].
    type Snapshot: SnapshotData;

    /// Applies the command committed at `index` (called once per index, in order, for every
    /// normal entry after the restored snapshot). `Ok(None)`: the entry is no command of this
    /// machine (its proposer, if any, is told it was lost). An error means the committed log
    /// is unusable here; the replica stops rather than diverge from the others.
    fn apply(&mut self, index: LogIndex, command: &[u8]) -> Result<Option<Self::Output>, String>;

    /// A copy of the state as of the last applied index.
    fn snapshot(&self) -> Self::Snapshot;

    /// Replaces the whole state with a snapshot's, taken at `index`: `data` reads the bytes
    /// [`SnapshotData::into_bytes`] (or `write_to`) of some replica made, streamed from the
    /// snapshot file (or from memory in the simulator), so a large state never needs its
    /// serialized copy in memory: decode it as it comes. A read error (a damaged chunk) or
    /// anything undecodable is an error, which stops the replica: the snapshot is durable but
    /// unusable. Leave the state unchanged on error where cheap.
    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> Result<(), String>;

    /// The replica's role or known leader changed. Called before the entries of the same
    /// `Ready` are applied.
    fn on_role_change(&mut self, role: Role, leader: Option<NodeId>) {
        let _ = (role, leader);
    }
}

/// The serializable half of a snapshot, made on the loop, serialized off it.
pub trait SnapshotData: Send + 'static {
    /// The snapshot's bytes (the slow part: run it off the driver's loop).
    fn into_bytes(self) -> Vec<u8>;

    /// The number of bytes [`SnapshotData::into_bytes`] would make, if the machine can tell
    /// without making them: then [`SnapshotJob::prepare`] streams the snapshot into its file
    /// with [`SnapshotData::write_to`] instead of holding it whole. `None` (the default):
    /// `into_bytes`.
    fn encoded_len(&self) -> Option<u64> {
        None
    }

    /// Writes exactly the bytes [`SnapshotData::into_bytes`] would make (and
    /// [`SnapshotData::encoded_len`] announced) to `w`.
    fn write_to(self, w: &mut dyn std::io::Write) -> std::io::Result<()>
    where
        Self: Sized,
    {
        w.write_all(&self.into_bytes())
    }
}

impl SnapshotData for Vec<u8> {
    fn into_bytes(self) -> Vec<u8> {
        self
    }
}

/// When a replica takes its own snapshot (and then drops the log before it). Both limits may be
/// set; either one triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotPolicy {
    /// Snapshot once the live log ([`DurableStorage::log_bytes`]) exceeds this many bytes.
    pub log_bytes: Option<u64>,
    /// Snapshot once this many entries were applied since the log's first index.
    pub entries: Option<u64>,
}

/// How a replica treats its callers. The default: no snapshots, reads wait, proposals are
/// decided by their slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaConfig {
    /// When to snapshot.
    pub snapshot: SnapshotPolicy,
    /// A read not answered within this many ticks fails ([`ReadFailure::TimedOut`]), so that
    /// none waits forever when its confirmation was lost. `None`: reads wait until answered or
    /// until leadership is lost.
    pub read_timeout_ticks: Option<u64>,
    /// On losing leadership, answer every waiting proposal [`Done::Lost`] at once instead of
    /// when its slot is decided. For services whose clients retry idempotently (the KV
    /// database): they find the new leader sooner. A proposal reported lost this way may still
    /// commit, so services that promise "lost means never applied" leave this off.
    pub fail_proposals_on_leadership_loss: bool,
}

/// Why a replica stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The durable storage failed (a failed fsync leaves a file in an unknown state: retrying
    /// it could lie about durability, so the replica stops).
    #[error(transparent)]
    Storage(#[from] shoal_storage::Error),
    /// Raft refused the stored state at start.
    #[error(transparent)]
    Raft(#[from] shoal_raft::Error),
    /// Raft committed a snapshot or entry the state machine cannot use: this replica must stop
    /// (its state machine is then in no defined state).
    #[error("the committed {what} at index {index} is unusable: {reason}")]
    Unusable {
        /// `snapshot` or `log entry`.
        what: &'static str,
        /// Its Raft index.
        index: u64,
        /// The state machine's reason.
        reason: String,
    },
}

/// Why a read was not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFailure {
    /// This replica is not (or no longer) the leader; ask `leader` if known.
    NotLeader {
        /// The leader this replica knows of.
        leader: Option<NodeId>,
    },
    /// Its confirmation did not come within [`ReplicaConfig::read_timeout_ticks`].
    TimedOut,
}

/// An answer for a caller of [`Replica::propose`] or [`Replica::read`], from
/// [`Replica::take_done`].
#[derive(Debug, PartialEq, Eq)]
pub enum Done<T, O> {
    /// The proposal applied at `index`, giving `output`.
    Applied {
        /// The caller's tag.
        tag: T,
        /// Where it applied.
        index: LogIndex,
        /// The term it was proposed (and committed) in.
        term: Term,
        /// What the state machine gave.
        output: O,
    },
    /// The proposal will not apply as proposed: another leader's entry took its slot, a
    /// snapshot covered it without saying whether it was inside, the state machine took it for
    /// no command, or (with [`ReplicaConfig::fail_proposals_on_leadership_loss`]) leadership
    /// was lost. Idempotent clients retry.
    Lost {
        /// The caller's tag.
        tag: T,
        /// The slot it had.
        index: LogIndex,
    },
    /// The read is safe to serve now from the state machine: leadership was confirmed after
    /// it arrived and everything committed before it is applied.
    ReadReady {
        /// The caller's tag.
        tag: T,
        /// The commit index it waited for.
        index: LogIndex,
    },
    /// The read will not be confirmed.
    ReadFailed {
        /// The caller's tag.
        tag: T,
        /// Why.
        reason: ReadFailure,
    },
}

/// A `Ready` whose writes are made but not yet durable: send [`Unsynced::messages`], make it
/// durable with [`Replica::sync`], then give it back to [`Replica::on_synced`].
#[derive(Debug)]
#[must_use = "an Unsynced must be synced and given back to on_synced"]
pub struct Unsynced {
    /// Messages to send at once (they promise nothing unpersisted).
    pub messages: Vec<Message>,
    ready: Ready,
}

impl Unsynced {
    /// Whether it wrote anything that needs the fsync (a driver may skip handing its thread
    /// over for a `Ready` that only sends and applies).
    pub fn needs_sync(&self) -> bool {
        self.ready.snapshot.is_some()
            || !self.ready.entries.is_empty()
            || self.ready.hard_state.is_some()
    }

    /// The role or leader change this `Ready` reports, if any (for the driver's log).
    pub fn soft_state(&self) -> Option<SoftState> {
        self.ready.soft_state
    }

    /// The log entries this `Ready` persists (the group-commit batch, for metrics).
    pub fn entries(&self) -> usize {
        self.ready.entries.len()
    }
}

/// What [`Replica::on_synced`] leaves for the driver.
#[derive(Debug)]
#[must_use = "persisted messages must be sent and a snapshot job run"]
pub struct Synced<D> {
    /// Messages to send now (votes, append acknowledgements: they promise the fsync).
    pub messages: Vec<Message>,
    /// A snapshot to make off the loop, then hand to [`Replica::install_snapshot`].
    pub snapshot: Option<SnapshotJob<D>>,
}

/// A snapshot to serialize and write off the driver's loop: the state machine's copy and the
/// Raft metadata of the index it was taken at.
#[derive(Debug)]
pub struct SnapshotJob<D> {
    meta: SnapshotMeta,
    data: D,
}

impl<D: SnapshotData> SnapshotJob<D> {
    /// The log index it covers.
    pub fn index(&self) -> LogIndex {
        self.meta.index
    }

    /// Serializes it and writes it, fsynced, under a temporary name of `disk` (a second handle
    /// on the replica's directory, on another thread if the driver likes): the slow part. The
    /// result goes to [`Replica::install_snapshot`]. A temporary file never installed is
    /// removed when the storage next opens.
    pub fn prepare(self, disk: &mut impl Disk) -> Result<PreparedSnapshot, shoal_storage::Error> {
        if let Some(len) = self.data.encoded_len() {
            let data = self.data;
            return shoal_storage::prepare_snapshot_streaming(disk, self.meta, len, |w| {
                data.write_to(w)
            });
        }
        let snapshot = shoal_raft::Snapshot {
            data: self.data.into_bytes(),
            meta: self.meta,
        };
        shoal_storage::prepare_snapshot(disk, snapshot)
    }
}

/// How a membership change proposed with [`Replica::propose_conf_change`] ended, from
/// [`Replica::take_conf_done`].
#[derive(Debug, PartialEq, Eq)]
pub enum ConfChangeDone<T> {
    /// The change is committed (and, if it entered a joint configuration, that was left and
    /// the leaving entry committed too): the membership is now `membership`.
    Committed {
        /// The caller's tag.
        tag: T,
        /// The index of the change's entry.
        index: LogIndex,
        /// The membership in effect.
        membership: shoal_raft::Membership,
    },
    /// This replica stopped leading before the change was known committed: it may or may not
    /// take effect (ask the new leader, `leader` if known, for the membership).
    NotLeader {
        /// The caller's tag.
        tag: T,
        /// The leader this replica knows of.
        leader: Option<NodeId>,
    },
}

/// A membership change waiting for its commit.
#[derive(Debug)]
struct PendingConfChange<T> {
    tag: T,
    index: LogIndex,
    term: Term,
    /// Once committed and not joint: the last index then, which covers the entry leaving a
    /// joint configuration if there was one; answered once it is committed.
    leave_at: Option<LogIndex>,
}

#[derive(Debug)]
struct PendingRead<T> {
    tag: T,
    /// The tick it was issued at (for the timeout).
    issued: u64,
    /// Set once leadership is confirmed: answer once applied reaches it.
    index: Option<LogIndex>,
}

/// One replica: Raft core, durable storage, state machine, callers waiting, snapshot policy.
/// `T` is the driver's tag for a caller (a reply channel, a connection token).
pub struct Replica<SM: StateMachine, T> {
    raw: RawNode<DurableStorage>,
    machine: SM,
    config: ReplicaConfig,
    applied: LogIndex,
    /// Proposals waiting to apply: index → (term proposed in, tag).
    proposals: BTreeMap<LogIndex, (Term, T)>,
    /// Reads waiting: id (the read-index context) → read. Ids grow, so the first is oldest.
    reads: BTreeMap<u64, PendingRead<T>>,
    next_read_id: u64,
    ticks: u64,
    role: Role,
    leader: Option<NodeId>,
    /// The index of the snapshot job handed out and not yet installed (one at a time).
    snapshot_in_flight: Option<LogIndex>,
    done: Vec<Done<T, SM::Output>>,
    snapshots_taken: u64,
    snapshots_installed: u64,
    /// Proposals accepted by the core, and refused or lost since start (for metrics).
    proposals_made: u64,
    proposals_failed: u64,
    /// The membership change waiting for its commit (one at a time, as Raft allows).
    conf_change: Option<PendingConfChange<T>>,
    conf_done: Vec<ConfChangeDone<T>>,
}

impl<SM: StateMachine, T> Replica<SM, T> {
    /// Starts (or restarts) a replica from its durable state: the state machine is restored
    /// from the stored snapshot, and Raft resumes after it.
    pub fn new(
        mut raft: Config,
        storage: DurableStorage,
        mut machine: SM,
        config: ReplicaConfig,
    ) -> Result<Replica<SM, T>, Error> {
        use shoal_raft::Storage as _;
        let mut storage = storage;
        // The snapshot file as the storage opened and checked it (its data not in memory),
        // or the data in memory.
        let opened = storage.take_opened_snapshot_data();
        let snap = storage.snapshot().map_err(shoal_raft::Error::from)?;
        let index = snap.meta.index;
        // A fresh machine is the state at index 0; a stored snapshot replaces it.
        if index > LogIndex(0) || !snap.data.is_empty() || opened.is_some() {
            let mut data: Box<dyn std::io::Read + '_> = match opened {
                Some(r) => r,
                None => Box::new(snap.data.as_slice()),
            };
            machine
                .restore(index, &mut data)
                .map_err(|reason| Error::Unusable {
                    what: "snapshot",
                    index: index.0,
                    reason,
                })?;
        }
        raft.applied = index;
        let raw = RawNode::new(raft, storage)?;
        let status = raw.status();
        Ok(Replica {
            raw,
            machine,
            config,
            applied: index,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_read_id: 1,
            ticks: 0,
            role: status.role,
            leader: status.leader,
            snapshot_in_flight: None,
            done: Vec::new(),
            snapshots_taken: 0,
            snapshots_installed: 0,
            proposals_made: 0,
            proposals_failed: 0,
            conf_change: None,
            conf_done: Vec::new(),
        })
    }

    // ---- inputs --------------------------------------------------------------------------

    /// Advances Raft's logical clock by one tick; fails reads older than the read timeout.
    pub fn tick(&mut self) {
        self.raw.tick();
        self.ticks += 1;
        if let Some(limit) = self.config.read_timeout_ticks {
            while let Some(entry) = self.reads.first_entry() {
                if entry.get().issued.saturating_add(limit) > self.ticks {
                    break;
                }
                let read = entry.remove();
                self.done.push(Done::ReadFailed {
                    tag: read.tag,
                    reason: ReadFailure::TimedOut,
                });
            }
        }
    }

    /// A message from a peer. The driver checked that it comes from whom it claims (the
    /// transport's handshake) and is addressed to this replica.
    pub fn step(&mut self, msg: Message) -> Result<(), shoal_raft::Error> {
        self.raw.step(msg)
    }

    /// Appends `command` to the leader's log; `tag` is answered in [`Replica::take_done`] when
    /// its slot is decided. Refused (tag handed back) if this replica is not the leader or
    /// Raft refuses it (too large, a leadership transfer in progress).
    pub fn propose(
        &mut self,
        command: Vec<u8>,
        tag: T,
    ) -> Result<LogIndex, (shoal_raft::Error, T)> {
        let term = self.raw.term();
        match self.raw.propose(command) {
            Ok(index) => {
                self.proposals_made += 1;
                if let Some((_, old)) = self.proposals.insert(index, (term, tag)) {
                    // Our own log was truncated and refilled: the old proposal is gone.
                    self.proposals_failed += 1;
                    self.done.push(Done::Lost { tag: old, index });
                }
                Ok(index)
            }
            Err(e) => {
                self.proposals_failed += 1;
                Err((e, tag))
            }
        }
    }

    /// Proposes a membership change (Raft's typed refusals handed back with the tag: not the
    /// leader, a change in flight, a learner behind, an invalid change). `tag` is answered in
    /// [`Replica::take_conf_done`] once the change is committed and any joint configuration
    /// it entered was left, or when this replica stops leading.
    pub fn propose_conf_change(
        &mut self,
        steps: Vec<ConfChangeStep>,
        tag: T,
    ) -> Result<LogIndex, (shoal_raft::Error, T)> {
        if let Some(p) = &self.conf_change {
            let err = shoal_raft::Error::ConfChangeInFlight {
                pending: p.leave_at.unwrap_or(p.index),
                committed: self.raw.status().commit,
            };
            return Err((err, tag));
        }
        let term = self.raw.term();
        match self.raw.propose_conf_change(steps) {
            Ok(index) => {
                self.conf_change = Some(PendingConfChange {
                    tag,
                    index,
                    term,
                    leave_at: None,
                });
                Ok(index)
            }
            Err(e) => Err((e, tag)),
        }
    }

    /// Answers for callers of [`Replica::propose_conf_change`].
    pub fn take_conf_done(&mut self) -> Vec<ConfChangeDone<T>> {
        std::mem::take(&mut self.conf_done)
    }

    /// Whether answers wait in [`Replica::take_conf_done`].
    pub fn has_conf_done(&self) -> bool {
        !self.conf_done.is_empty()
    }

    /// Appends `command` with nobody waiting for its outcome (a leader's own duties).
    pub fn propose_untracked(&mut self, command: Vec<u8>) -> Result<LogIndex, shoal_raft::Error> {
        let result = self.raw.propose(command);
        match result {
            Ok(_) => self.proposals_made += 1,
            Err(_) => self.proposals_failed += 1,
        }
        result
    }

    /// A linearizable read (read-index, thesis §6.4): no log write; `tag` gets
    /// [`Done::ReadReady`] once leadership is confirmed and the state machine caught up.
    pub fn read(&mut self, tag: T) -> Result<(), (shoal_raft::Error, T)> {
        let id = self.next_read_id;
        match self.raw.read_index(id.to_le_bytes().to_vec()) {
            Ok(()) => {
                self.next_read_id += 1;
                let issued = self.ticks;
                self.reads.insert(
                    id,
                    PendingRead {
                        tag,
                        issued,
                        index: None,
                    },
                );
                Ok(())
            }
            Err(e) => Err((e, tag)),
        }
    }

    // ---- the Ready pipeline ---------------------------------------------------------------

    /// Takes the next `Ready`, if any, and writes what it asks to persist (a received snapshot,
    /// entries, hard state) without the fsync: [`Replica::take_ready`] then
    /// [`Replica::write`]. The driver sends [`Unsynced::messages`], then calls
    /// [`Replica::sync`] and [`Replica::on_synced`].
    pub fn write_ready(&mut self, disk: &mut impl Disk) -> Result<Option<Unsynced>, Error> {
        let Some(unsynced) = self.take_ready() else {
            return Ok(None);
        };
        self.write(disk, &unsynced)?;
        Ok(Some(unsynced))
    }

    /// Takes the next `Ready`, if any, writing nothing yet: for a driver that sends
    /// [`Unsynced::messages`] first and then writes and syncs in one go, off its event loop
    /// (only when [`Unsynced::needs_sync`]).
    pub fn take_ready(&mut self) -> Option<Unsynced> {
        if !self.raw.has_ready() {
            return None;
        }
        let mut ready = self.raw.ready();
        let messages = std::mem::take(&mut ready.messages);
        Some(Unsynced { messages, ready })
    }

    /// Writes what a `Ready` taken by [`Replica::take_ready`] asks to persist, without the
    /// fsync.
    pub fn write(&mut self, disk: &mut impl Disk, unsynced: &Unsynced) -> Result<(), Error> {
        let ready = &unsynced.ready;
        let storage = self.raw.storage_mut();
        if let Some(s) = &ready.snapshot {
            // Durable when it returns (it replaces the whole log).
            storage.apply_snapshot(disk, s.clone())?;
        }
        storage.append(disk, &ready.entries)?;
        if let Some(hs) = ready.hard_state {
            storage.set_hard_state(disk, hs)?;
        }
        Ok(())
    }

    /// The durability barrier: one fsync per file written since the last call (group commit).
    pub fn sync(&mut self, disk: &mut impl Disk) -> Result<(), Error> {
        self.raw.storage_mut().sync(disk)?;
        Ok(())
    }

    /// The rest of a `Ready` once its writes are durable: restore a received snapshot, apply
    /// the committed entries, decide the waiting proposals and reads, tell Raft the `Ready` is
    /// done, and maybe hand out a snapshot job.
    pub fn on_synced(
        &mut self,
        disk: &mut impl Disk,
        unsynced: Unsynced,
    ) -> Result<Synced<SM::Snapshot>, Error> {
        let mut rd = unsynced.ready;
        let messages = std::mem::take(&mut rd.persisted_messages);
        if let Some(soft) = rd.soft_state {
            self.on_soft_state(soft);
        }
        if let Some(snap) = &rd.snapshot {
            if snap.meta.index > self.applied {
                let index = snap.meta.index;
                // The installed snapshot, from memory or streamed from its file.
                let mut data = self.raw.storage().snapshot_data(&*disk)?;
                let restored = self.machine.restore(index, &mut data);
                drop(data);
                restored.map_err(|reason| Error::Unusable {
                    what: "snapshot",
                    index: index.0,
                    reason,
                })?;
                self.applied = index;
                self.snapshots_installed += 1;
                // Whether a waiting proposal is inside the snapshot is unknown: lost.
                self.resolve_up_to(index, None);
                tracing::info!(
                    index = index.0,
                    "restored snapshot (received from the leader)"
                );
            }
        }
        for e in &rd.committed_entries {
            self.apply_entry(e)?;
        }
        if let Some(snapshot) = rd.compact.take() {
            // Only `RawNode::snapshot` fills `compact`; the shell uses jobs instead, but a
            // caller of `raw_mut` may have asked.
            self.raw.storage_mut().compact(disk, snapshot)?;
        }
        for rs in &rd.read_states {
            let Ok(bytes) = <[u8; 8]>::try_from(rs.context.as_slice()) else {
                continue;
            };
            if let Some(read) = self.reads.get_mut(&u64::from_le_bytes(bytes)) {
                read.index = Some(rs.index);
            }
        }
        self.answer_reads();
        self.raw.advance();
        self.check_conf_change();
        let snapshot = self.maybe_snapshot();
        Ok(Synced { messages, snapshot })
    }

    /// Makes a snapshot prepared off the loop the storage's snapshot and drops the log before
    /// it (a rename and a directory fsync). Hands back the entries it dropped, for the driver
    /// to free off a latency-sensitive loop (`None`: a newer snapshot superseded it and it was
    /// discarded). A failed preparation is an error: the replica stops.
    pub fn install_snapshot(
        &mut self,
        disk: &mut impl Disk,
        prepared: Result<PreparedSnapshot, shoal_storage::Error>,
    ) -> Result<Option<Vec<Entry>>, Error> {
        self.snapshot_in_flight = None;
        let prepared = prepared?;
        Ok(self
            .raw
            .storage_mut()
            .install_prepared_releasing(disk, prepared)?)
    }

    /// A snapshot file received from the leader (checked, fsynced, in the storage's
    /// directory) is about to be stepped in as `InstallSnapshot` with `meta` and no data:
    /// if Raft installs it, the storage renames the file into place
    /// ([`DurableStorage::stage_received_snapshot`]). Call
    /// [`Replica::discard_received_snapshot`] once the `Ready`s are processed.
    pub fn stage_received_snapshot(
        &mut self,
        disk: &mut impl Disk,
        name: String,
        meta: SnapshotMeta,
    ) -> Result<(), Error> {
        self.raw
            .storage_mut()
            .stage_received_snapshot(disk, name, meta)?;
        Ok(())
    }

    /// Removes a staged received snapshot Raft did not install (it was stale).
    pub fn discard_received_snapshot(&mut self, disk: &mut impl Disk) -> Result<(), Error> {
        self.raw.storage_mut().discard_staged_snapshot(disk)?;
        Ok(())
    }

    /// The driver could not start a snapshot job (no thread): forget it; a later `Ready` asks
    /// again.
    pub fn abandon_snapshot(&mut self) {
        self.snapshot_in_flight = None;
    }

    /// Whether Raft has a `Ready` for the driver.
    pub fn has_ready(&mut self) -> bool {
        self.raw.has_ready()
    }

    /// Answers for callers, in the order they were decided.
    pub fn take_done(&mut self) -> Vec<Done<T, SM::Output>> {
        std::mem::take(&mut self.done)
    }

    /// Moves the answers for callers to the end of `out`, in the order they were decided
    /// (both vectors keep their capacity: no allocation per round on a busy server).
    pub fn take_done_into(&mut self, out: &mut Vec<Done<T, SM::Output>>) {
        out.append(&mut self.done);
    }

    /// Whether answers wait in [`Replica::take_done`].
    pub fn has_done(&self) -> bool {
        !self.done.is_empty()
    }

    /// Every caller still waiting (at shutdown: the driver tells them the replica stopped).
    pub fn drain_waiting(&mut self) -> Vec<T> {
        let mut tags: Vec<T> = std::mem::take(&mut self.proposals)
            .into_values()
            .map(|(_, t)| t)
            .collect();
        tags.extend(std::mem::take(&mut self.reads).into_values().map(|r| r.tag));
        tags.extend(self.conf_change.take().map(|p| p.tag));
        tags.extend(self.take_conf_done().into_iter().map(|d| match d {
            ConfChangeDone::Committed { tag, .. } | ConfChangeDone::NotLeader { tag, .. } => tag,
        }));
        tags.extend(self.take_done().into_iter().map(|d| match d {
            Done::Applied { tag, .. }
            | Done::Lost { tag, .. }
            | Done::ReadReady { tag, .. }
            | Done::ReadFailed { tag, .. } => tag,
        }));
        tags
    }

    /// Forgets waiting proposals whose caller gave up (`gone(tag)`), before refusing new ones
    /// for a limit.
    pub fn forget_proposals(&mut self, mut gone: impl FnMut(&T) -> bool) {
        self.proposals.retain(|_, (_, t)| !gone(t));
    }

    // ---- queries ----------------------------------------------------------------------------

    /// The Raft core (status, leadership transfer, campaign in tests).
    pub fn raw(&self) -> &RawNode<DurableStorage> {
        &self.raw
    }

    /// The Raft core, mutably.
    pub fn raw_mut(&mut self) -> &mut RawNode<DurableStorage> {
        &mut self.raw
    }

    /// Raft's status.
    pub fn status(&self) -> Status {
        self.raw.status()
    }

    /// The state machine.
    pub fn machine(&self) -> &SM {
        &self.machine
    }

    /// The state machine, mutably (for a service's own volatile state; its replicated state
    /// changes only through committed entries).
    pub fn machine_mut(&mut self) -> &mut SM {
        &mut self.machine
    }

    /// The last applied index.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// The role as of the last `Ready` carried out.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Proposals waiting to apply.
    pub fn pending_proposals(&self) -> usize {
        self.proposals.len()
    }

    /// Reads waiting.
    pub fn pending_reads(&self) -> usize {
        self.reads.len()
    }

    /// Ticks since start.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// Snapshot jobs handed out since start.
    pub fn snapshots_taken(&self) -> u64 {
        self.snapshots_taken
    }

    /// Snapshots received from a leader and restored since start.
    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed
    }

    /// Proposals since start: accepted by the core, and failed (refused by the core, or lost
    /// because another leader's entry took the slot). For the drivers' metrics.
    pub fn proposal_counts(&self) -> (u64, u64) {
        (self.proposals_made, self.proposals_failed)
    }

    /// The index of the snapshot job handed out and not yet installed.
    pub fn snapshot_in_flight(&self) -> Option<LogIndex> {
        self.snapshot_in_flight
    }

    // ---- internals --------------------------------------------------------------------------

    fn on_soft_state(&mut self, soft: SoftState) {
        let was_leader = self.role == Role::Leader;
        self.role = soft.role;
        self.leader = soft.leader;
        if soft.role != Role::Leader {
            // Reads in flight were issued to us as leader; they will never be confirmed.
            for (_, read) in std::mem::take(&mut self.reads) {
                self.done.push(Done::ReadFailed {
                    tag: read.tag,
                    reason: ReadFailure::NotLeader {
                        leader: soft.leader,
                    },
                });
            }
            if let Some(p) = self.conf_change.take() {
                self.conf_done.push(ConfChangeDone::NotLeader {
                    tag: p.tag,
                    leader: soft.leader,
                });
            }
            if was_leader && self.config.fail_proposals_on_leadership_loss {
                for (index, (_, tag)) in std::mem::take(&mut self.proposals) {
                    self.proposals_failed += 1;
                    self.done.push(Done::Lost { tag, index });
                }
            }
        }
        self.machine.on_role_change(soft.role, soft.leader);
    }

    /// Answers the waiting membership change once it is committed (and, if it entered a
    /// joint configuration, once the leaving entry is committed too).
    fn check_conf_change(&mut self) {
        let Some(p) = &mut self.conf_change else {
            return;
        };
        if self.raw.role() != Role::Leader || self.raw.term() != p.term {
            let leader = self.raw.leader();
            if let Some(p) = self.conf_change.take() {
                self.conf_done
                    .push(ConfChangeDone::NotLeader { tag: p.tag, leader });
            }
            return;
        }
        let status = self.raw.status();
        if status.commit < p.index {
            return;
        }
        if status.membership.is_joint() {
            return;
        }
        // Not (or no longer) joint: a leaving entry, if the change entered a joint
        // configuration, is at or below the last index (the core appends it as soon as the
        // change commits, perhaps in the same step): wait until that is committed too.
        let leave_at = *p.leave_at.get_or_insert(status.last_index);
        if status.commit < leave_at {
            return;
        }
        if let Some(p) = self.conf_change.take() {
            self.conf_done.push(ConfChangeDone::Committed {
                tag: p.tag,
                index: p.index,
                membership: status.membership,
            });
        }
    }

    fn apply_entry(&mut self, e: &Entry) -> Result<(), Error> {
        if e.index <= self.applied {
            return Ok(()); // covered by a snapshot restored in this Ready
        }
        if e.index != self.applied.next() {
            // Raft hands out committed entries in order; a gap is a bug in the core, and
            // applying past it would diverge.
            return Err(Error::Unusable {
                what: "log entry",
                index: e.index.0,
                reason: format!("applied out of order after {}", self.applied),
            });
        }
        let output = if e.kind == EntryKind::Normal {
            self.machine
                .apply(e.index, &e.data)
                .map_err(|reason| Error::Unusable {
                    what: "log entry",
                    index: e.index.0,
                    reason,
                })?
        } else {
            None
        };
        self.applied = e.index;
        // Proposals below this index lost their slots to a snapshot or a truncation.
        self.resolve_up_to(LogIndex(e.index.0 - 1), None);
        if let Some((term, tag)) = self.proposals.remove(&e.index) {
            match output {
                Some(output) if term == e.term => self.done.push(Done::Applied {
                    tag,
                    index: e.index,
                    term,
                    output,
                }),
                // Another leader's entry took the slot, or no command of ours.
                _ => {
                    self.proposals_failed += 1;
                    self.done.push(Done::Lost {
                        tag,
                        index: e.index,
                    })
                }
            }
        }
        Ok(())
    }

    /// Reports lost every proposal at or below `index` (`term` unused: their slot's entry is
    /// not theirs, or unknown).
    fn resolve_up_to(&mut self, index: LogIndex, _term: Option<Term>) {
        while let Some(entry) = self.proposals.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (at, (_, tag)) = entry.remove_entry();
            self.proposals_failed += 1;
            self.done.push(Done::Lost { tag, index: at });
        }
    }

    fn answer_reads(&mut self) {
        let applied = self.applied;
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Some(read) = self.reads.remove(&id) {
                self.done.push(Done::ReadReady {
                    tag: read.tag,
                    index: read.index.unwrap_or(applied),
                });
            }
        }
    }

    /// The snapshot policy: a job when a limit is passed and none is in flight.
    fn maybe_snapshot(&mut self) -> Option<SnapshotJob<SM::Snapshot>> {
        if self.snapshot_in_flight.is_some() {
            return None;
        }
        let policy = self.config.snapshot;
        let first = self.raw.status().first_index;
        if self.applied < first {
            return None;
        }
        let by_bytes = policy
            .log_bytes
            .is_some_and(|limit| self.raw.storage().log_bytes() > limit);
        let by_entries = policy
            .entries
            .is_some_and(|every| self.applied.0 >= first.0.saturating_add(every));
        if !(by_bytes || by_entries) {
            return None;
        }
        match self.raw.snapshot_meta(self.applied) {
            Ok(meta) => {
                self.snapshot_in_flight = Some(meta.index);
                self.snapshots_taken += 1;
                Some(SnapshotJob {
                    meta,
                    data: self.machine.snapshot(),
                })
            }
            Err(e) => {
                tracing::debug!(error = %e, "snapshot not taken");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_storage::{MemDisk, StorageConfig};

    /// A machine that sums the bytes of its commands; an empty command is no command, and a
    /// command `[0xff]` is unusable.
    #[derive(Debug, Default)]
    struct Sum(u64);

    impl StateMachine for Sum {
        type Output = u64;
        type Snapshot = Vec<u8>;

        fn apply(&mut self, _index: LogIndex, command: &[u8]) -> Result<Option<u64>, String> {
            match command {
                [] => Ok(None),
                [0xff] => Err("poison".into()),
                bytes => {
                    self.0 += bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
                    Ok(Some(self.0))
                }
            }
        }

        fn snapshot(&self) -> Vec<u8> {
            self.0.to_le_bytes().to_vec()
        }

        fn restore(
            &mut self,
            _index: LogIndex,
            data: &mut dyn std::io::Read,
        ) -> Result<(), String> {
            let mut all = Vec::new();
            data.read_to_end(&mut all).map_err(|e| e.to_string())?;
            let bytes: [u8; 8] = all
                .as_slice()
                .try_into()
                .map_err(|_| "not 8 bytes".to_string())?;
            self.0 = u64::from_le_bytes(bytes);
            Ok(())
        }
    }

    fn single(disk: &mut MemDisk, config: ReplicaConfig) -> Replica<Sum, &'static str> {
        let storage = DurableStorage::open(disk, 1, 1, StorageConfig::default()).unwrap();
        let raft = Config::new(NodeId(1), vec![NodeId(1)]);
        Replica::new(raft, storage, Sum::default(), config).unwrap()
    }

    /// Carries out every Ready; snapshot jobs are prepared and installed at once.
    fn drive(r: &mut Replica<Sum, &'static str>, disk: &mut MemDisk) -> Result<(), Error> {
        while let Some(u) = r.write_ready(disk)? {
            r.sync(disk)?;
            if let Some(job) = r.on_synced(disk, u)?.snapshot {
                let prepared = job.prepare(disk);
                r.install_snapshot(disk, prepared)?;
            }
        }
        Ok(())
    }

    #[test]
    fn proposals_apply_reads_wait_for_apply_and_answers_keep_their_order() {
        let mut disk = MemDisk::new();
        let mut r = single(&mut disk, ReplicaConfig::default());
        // Not the leader yet: refused, the tag handed back.
        assert_eq!(r.propose(vec![1], "early").unwrap_err().1, "early");
        r.raw_mut().campaign();
        drive(&mut r, &mut disk).unwrap();
        assert_eq!(r.role(), Role::Leader);
        let a = r.propose(vec![2], "a").unwrap();
        let b = r.propose(vec![], "noop").unwrap();
        r.read("read").unwrap();
        let c = r.propose(vec![3, 4], "c").unwrap();
        drive(&mut r, &mut disk).unwrap();
        let done = r.take_done();
        let term = r.status().term;
        // The read was confirmed at the commit index it arrived at (1: before the writes
        // committed), so it is ready at once; the writes follow in log order.
        assert_eq!(
            done,
            vec![
                Done::ReadReady {
                    tag: "read",
                    index: LogIndex(1)
                },
                Done::Applied {
                    tag: "a",
                    index: a,
                    term,
                    output: 2
                },
                Done::Lost {
                    tag: "noop",
                    index: b
                },
                Done::Applied {
                    tag: "c",
                    index: c,
                    term,
                    output: 9
                },
            ]
        );
        assert_eq!(r.pending_proposals() + r.pending_reads(), 0);
        assert_eq!(r.machine().0, 9);
    }

    #[test]
    fn the_entry_policy_snapshots_and_a_restart_restores_from_it() {
        let mut disk = MemDisk::new();
        let config = ReplicaConfig {
            snapshot: SnapshotPolicy {
                log_bytes: None,
                entries: Some(3),
            },
            ..ReplicaConfig::default()
        };
        let mut r = single(&mut disk, config);
        r.raw_mut().campaign();
        drive(&mut r, &mut disk).unwrap();
        for i in 1..=10u8 {
            r.propose(vec![i], "p").unwrap();
            drive(&mut r, &mut disk).unwrap();
        }
        assert!(r.snapshots_taken() >= 2, "{}", r.snapshots_taken());
        assert!(r.status().first_index.0 > 1, "the log was not compacted");
        assert_eq!(r.snapshot_in_flight(), None);
        let applied = r.applied();
        drop(r);
        // A restart restores the machine from the stored snapshot and replays the log after it.
        let mut r = single(&mut disk, config);
        assert!(r.status().first_index.0 > 1);
        assert!(
            r.applied() <= applied && r.applied().0 > 1,
            "restored from the snapshot"
        );
        r.raw_mut().campaign();
        drive(&mut r, &mut disk).unwrap();
        assert_eq!(r.machine().0, 55, "the snapshot and the log after it");
        assert!(r.applied() > applied, "the new leader's entry applied too");
    }

    #[test]
    fn an_unusable_entry_stops_the_replica_with_an_error() {
        let mut disk = MemDisk::new();
        let mut r = single(&mut disk, ReplicaConfig::default());
        r.raw_mut().campaign();
        drive(&mut r, &mut disk).unwrap();
        r.propose(vec![0xff], "poison").unwrap();
        let err = drive(&mut r, &mut disk).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unusable {
                    what: "log entry",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("poison"), "{err}");
    }

    #[test]
    fn a_failed_snapshot_preparation_stops_the_replica_and_frees_the_slot() {
        let mut disk = MemDisk::new();
        let config = ReplicaConfig {
            snapshot: SnapshotPolicy {
                log_bytes: Some(0),
                entries: None,
            },
            ..ReplicaConfig::default()
        };
        let mut r = single(&mut disk, config);
        r.raw_mut().campaign();
        let mut job = None;
        while let Some(u) = r.write_ready(&mut disk).unwrap() {
            r.sync(&mut disk).unwrap();
            job = job.or(r.on_synced(&mut disk, u).unwrap().snapshot);
        }
        let job = job.expect("a job over a 0-byte threshold");
        assert_eq!(r.snapshot_in_flight(), Some(job.index()));
        let failed = Err(shoal_storage::Error::Invalid("disk full".into()));
        assert!(r.install_snapshot(&mut disk, failed).is_err());
        assert_eq!(r.snapshot_in_flight(), None);
    }

    #[test]
    fn leadership_loss_fails_reads_and_with_the_flag_proposals() {
        for fail_proposals in [false, true] {
            let mut disk = MemDisk::new();
            let storage = DurableStorage::open(&mut disk, 1, 1, StorageConfig::default()).unwrap();
            let raft = Config::new(NodeId(1), vec![NodeId(1), NodeId(2), NodeId(3)]);
            let config = ReplicaConfig {
                fail_proposals_on_leadership_loss: fail_proposals,
                ..ReplicaConfig::default()
            };
            let mut r: Replica<Sum, &str> =
                Replica::new(raft, storage, Sum::default(), config).unwrap();
            // Win an election by hand: campaign, then grant every (pre-)vote it asks for.
            r.raw_mut().campaign();
            for _ in 0..4 {
                let mut out = Vec::new();
                while let Some(u) = r.write_ready(&mut disk).unwrap() {
                    out.extend(u.messages.iter().cloned());
                    r.sync(&mut disk).unwrap();
                    out.extend(r.on_synced(&mut disk, u).unwrap().messages);
                }
                for m in out {
                    if let shoal_raft::MessageBody::RequestVote { pre_vote, .. } = m.body {
                        let _ = r.step(shoal_raft::Message {
                            from: m.to,
                            to: m.from,
                            term: m.term,
                            body: shoal_raft::MessageBody::RequestVoteResponse {
                                pre_vote,
                                granted: true,
                            },
                        });
                    }
                }
            }
            drive(&mut r, &mut disk).unwrap();
            assert_eq!(r.role(), Role::Leader, "elected by hand");
            r.propose(vec![1], "write").unwrap();
            r.read("read").unwrap();
            drive(&mut r, &mut disk).unwrap();
            // A higher term from a peer: the replica steps down.
            let term = r.status().term;
            let heartbeat = shoal_raft::Message {
                from: NodeId(2),
                to: NodeId(1),
                term: Term(term.0 + 1),
                body: shoal_raft::MessageBody::Heartbeat {
                    commit: LogIndex(0),
                    read_context: None,
                },
            };
            let _ = r.step(heartbeat);
            drive(&mut r, &mut disk).unwrap();
            let done = r.take_done();
            assert!(
                done.contains(&Done::ReadFailed {
                    tag: "read",
                    reason: ReadFailure::NotLeader {
                        leader: Some(NodeId(2))
                    }
                }),
                "{done:?}"
            );
            let lost = done
                .iter()
                .any(|d| matches!(d, Done::Lost { tag: "write", .. }));
            assert_eq!(lost, fail_proposals, "{done:?}");
            assert_eq!(r.pending_proposals(), usize::from(!fail_proposals));
        }
    }
}
