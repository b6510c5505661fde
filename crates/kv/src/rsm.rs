//! The replicated KV state machine: a [`KvStore`] hosted by the replica shell
//! ([`shoal_replica::Replica`]), sans-IO.
//!
//! Writes are proposed to Raft and answered when applied at the index they were proposed at
//! (wrong-leader if another entry lands there or leadership is lost). Reads use read-index
//! (thesis §6.4): no log write, answered once the state machine has applied the index the
//! leader confirmed. Snapshots are taken by the shell's policy when the live log exceeds
//! `snapshot_bytes`, as jobs the driver runs off its loop.
//!
//! A driver (the tokio one in `shoal_runtime`, the simulator's in `shoal_replica::sim`) feeds
//! [`KvRsm::tick`], [`KvRsm::step`] and [`KvRsm::handle_request`], carries out the shell's
//! pipeline on [`KvRsm::replica_mut`] (`write_ready`, `sync`, `on_synced`, snapshot jobs; the
//! contract is on `shoal_raft::Ready`), then sends the replies of [`KvRsm::take_replies`] to the
//! connections named by their token.
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

use shoal_raft::{Config, LogIndex, NodeId, RawNode, Role};
use shoal_replica::{Done, Replica, ReplicaConfig, SnapshotPolicy};
use shoal_storage::DurableStorage;
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

/// Who waits for a proposal or a read: the connection token to answer on and the request.
#[derive(Debug)]
pub struct Waiter {
    pub(crate) reply_to: u64,
    pub(crate) client: u64,
    pub(crate) request: u64,
    /// The read to serve once confirmed (`None` for a write).
    pub(crate) read: Option<KvOp>,
}

/// The KV state machine as the replica shell hosts it: the store, and the lease clock's
/// volatile state (each replica's own; it follows the entries applied and the role).
pub struct KvMachine {
    store: KvStore,
    leases: LeaseClock,
    role: Role,
    lease_checkpoint_ms: u64,
}

/// A snapshot in the making: an O(1) copy of the store (sharing its nodes, see [`KvStore`]),
/// serialized off the loop.
#[derive(Debug)]
pub struct StoreSnapshot(KvStore);

impl shoal_replica::SnapshotData for StoreSnapshot {
    fn into_bytes(self) -> Vec<u8> {
        self.0.snapshot()
    }

    fn encoded_len(&self) -> Option<u64> {
        Some(self.0.snapshot_len())
    }

    /// Streamed into the snapshot file: the serialized store is never held whole.
    fn write_to(self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        self.0.write_snapshot(w)
    }
}

/// A snapshot job of the KV server (see [`shoal_replica::SnapshotJob`]).
pub type SnapshotJob = shoal_replica::SnapshotJob<StoreSnapshot>;

impl shoal_replica::StateMachine for KvMachine {
    type Output = KvResult;
    type Snapshot = StoreSnapshot;

    fn apply(&mut self, index: LogIndex, command: &[u8]) -> Result<Option<KvResult>, String> {
        if command.is_empty() {
            return Ok(None);
        }
        // Only this crate proposes; a committed entry that does not decode means the log is
        // corrupt, and skipping it on one replica would diverge.
        let req: KvRequest = postcard::from_bytes(command).map_err(|e| e.to_string())?;
        let mut events = Vec::new();
        let result = self.store.apply_with_events(index.0, &req, &mut events);
        if !events.is_empty() {
            self.on_lease_events(&events);
        }
        Ok(Some(result))
    }

    fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot(self.store.clone())
    }

    fn restore(&mut self, _index: LogIndex, data: &mut dyn std::io::Read) -> Result<(), String> {
        // A snapshot Raft accepted must decode: anything else would diverge. Decoded as it is
        // read from the snapshot file: never held whole.
        self.store.restore_from(data).map_err(|e| e.to_string())?;
        self.reset_lease_deadlines();
        Ok(())
    }

    fn on_role_change(&mut self, role: Role, _leader: Option<NodeId>) {
        let was_leader = self.role == Role::Leader;
        self.role = role;
        if was_leader && role != Role::Leader {
            self.leases.expiring.clear();
        }
        if !was_leader && role == Role::Leader {
            self.on_became_leader();
        }
    }
}

