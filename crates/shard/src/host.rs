//! The group host: a replica group's [`ShardMachine`] hosted by the replica shell
//! ([`shoal_replica::Replica`]), sans-IO, turning client requests ([`ShardRequest`]) into
//! proposals and read-index reads, and the shell's answers into replies ([`ShardReply`]).
//!
//! It mirrors the KV server's host (`shoal_kv::KvRsm`): writes are proposed as
//! [`GroupEntry::Client`] and answered from the applied [`GroupOutput`]; reads wait for a
//! read-index confirmation and are answered from [`ShardMachine::read`] then (so a shard that
//! left in between answers WrongGroup). A request for a shard the group does not serve now
//! (per the state applied so far) is answered WrongGroup at once, without a log entry: the
//! state machine would refuse it anyway, and the client needs a newer configuration first.
//!
//! The group's own driver (the controller's follower, not here yet) proposes the migration
//! entries with [`GroupHost::propose_control`] and asks for a frozen shard's bytes with
//! [`GroupHost::export`]; their results, under the caller's tag, come back from
//! [`GroupHost::take_control_results`].
//!
//! A driver feeds [`GroupHost::tick`], [`GroupHost::step`] and [`GroupHost::handle_request`],
//! carries out the shell's pipeline on [`GroupHost::replica_mut`] (`write_ready`, `sync`,
//! `on_synced`, snapshot jobs; the contract is on `shoal_raft::Ready`), then sends the replies
//! of [`GroupHost::take_replies`] to the connections named by their token.

use shoal_kv::Limits;
use shoal_raft::{Config, RawNode, Role};
use shoal_replica::{Done, Replica, ReplicaConfig, SnapshotPolicy};
use shoal_storage::DurableStorage;
use shoal_wire::kv::{KvOp, KvRequest, KvResult, ServerStatus};
use shoal_wire::shard::{
    ControlOp, ControlReply, ControlRequest, ControlStatus, DeltaChunk, ShardChunk, ShardReply,
    ShardRequest,
};

use crate::{ControlOutcome, Gid, GroupEntry, GroupOutput, GroupSnapshot, ShardId, ShardMachine};

/// Why a group host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The group's parameters are invalid (gid 0, a shard count out of range).
    #[error(transparent)]
    Shard(#[from] crate::Error),
    /// The replica could not start from its durable state.
    #[error(transparent)]
    Replica(#[from] shoal_replica::Error),
}

/// A snapshot job of a group (see [`shoal_replica::SnapshotJob`]).
pub type SnapshotJob = shoal_replica::SnapshotJob<GroupSnapshot>;

/// Who waits for a proposal or a read.
#[derive(Debug)]
pub enum Waiter {
    /// A client's request, to answer on connection `reply_to`.
    Client {
        /// The driver's connection token.
        reply_to: u64,
        /// Echoed in the reply.
        client: u64,
        /// Echoed in the reply.
        request: u64,
        /// The shard the request is for.
        shard: ShardId,
        /// The read to serve once confirmed (`None` for a write).
        read: Option<KvOp>,
    },
    /// A control entry proposed by [`GroupHost::propose_control`].
    Control {
        /// The caller's tag.
        tag: u64,
    },
    /// An export asked by [`GroupHost::export`].
    Export {
        /// The caller's tag.
        tag: u64,
        /// The shard.
        shard: ShardId,
        /// The configuration it must be frozen at.
        config: u64,
    },
    /// A chunk asked by [`GroupHost::export_chunk`].
    ExportChunk {
        /// The caller's tag.
        tag: u64,
        /// The shard.
        shard: ShardId,
        /// The configuration it must be frozen at.
        config: u64,
        /// The last key of the previous chunk.
        after: Option<Vec<u8>>,
        /// About how many bytes.
        max_bytes: u64,
    },
    /// A chunk of a delta round asked by [`GroupHost::export_delta`].
    ExportDelta {
        /// The caller's tag.
        tag: u64,
        /// The shard.
        shard: ShardId,
        /// The configuration it is copied to.
        config: u64,
        /// The last key of the previous chunk.
        after: Option<Vec<u8>>,
        /// About how many bytes.
        max_bytes: u64,
    },
}

/// The result of [`GroupHost::propose_control`] or [`GroupHost::export`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlResult {
    /// The control entry applied with this outcome.
    Applied(ControlOutcome),
    /// The export, confirmed by read-index: the shard's bytes, or `None` when the shard is not
    /// held frozen at that configuration (not frozen yet, or already deleted).
    Exported(Option<Vec<u8>>),
    /// A chunk of the shard, confirmed by read-index, or `None` when the shard is not held
    /// frozen at that configuration.
    Chunk(Option<ShardChunk>),
    /// A chunk of a delta round, confirmed by read-index, or `None` when the shard is not
    /// copied live for that configuration here.
    Delta(Option<DeltaChunk>),
    /// This server is not the leader, or lost leadership before the outcome was known (a
    /// control entry may still have applied: they are idempotent, so the caller retries).
    NotLeader {
        /// The leader this server knows of (a server id), if any.
        leader: Option<u64>,
    },
}

