//! A simulated replica-group server: a [`GroupHost`] over `DurableStorage` on the node's
//! simulated disk, driven by the replica shell's simulator driver ([`SimPipeline`]) like the
//! KV servers of [`crate::kv_node`]. It ticks, sends Raft messages to its group's peers,
//! answers clients' [`SM::Shard`] requests and the controller's [`SM::Control`] requests, and
//! snapshots by a small byte threshold so that snapshots and their installs happen.

use std::cell::Cell;
use std::rc::Rc;

use shoal_kv::Limits;
use shoal_raft::{Config, NodeId, RawNode};
use shoal_replica::sim::SimPipeline;
use shoal_replica::SnapshotPolicy;
use shoal_shard::{Gid, GroupHost, GroupSnapshot};
use shoal_sim::rand::Rng;
use shoal_sim::{Ctx, Node};
use shoal_storage::{DurableStorage, StorageConfig};

use super::{SEGMENT_BYTES, SM};
use crate::invariants::{Journal, RaftHost, Recorder};
use crate::kv_client::SimId;
use crate::kv_node::{ELECTION_TICKS, HEARTBEAT_TICKS, TICK};

const TIMER_TICK: u64 = 0;

/// Snapshot counts summed over every server and incarnation of a world's groups (a server's
/// own counters restart with it), so tests can assert that snapshots were taken and installed.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    /// Snapshots a server took of its own state.
    pub taken: Cell<u64>,
    /// Snapshots a server received from its leader (InstallSnapshot) and restored.
    pub installed: Cell<u64>,
}
/// Each group is its own Raft cluster: a distinct cluster id per group, so that a message that
/// reached another group's server would be refused rather than taken for its own.
const CLUSTER_ID_BASE: u64 = 1_000;

/// One server of replica group `gid`.
pub struct GroupNode {
    gid: Gid,
    /// The group's servers' sim ids; `peers[i - 1]` has Raft id `i`.
    peers: Vec<SimId>,
    shards: u32,
    snapshot_bytes: u64,
    /// The server, once started.
    pub host: Option<GroupHost>,
    pipeline: SimPipeline<GroupSnapshot, SM>,
    journal: Option<Journal>,
    stats: Option<Rc<SnapshotStats>>,
    /// (taken, installed) already added to `stats` by this incarnation.
    counted: (u64, u64),
}

/// The route of a group's Raft messages: Raft id `i` is `peers[i - 1]`. A message to an id
/// outside the group (none is ever addressed so) goes to the sender's first peer, whose Raft
/// refuses it.
fn router(peers: Vec<SimId>) -> impl Fn(shoal_raft::Message) -> (SimId, SM) + 'static {
    move |m| {
        let to = usize::try_from(m.to.0.saturating_sub(1))
            .ok()
            .and_then(|i| peers.get(i).copied())
            .unwrap_or(peers[0]);
        (to, SM::GroupRaft(m))
    }
}

impl GroupNode {
    /// A server of group `gid` whose servers are `peers` (in Raft id order), in a cluster of
    /// `shards` shards, snapshotting when its live log passes `snapshot_bytes`.
    pub fn new(gid: Gid, peers: Vec<SimId>, shards: u32, snapshot_bytes: u64) -> GroupNode {
        assert!(!peers.is_empty(), "a group has servers");
        GroupNode {
            gid,
            pipeline: SimPipeline::new(router(peers.clone())),
            peers,
            shards,
            snapshot_bytes,
            host: None,
            journal: None,
            stats: None,
            counted: (0, 0),
        }
    }

    /// Adds this server's snapshot counts to `stats`.
    pub fn with_stats(mut self, stats: Rc<SnapshotStats>) -> GroupNode {
        self.stats = Some(stats);
        self
    }

    /// Reports writes, overwrites, applies and compactions to `journal` (the group's Figure-3
    /// checker).
    pub fn with_journal(mut self, journal: Journal) -> GroupNode {
        self.journal = Some(journal);
        self
    }

    /// The group's id.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// The bytes a snapshot of this server's state machine taken now would hold (every shard
    /// it holds, served or frozen, with its sessions, and its delete records), or `None` while
    /// it is down. Tests bound it: a deleted shard must not stay in the state.
    pub fn state_bytes(&self) -> Option<u64> {
        use shoal_replica::{SnapshotData, StateMachine};
        let host = self.host.as_ref()?;
        Some(host.machine().snapshot().into_bytes().len() as u64)
    }