impl KvMachine {
    /// The store.
    pub fn store(&self) -> &KvStore {
        &self.store
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

    /// The leader's lease duties at a tick: the expiry of every lease whose deadline passed,
    /// and a checkpoint when one is due, as operations to propose.
    fn lease_duties(&mut self) -> Vec<KvOp> {
        let mut ops = Vec::new();
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
            ops.push(KvOp::LeaseExpire { id, renewals });
        }
        if now >= self.leases.next_checkpoint_ms {
            self.leases.next_checkpoint_ms = now + self.lease_checkpoint_ms.max(1);
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
                ops.push(KvOp::LeaseCheckpoint {
                    leases: chunk.to_vec(),
                });
            }
        }
        ops
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
        self.leases.next_checkpoint_ms = now + self.lease_checkpoint_ms.max(1);
    }
}

/// A replicated KV server: the replica shell hosting a [`KvMachine`], and the replies to send.
pub struct KvRsm {
    replica: Replica<KvMachine, Waiter>,
    config: RsmConfig,
    replies: Vec<(u64, KvReply)>,
    /// Confirmed backups waiting to be serialized ([`KvRsm::take_backups`]).
    backups: Vec<PendingBackup>,
    /// Whether the driver takes backups and serializes them off its loop; otherwise they are
    /// serialized into [`KvRsm::take_replies`].
    backups_off_loop: bool,
    /// A buffer for the replica's answers, kept between rounds (no allocation per round).
    done: Vec<Done<Waiter, KvResult>>,
    /// Addresses known without the log (`--peers`), see [`KvRsm::set_known_addresses`].
    pub(crate) known_addresses: BTreeMap<u64, String>,
}

impl KvRsm {
    /// Starts (or restarts) a server from its durable Raft state, restoring the store from the
    /// stored snapshot.
    pub fn new(raft: Config, storage: DurableStorage, config: RsmConfig) -> Result<KvRsm, Error> {
        let floor_ms = 2 * u64::from(raft.election_tick) * config.tick_ms;
        let machine = KvMachine {
            store: KvStore::new(config.limits),
            leases: LeaseClock {
                floor_ms,
                ..LeaseClock::default()
            },
            role: Role::Follower,
            lease_checkpoint_ms: config.lease_checkpoint_ms,
        };
        let replica_config = ReplicaConfig {
            snapshot: SnapshotPolicy {
                log_bytes: config.snapshot_bytes,
                entries: None,
            },
            read_timeout_ticks: None,
            // Clients retry with the same request id (at-most-once): telling them at once
            // lets them find the new leader sooner.
            fail_proposals_on_leadership_loss: true,
        };
        let replica = Replica::new(raft, storage, machine, replica_config)?;
        Ok(KvRsm {
            replica,
            config,
            replies: Vec::new(),
            backups: Vec::new(),
            backups_off_loop: false,
            done: Vec::new(),
            known_addresses: BTreeMap::new(),
        })
    }

    /// The replica shell, for the driver's pipeline (`write_ready`, `sync`, `on_synced`,
    /// snapshot jobs).
    pub fn replica_mut(&mut self) -> &mut Replica<KvMachine, Waiter> {
        &mut self.replica
    }

    /// The replica shell.
    pub fn replica(&self) -> &Replica<KvMachine, Waiter> {
        &self.replica
    }

    /// This server's lease clock in ms (ticks × `tick_ms` since it started).
    pub fn lease_now_ms(&self) -> u64 {
        self.replica.machine().leases.now_ms
    }

    /// When lease `id` expires on this server's lease clock, as far as it knows (the leader
    /// acts on it; a follower's is an estimate from the entries it applied).
    pub fn lease_deadline_ms(&self, id: u64) -> Option<u64> {
        self.replica.machine().leases.deadlines.get(&id).copied()
    }

    /// Proposes an operation of the leader's own (lease expiry, checkpoint): no session, no
    /// waiting client. A refused proposal is retried by the next tick's duties.
    pub(crate) fn propose_internal(&mut self, op: KvOp) {
        let req = KvRequest {
            client: 0,
            request: 0,
            op,
            serializable: false,
        };
        match postcard::to_allocvec(&req) {
            Ok(data) => {
                if let Err(e) = self.replica.propose_untracked(data) {
                    tracing::debug!(error = %e, "lease proposal refused");
                }
            }
            Err(e) => tracing::error!(error = %e, "lease proposal does not encode"),
        }
    }