/// Internal tags of control requests that came over the wire have this bit set.
const WIRE_TAG_BIT: u64 = 1 << 63;

/// The wire form of a control entry's outcome.
pub fn control_status(outcome: ControlOutcome) -> ControlStatus {
    match outcome {
        ControlOutcome::Applied => ControlStatus::Applied,
        ControlOutcome::AlreadyDone => ControlStatus::AlreadyDone,
        ControlOutcome::Stale { seen } => ControlStatus::Stale { seen },
        ControlOutcome::Refused { reason } => ControlStatus::Refused { reason },
    }
}

/// A replica group's server: the replica shell hosting a [`ShardMachine`], and the replies and
/// control results to hand out.
pub struct GroupHost {
    replica: Replica<ShardMachine, Waiter>,
    replies: Vec<(u64, ShardReply)>,
    control: Vec<(u64, ControlResult)>,
    /// Control requests from the wire in flight: internal tag → (reply_to, the request's tag).
    wire_control: std::collections::BTreeMap<u64, (u64, u64)>,
    /// The next internal tag for a wire control request (high bit set: never a caller's tag
    /// of [`GroupHost::propose_control`] in practice; a clash is refused below).
    next_wire_tag: u64,
    /// Answers to control requests from the wire: (reply_to, reply).
    control_replies: Vec<(u64, ControlReply)>,
    /// A buffer for the replica's answers, kept between rounds (no allocation per round).
    done: Vec<Done<Waiter, GroupOutput>>,
}

impl GroupHost {
    /// Starts (or restarts) a server of group `gid` (a cluster of `shards` shards) from its
    /// durable Raft state, restoring the machine from the stored snapshot. `limits` must be the
    /// same on every server of every group (shards migrate between groups).
    pub fn new(
        raft: Config,
        storage: DurableStorage,
        gid: Gid,
        shards: u32,
        limits: Limits,
        snapshot: SnapshotPolicy,
    ) -> Result<GroupHost, HostError> {
        let machine = ShardMachine::new(gid, shards, limits)?;
        let config = ReplicaConfig {
            snapshot,
            read_timeout_ticks: None,
            // Clients retry with the same request id (at-most-once), and control entries are
            // idempotent: telling callers at once lets them find the new leader sooner.
            fail_proposals_on_leadership_loss: true,
        };
        let replica = Replica::new(raft, storage, machine, config)?;
        Ok(GroupHost {
            replica,
            replies: Vec::new(),
            control: Vec::new(),
            wire_control: std::collections::BTreeMap::new(),
            next_wire_tag: WIRE_TAG_BIT,
            control_replies: Vec::new(),
            done: Vec::new(),
        })
    }

    /// The replica shell, for the driver's pipeline (`write_ready`, `sync`, `on_synced`,
    /// snapshot jobs).
    pub fn replica_mut(&mut self) -> &mut Replica<ShardMachine, Waiter> {
        &mut self.replica
    }

    /// The replica shell.
    pub fn replica(&self) -> &Replica<ShardMachine, Waiter> {
        &self.replica
    }

    /// The Raft core (status, tests).
    pub fn raw(&self) -> &RawNode<DurableStorage> {
        self.replica.raw()
    }

