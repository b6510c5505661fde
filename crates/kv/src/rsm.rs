//! The replicated state machine: a [`KvStore`] on top of a Raft [`RawNode`], sans-IO.
//!
//! Writes are proposed to Raft and answered when applied at the index they were proposed at
//! (wrong-leader if another entry lands there or leadership is lost). Reads use read-index
//! (thesis §6.4): no log write, answered once the state machine has applied the index the
//! leader confirmed. A snapshot is taken when the driver reports more Raft state than
//! `snapshot_bytes`.
//!
//! The driver's loop (the simulator's or tokio's):
//!
//! 1. feed [`KvRsm::tick`], [`KvRsm::step`] (peer messages), [`KvRsm::handle_request`];
//! 2. while [`KvRsm::ready`] gives a [`Ready`]: send `messages`; persist `snapshot`, `entries`,
//!    `hard_state` through [`KvRsm::raw_mut`]'s storage and fsync; send `persisted_messages`;
//!    call [`KvRsm::apply`]; persist `compact`; call [`KvRsm::advance`] and
//!    [`KvRsm::maybe_snapshot`] with the persisted Raft state's size;
//! 3. send the replies from [`KvRsm::take_replies`] to the connections named by their token.
//!
//! **Lease clock.** The state machine reads no clock: each [`KvRsm::tick`] advances its time
//! by [`RsmConfig::tick_ms`] (the driver ticks at that period, the simulator in simulated
//! time). Every replica keeps a deadline per lease, from the entries it applies (grant and
//! keep-alive: now + TTL; a checkpoint: now + the replicated remaining time). Only the leader
//! acts on them: when a deadline passes it proposes [`KvOp::LeaseExpire`] (fenced by the
//! lease's renewal counter), and every [`RsmConfig::lease_checkpoint_ms`] it proposes a
//! [`KvOp::LeaseCheckpoint`] of every lease's remaining time. A server that becomes leader
//! keeps its deadlines but never shorter than the longest election timeout from now, so that
//! leases do not expire in a burst after a failover (`docs/kv.md`, "Leases", for the bounds).

use std::collections::BTreeMap;

use shoal_raft::{
    Config, EntryKind, LogIndex, NodeId, RawNode, Ready, Role, Snapshot, SnapshotMeta, Storage,
    Term,
};
use shoal_wire::kv::{
    KvOp, KvReply, KvRequest, KvResult, LeaseCheckpoint, ServerRole, ServerStatus,
};

use crate::store::{KvStore, LeaseEvent, Limits};
use crate::Error;

/// Default [`RsmConfig::tick_ms`]: the tokio driver's default tick.
pub const DEFAULT_TICK_MS: u64 = 25;
/// Default [`RsmConfig::lease_checkpoint_ms`]. A lease outlives its deadline after a failover
/// by at most about this plus an election, so it is short next to a lock's TTL (seconds); the
/// cost is one log entry of ~24 bytes per live lease per period, and only while leases exist.
pub const DEFAULT_LEASE_CHECKPOINT_MS: u64 = 1_000;
/// Most leases in one checkpoint entry (more are split over several entries).
pub const MAX_LEASES_PER_CHECKPOINT: usize = 1_000;

/// Settings of a replicated KV server.
#[derive(Debug, Clone, Copy)]
pub struct RsmConfig {
    /// Snapshot when the persisted Raft state exceeds this many bytes (`None`: never).
    pub snapshot_bytes: Option<u64>,
    /// The store's limits (the same on every replica).
    pub limits: Limits,
    /// Milliseconds of (monotonic) time one [`KvRsm::tick`] stands for: the lease clock.
    pub tick_ms: u64,
    /// How often the leader replicates the leases' remaining times, in ms.
    pub lease_checkpoint_ms: u64,
}

impl Default for RsmConfig {
    fn default() -> Self {
        RsmConfig {
            snapshot_bytes: None,
            limits: Limits::default(),
            tick_ms: DEFAULT_TICK_MS,
            lease_checkpoint_ms: DEFAULT_LEASE_CHECKPOINT_MS,
        }
    }
}