    /// The Raft core (status, tests).
    pub fn raw(&self) -> &RawNode<DurableStorage> {
        self.replica.raw()
    }

    /// The Raft core (campaign, leadership transfer).
    pub fn raw_mut(&mut self) -> &mut RawNode<DurableStorage> {
        self.replica.raw_mut()
    }

    /// The state machine.
    pub fn store(&self) -> &KvStore {
        &self.replica.machine().store
    }

    /// Last applied log index.
    pub fn applied(&self) -> LogIndex {
        self.replica.applied()
    }

    /// Snapshot jobs this server handed out since it started.
    pub fn snapshots_taken(&self) -> u64 {
        self.replica.snapshots_taken()
    }

    /// Snapshots received from a leader (InstallSnapshot) and restored since it started.
    pub fn snapshots_installed(&self) -> u64 {
        self.replica.snapshots_installed()
    }

    /// What this server says of itself to a [`KvOp::Status`] request.
    pub fn server_status(&self) -> ServerStatus {
        server_status(&self.replica)
    }

    /// The answer to a confirmed [`KvOp::Snapshot`], not yet serialized: an O(1) copy of the
    /// store as of the applied index (at least the index the leader confirmed, so every
    /// acknowledged write is in it), with that entry's term and the voters.
    fn backup(&self, w: &Waiter) -> Result<PendingBackup, KvResult> {
        let applied = self.replica.applied();
        let raw = self.replica.raw();
        // The applied entry is in the log, or is the stored snapshot's last entry.
        let meta = raw.snapshot_meta(applied).ok().or_else(|| {
            let stored = raw.storage().snapshot_meta();
            (stored.index == applied).then(|| stored.clone())
        });
        let Some(meta) = meta else {
            return Err(KvResult::Refused {
                reason: format!("the term of applied index {applied} is unknown; try again"),
            });
        };
        Ok(PendingBackup {
            reply_to: w.reply_to,
            client: w.client,
            request: w.request,
            index: meta.index.0,
            term: meta.term.0,
            voters: meta.voters.iter().map(|v| v.0).collect(),
            server: self.replica.status().id.0,
            store: StoreSnapshot(self.replica.machine().store.clone()),
        })
    }

    /// Tells the server that its driver calls [`KvRsm::take_backups`] after each
    /// [`KvRsm::take_replies`] and serializes them off its loop (a 50 MB store takes about a
    /// tenth of a second to serialize). Without it, backups are serialized in
    /// `take_replies`.
    pub fn set_backups_off_loop(&mut self, off_loop: bool) {
        self.backups_off_loop = off_loop;
    }

    /// Confirmed backups to serialize and send ([`PendingBackup::into_reply`]), when
    /// [`KvRsm::set_backups_off_loop`] is on.
    pub fn take_backups(&mut self) -> Vec<PendingBackup> {
        std::mem::take(&mut self.backups)
    }

    /// Requests waiting for an answer.
    pub fn pending(&self) -> usize {
        self.replica.pending_proposals() + self.replica.pending_reads()
    }

    /// Answers that this server does not lead, with the leader it knows of and, if it knows
    /// it, the leader's address (so a client reaches the leader even when the leader is not
    /// among its endpoints, or its endpoints are not in id order).
    pub(crate) fn wrong_leader(&mut self, reply_to: u64, client: u64, request: u64) {
        let leader = self.replica.raw().leader().map(|l| l.0);
        let leader_addr = leader.and_then(|l| self.address_of(l));
        self.replies.push((
            reply_to,
            KvReply::WrongLeader {
                client,
                request,
                leader,
                leader_addr,
            },
        ));
    }

    /// Queues the answer `result` to request `request` of `client`, for connection `reply_to`.
    pub(crate) fn answer(&mut self, reply_to: u64, client: u64, request: u64, result: KvResult) {
        let reply = KvReply::Done {
            client,
            request,
            result,
        };
        self.replies.push((reply_to, reply));
    }