    /// The Raft core (campaign, leadership transfer).
    pub fn raw_mut(&mut self) -> &mut RawNode<DurableStorage> {
        self.replica.raw_mut()
    }

    /// The group's state machine, as applied on this server.
    pub fn machine(&self) -> &ShardMachine {
        self.replica.machine()
    }

    /// Requests, control entries and exports waiting for an answer.
    pub fn pending(&self) -> usize {
        self.replica.pending_proposals() + self.replica.pending_reads()
    }

    /// Advances Raft's logical clock by one tick.
    pub fn tick(&mut self) {
        self.replica.tick();
    }

    /// A Raft message from a peer. A message Raft refuses (another cluster's, a stale one) is
    /// dropped: Raft's own retries recover.
    pub fn step(&mut self, msg: shoal_raft::Message) {
        if let Err(e) = self.replica.step(msg) {
            tracing::debug!(node = self.replica.status().id.0, error = %e, "raft message refused");
        }
    }

    /// What this server says of itself to a [`KvOp::Status`] request.
    pub fn server_status(&self) -> ServerStatus {
        shoal_kv::rsm::server_status(&self.replica)
    }

    fn leader_hint(&self) -> Option<u64> {
        self.replica.raw().leader().map(|l| l.0)
    }

    /// Queues the answer `result` to request `request` of `client`, for connection `reply_to`.
    fn answer(&mut self, reply_to: u64, client: u64, request: u64, result: KvResult) {
        let reply = ShardReply::Done {
            client,
            request,
            result,
        };
        self.replies.push((reply_to, reply));
    }

    fn wrong_leader(&mut self, reply_to: u64, client: u64, request: u64) {
        let leader = self.leader_hint();
        self.replies.push((
            reply_to,
            ShardReply::WrongLeader {
                client,
                request,
                leader,
            },
        ));
    }

    /// The reply a state machine output gives a client.
    fn reply_of(client: u64, request: u64, output: GroupOutput) -> ShardReply {
        match output {
            GroupOutput::Kv(result) => ShardReply::Done {
                client,
                request,
                result,
            },
            GroupOutput::WrongGroup { config } => ShardReply::WrongGroup {
                client,
                request,
                config,
            },
            // Only a control entry gives a control outcome, and clients never propose one
            // (`handle_request` wraps every request in `GroupEntry::Client`).
            GroupOutput::Control(outcome) => ShardReply::Done {
                client,
                request,
                result: KvResult::Refused {
                    reason: format!("a control outcome for a client request: {outcome:?}"),
                },
            },
        }
    }

    /// A client request arrived on connection `reply_to` (an opaque token for the driver).
    pub fn handle_request(&mut self, reply_to: u64, req: ShardRequest) {
        self.collect_done();
        let (client, request) = (req.client, req.request);
        if req.op == KvOp::Status {
            let result = KvResult::Status(self.server_status());
            self.answer(reply_to, client, request, result);
            return;
        }
        if req.op.is_read() && req.serializable {
            let output = self.replica.machine().read(req.shard, &req.op);
            self.replies
                .push((reply_to, Self::reply_of(client, request, output)));
            return;
        }
        if req.op.is_internal() {
            let result = KvResult::Refused {
                reason: "lease expiry and checkpoints are proposed by the leader only".into(),
            };
            self.answer(reply_to, client, request, result);
            return;
        }
        if crate::group::is_lease_op(&req.op) {
            // Refused before it takes log space (the machine refuses it too).
            let result = KvResult::Refused {
                reason: crate::group::LEASES_REFUSED.into(),
            };
            self.answer(reply_to, client, request, result);
            return;
        }
        if self.replica.raw().role() != Role::Leader {
            self.wrong_leader(reply_to, client, request);
            return;
        }
        let machine = self.replica.machine();
        if !machine.serves(req.shard) {
            let config = machine.config().num;
            self.replies.push((
                reply_to,
                ShardReply::WrongGroup {
                    client,
                    request,
                    config,
                },
            ));
            return;
        }
        if req.op.is_read() {
            let waiter = Waiter::Client {
                reply_to,
                client,
                request,
                shard: req.shard,
                read: Some(req.op),
            };
            if let Err((_, w)) = self.replica.read(waiter) {
                self.fail(w);
            }
            return;
        }
        // Refuse oversized writes before they take log space (the store refuses them too).
        if let Some(result) = machine
            .shard(req.shard)
            .and_then(|s| s.store.size_error(&req.op))
        {
            self.answer(reply_to, client, request, result);
            return;
        }
        let entry = GroupEntry::Client {
            shard: req.shard,
            config: req.config,
            request: KvRequest {
                client,
                request,
                op: req.op,
                serializable: false,
            },
        };
        let waiter = Waiter::Client {
            reply_to,
            client,
            request,
            shard: req.shard,
            read: None,
        };
        if let Err((_, w)) = self.replica.propose(entry.encode(), waiter) {
            self.fail(w);
        }
    }

