//! The simulated KV servers: [`SingleNode`] (one unreplicated `SingleServer`) and [`RaftNode`]
//! (a `KvRsm` over `DurableStorage` on the node's simulated disk). A `RaftNode` is a thin node
//! over the replica shell's simulator driver ([`SimPipeline`]): the production pipeline, each
//! fsync completing on a simulated timer and each snapshot job prepared and installed as later
//! events. Given a journal it reports what it writes, applies and compacts to the Figure-3
//! checker ([`crate::invariants`]).

use std::time::Duration;

use shoal_kv::{KvRsm, RsmConfig, SingleServer, StoreSnapshot};
use shoal_raft::{Config, NodeId, RawNode};
use shoal_replica::sim::SimPipeline;
use shoal_sim::rand::Rng;
use shoal_sim::{Ctx, Node};
use shoal_storage::{DurableStorage, StorageConfig};
use shoal_wire::kv::KvMessage;

use crate::invariants::{Journal, RaftHost, Recorder};
use crate::kv_client::{server_sim, SimId, M};

/// Raft tick.
pub const TICK: Duration = Duration::from_millis(10);
/// Heartbeat interval: HEARTBEAT_TICKS ticks.
pub const HEARTBEAT_TICKS: u32 = 10;
/// Election timeout base: ELECTION_TICKS ticks (1 s as in the lab's tester would be 100).
pub const ELECTION_TICKS: u32 = 30;
const TIMER_TICK: u64 = 0;
const CLUSTER_ID: u64 = 7;

/// The single server actor.
pub struct SingleNode {
    /// The server.
    pub server: SingleServer,
}

