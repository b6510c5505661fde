//! The simulated KV servers: [`SingleNode`] (one unreplicated `SingleServer`) and [`RaftNode`]
//! (a `KvRsm` over `DurableStorage` on the node's simulated disk). A `RaftNode` writes each
//! Ready, waits for the simulated fsync (a timer), then sends what depended on it, applies and
//! advances, and snapshots by size (`RsmConfig::snapshot_bytes`); given a journal it reports
//! what it writes and applies to the Figure-3 checker ([`crate::invariants`]).
//!
//! This is the simulator's KV driver in one module, so that a driver over a shared replica
//! shell can replace it in one place.

use std::time::Duration;

use shoal_kv::{KvRsm, RsmConfig, SingleServer};
use shoal_raft::{Config, NodeId, RawNode, Role};
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
const TIMER_SYNC: u64 = 1;
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

/// A replicated server actor: KvRsm over durable storage on the node's simulated disk.
pub struct RaftNode {
    /// Servers in the cluster (Raft ids `1..=n`).
    pub n: u64,
    /// The state machine's configuration.
    pub config: RsmConfig,
    /// Log segment size.
    pub segment_bytes: u64,
    /// The replica (`None` until started).
    pub rsm: Option<KvRsm<DurableStorage>>,
    syncing: Option<shoal_raft::Ready>,
    /// Reports to the invariant checker, if one watches.
    recorder: Option<Recorder>,
}

impl RaftNode {
    /// Server of an `n`-node cluster, reporting to no invariant checker.
    pub fn new(n: u64, config: RsmConfig, segment_bytes: u64) -> RaftNode {
        RaftNode {
            n,
            config,
            segment_bytes,
            rsm: None,
            syncing: None,
            recorder: None,
        }
    }

    /// The same server reporting its writes and applies to `journal`.
    pub fn with_journal(mut self, journal: Journal) -> RaftNode {
        self.recorder = Some(Recorder::new(journal));
        self
    }

    fn rsm(&mut self) -> &mut KvRsm<DurableStorage> {
        self.rsm.as_mut().expect("started")
    }

    fn flush_replies(&mut self, ctx: &mut Ctx<'_, M>) {
        for (to, reply) in self.rsm().take_replies() {
            ctx.send(shoal_sim::NodeId(to as u32), KvMessage::Reply(reply));
        }
    }

    /// Persists the next Ready's writes and waits for the simulated fsync.
    fn drive(&mut self, ctx: &mut Ctx<'_, M>) {
        self.flush_replies(ctx);
        if self.syncing.is_some() {
            return;
        }
        let rsm = self.rsm.as_mut().expect("started");
        let Some(mut rd) = rsm.ready() else {
            return;
        };
        let st = rsm.raw().status();
        let leader_term = (st.role == Role::Leader).then_some(st.term.0);
        for m in std::mem::take(&mut rd.messages) {
            ctx.send(server_sim(m.to.0), KvMessage::Raft(m));
        }
        let storage = rsm.raw_mut().storage_mut();
        let disk = ctx.disk();
        if let Some(s) = &rd.snapshot {
            storage
                .apply_snapshot(disk, s.clone())
                .expect("snapshot persists");
        }
        storage.append(disk, &rd.entries).expect("append");
        if let Some(hs) = rd.hard_state {
            storage.set_hard_state(disk, hs).expect("hard state");
        }
        if let Some(rec) = &mut self.recorder {
            if let Some(s) = &rd.snapshot {
                rec.snapshot(s.meta.index.0, s.meta.term.0, true);
            }
            rec.append(ctx.id(), leader_term, &rd.entries);
        }
        self.syncing = Some(rd);
        let latency = Duration::from_micros(ctx.rng().gen_range(200..2000));
        ctx.set_timer(latency, TIMER_SYNC);
    }

    fn finish_sync(&mut self, ctx: &mut Ctx<'_, M>) {
        let Some(mut rd) = self.syncing.take() else {
            return;
        };
        let rsm = self.rsm.as_mut().expect("started");
        rsm.raw_mut().storage_mut().sync(ctx.disk()).expect("sync");
        for m in std::mem::take(&mut rd.persisted_messages) {
            ctx.send(server_sim(m.to.0), KvMessage::Raft(m));
        }
        if let Some(rec) = &self.recorder {
            // Entries at or below the applied index (or covered by the snapshot installed in
            // this Ready) are skipped by the state machine, so they are not reported as applied.
            let applied = rd
                .snapshot
                .as_ref()
                .map_or(rsm.applied().0, |s| rsm.applied().0.max(s.meta.index.0));
            let (node_term, me) = (rsm.raw().status().term.0, ctx.id());
            for e in rd.committed_entries.iter().filter(|e| e.index.0 > applied) {
                rec.applied(me, e, node_term);
            }
        }
        // The simulated replicas only ever commit what they proposed: an unusable entry or
        // snapshot here is a bug, and the failing seed is printed by the harness.
        rsm.apply(&rd)
            .expect("a committed entry or snapshot is unusable");
        if let Some(s) = rd.compact.take() {
            let (index, term) = (s.meta.index.0, s.meta.term.0);
            rsm.raw_mut()
                .storage_mut()
                .compact(ctx.disk(), s)
                .expect("compact");
            if let Some(rec) = &mut self.recorder {
                rec.snapshot(index, term, false);
            }
        }
        rsm.advance();
        let bytes = raft_state_bytes(ctx.disk());
        rsm.maybe_snapshot(bytes);
        self.drive(ctx);
    }
}

impl RaftHost for RaftNode {
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

impl Node<M> for RaftNode {
    fn on_start(&mut self, ctx: &mut Ctx<'_, M>) {
        let id = NodeId(u64::from(ctx.id().0) + 1);
        let storage = DurableStorage::open(
            ctx.disk(),
            CLUSTER_ID,
            id.0,
            StorageConfig {
                max_segment_bytes: self.segment_bytes,
            },
        )
        .expect("storage opens");
        if let Some(rec) = &mut self.recorder {
            // The recovered log is checked like a written one (torn writes must not break it).
            rec.recovered(ctx.id(), &storage)
                .expect("recovered log reads");
        }
        let mut cfg = Config::new(id, (1..=self.n).map(NodeId).collect());
        cfg.election_tick = ELECTION_TICKS;
        cfg.heartbeat_tick = HEARTBEAT_TICKS;
        cfg.rng_seed = ctx.rng().gen();
        self.rsm = Some(KvRsm::new(cfg, storage, self.config).expect("server starts"));
        ctx.set_timer(TICK, TIMER_TICK);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, M>, from: SimId, msg: M) {
        match msg {
            KvMessage::Raft(m) => self.rsm().step(m),
            KvMessage::Request(r) => self.rsm().handle_request(u64::from(from.0), r),
            KvMessage::Reply(_) => {}
        }
        self.drive(ctx);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, M>, token: u64) {
        match token {
            TIMER_TICK => {
                self.rsm().tick();
                self.drive(ctx);
                ctx.set_timer(TICK, TIMER_TICK);
            }
            _ => self.finish_sync(ctx),
        }
    }
}