    /// Proposes a control entry (Adopt, Freeze, Install, Delete; a Client entry is refused:
    /// clients go through [`GroupHost::handle_request`]). Its result comes back under `tag`
    /// from [`GroupHost::take_control_results`].
    pub fn propose_control(&mut self, tag: u64, entry: GroupEntry) {
        self.collect_done();
        if matches!(entry, GroupEntry::Client { .. }) {
            self.control.push((
                tag,
                ControlResult::Applied(ControlOutcome::Refused {
                    reason: "client entries are proposed by handle_request only".into(),
                }),
            ));
            return;
        }
        if let Err((_, w)) = self
            .replica
            .propose(entry.encode(), Waiter::Control { tag })
        {
            self.fail(w);
        }
    }

    /// Asks for `shard`'s bytes as frozen at configuration `config`, for the new owner's
    /// Install. Served after a read-index confirmation, so the bytes are the group's
    /// committed state as of a moment after this call (linearizable), not a deposed leader's.
    pub fn export(&mut self, tag: u64, shard: ShardId, config: u64) {
        self.collect_done();
        if let Err((_, w)) = self.replica.read(Waiter::Export { tag, shard, config }) {
            self.fail(w);
        }
    }

    /// Asks for a chunk of `shard` frozen at configuration `config`: its keys after `after`,
    /// about `max_bytes` of them, for the new owner's Stage (and on the last chunk the tail for
    /// its Install). Served after a read-index confirmation, like [`GroupHost::export`].
    pub fn export_chunk(
        &mut self,
        tag: u64,
        shard: ShardId,
        config: u64,
        after: Option<Vec<u8>>,
        max_bytes: u64,
    ) {
        self.collect_done();
        let waiter = Waiter::ExportChunk {
            tag,
            shard,
            config,
            after,
            max_bytes,
        };
        if let Err((_, w)) = self.replica.read(waiter) {
            self.fail(w);
        }
    }

    /// Asks for a chunk of the current delta round of `shard`, copied live for `config`
    /// ([`ShardMachine::export_delta`]), served after a read-index confirmation like
    /// [`GroupHost::export_chunk`].
    pub fn export_delta(
        &mut self,
        tag: u64,
        shard: ShardId,
        config: u64,
        after: Option<Vec<u8>>,
        max_bytes: u64,
    ) {
        self.collect_done();
        let waiter = Waiter::ExportDelta {
            tag,
            shard,
            config,
            after,
            max_bytes,
        };
        if let Err((_, w)) = self.replica.read(waiter) {
            self.fail(w);
        }
    }