    fn host(&mut self) -> &mut GroupHost {
        self.host.as_mut().expect("started")
    }

    /// Carries the pipeline on, then sends the replies it decided. The simulated replicas only
    /// commit what they proposed and their disks fail only by crashing: an error here is a
    /// bug, and the failing seed is printed by the harness.
    fn drive(&mut self, ctx: &mut Ctx<'_, SM>, token: Option<u64>) {
        let host = self.host.as_mut().expect("started");
        let result = match token {
            Some(t) => self
                .pipeline
                .on_timer(ctx, host.replica_mut(), t)
                .map(|_| ()),
            None => self.pipeline.drive(ctx, host.replica_mut()),
        };
        if let Err(e) = result {
            panic!("group {}: the replica pipeline failed: {e}", self.gid);
        }
        for (to, reply) in host.take_replies() {
            ctx.send(shoal_sim::NodeId(to as u32), SM::ShardReply(reply));
        }
        for (to, reply) in host.take_control_replies() {
            ctx.send(shoal_sim::NodeId(to as u32), SM::ControlReply(reply));
        }
        if let Some(stats) = &self.stats {
            let r = host.replica();
            let now = (r.snapshots_taken(), r.snapshots_installed());
            stats.taken.set(stats.taken.get() + now.0 - self.counted.0);
            stats
                .installed
                .set(stats.installed.get() + now.1 - self.counted.1);
            self.counted = now;
        }
    }
}

impl RaftHost for GroupNode {
    fn raft(&self) -> Option<&RawNode<DurableStorage>> {
        self.host.as_ref().map(|h| h.raw())
    }
}

impl Node<SM> for GroupNode {
    fn on_start(&mut self, ctx: &mut Ctx<'_, SM>) {
        let me = self
            .peers
            .iter()
            .position(|&p| p == ctx.id())
            .expect("a group server is one of its peers") as u64
            + 1;
        let storage = DurableStorage::open(
            ctx.disk(),
            CLUSTER_ID_BASE + self.gid,
            me,
            StorageConfig {
                max_segment_bytes: SEGMENT_BYTES,
                ..StorageConfig::default()
            },
        )
        .expect("storage opens");
        let mut pipeline = SimPipeline::new(router(self.peers.clone()));
        if let Some(journal) = &self.journal {
            let mut rec = Recorder::new(journal.clone());
            // The recovered log is checked like a written one (torn writes must not break it).
            rec.recovered(ctx.id(), &storage)
                .expect("recovered log reads");
            pipeline = pipeline.with_observer(Box::new(rec));
        }
        self.pipeline = pipeline;
        let n = self.peers.len() as u64;
        let mut cfg = Config::new(NodeId(me), (1..=n).map(NodeId).collect());
        cfg.election_tick = ELECTION_TICKS;
        cfg.heartbeat_tick = HEARTBEAT_TICKS;
        cfg.rng_seed = ctx.rng().gen();
        let snapshot = SnapshotPolicy {
            log_bytes: Some(self.snapshot_bytes),
            entries: None,
        };
        let host = GroupHost::new(
            cfg,
            storage,
            self.gid,
            self.shards,
            Limits::default(),
            snapshot,
        )
        .expect("group server starts");
        self.host = Some(host);
        ctx.set_timer(TICK, TIMER_TICK);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, SM>, from: SimId, msg: SM) {
        let reply_to = u64::from(from.0);
        match msg {
            SM::GroupRaft(m) => self.host().step(m),
            SM::Shard(req) => self.host().handle_request(reply_to, req),
            SM::Control(req) => self.host().handle_control(reply_to, req),
            SM::Kv(_) | SM::ShardReply(_) | SM::ControlReply(_) => return,
        }
        self.drive(ctx, None);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, SM>, token: u64) {
        if token == TIMER_TICK {
            self.host().tick();
            self.drive(ctx, None);
            ctx.set_timer(TICK, TIMER_TICK);
        } else {
            self.drive(ctx, Some(token));
        }
    }
}