/// The lease clock's volatile state (never replicated, rebuilt from the store).
#[derive(Debug, Default)]
struct LeaseClock {
    /// Milliseconds since this server started (ticks × tick_ms).
    now_ms: u64,
    /// Lease id → the time it expires, on this server's clock.
    deadlines: BTreeMap<u64, u64>,
    /// Leases whose expiry this leader proposed, and when (re-proposed if still alive after
    /// a floor's time: the proposal may have been lost with a log truncation).
    expiring: BTreeMap<u64, u64>,
    /// When the leader sends its next checkpoint.
    next_checkpoint_ms: u64,
    /// A new leader's shortest deadline from now: the longest election timeout.
    floor_ms: u64,
}

/// A write waiting for its index to apply.
#[derive(Debug)]
struct PendingWrite {
    term: Term,
    reply_to: u64,
    client: u64,
    request: u64,
}

/// A read waiting for leadership confirmation and apply.
#[derive(Debug)]
struct PendingRead {
    reply_to: u64,
    request: KvRequest,
    /// Set once Raft confirmed: serve when applied reaches it.
    index: Option<LogIndex>,
}

/// A snapshot to make off the driver's loop: a copy of the store (sharing its nodes, see
/// [`KvStore`]) and the Raft metadata of the index it was taken at.
#[derive(Debug)]
pub struct SnapshotJob {
    meta: SnapshotMeta,
    store: KvStore,
}

impl SnapshotJob {
    /// The log index the snapshot covers.
    pub fn index(&self) -> LogIndex {
        self.meta.index
    }

    /// Serializes the store (the slow part: call it off the loop).
    pub fn run(self) -> Snapshot {
        Snapshot {
            data: self.store.snapshot(),
            meta: self.meta,
        }
    }
}

/// A replicated KV server: Raft core + versioned store + pending requests.
pub struct KvRsm<S: Storage> {
    raw: RawNode<S>,
    store: KvStore,
    config: RsmConfig,
    applied: LogIndex,
    pending_writes: BTreeMap<LogIndex, PendingWrite>,
    pending_reads: BTreeMap<u64, PendingRead>,
    next_read_id: u64,
    replies: Vec<(u64, KvReply)>,
    role: Role,
    leader: Option<NodeId>,
    snapshots_taken: u64,
    snapshots_installed: u64,
    leases: LeaseClock,
}

impl<S: Storage> KvRsm<S> {
    /// Starts (or restarts) a server from its durable Raft state, restoring the store from the
    /// stored snapshot.
    pub fn new(mut raft: Config, storage: S, config: RsmConfig) -> Result<KvRsm<S>, Error> {
        let snap = storage.snapshot().map_err(shoal_raft::Error::from)?;
        let mut store = KvStore::new(config.limits);
        store.restore(&snap.data)?;
        raft.applied = snap.meta.index;
        let floor_ms = 2 * u64::from(raft.election_tick) * config.tick_ms;
        let raw = RawNode::new(raft, storage)?;
        let status = raw.status();
        let mut leases = LeaseClock {
            floor_ms,
            ..LeaseClock::default()
        };
        for l in store.leases() {
            leases.deadlines.insert(l.id, l.remaining_ms);
        }
        Ok(KvRsm {
            raw,
            store,
            config,
            applied: snap.meta.index,
            pending_writes: BTreeMap::new(),
            pending_reads: BTreeMap::new(),
            next_read_id: 1,
            replies: Vec::new(),
            role: status.role,
            leader: status.leader,
            snapshots_taken: 0,
            snapshots_installed: 0,
            leases,
        })
    }

    /// This server's lease clock in ms (ticks × `tick_ms` since it started).
    pub fn lease_now_ms(&self) -> u64 {
        self.leases.now_ms
    }

    /// When lease `id` expires on this server's lease clock, as far as it knows (the leader
    /// acts on it; a follower's is an estimate from the entries it applied).
    pub fn lease_deadline_ms(&self, id: u64) -> Option<u64> {
        self.leases.deadlines.get(&id).copied()
    }