    /// A control request from the controller arrived on connection `reply_to`: proposes the
    /// step (or serves the read) and answers through [`GroupHost::take_control_replies`]. A
    /// request for another gid is answered `WrongGid`, an Adopt whose configuration does not
    /// decode `Invalid`, a follower `NotLeader`; none of them changes anything.
    pub fn handle_control(&mut self, reply_to: u64, req: ControlRequest) {
        self.collect_done();
        let tag = req.tag;
        let gid = self.replica.machine().gid();
        if req.gid != gid {
            self.control_replies
                .push((reply_to, ControlReply::WrongGid { tag, gid }));
            return;
        }
        if matches!(req.op, ControlOp::Shards) {
            // Fixed for the group's life: any server answers.
            let shards = self.replica.machine().config().num_shards();
            self.control_replies
                .push((reply_to, ControlReply::Shards { tag, shards }));
            return;
        }
        if self.replica.raw().role() != Role::Leader {
            let leader = self.leader_hint();
            self.control_replies
                .push((reply_to, ControlReply::NotLeader { tag, leader }));
            return;
        }
        let adopted = self.replica.machine().config().num;
        let entry = match req.op {
            ControlOp::Adopted => {
                self.control_replies
                    .push((reply_to, ControlReply::Adopted { tag, adopted }));
                return;
            }
            // Answered above.
            ControlOp::Shards => return,
            ControlOp::Export { shard, config } => {
                let internal = self.wire_tag(reply_to, tag);
                self.export(internal, shard, config);
                return;
            }
            ControlOp::ExportChunk {
                shard,
                config,
                after,
                max_bytes,
            } => {
                let internal = self.wire_tag(reply_to, tag);
                self.export_chunk(internal, shard, config, after, max_bytes);
                return;
            }
            ControlOp::ExportDelta {
                shard,
                config,
                after,
                max_bytes,
            } => {
                let internal = self.wire_tag(reply_to, tag);
                self.export_delta(internal, shard, config, after, max_bytes);
                return;
            }
            ControlOp::Stage {
                shard,
                config,
                items,
            } => GroupEntry::Stage {
                shard,
                config,
                items,
            },
            ControlOp::StageRound {
                shard,
                config,
                round,
                items,
                absent,
            } => GroupEntry::StageRound {
                shard,
                config,
                round,
                items,
                absent,
            },
            ControlOp::CopyRound {
                shard,
                config,
                round,
            } => GroupEntry::CopyRound {
                shard,
                config,
                round,
            },
            ControlOp::Adopt { config } => match crate::Config::decode(&config) {
                Ok(config) => GroupEntry::Adopt { config },
                Err(e) => {
                    let reason = format!("the configuration does not decode: {e}");
                    self.control_replies
                        .push((reply_to, ControlReply::Invalid { tag, reason }));
                    return;
                }
            },
            ControlOp::Freeze { shard, config } => GroupEntry::Freeze { shard, config },
            ControlOp::Install {
                shard,
                config,
                data,
            } => GroupEntry::Install {
                shard,
                config,
                data,
            },
            ControlOp::Delete { shard, config } => GroupEntry::Delete { shard, config },
            ControlOp::CopyStart { shard, config } => GroupEntry::CopyStart { shard, config },
        };
        let internal = self.wire_tag(reply_to, tag);
        self.propose_control(internal, entry);
    }

    fn wire_tag(&mut self, reply_to: u64, tag: u64) -> u64 {
        let internal = self.next_wire_tag;
        self.next_wire_tag = WIRE_TAG_BIT | (self.next_wire_tag.wrapping_add(1));
        self.wire_control.insert(internal, (reply_to, tag));
        internal
    }

    /// Answers to [`GroupHost::handle_control`]: (the `reply_to` token, reply).
    pub fn take_control_replies(&mut self) -> Vec<(u64, ControlReply)> {
        self.collect_done();
        self.route_wire_control();
        std::mem::take(&mut self.control_replies)
    }

    /// Moves the results of wire control requests from `control` to `control_replies`.
    fn route_wire_control(&mut self) {
        if self.wire_control.is_empty() {
            return;
        }
        let adopted = self.replica.machine().config().num;
        let mut kept = Vec::new();
        for (internal, result) in self.control.drain(..) {
            let Some((reply_to, tag)) = self.wire_control.remove(&internal) else {
                kept.push((internal, result));
                continue;
            };
            let reply = match result {
                ControlResult::Applied(outcome) => ControlReply::Done {
                    tag,
                    status: control_status(outcome),
                    adopted,
                },
                ControlResult::Exported(data) => ControlReply::Exported { tag, data, adopted },
                ControlResult::Chunk(chunk) => ControlReply::Chunk {
                    tag,
                    chunk,
                    adopted,
                },
                ControlResult::Delta(chunk) => ControlReply::Delta {
                    tag,
                    chunk,
                    adopted,
                },
                ControlResult::NotLeader { leader } => ControlReply::NotLeader { tag, leader },
            };
            self.control_replies.push((reply_to, reply));
        }
        self.control = kept;
    }

