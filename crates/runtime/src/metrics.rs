//! The runtime's Prometheus metrics (served by `shoal_metrics` when a server is started with
//! `--metrics ADDR`; the list, with types and meanings, is in `docs/operations.md`).
//!
//! The metric families live in one process-wide [`RuntimeMetrics`] so that the drivers update
//! them without any handle being threaded through their constructors; [`register`] adds them
//! to the registry a command serves. The hot paths hold pre-resolved handles (a clone of an
//! `Arc` around atomics): the driver resolves its group's handles once ([`GroupMetrics`]), a
//! client connection its request histograms once, a peer connection its byte counter once.
//! Nothing is measured in the pure protocol crates: they expose counters (proposals, snapshots)
//! that the driver turns into metrics here.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, ReadBuf};

/// A Raft group's label: `group="0"` on a KV server (one group), the group id on a shard
/// server.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    /// The group id (0 for the KV database's one group).
    pub group: u64,
}

/// A Raft role, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are written as Prometheus users expect
pub enum RoleValue {
    /// Follower.
    follower,
    /// Pre-candidate (pre-vote).
    pre_candidate,
    /// Candidate.
    candidate,
    /// Leader.
    leader,
}

const ROLES: [RoleValue; 4] = [
    RoleValue::follower,
    RoleValue::pre_candidate,
    RoleValue::candidate,
    RoleValue::leader,
];

/// `shoal_raft_role{group, role}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// The group.
    pub group: u64,
    /// The role.
    pub role: RoleValue,
}

/// A client operation, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum OpValue {
    /// A get.
    get,
    /// A put (with or without a lease).
    put,
    /// A delete.
    delete,
    /// A scan.
    scan,
    /// A session registration.
    register,
    /// A server status.
    status,
    /// A lease operation (grant, keep-alive, revoke, list).
    lease,
    /// A backup (`kv snapshot save`).
    snapshot,
    /// A membership operation (`kv member list|add|promote|remove`).
    member,
    /// Anything else (internal operations, refused).
    other,
}

const OPS: [OpValue; 10] = [
    OpValue::get,
    OpValue::put,
    OpValue::delete,
    OpValue::scan,
    OpValue::register,
    OpValue::status,
    OpValue::lease,
    OpValue::snapshot,
    OpValue::member,
    OpValue::other,
];

/// How a client request ended, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum OutcomeValue {
    /// Decided (found, written, not found, version mismatch…: the database answered).
    ok,
    /// Not the leader: the client goes elsewhere.
    wrong_leader,
    /// A shard server that does not serve the key's shard (at the client's configuration).
    wrong_group,
    /// Refused (too large, session expired, a rule of the server).
    refused,
}

const OUTCOMES: [OutcomeValue; 4] = [
    OutcomeValue::ok,
    OutcomeValue::wrong_leader,
    OutcomeValue::wrong_group,
    OutcomeValue::refused,
];

/// `shoal_kv_request_duration_seconds{op, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The operation.
    pub op: OpValue,
    /// Its outcome.
    pub outcome: OutcomeValue,
}

/// `shoal_peer_*_bytes_total{peer}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The peer's server id.
    pub peer: u64,
}

/// A shard migration step, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum MigrationStep {
    /// A configuration adopted (the start of a migration).
    adopt,
    /// A shard frozen (it stops taking writes here, to be moved away).
    freeze,
    /// A frozen shard exported whole.
    export,
    /// A copy started while the shard still serves here (writes from then on are tracked).
    copy_start,
    /// A delta round of a copy while the shard serves started here (the keys written since
    /// the previous round are re-sent).
    copy_round,
    /// A chunk of a shard exported (large shards move in chunks, live or frozen).
    export_chunk,
    /// A chunk of a delta round exported.
    export_delta,
    /// Chunks staged here before an install.
    stage,
    /// A shard installed and serving here.
    install,
    /// A moved-away shard deleted here.
    delete,
}

/// `shoal_shard_migration_steps_total{step}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabel {
    /// The step.
    pub step: MigrationStep,
}

/// Makes histograms with a fixed bucket layout for a [`Family`].
#[derive(Clone, Copy)]
pub struct Buckets(fn() -> Histogram);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        (self.0)()
    }
}

fn latency() -> Histogram {
    Histogram::new(shoal_metrics::latency_buckets())
}

fn sizes() -> Histogram {
    Histogram::new(shoal_metrics::size_buckets())
}