    /// A client request arrived on connection `reply_to` (an opaque token for the driver).
    pub fn handle_request(&mut self, reply_to: u64, req: KvRequest) {
        self.collect_done();
        let status = self.replica.status();
        if req.op == KvOp::Status {
            let result = KvResult::Status(self.server_status());
            self.answer(reply_to, req.client, req.request, result);
            return;
        }
        // A backup is always confirmed by the leader: a stale one would silently lose writes.
        if req.op.is_read() && req.serializable && req.op != KvOp::Snapshot {
            let result = self.replica.machine().read(&req.op);
            self.answer(reply_to, req.client, req.request, result);
            return;
        }
        if req.op.is_membership() {
            self.handle_membership(reply_to, req);
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
            let waiter = Waiter {
                reply_to,
                client: req.client,
                request: req.request,
                read: Some(req.op),
            };
            if let Err((_, w)) = self.replica.read(waiter) {
                self.wrong_leader(w.reply_to, w.client, w.request);
            }
            return;
        }
        // Refuse oversized writes before they take log space (the store refuses them too).
        if let Some(result) = self.replica.machine().store.size_error(&req.op) {
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
        let waiter = Waiter {
            reply_to,
            client: req.client,
            request: req.request,
            read: None,
        };
        if let Err((_, w)) = self.replica.propose(data, waiter) {
            self.wrong_leader(w.reply_to, w.client, w.request);
        }
    }

    /// Advances Raft's logical clock and the lease clock by one tick ([`RsmConfig::tick_ms`]);
    /// on the leader, proposes the expiry of leases whose deadline passed and checkpoints.
    pub fn tick(&mut self) {
        self.replica.tick();
        let tick_ms = self.config.tick_ms;
        let machine = self.replica.machine_mut();
        machine.leases.now_ms += tick_ms;
        if machine.role == Role::Leader {
            for op in machine.lease_duties() {
                self.propose_internal(op);
            }
        }
    }

    /// A Raft message from a peer.
    pub fn step(&mut self, msg: shoal_raft::Message) {
        if let Err(e) = self.replica.step(msg) {
            tracing::debug!(node = self.replica.status().id.0, error = %e, "raft message refused");
        }
    }

    /// Replies ready to send: (the `reply_to` token given with the request, reply). Call after
    /// the pipeline's `on_synced`: reads confirmed there are served now.
    pub fn take_replies(&mut self) -> Vec<(u64, KvReply)> {
        self.collect_done();
        std::mem::take(&mut self.replies)
    }

    /// Turns what the replica decided into replies, in order (before any answer given at
    /// once, so replies keep the order things happened in).
    fn collect_done(&mut self) {
        self.collect_conf_done();
        if !self.replica.has_done() {
            return;
        }
        let mut done = std::mem::take(&mut self.done);
        self.replica.take_done_into(&mut done);
        for d in done.drain(..) {
            match d {
                Done::Applied { tag: w, output, .. } => {
                    self.answer(w.reply_to, w.client, w.request, output)
                }
                Done::Lost { tag: w, .. } | Done::ReadFailed { tag: w, .. } => {
                    self.wrong_leader(w.reply_to, w.client, w.request)
                }
                Done::ReadReady { tag: w, .. } => {
                    let result = match &w.read {
                        Some(KvOp::Snapshot) => match self.backup(&w) {
                            Ok(b) if self.backups_off_loop => {
                                self.backups.push(b);
                                continue;
                            }
                            Ok(b) => {
                                let (reply_to, reply) = b.into_reply();
                                self.replies.push((reply_to, reply));
                                continue;
                            }
                            Err(refused) => refused,
                        },
                        Some(op) => self.replica.machine().read(op),
                        None => KvResult::Stale,
                    };
                    self.answer(w.reply_to, w.client, w.request, result);
                }
            }
        }
        self.done = done;
    }
}

/// A confirmed backup ([`KvOp::Snapshot`]) whose store copy is still to be serialized.
#[derive(Debug)]
pub struct PendingBackup {
    reply_to: u64,
    client: u64,
    request: u64,
    index: u64,
    term: u64,
    voters: Vec<u64>,
    server: u64,
    store: StoreSnapshot,
}

impl PendingBackup {
    /// The connection token to answer on.
    pub fn reply_to(&self) -> u64 {
        self.reply_to
    }