    /// Replies ready to send: (the `reply_to` token given with the request, reply). Call after
    /// the pipeline's `on_synced`: reads confirmed there are served now.
    pub fn take_replies(&mut self) -> Vec<(u64, ShardReply)> {
        self.collect_done();
        std::mem::take(&mut self.replies)
    }

    /// Results of control entries and exports: (the caller's tag, result).
    pub fn take_control_results(&mut self) -> Vec<(u64, ControlResult)> {
        self.collect_done();
        self.route_wire_control();
        std::mem::take(&mut self.control)
    }

    /// A waiter that will get no answer from the replica: not the leader, or leadership lost.
    fn fail(&mut self, w: Waiter) {
        match w {
            Waiter::Client {
                reply_to,
                client,
                request,
                ..
            } => self.wrong_leader(reply_to, client, request),
            Waiter::Control { tag }
            | Waiter::Export { tag, .. }
            | Waiter::ExportChunk { tag, .. }
            | Waiter::ExportDelta { tag, .. } => {
                let leader = self.leader_hint();
                self.control
                    .push((tag, ControlResult::NotLeader { leader }));
            }
        }
    }

    /// Turns what the replica decided into replies and control results, in order.
    fn collect_done(&mut self) {
        if !self.replica.has_done() {
            return;
        }
        let mut done = std::mem::take(&mut self.done);
        self.replica.take_done_into(&mut done);
        for d in done.drain(..) {
            match d {
                Done::Applied { tag, output, .. } => match tag {
                    Waiter::Client {
                        reply_to,
                        client,
                        request,
                        ..
                    } => self
                        .replies
                        .push((reply_to, Self::reply_of(client, request, output))),
                    Waiter::Control { tag }
                    | Waiter::Export { tag, .. }
                    | Waiter::ExportChunk { tag, .. }
                    | Waiter::ExportDelta { tag, .. } => {
                        let result = match output {
                            GroupOutput::Control(outcome) => ControlResult::Applied(outcome),
                            // Control entries only give control outcomes; anything else means
                            // the entry was taken for something else.
                            other => ControlResult::Applied(ControlOutcome::Refused {
                                reason: format!("the entry gave {other:?}"),
                            }),
                        };
                        self.control.push((tag, result));
                    }
                },
                Done::Lost { tag, .. } | Done::ReadFailed { tag, .. } => self.fail(tag),
                Done::ReadReady { tag, .. } => match tag {
                    Waiter::Client {
                        reply_to,
                        client,
                        request,
                        shard,
                        read,
                    } => {
                        let output = match &read {
                            Some(op) => self.replica.machine().read(shard, op),
                            None => GroupOutput::Kv(KvResult::Stale),
                        };
                        self.replies
                            .push((reply_to, Self::reply_of(client, request, output)));
                    }
                    Waiter::Export { tag, shard, config } => {
                        let data = self.replica.machine().export(shard, config);
                        self.control.push((tag, ControlResult::Exported(data)));
                    }
                    Waiter::ExportChunk {
                        tag,
                        shard,
                        config,
                        after,
                        max_bytes,
                    } => {
                        let chunk = self.replica.machine().export_chunk(
                            shard,
                            config,
                            after.as_deref(),
                            max_bytes,
                        );
                        self.control.push((tag, ControlResult::Chunk(chunk)));
                    }
                    Waiter::ExportDelta {
                        tag,
                        shard,
                        config,
                        after,
                        max_bytes,
                    } => {
                        let chunk = self.replica.machine().export_delta(
                            shard,
                            config,
                            after.as_deref(),
                            max_bytes,
                        );
                        self.control.push((tag, ControlResult::Delta(chunk)));
                    }
                    Waiter::Control { tag } => {
                        let leader = self.leader_hint();
                        self.control
                            .push((tag, ControlResult::NotLeader { leader }));
                    }
                },
            }
        }
        self.done = done;
    }
}