fn batches() -> Histogram {
    Histogram::new(shoal_metrics::batch_buckets())
}

type HistogramFamily<L> = Family<L, Histogram, Buckets>;

/// Every metric family of the runtime (one per process).
pub struct RuntimeMetrics {
    term: Family<GroupLabel, Gauge>,
    role: Family<RoleLabels, Gauge>,
    commit_index: Family<GroupLabel, Gauge>,
    applied_index: Family<GroupLabel, Gauge>,
    leader_changes: Family<GroupLabel, Counter>,
    proposals: Family<GroupLabel, Counter>,
    proposals_failed: Family<GroupLabel, Counter>,
    wal_fsync: HistogramFamily<GroupLabel>,
    ready_entries: HistogramFamily<GroupLabel>,
    ready_events: HistogramFamily<GroupLabel>,
    snapshots: Family<GroupLabel, Counter>,
    snapshot_bytes: HistogramFamily<GroupLabel>,
    snapshot_duration: HistogramFamily<GroupLabel>,
    snapshots_installed: Family<GroupLabel, Counter>,
    requests: HistogramFamily<RequestLabels>,
    client_connections: Gauge,
    sessions: Gauge,
    peer_sent: Family<PeerLabel, Counter>,
    peer_received: Family<PeerLabel, Counter>,
    migration_steps: Family<MigrationLabel, Counter>,
    migration_bytes: Counter,
    migration_duration: Histogram,
    migrations_in_progress: Gauge,
}

static METRICS: LazyLock<RuntimeMetrics> = LazyLock::new(|| RuntimeMetrics {
    term: Family::default(),
    role: Family::default(),
    commit_index: Family::default(),
    applied_index: Family::default(),
    leader_changes: Family::default(),
    proposals: Family::default(),
    proposals_failed: Family::default(),
    wal_fsync: Family::new_with_constructor(Buckets(latency)),
    ready_entries: Family::new_with_constructor(Buckets(batches)),
    ready_events: Family::new_with_constructor(Buckets(batches)),
    snapshots: Family::default(),
    snapshot_bytes: Family::new_with_constructor(Buckets(sizes)),
    snapshot_duration: Family::new_with_constructor(Buckets(latency)),
    snapshots_installed: Family::default(),
    requests: Family::new_with_constructor(Buckets(latency)),
    client_connections: Gauge::default(),
    sessions: Gauge::default(),
    peer_sent: Family::default(),
    peer_received: Family::default(),
    migration_steps: Family::default(),
    migration_bytes: Counter::default(),
    migration_duration: latency(),
    migrations_in_progress: Gauge::default(),
});

/// The process's runtime metrics.
pub fn metrics() -> &'static RuntimeMetrics {
    &METRICS
}

/// What a server kind exports: the Raft, client and peer metrics every server has, and the
/// KV or shard ones of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `shoal kv server`.
    Kv,
    /// `shoal shard server`.
    Shard,
}