    /// Answers a read from the store; the leases' remaining times come from this server's
    /// deadlines rather than the last replicated values.
    fn read(&self, op: &KvOp) -> KvResult {
        match self.store.read(op) {
            Ok(KvResult::Leases { mut leases }) => {
                for l in &mut leases {
                    if let Some(d) = self.leases.deadlines.get(&l.id) {
                        l.remaining_ms = d.saturating_sub(self.leases.now_ms);
                    }
                }
                KvResult::Leases { leases }
            }
            Ok(r) => r,
            Err(_) => KvResult::Stale,
        }
    }

    /// Proposes an operation of the leader's own (lease expiry, checkpoint): no session, no
    /// waiting client. A refused proposal is retried by the next tick's duties.
    fn propose_internal(&mut self, op: KvOp) {
        let req = KvRequest {
            client: 0,
            request: 0,
            op,
            serializable: false,
        };
        match postcard::to_allocvec(&req) {
            Ok(data) => {
                if let Err(e) = self.raw.propose(data) {
                    tracing::debug!(error = %e, "lease proposal refused");
                }
            }
            Err(e) => tracing::error!(error = %e, "lease proposal does not encode"),
        }
    }

    /// The leader's lease duties at each tick: propose the expiry of every lease whose
    /// deadline passed, and a checkpoint when one is due.
    fn lease_duties(&mut self) {
        let now = self.leases.now_ms;
        let due: Vec<u64> = self
            .leases
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(renewals) = self.store.lease_renewals(id) else {
                self.leases.deadlines.remove(&id);
                continue;
            };
            let retry = self.leases.floor_ms.max(1);
            if let Some(at) = self.leases.expiring.get(&id) {
                if now < at + retry {
                    continue;
                }
            }
            self.leases.expiring.insert(id, now);
            tracing::debug!(lease = id, "lease deadline passed: proposing its expiry");
            self.propose_internal(KvOp::LeaseExpire { id, renewals });
        }
        if now >= self.leases.next_checkpoint_ms {
            self.leases.next_checkpoint_ms = now + self.config.lease_checkpoint_ms.max(1);
            let all: Vec<LeaseCheckpoint> = self
                .store
                .leases()
                .into_iter()
                .filter_map(|l| {
                    let d = self.leases.deadlines.get(&l.id)?;
                    Some(LeaseCheckpoint {
                        id: l.id,
                        renewals: l.renewals,
                        remaining_ms: d.saturating_sub(now),
                    })
                })
                .collect();
            for chunk in all.chunks(MAX_LEASES_PER_CHECKPOINT) {
                self.propose_internal(KvOp::LeaseCheckpoint {
                    leases: chunk.to_vec(),
                });
            }
        }
    }

    /// Updates the deadlines after an apply, from what it did to leases.
    fn on_lease_events(&mut self, events: &[LeaseEvent]) {
        let now = self.leases.now_ms;
        for e in events {
            match *e {
                LeaseEvent::Renewed { id, ttl_ms } => {
                    self.leases.deadlines.insert(id, now + ttl_ms);
                    self.leases.expiring.remove(&id);
                }
                LeaseEvent::Checkpointed { id, remaining_ms } => {
                    // The leader made it from its own deadlines: nothing to learn. A follower
                    // takes it as its estimate (a later point than the leader measured from,
                    // so never earlier than the leader's deadline).
                    if self.role != Role::Leader {
                        self.leases.deadlines.insert(id, now + remaining_ms);
                    }
                }
                LeaseEvent::Ended { id } => {
                    self.leases.deadlines.remove(&id);
                    self.leases.expiring.remove(&id);
                }
            }
        }
    }

    /// Rebuilds the deadlines from the store (after a snapshot replaced it).
    fn reset_lease_deadlines(&mut self) {
        let now = self.leases.now_ms;
        self.leases.deadlines = self
            .store
            .leases()
            .into_iter()
            .map(|l| (l.id, now + l.remaining_ms))
            .collect();
        self.leases.expiring.clear();
    }

    /// A new leader honours each lease's remaining time as it knows it, but gives every lease
    /// at least `floor_ms` (an election timeout), so that the clients of the old leader have
    /// time to find this one before their leases expire.
    fn on_became_leader(&mut self) {
        let now = self.leases.now_ms;
        let floor = now + self.leases.floor_ms;
        for l in self.store.leases() {
            let d = self
                .leases
                .deadlines
                .get(&l.id)
                .copied()
                .unwrap_or(now + l.remaining_ms);
            self.leases.deadlines.insert(l.id, d.max(floor));
        }
        self.leases.expiring.clear();
        self.leases.next_checkpoint_ms = now + self.config.lease_checkpoint_ms.max(1);
    }

    /// The Raft core (status, tests).
    pub fn raw(&self) -> &RawNode<S> {
        &self.raw
    }

    /// The Raft core, for the driver's storage writes.
    pub fn raw_mut(&mut self) -> &mut RawNode<S> {
        &mut self.raw
    }

    /// The state machine.
    pub fn store(&self) -> &KvStore {
        &self.store
    }

    /// Last applied log index.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// Snapshots this server asked Raft to take since it started.
    pub fn snapshots_taken(&self) -> u64 {
        self.snapshots_taken
    }

    /// Snapshots received from a leader (InstallSnapshot) and restored since it started.
    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed
    }

    /// What this server says of itself to a [`KvOp::Status`] request.
    pub fn server_status(&self) -> ServerStatus {
        let s = self.raw.status();
        ServerStatus {
            id: s.id.0,
            role: match s.role {
                Role::Follower => ServerRole::Follower,
                Role::PreCandidate => ServerRole::PreCandidate,
                Role::Candidate => ServerRole::Candidate,
                Role::Leader => ServerRole::Leader,
            },
            term: s.term.0,
            leader: s.leader.map(|l| l.0),
            commit: s.commit.0,
            applied: self.applied.0,
            last_index: s.last_index.0,
        }
    }

    /// Requests waiting for an answer.
    pub fn pending(&self) -> usize {
        self.pending_writes.len() + self.pending_reads.len()
    }

    fn wrong_leader(&mut self, reply_to: u64, client: u64, request: u64) {
        let leader = self.raw.status().leader.map(|l| l.0);
        self.replies.push((
            reply_to,
            KvReply::WrongLeader {
                client,
                request,
                leader,
            },
        ));
    }

    /// Queues the answer `result` to request `request` of `client`, for connection `reply_to`.
    fn answer(&mut self, reply_to: u64, client: u64, request: u64, result: KvResult) {
        let reply = KvReply::Done {
            client,
            request,
            result,
        };
        self.replies.push((reply_to, reply));
    }

    /// A client request arrived on connection `reply_to` (an opaque token for the driver).
    pub fn handle_request(&mut self, reply_to: u64, req: KvRequest) {
        let status = self.raw.status();
        if req.op == KvOp::Status {
            let result = KvResult::Status(self.server_status());
            self.answer(reply_to, req.client, req.request, result);
            return;
        }
        if req.op.is_read() && req.serializable {
            let result = self.read(&req.op);
            self.answer(reply_to, req.client, req.request, result);
            return;
        }
        if req.op.is_internal() {
            let result = KvResult::Refused {
                reason: "lease expiry and checkpoints are proposed by the leader only".into(),
            };
            self.answer(reply_to, req.client, req.request, result);
            return;
        }
        if status.role != Role::Leader {
            self.wrong_leader(reply_to, req.client, req.request);
            return;
        }
        if req.op.is_read() {
            let id = self.next_read_id;
            self.next_read_id += 1;
            if self.raw.read_index(id.to_le_bytes().to_vec()).is_err() {
                self.wrong_leader(reply_to, req.client, req.request);
                return;
            }
            self.pending_reads.insert(
                id,
                PendingRead {
                    reply_to,
                    request: req,
                    index: None,
                },
            );
            return;
        }
        // Refuse oversized writes before they take log space (the store refuses them too).
        if let Some(result) = self.store.size_error(&req.op) {
            self.answer(reply_to, req.client, req.request, result);
            return;
        }
        let data = match postcard::to_allocvec(&req) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(node = status.id.0, error = %e, "request does not encode");
                return;
            }
        };
        match self.raw.propose(data) {
            Ok(index) => {
                let pending = PendingWrite {
                    term: status.term,
                    reply_to,
                    client: req.client,
                    request: req.request,
                };
                if let Some(old) = self.pending_writes.insert(index, pending) {
                    // Our own log was truncated and refilled: the old proposal is gone.
                    self.wrong_leader(old.reply_to, old.client, old.request);
                }
            }
            Err(_) => self.wrong_leader(reply_to, req.client, req.request),
        }
    }

    /// Advances Raft's logical clock and the lease clock by one tick ([`RsmConfig::tick_ms`]);
    /// on the leader, proposes the expiry of leases whose deadline passed and checkpoints.
    pub fn tick(&mut self) {
        self.raw.tick();
        self.leases.now_ms += self.config.tick_ms;
        if self.role == Role::Leader {
            self.lease_duties();
        }
    }

    /// A Raft message from a peer.
    pub fn step(&mut self, msg: shoal_raft::Message) {
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(node = self.raw.status().id.0, error = %e, "raft message refused");
        }
    }

    /// The next batch of work, if any.
    pub fn ready(&mut self) -> Option<Ready> {
        if self.raw.has_ready() {
            Some(self.raw.ready())
        } else {
            None
        }
    }

    /// Step 4 and 6 of a Ready (after its writes are durable): restore a snapshot, apply the
    /// committed entries in order, serve safe reads, and fail requests whose leadership ended.
    ///
    /// [`Error::Unusable`] if a committed snapshot or entry does not decode: the replica must
    /// stop (the state machine is then in no defined state and must not be used again).
    pub fn apply(&mut self, rd: &Ready) -> Result<(), Error> {
        let id = self.raw.status().id.0;
        if let Some(ss) = rd.soft_state {
            let was_leader = self.role == Role::Leader;
            self.role = ss.role;
            self.leader = ss.leader;
            if was_leader && ss.role != Role::Leader {
                tracing::debug!(node = id, "lost leadership; failing pending requests");
                self.fail_all_pending();
                self.leases.expiring.clear();
            }
            if !was_leader && ss.role == Role::Leader {
                self.on_became_leader();
            }
        }
        if let Some(snap) = &rd.snapshot {
            if snap.meta.index > self.applied {
                if let Err(e) = self.store.restore(&snap.data) {
                    // A snapshot Raft accepted must decode: anything else would diverge.
                    return Err(Error::Unusable {
                        what: "snapshot",
                        index: snap.meta.index.0,
                        reason: e.to_string(),
                    });
                }
                self.applied = snap.meta.index;
                self.snapshots_installed += 1;
                self.reset_lease_deadlines();
                let covered: Vec<LogIndex> = self
                    .pending_writes
                    .range(..=snap.meta.index)
                    .map(|(i, _)| *i)
                    .collect();
                for i in covered {
                    if let Some(p) = self.pending_writes.remove(&i) {
                        self.wrong_leader(p.reply_to, p.client, p.request);
                    }
                }
                tracing::info!(node = id, index = snap.meta.index.0, "restored snapshot");
            }
        }
        for e in &rd.committed_entries {
            if e.index <= self.applied {
                continue;
            }
            assert_eq!(
                e.index.0,
                self.applied.0 + 1,
                "node {id}: apply out of order"
            );
            self.applied = e.index;
            let pending = self.pending_writes.remove(&e.index);
            if e.kind != EntryKind::Normal || e.data.is_empty() {
                if let Some(p) = pending {
                    self.wrong_leader(p.reply_to, p.client, p.request);
                }
                continue;
            }
            let req: KvRequest = match postcard::from_bytes(&e.data) {
                Ok(r) => r,
                Err(err) => {
                    // Only this crate proposes; a committed entry that does not decode means
                    // the log is corrupt, and skipping it on one replica would diverge.
                    return Err(Error::Unusable {
                        what: "log entry",
                        index: e.index.0,
                        reason: err.to_string(),
                    });
                }
            };
            let mut events = Vec::new();
            let result = self.store.apply_with_events(e.index.0, &req, &mut events);
            if !events.is_empty() {
                self.on_lease_events(&events);
            }
            if let Some(p) = pending {
                if p.term == e.term && p.client == req.client && p.request == req.request {
                    self.answer(p.reply_to, req.client, req.request, result);
                } else {
                    self.wrong_leader(p.reply_to, p.client, p.request);
                }
            }
        }
        for rs in &rd.read_states {
            let Ok(bytes) = <[u8; 8]>::try_from(rs.context.as_slice()) else {
                continue;
            };
            if let Some(p) = self.pending_reads.get_mut(&u64::from_le_bytes(bytes)) {
                p.index = Some(rs.index);
            }
        }
        self.serve_reads();
        Ok(())
    }

    /// Answers confirmed reads whose index is applied.
    fn serve_reads(&mut self) {
        let ready: Vec<u64> = self
            .pending_reads
            .iter()
            .filter(|(_, p)| p.index.is_some_and(|i| i <= self.applied))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Some(p) = self.pending_reads.remove(&id) {
                let result = self.read(&p.request.op);
                self.answer(p.reply_to, p.request.client, p.request.request, result);
            }
        }
    }

    fn fail_all_pending(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending_writes) {
            self.wrong_leader(p.reply_to, p.client, p.request);
        }
        for (_, p) in std::mem::take(&mut self.pending_reads) {
            self.wrong_leader(p.reply_to, p.request.client, p.request.request);
        }
    }

    /// Tells Raft the Ready is done.
    pub fn advance(&mut self) {
        self.raw.advance();
    }

    /// Asks Raft for a snapshot of the store if `raft_state_bytes` (the persisted log and hard
    /// state) exceeds `snapshot_bytes`. The snapshot comes back as a later Ready's `compact`.
    pub fn maybe_snapshot(&mut self, raft_state_bytes: u64) {
        // The same test and metadata as a job, run at once: `snapshot_meta` just checked
        // what `RawNode::snapshot` checks, so it cannot refuse.
        if let Some(job) = self.snapshot_job(raft_state_bytes) {
            let snapshot = job.run();
            let taken = self.raw.snapshot(snapshot.meta.index, snapshot.data);
            debug_assert!(
                taken.is_ok(),
                "snapshot refused after its metadata: {taken:?}"
            );
        }
    }

    /// Like [`KvRsm::maybe_snapshot`], but hands the work to the driver instead of doing it
    /// in place: if `raft_state_bytes` exceeds `snapshot_bytes`, a [`SnapshotJob`] holding an
    /// O(1) copy of the store and the snapshot's metadata. The driver runs it on another
    /// thread, writes the file there, and compacts its storage when the file is durable; the
    /// Raft core needs nothing back (it reads its first index from the storage). At most one
    /// job should be in flight: the driver asks again only after the last one finished.
    pub fn snapshot_job(&mut self, raft_state_bytes: u64) -> Option<SnapshotJob> {
        let limit = self.config.snapshot_bytes?;
        let status = self.raw.status();
        if raft_state_bytes <= limit || self.applied < status.first_index {
            return None;
        }
        match self.raw.snapshot_meta(self.applied) {
            Ok(meta) => {
                self.snapshots_taken += 1;
                Some(SnapshotJob {
                    meta,
                    store: self.store.clone(),
                })
            }
            Err(e) => {
                tracing::debug!(node = status.id.0, error = %e, "snapshot not taken");
                None
            }
        }
    }

    /// Replies ready to send: (the `reply_to` token given with the request, reply).
    pub fn take_replies(&mut self) -> Vec<(u64, KvReply)> {
        std::mem::take(&mut self.replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_raft::MemStorage;
    use shoal_wire::kv::{Expected, KvOp};

    /// Drives a single-node cluster's Readies with in-memory storage.
    fn drive(rsm: &mut KvRsm<MemStorage>) {
        while let Some(mut rd) = rsm.ready() {
            let storage = rsm.raw_mut().storage_mut();
            if let Some(s) = rd.snapshot.clone() {
                storage.apply_snapshot(s);
            }
            storage.append(&rd.entries);
            if let Some(hs) = rd.hard_state {
                storage.set_hard_state(hs);
            }
            rsm.apply(&rd).expect("apply");
            if let Some(s) = rd.compact.take() {
                rsm.raw_mut().storage_mut().compact(s);
            }
            rsm.advance();
            rsm.maybe_snapshot(u64::MAX);
        }
    }

    fn req(client: u64, request: u64, op: KvOp) -> KvRequest {
        KvRequest {
            client,
            request,
            op,
            serializable: false,
        }
    }

    /// A committed entry or snapshot that does not decode stops the replica with an error
    /// naming what and where, never a panic (the driver reports it and exits).
    #[test]
    fn an_unusable_entry_or_snapshot_is_an_error_not_a_panic() {
        let raft = Config::new(NodeId(1), vec![NodeId(1)]);
        let mut rsm = KvRsm::new(raft, MemStorage::new(), RsmConfig::default()).unwrap();
        let rd = Ready {
            committed_entries: vec![shoal_raft::Entry {
                term: Term(1),
                index: LogIndex(1),
                kind: EntryKind::Normal,
                data: vec![0xff; 7],
            }],
            ..Ready::default()
        };
        let err = rsm.apply(&rd).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unusable {
                    what: "log entry",
                    index: 1,
                    ..
                }
            ),
            "{err}"
        );

        let raft = Config::new(NodeId(1), vec![NodeId(1)]);
        let mut rsm = KvRsm::new(raft, MemStorage::new(), RsmConfig::default()).unwrap();
        let rd = Ready {
            snapshot: Some(Snapshot {
                meta: SnapshotMeta {
                    index: LogIndex(5),
                    term: Term(1),
                    ..SnapshotMeta::default()
                },
                data: b"not a snapshot".to_vec(),
            }),
            ..Ready::default()
        };
        let err = rsm.apply(&rd).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the committed snapshot at index 5 is unusable"),
            "{err}"
        );
    }

    /// A snapshot job is a copy of the store at the applied index: writes applied after it
    /// was handed out do not leak into it, and restoring its data gives that state back.
    #[test]
    fn snapshot_job_copies_the_store_at_its_index() {
        let config = RsmConfig {
            snapshot_bytes: Some(10),
            ..RsmConfig::default()
        };
        let raft = Config::new(NodeId(1), vec![NodeId(1)]);
        let mut rsm = KvRsm::new(raft, MemStorage::new(), config).unwrap();
        rsm.raw_mut().campaign();
        let drive_plain = |rsm: &mut KvRsm<MemStorage>| {
            while let Some(rd) = rsm.ready() {
                let storage = rsm.raw_mut().storage_mut();
                storage.append(&rd.entries);
                if let Some(hs) = rd.hard_state {
                    storage.set_hard_state(hs);
                }
                rsm.apply(&rd).expect("apply");
                rsm.advance();
            }
        };
        drive_plain(&mut rsm);
        rsm.handle_request(1, req(5, 1, KvOp::Register));
        drive_plain(&mut rsm);
        let session = rsm.applied().0;
        let put = |request: u64, value: &str| {
            let op = KvOp::Put {
                key: b"k".to_vec(),
                value: value.as_bytes().to_vec(),
                expected: Expected::Any,
            };
            req(session, request, op)
        };
        rsm.handle_request(1, put(1, "before"));
        drive_plain(&mut rsm);
        // Under the threshold: no job.
        assert!(rsm.snapshot_job(10).is_none());
        let job = rsm.snapshot_job(11).expect("over the threshold");
        assert_eq!(job.index(), rsm.applied());
        let at_job = rsm.store().snapshot();
        rsm.handle_request(1, put(2, "after"));
        drive_plain(&mut rsm);
        assert_eq!(rsm.store().get(b"k"), Some((&b"after"[..], 2)));
        let snap = job.run();
        assert_eq!(snap.meta.index, LogIndex(rsm.applied().0 - 1));
        assert_eq!(snap.meta.voters, vec![NodeId(1)]);
        assert_eq!(snap.data, at_job);
        let mut restored = KvStore::new(Limits::default());
        restored.restore(&snap.data).unwrap();
        assert_eq!(restored.get(b"k"), Some((&b"before"[..], 1)));
        assert_eq!(rsm.snapshots_taken(), 1);
    }

    #[test]
    fn single_node_write_then_read_index() {
        let config = RsmConfig {
            snapshot_bytes: Some(0),
            ..RsmConfig::default()
        };
        let raft = Config::new(NodeId(1), vec![NodeId(1)]);
        let mut rsm = KvRsm::new(raft, MemStorage::new(), config).unwrap();
        rsm.raw_mut().campaign();
        drive(&mut rsm);
        let put = KvOp::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expected: Expected::Version(0),
        };
        rsm.handle_request(1, req(5, 1, KvOp::Register));
        drive(&mut rsm);
        let Some((
            1,
            KvReply::Done {
                result: KvResult::Registered { session },
                ..
            },
        )) = rsm.take_replies().pop()
        else {
            panic!("registration")
        };
        rsm.handle_request(1, req(session, 1, put.clone()));
        drive(&mut rsm);
        // A retry of the same request is answered from the session table.
        rsm.handle_request(1, req(session, 1, put.clone()));
        drive(&mut rsm);
        // A write from a session that was never opened is refused.
        rsm.handle_request(3, req(session + 1000, 1, put));
        drive(&mut rsm);
        rsm.handle_request(2, req(5, 2, KvOp::Get { key: b"k".to_vec() }));
        drive(&mut rsm);
        let replies = rsm.take_replies();
        let results: Vec<_> = replies
            .iter()
            .map(|(to, r)| match r {
                KvReply::Done { result, .. } => (*to, result.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            results,
            vec![
                (1, KvResult::Written { version: 1 }),
                (1, KvResult::Written { version: 1 }),
                (3, KvResult::SessionExpired),
                (
                    2,
                    KvResult::Found {
                        value: b"v".to_vec(),
                        version: 1
                    }
                )
            ]
        );
        assert!(rsm.snapshots_taken() > 0);
        assert_eq!(rsm.pending(), 0);
    }

    #[test]
    fn follower_answers_wrong_leader() {
        let raft = Config::new(NodeId(2), vec![NodeId(1), NodeId(2), NodeId(3)]);
        let mut rsm = KvRsm::new(raft, MemStorage::new(), RsmConfig::default()).unwrap();
        rsm.handle_request(7, req(5, 1, KvOp::Get { key: b"k".to_vec() }));
        assert!(matches!(
            rsm.take_replies().as_slice(),
            [(7, KvReply::WrongLeader { .. })]
        ));
    }

    /// On one node: the leader's lease clock expires a lease after its TTL of ticks (and not
    /// before), a keep-alive pushes the deadline, and a client cannot send the leader's own
    /// expiry.
    #[test]
    fn leader_expires_leases_by_its_ticks() {
        let config = RsmConfig {
            tick_ms: 100,
            limits: Limits {
                min_lease_ttl_ms: 100,
                ..Limits::default()
            },
            ..RsmConfig::default()
        };
        let raft = Config::new(NodeId(1), vec![NodeId(1)]);
        let mut rsm = KvRsm::new(raft, MemStorage::new(), config).unwrap();
        rsm.raw_mut().campaign();
        drive(&mut rsm);
        rsm.handle_request(1, req(5, 1, KvOp::Register));
        drive(&mut rsm);
        let session = rsm.applied().0;
        rsm.handle_request(1, req(session, 1, KvOp::LeaseGrant { ttl_ms: 1_000 }));
        drive(&mut rsm);
        let id = rsm.applied().0;
        assert_eq!(rsm.lease_deadline_ms(id), Some(rsm.lease_now_ms() + 1_000));
        let forged = KvOp::LeaseExpire { id, renewals: 0 };
        rsm.handle_request(2, req(session, 2, forged));
        drive(&mut rsm);
        let replies = rsm.take_replies();
        assert!(matches!(
            replies.last(),
            Some((
                2,
                KvReply::Done {
                    result: KvResult::Refused { .. },
                    ..
                }
            ))
        ));
        for _ in 0..9 {
            rsm.tick();
            drive(&mut rsm);
        }
        assert_eq!(rsm.store().lease_count(), 1, "expired before its TTL");
        rsm.handle_request(1, req(session, 3, KvOp::LeaseKeepAlive { id }));
        drive(&mut rsm);
        for _ in 0..9 {
            rsm.tick();
            drive(&mut rsm);
        }
        assert_eq!(rsm.store().lease_count(), 1, "a keep-alive did not renew");
        for _ in 0..2 {
            rsm.tick();
            drive(&mut rsm);
        }
        assert_eq!(rsm.store().lease_count(), 0, "not expired after its TTL");
        assert_eq!(rsm.lease_deadline_ms(id), None);
    }
}