    /// Serializes the store (the long part) and returns `(reply_to, reply)`.
    pub fn into_reply(self) -> (u64, KvReply) {
        let result = KvResult::Snapshot {
            index: self.index,
            term: self.term,
            voters: self.voters,
            server: self.server,
            data: self.store.0.snapshot(),
        };
        let reply = KvReply::Done {
            client: self.client,
            request: self.request,
            result,
        };
        (self.reply_to, reply)
    }
}

/// What a server hosting `replica` says of itself to a [`KvOp::Status`] request (the KV server
/// and the sharded KV's groups alike).
pub fn server_status<SM: shoal_replica::StateMachine, T>(replica: &Replica<SM, T>) -> ServerStatus {
    let s = replica.status();
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
        applied: replica.applied().0,
        last_index: s.last_index.0,
    }
}

impl From<shoal_replica::Error> for Error {
    fn from(e: shoal_replica::Error) -> Error {
        match e {
            shoal_replica::Error::Unusable {
                what,
                index,
                reason,
            } => Error::Unusable {
                what,
                index,
                reason,
            },
            shoal_replica::Error::Raft(e) => Error::Raft(e),
            shoal_replica::Error::Storage(e) => Error::Storage(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_storage::{MemDisk, StorageConfig};
    use shoal_wire::kv::{Expected, KvOp};

    /// A single-node server on an in-memory disk.
    fn single(config: RsmConfig) -> (KvRsm, MemDisk) {
        let mut disk = MemDisk::new();
        let storage = DurableStorage::open(&mut disk, 1, 1, StorageConfig::default()).unwrap();
        let raft = Config::new(NodeId(1), vec![NodeId(1)]);
        (KvRsm::new(raft, storage, config).unwrap(), disk)
    }

    /// Carries out the Readies of a single-node cluster; snapshot jobs are held back in `jobs`
    /// (`None`: run and installed at once).
    fn drive_holding(
        rsm: &mut KvRsm,
        disk: &mut MemDisk,
        mut jobs: Option<&mut Vec<SnapshotJob>>,
    ) -> Result<(), shoal_replica::Error> {
        let replica = rsm.replica_mut();
        while let Some(u) = replica.write_ready(disk)? {
            replica.sync(disk)?;
            let synced = replica.on_synced(disk, u)?;
            if let Some(job) = synced.snapshot {
                match jobs.as_deref_mut() {
                    Some(held) => held.push(job),
                    None => {
                        let prepared = job.prepare(disk);
                        replica.install_snapshot(disk, prepared)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn drive(rsm: &mut KvRsm, disk: &mut MemDisk) {
        drive_holding(rsm, disk, None).expect("drive");
    }

    fn elect(rsm: &mut KvRsm, disk: &mut MemDisk) {
        rsm.raw_mut().campaign();
        drive(rsm, disk);
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
        let (mut rsm, mut disk) = single(RsmConfig::default());
        elect(&mut rsm, &mut disk);
        rsm.replica_mut()
            .propose_untracked(vec![0xff; 7])
            .expect("leader");
        let err = Error::from(drive_holding(&mut rsm, &mut disk, None).unwrap_err());
        assert!(
            matches!(
                err,
                Error::Unusable {
                    what: "log entry",
                    index: 2,
                    ..
                }
            ),
            "{err}"
        );

        // A stored snapshot that does not decode is refused at start.
        let mut disk = MemDisk::new();
        let mut storage =
            DurableStorage::open(&mut disk, 1, 1, shoal_storage::StorageConfig::default()).unwrap();
        let snapshot = shoal_raft::Snapshot {
            meta: shoal_raft::SnapshotMeta {
                index: LogIndex(5),
                term: shoal_raft::Term(1),
                voters: vec![NodeId(1)],
                ..Default::default()
            },
            data: b"not a snapshot".to_vec(),
        };
        storage.apply_snapshot(&mut disk, snapshot).unwrap();
        let raft = Config::new(NodeId(1), vec![NodeId(1)]);
        let err = KvRsm::new(raft, storage, RsmConfig::default())
            .err()
            .expect("refused");
        assert!(
            err.to_string()
                .starts_with("the committed snapshot at index 5 is unusable"),
            "{err}"
        );
    }

    /// A backup request (even one marked serializable) is confirmed by read-index and
    /// answered with the store as of the applied index, its term and the voters; a follower
    /// sends it to the leader.
    #[test]
    fn backup_is_the_store_at_a_confirmed_index() {
        let (mut rsm, mut disk) = single(RsmConfig::default());
        elect(&mut rsm, &mut disk);
        rsm.handle_request(1, req(5, 1, KvOp::Register));
        drive(&mut rsm, &mut disk);
        rsm.take_replies();
        let put = KvOp::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expected: Expected::Any,
        };
        rsm.handle_request(1, req(2, 1, put));
        drive(&mut rsm, &mut disk);
        rsm.take_replies();
        let mut backup = req(9, 1, KvOp::Snapshot);
        backup.serializable = true;
        rsm.handle_request(3, backup);
        assert!(rsm.take_replies().is_empty(), "answered before confirmed");
        drive(&mut rsm, &mut disk);
        let replies = rsm.take_replies();
        let [(3, KvReply::Done { result, .. })] = replies.as_slice() else {
            panic!("{replies:?}");
        };
        let KvResult::Snapshot {
            index,
            term,
            voters,
            server,
            data,
        } = result
        else {
            panic!("{result:?}");
        };
        assert_eq!(*index, rsm.applied().0);
        assert_eq!((*term, voters.as_slice(), *server), (1, &[1u64][..], 1));
        let mut restored = KvStore::new(Limits::default());
        restored.restore(data).unwrap();
        assert_eq!(
            restored.read(&KvOp::Get { key: b"k".to_vec() }).unwrap(),
            KvResult::Found {
                value: b"v".to_vec(),
                version: 1
            }
        );
        // Off the loop: the reply waits in take_backups, serialized by whoever takes it, as
        // the same reply.
        let want = replies[0].1.clone();
        rsm.set_backups_off_loop(true);
        rsm.handle_request(3, req(9, 1, KvOp::Snapshot));
        drive(&mut rsm, &mut disk);
        assert!(rsm.take_replies().is_empty());
        let backups = rsm.take_backups();
        let [backup] = <[_; 1]>::try_from(backups).expect("one backup");
        assert_eq!(backup.into_reply(), (3, want));
    }

    /// What one `Ready` of a single node gave.
    enum Step {
        Nothing,
        Plain,
        /// A snapshot job, and the store's snapshot at the moment it was handed out.
        Job(Box<SnapshotJob>, Vec<u8>),
    }

    fn one_ready(rsm: &mut KvRsm, disk: &mut MemDisk) -> Step {
        let replica = rsm.replica_mut();
        let Some(u) = replica.write_ready(disk).unwrap() else {
            return Step::Nothing;
        };
        replica.sync(disk).unwrap();
        match replica.on_synced(disk, u).unwrap().snapshot {
            Some(job) => Step::Job(Box::new(job), rsm.store().snapshot()),
            None => Step::Plain,
        }
    }

    /// A snapshot job is a copy of the store at the applied index: writes applied after it
    /// was handed out do not leak into it, one job is in flight at a time, and installing it
    /// stores that state and drops the log before it.
    #[test]
    fn snapshot_job_copies_the_store_at_its_index() {
        let config = RsmConfig {
            snapshot_bytes: Some(10),
            ..RsmConfig::default()
        };
        let (mut rsm, mut disk) = single(config);
        let install = |rsm: &mut KvRsm, disk: &mut MemDisk, job: SnapshotJob| {
            let prepared = job.prepare(disk);
            rsm.replica_mut().install_snapshot(disk, prepared).unwrap()
        };
        elect(&mut rsm, &mut disk);
        rsm.handle_request(1, req(5, 1, KvOp::Register));
        drive(&mut rsm, &mut disk);
        let session = rsm.applied().0;
        let put = |request: u64, key: &str, value: &str| {
            let op = KvOp::Put {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                expected: Expected::Any,
            };
            req(session, request, op)
        };
        rsm.handle_request(1, put(1, "k", "before"));
        // Run Readies (writing other keys when there are none) until a job is handed out
        // with "before" applied; earlier jobs are installed at once.
        let mut request = 2;
        let (job, at_job) = loop {
            match one_ready(&mut rsm, &mut disk) {
                Step::Job(job, at) if rsm.store().get(b"k").is_some() => break (*job, at),
                Step::Job(job, _) => {
                    install(&mut rsm, &mut disk, *job);
                }
                Step::Plain => {}
                Step::Nothing => {
                    rsm.handle_request(1, put(request, "x", "filler"));
                    request += 1;
                    assert!(request < 100, "no snapshot job over the threshold");
                }
            }
        };
        let job_index = job.index();
        assert_eq!(job_index, rsm.applied());
        assert_eq!(rsm.replica().snapshot_in_flight(), Some(job_index));
        rsm.handle_request(1, put(request, "k", "after"));
        let mut jobs = Vec::new();
        drive_holding(&mut rsm, &mut disk, Some(&mut jobs)).unwrap();
        assert!(jobs.is_empty(), "a second job while one is in flight");
        assert_eq!(rsm.store().get(b"k"), Some((&b"after"[..], 2)));
        let dropped = install(&mut rsm, &mut disk, job).expect("installed");
        assert!(!dropped.is_empty());
        assert_eq!(rsm.replica().snapshot_in_flight(), None);
        // What was installed is the store as of the job, not later.
        use shoal_raft::Storage as _;
        let stored = rsm.raw().storage().snapshot().unwrap();
        assert_eq!(stored.meta.index, job_index);
        assert_eq!(stored.meta.voters, vec![NodeId(1)]);
        assert_eq!(stored.data, at_job);
        let mut restored = KvStore::new(Limits::default());
        restored.restore(&stored.data).unwrap();
        assert_eq!(restored.get(b"k"), Some((&b"before"[..], 1)));
        assert!(rsm.snapshots_taken() >= 1);
    }

    #[test]
    fn single_node_write_then_read_index() {
        let config = RsmConfig {
            snapshot_bytes: Some(0),
            ..RsmConfig::default()
        };
        let (mut rsm, mut disk) = single(config);
        elect(&mut rsm, &mut disk);
        let put = KvOp::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expected: Expected::Version(0),
        };
        rsm.handle_request(1, req(5, 1, KvOp::Register));
        drive(&mut rsm, &mut disk);
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
        drive(&mut rsm, &mut disk);
        // A retry of the same request is answered from the session table.
        rsm.handle_request(1, req(session, 1, put.clone()));
        drive(&mut rsm, &mut disk);
        // A write from a session that was never opened is refused.
        rsm.handle_request(3, req(session + 1000, 1, put));
        drive(&mut rsm, &mut disk);
        rsm.handle_request(2, req(5, 2, KvOp::Get { key: b"k".to_vec() }));
        drive(&mut rsm, &mut disk);
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
        let mut disk = MemDisk::new();
        let storage = DurableStorage::open(&mut disk, 1, 2, StorageConfig::default()).unwrap();
        let raft = Config::new(NodeId(2), vec![NodeId(1), NodeId(2), NodeId(3)]);
        let mut rsm = KvRsm::new(raft, storage, RsmConfig::default()).unwrap();
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
        let (mut rsm, mut disk) = single(config);
        elect(&mut rsm, &mut disk);
        rsm.handle_request(1, req(5, 1, KvOp::Register));
        drive(&mut rsm, &mut disk);
        let session = rsm.applied().0;
        rsm.handle_request(1, req(session, 1, KvOp::LeaseGrant { ttl_ms: 1_000 }));
        drive(&mut rsm, &mut disk);
        let id = rsm.applied().0;
        assert_eq!(rsm.lease_deadline_ms(id), Some(rsm.lease_now_ms() + 1_000));
        let forged = KvOp::LeaseExpire { id, renewals: 0 };
        rsm.handle_request(2, req(session, 2, forged));
        drive(&mut rsm, &mut disk);
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
            drive(&mut rsm, &mut disk);
        }
        assert_eq!(rsm.store().lease_count(), 1, "expired before its TTL");
        rsm.handle_request(1, req(session, 3, KvOp::LeaseKeepAlive { id }));
        drive(&mut rsm, &mut disk);
        for _ in 0..9 {
            rsm.tick();
            drive(&mut rsm, &mut disk);
        }
        assert_eq!(rsm.store().lease_count(), 1, "a keep-alive did not renew");
        for _ in 0..2 {
            rsm.tick();
            drive(&mut rsm, &mut disk);
        }
        assert_eq!(rsm.store().lease_count(), 0, "not expired after its TTL");
        assert_eq!(rsm.lease_deadline_ms(id), None);
    }
}