/// Registers the runtime's metrics in `registry` (names: `docs/operations.md`, "Metrics").
pub fn register(registry: &mut Registry, kind: ServerKind) {
    let m = metrics();
    registry.register("shoal_raft_term", "Current Raft term", m.term.clone());
    registry.register(
        "shoal_raft_role",
        "1 for the role this server has in the group now, 0 for the others",
        m.role.clone(),
    );
    registry.register(
        "shoal_raft_commit_index",
        "Highest log index known committed",
        m.commit_index.clone(),
    );
    registry.register(
        "shoal_raft_applied_index",
        "Highest log index applied to the state machine",
        m.applied_index.clone(),
    );
    registry.register(
        "shoal_raft_leader_changes",
        "Times the leader this server knows of changed (to another server or to none)",
        m.leader_changes.clone(),
    );
    registry.register(
        "shoal_raft_proposals",
        "Entries proposed to the log by this server (as leader)",
        m.proposals.clone(),
    );
    registry.register(
        "shoal_raft_proposals_failed",
        "Proposals refused (not the leader, too large, a transfer in progress) or lost to a new leader",
        m.proposals_failed.clone(),
    );
    registry.register(
        "shoal_wal_fsync_duration_seconds",
        "Time to write and fsync one Ready's log entries and hard state (the durability barrier)",
        m.wal_fsync.clone(),
    );
    registry.register(
        "shoal_raft_ready_entries",
        "Log entries persisted per Ready (the group-commit batch)",
        m.ready_entries.clone(),
    );
    registry.register(
        "shoal_raft_ready_events",
        "Peer messages, ticks and client requests taken per wake-up of the driver loop",
        m.ready_events.clone(),
    );
    registry.register(
        "shoal_snapshots",
        "Snapshots of the state machine taken and written by this server",
        m.snapshots.clone(),
    );
    registry.register(
        "shoal_snapshot_size_bytes",
        "Size of each snapshot taken (the state machine's serialized state)",
        m.snapshot_bytes.clone(),
    );
    registry.register(
        "shoal_snapshot_duration_seconds",
        "Time to serialize, write and fsync a snapshot (off the driver loop)",
        m.snapshot_duration.clone(),
    );
    registry.register(
        "shoal_snapshots_installed",
        "Snapshots installed: this server's own, and leaders' received to catch up",
        m.snapshots_installed.clone(),
    );
    registry.register(
        "shoal_client_connections",
        "Client connections open now",
        m.client_connections.clone(),
    );
    registry.register(
        "shoal_peer_sent_bytes",
        "Bytes written to each peer's connection (Raft messages, framed)",
        m.peer_sent.clone(),
    );
    registry.register(
        "shoal_peer_received_bytes",
        "Bytes read from each peer's connections",
        m.peer_received.clone(),
    );
    registry.register(
        "shoal_kv_request_duration_seconds",
        "Client requests of a KV or shard server from arrival to reply, by operation and outcome",
        m.requests.clone(),
    );
    registry.register(
        "shoal_kv_sessions",
        "Client sessions in the deduplication table",
        m.sessions.clone(),
    );
    if kind == ServerKind::Shard {
        registry.register(
            "shoal_shard_migration_steps",
            "Shard migration steps the controller asked of this group, by step",
            m.migration_steps.clone(),
        );
        registry.register(
            "shoal_shard_migration_bytes",
            "Bytes of shard data moved by this group: installed here, or exported from here",
            m.migration_bytes.clone(),
        );
        registry.register(
            "shoal_shard_migration_duration_seconds",
            "A shard moving away from this group: from its freeze to its delete here",
            m.migration_duration.clone(),
        );
        registry.register(
            "shoal_shard_migrations_in_progress",
            "Shards frozen here and not yet deleted (moving away)",
            m.migrations_in_progress.clone(),
        );
    }
}

/// One Raft group's metric handles, resolved once by its driver.
pub(crate) struct GroupMetrics {
    term: Gauge,
    roles: [Gauge; 4],
    commit_index: Gauge,
    applied_index: Gauge,
    leader_changes: Counter,
    proposals: Counter,
    proposals_failed: Counter,
    pub(crate) wal_fsync: Histogram,
    pub(crate) ready_entries: Histogram,
    pub(crate) ready_events: Histogram,
    pub(crate) snapshots: Counter,
    pub(crate) snapshot_bytes: Histogram,
    pub(crate) snapshot_duration: Histogram,
    pub(crate) snapshots_installed: Counter,
    /// The replica's proposal counters and received snapshots when last read (the counters
    /// grow by the difference).
    seen_proposals: (u64, u64),
    seen_received_snapshots: u64,
    leader: Option<u64>,
}

impl GroupMetrics {
    pub(crate) fn new(group: u64) -> GroupMetrics {
        let m = metrics();
        let g = GroupLabel { group };
        GroupMetrics {
            term: m.term.get_or_create_owned(&g),
            roles: ROLES.map(|role| m.role.get_or_create_owned(&RoleLabels { group, role })),
            commit_index: m.commit_index.get_or_create_owned(&g),
            applied_index: m.applied_index.get_or_create_owned(&g),
            leader_changes: m.leader_changes.get_or_create_owned(&g),
            proposals: m.proposals.get_or_create_owned(&g),
            proposals_failed: m.proposals_failed.get_or_create_owned(&g),
            wal_fsync: m.wal_fsync.get_or_create_owned(&g),
            ready_entries: m.ready_entries.get_or_create_owned(&g),
            ready_events: m.ready_events.get_or_create_owned(&g),
            snapshots: m.snapshots.get_or_create_owned(&g),
            snapshot_bytes: m.snapshot_bytes.get_or_create_owned(&g),
            snapshot_duration: m.snapshot_duration.get_or_create_owned(&g),
            snapshots_installed: m.snapshots_installed.get_or_create_owned(&g),
            seen_proposals: (0, 0),
            seen_received_snapshots: 0,
            leader: None,
        }
    }