impl Node<M> for SingleNode {
    fn on_start(&mut self, _ctx: &mut Ctx<'_, M>) {}
    fn on_message(&mut self, ctx: &mut Ctx<'_, M>, from: SimId, msg: M) {
        if let KvMessage::Request(req) = msg {
            let reply = self.server.handle(&req);
            ctx.send(from, KvMessage::Reply(reply));
        }
    }
    fn on_timer(&mut self, _ctx: &mut Ctx<'_, M>, _token: u64) {}
}

/// A simulation message type that carries the KV servers' traffic (their Raft messages, the
/// requests they serve and the replies they send): [`KvMessage`] itself, or a larger message
/// type of a simulation that also runs other nodes (the sharded KV's controller store).
pub trait KvEnvelope: shoal_sim::Message {
    /// Wraps a KV message.
    fn wrap(m: KvMessage) -> Self;
    /// The KV message inside, if it is one (anything else is not for a KV server).
    fn into_kv(self) -> Option<KvMessage>;
}

impl KvEnvelope for KvMessage {
    fn wrap(m: KvMessage) -> Self {
        m
    }
    fn into_kv(self) -> Option<KvMessage> {
        Some(self)
    }
}

/// A replicated server actor: KvRsm over durable storage on the node's simulated disk, driven
/// by the replica shell's simulator driver. `Msg` is the simulation's message type. The
/// servers must be the first nodes of the simulation: Raft id = sim id + 1.
pub struct RaftNode<Msg: KvEnvelope = M> {
    /// Servers in the cluster (ids 1..=n).
    pub n: u64,
    /// The state machine's settings (snapshot threshold, limits, lease clock).
    pub config: RsmConfig,
    /// Log segment size of its storage.
    pub segment_bytes: u64,
    /// The server, once started.
    pub rsm: Option<KvRsm>,
    /// The driver state of this incarnation.
    pub pipeline: SimPipeline<StoreSnapshot, Msg>,
    journal: Option<Journal>,
}

fn route<Msg: KvEnvelope>(m: shoal_raft::Message) -> (SimId, Msg) {
    (server_sim(m.to.0), Msg::wrap(KvMessage::Raft(m)))
}

impl<Msg: KvEnvelope> RaftNode<Msg> {
    /// A server of an `n`-server cluster.
    pub fn new(n: u64, config: RsmConfig, segment_bytes: u64) -> RaftNode<Msg> {
        RaftNode {
            n,
            config,
            segment_bytes,
            rsm: None,
            pipeline: SimPipeline::new(route::<Msg>),
            journal: None,
        }
    }

    /// Reports writes, overwrites, applies and compactions to `journal` (the Figure-3 checker).
    pub fn with_journal(mut self, journal: Journal) -> RaftNode<Msg> {
        self.journal = Some(journal);
        self
    }

    fn rsm(&mut self) -> &mut KvRsm {
        self.rsm.as_mut().expect("started")
    }

    /// Carries the pipeline on, then sends the replies it decided. The simulated replicas only
    /// ever commit what they proposed and their disks fail only by crashing: an error here is
    /// a bug, and the failing seed is printed by the harness.
    fn drive(&mut self, ctx: &mut Ctx<'_, Msg>, token: Option<u64>) {
        let rsm = self.rsm.as_mut().expect("started");
        let result = match token {
            Some(t) => self
                .pipeline
                .on_timer(ctx, rsm.replica_mut(), t)
                .map(|_| ()),
            None => self.pipeline.drive(ctx, rsm.replica_mut()),
        };
        if let Err(e) = result {
            panic!("the replica pipeline failed: {e}");
        }
        for (to, reply) in rsm.take_replies() {
            ctx.send(
                shoal_sim::NodeId(to as u32),
                Msg::wrap(KvMessage::Reply(reply)),
            );
        }
    }
}

impl<Msg: KvEnvelope> RaftHost for RaftNode<Msg> {
    fn raft(&self) -> Option<&RawNode<DurableStorage>> {
        self.rsm.as_ref().map(|r| r.raw())
    }
}

/// Bytes of the persisted Raft state (log segments and hard state; not the snapshot).
pub fn raft_state_bytes(disk: &shoal_sim::SimDisk) -> u64 {
    disk.list()
        .iter()
        .filter(|n| n.starts_with("seg-") || n.as_str() == "hardstate")
        .map(|n| disk.len(n).unwrap_or(0))
        .sum()
}

/// Bytes of the stored snapshot file.
pub fn snapshot_file_bytes(disk: &shoal_sim::SimDisk) -> u64 {
    disk.len(shoal_storage::SNAPSHOT_FILE).unwrap_or(0)
}

impl<Msg: KvEnvelope> Node<Msg> for RaftNode<Msg> {
    fn on_start(&mut self, ctx: &mut Ctx<'_, Msg>) {
        let id = NodeId(u64::from(ctx.id().0) + 1);
        let storage = DurableStorage::open(
            ctx.disk(),
            CLUSTER_ID,
            id.0,
            StorageConfig {
                max_segment_bytes: self.segment_bytes,
                ..StorageConfig::default()
            },
        )
        .expect("storage opens");
        if let Some(journal) = &self.journal {
            let mut rec = Recorder::new(journal.clone());
            // The recovered log is checked like a written one (torn writes must not break it).
            rec.recovered(ctx.id(), &storage)
                .expect("recovered log reads");
            self.pipeline = SimPipeline::new(route::<Msg>).with_observer(Box::new(rec));
        }
        let mut cfg = Config::new(id, (1..=self.n).map(NodeId).collect());
        cfg.election_tick = ELECTION_TICKS;
        cfg.heartbeat_tick = HEARTBEAT_TICKS;
        cfg.rng_seed = ctx.rng().gen();
        self.rsm = Some(KvRsm::new(cfg, storage, self.config).expect("server starts"));
        ctx.set_timer(TICK, TIMER_TICK);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, Msg>, from: SimId, msg: Msg) {
        match msg.into_kv() {
            Some(KvMessage::Raft(m)) => self.rsm().step(m),
            Some(KvMessage::Request(r)) => self.rsm().handle_request(u64::from(from.0), r),
            Some(KvMessage::Reply(_)) | None => {}
        }
        self.drive(ctx, None);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, Msg>, token: u64) {
        if token == TIMER_TICK {
            self.rsm().tick();
            self.drive(ctx, None);
            ctx.set_timer(TICK, TIMER_TICK);
        } else {
            self.drive(ctx, Some(token));
        }
    }
}