    /// After a round of Readies: the core's term, role, leader and indexes, and the replica's
    /// proposal counters (atomic stores and adds only).
    pub(crate) fn observe<SM: shoal_replica::StateMachine, T>(
        &mut self,
        replica: &shoal_replica::Replica<SM, T>,
    ) {
        let raw = replica.raw();
        self.term.set(gauge_value(raw.term().0));
        let role = match replica.role() {
            shoal_raft::Role::Follower => 0,
            shoal_raft::Role::PreCandidate => 1,
            shoal_raft::Role::Candidate => 2,
            shoal_raft::Role::Leader => 3,
        };
        for (i, gauge) in self.roles.iter().enumerate() {
            gauge.set(i64::from(i == role));
        }
        let leader = raw.leader().map(|l| l.0);
        if leader != self.leader {
            // The first observation is a server learning of a leader, a change too.
            self.leader_changes.inc();
            self.leader = leader;
        }
        self.commit_index.set(gauge_value(raw.commit().0));
        self.applied_index.set(gauge_value(replica.applied().0));
        let (proposed, failed) = replica.proposal_counts();
        self.proposals
            .inc_by(proposed.saturating_sub(self.seen_proposals.0));
        self.proposals_failed
            .inc_by(failed.saturating_sub(self.seen_proposals.1));
        self.seen_proposals = (proposed, failed);
        let received = replica.snapshots_installed();
        self.snapshots_installed
            .inc_by(received.saturating_sub(self.seen_received_snapshots));
        self.seen_received_snapshots = received;
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A client connection's request histograms by operation and outcome, resolved once per
/// connection so that each request costs one histogram observation.
pub(crate) struct RequestMetrics {
    by_op: [[Histogram; OUTCOMES.len()]; OPS.len()],
}

impl RequestMetrics {
    pub(crate) fn new() -> RequestMetrics {
        let m = metrics();
        RequestMetrics {
            by_op: OPS.map(|op| {
                OUTCOMES.map(|outcome| {
                    m.requests
                        .get_or_create_owned(&RequestLabels { op, outcome })
                })
            }),
        }
    }

    pub(crate) fn observe(&self, op: OpValue, outcome: OutcomeValue, seconds: f64) {
        let o = OUTCOMES.iter().position(|x| *x == outcome).unwrap_or(0);
        let i = OPS.iter().position(|x| *x == op).unwrap_or(OPS.len() - 1);
        self.by_op[i][o].observe(seconds);
    }
}

/// The label of a KV operation.
pub(crate) fn op_value(op: &shoal_wire::kv::KvOp) -> OpValue {
    use shoal_wire::kv::KvOp;
    match op {
        KvOp::Get { .. } => OpValue::get,
        KvOp::Put { .. } | KvOp::PutLease { .. } => OpValue::put,
        KvOp::Delete { .. } => OpValue::delete,
        KvOp::Scan { .. } => OpValue::scan,
        KvOp::Register => OpValue::register,
        KvOp::Status => OpValue::status,
        KvOp::LeaseGrant { .. }
        | KvOp::LeaseKeepAlive { .. }
        | KvOp::LeaseRevoke { .. }
        | KvOp::LeaseList => OpValue::lease,
        KvOp::Snapshot => OpValue::snapshot,
        KvOp::MemberList
        | KvOp::MemberAdd { .. }
        | KvOp::MemberPromote { .. }
        | KvOp::MemberRemove { .. } => OpValue::member,
        KvOp::LeaseExpire { .. } | KvOp::LeaseCheckpoint { .. } | KvOp::MemberAddresses { .. } => {
            OpValue::other
        }
    }
}

fn result_outcome(result: &shoal_wire::kv::KvResult) -> OutcomeValue {
    use shoal_wire::kv::KvResult;
    match result {
        KvResult::TooLarge { .. } | KvResult::SessionExpired | KvResult::Refused { .. } => {
            OutcomeValue::refused
        }
        _ => OutcomeValue::ok,
    }
}

/// The (client, request) ids and outcome label of a KV reply (`None` for a part of a large
/// reply, which has no ids: a backup, not timed).
pub(crate) fn kv_reply_outcome(
    reply: &shoal_wire::kv::KvReply,
) -> Option<((u64, u64), OutcomeValue)> {
    use shoal_wire::kv::KvReply;
    match reply {
        KvReply::Done {
            client,
            request,
            result,
        } => Some(((*client, *request), result_outcome(result))),
        KvReply::WrongLeader {
            client, request, ..
        } => Some(((*client, *request), OutcomeValue::wrong_leader)),
        KvReply::Part { .. } => None,
    }
}

/// The ids and outcome label of a shard group's reply.
pub(crate) fn shard_reply_outcome(
    reply: &shoal_wire::shard::ShardReply,
) -> ((u64, u64), OutcomeValue) {
    use shoal_wire::shard::ShardReply;
    let outcome = match reply {
        ShardReply::Done { result, .. } => result_outcome(result),
        ShardReply::WrongGroup { .. } => OutcomeValue::wrong_group,
        ShardReply::WrongLeader { .. } => OutcomeValue::wrong_leader,
    };
    (reply.ids(), outcome)
}

/// Client requests waiting for their reply, for the latency histogram: (connection, client,
/// request id) → (arrival, operation). Bounded: past `max` entries (requests never answered:
/// dropped under overload) it starts over; a closed connection's entries are forgotten.
pub(crate) struct RequestTiming {
    waiting: std::collections::BTreeMap<(u64, u64, u64), (tokio::time::Instant, OpValue)>,
    histograms: RequestMetrics,
    max: usize,
}

impl RequestTiming {
    pub(crate) fn new(max: usize) -> RequestTiming {
        RequestTiming {
            waiting: std::collections::BTreeMap::new(),
            histograms: RequestMetrics::new(),
            max,
        }
    }

    /// A request of connection `token` arrived at `at`.
    pub(crate) fn arrived(
        &mut self,
        token: u64,
        (client, request): (u64, u64),
        op: OpValue,
        at: tokio::time::Instant,
    ) {
        if self.waiting.len() >= self.max {
            self.waiting.clear();
        }
        // A retry of a request still waiting keeps the first arrival.
        self.waiting
            .entry((token, client, request))
            .or_insert((at, op));
    }

    /// The reply to a request of connection `token` is sent.
    pub(crate) fn replied(
        &mut self,
        token: u64,
        (client, request): (u64, u64),
        outcome: OutcomeValue,
    ) {
        if let Some((at, op)) = self.waiting.remove(&(token, client, request)) {
            self.histograms
                .observe(op, outcome, at.elapsed().as_secs_f64());
        }
    }

    /// Connection `token` closed: its requests will never be answered.
    pub(crate) fn closed(&mut self, token: u64) {
        let gone: Vec<_> = self
            .waiting
            .range((token, 0, 0)..=(token, u64::MAX, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.waiting.remove(&k);
        }
    }
}

/// A client connection opened (+1) or closed (-1).
pub(crate) fn client_connections(delta: i64) {
    metrics().client_connections.inc_by(delta);
}

/// The sessions in the dedup table now (a shard server: summed over its shards).
pub(crate) fn set_sessions(n: usize) {
    metrics().sessions.set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// The counter of bytes sent to peer `peer` (a peer added by a membership change too).
pub(crate) fn peer_sent(peer: u64) -> Counter {
    metrics().peer_sent.get_or_create_owned(&PeerLabel { peer })
}

/// The counter of bytes received from peer `peer`.
pub(crate) fn peer_received(peer: u64) -> Counter {
    metrics()
        .peer_received
        .get_or_create_owned(&PeerLabel { peer })
}

/// A migration step decided in a shard group's log.
pub(crate) fn migration_step(step: MigrationStep) {
    metrics()
        .migration_steps
        .get_or_create(&MigrationLabel { step })
        .inc();
}

/// Bytes of shard data installed here or exported from here.
pub(crate) fn migration_bytes(bytes: usize) {
    metrics().migration_bytes.inc_by(bytes as u64);
}

/// A shard that moved away was deleted here, `seconds` after its freeze.
pub(crate) fn migration_done(seconds: f64) {
    metrics().migration_duration.observe(seconds);
}

/// Shards frozen here and not yet deleted.
pub(crate) fn set_migrations_in_progress(n: usize) {
    metrics()
        .migrations_in_progress
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// A reader that adds the bytes it reads to a counter (a peer connection's inbound half).
pub(crate) struct CountingReader<R> {
    inner: R,
    counter: Counter,
}

impl<R> CountingReader<R> {
    pub(crate) fn new(inner: R, counter: Counter) -> Self {
        CountingReader { inner, counter }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for CountingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.counter.inc_by(read as u64);
        }
        result
    }
}
