//! The simulated Raft server: a `RawNode` over `DurableStorage` on the node's simulated disk,
//! with a state machine that records the commands it applied. Every Ready's writes go to the
//! disk, the fsync completes after a simulated latency (a timer), and only then are the
//! dependent messages sent, entries applied and the node advanced; a crash in between loses
//! or tears the unsynced writes. It reports what it writes and applies to the Figure-3
//! [`Journal`].
//!
//! This is the simulator's Raft driver in one module, so that a driver over a shared replica
//! shell can replace it in one place. Cluster-wide checks on its nodes are below it.

use std::collections::BTreeSet;
use std::time::Duration;

use shoal_raft::{Config, EntryKind, LogIndex, Message, NodeId, RawNode, Ready, Role, Storage};
use shoal_sim::rand::Rng;
use shoal_sim::{Ctx, Node, Sim};
use shoal_storage::{DurableStorage, StorageConfig};

use crate::invariants::{digest, Journal, Obs, RaftHost, Recorder};

type SimId = shoal_sim::NodeId;

/// Raft tick.
pub const TICK: Duration = Duration::from_millis(10);
/// Election timeout base in ticks (randomized in [30, 60) ticks: 300–600 ms).
pub const ELECTION_TICKS: u32 = 30;
/// Heartbeat interval in ticks.
pub const HEARTBEAT_TICKS: u32 = 10;
const TIMER_TICK: u64 = 0;
const TIMER_SYNC: u64 = 1;
const CLUSTER_ID: u64 = 42;
/// Small segments, so compaction frees disk space often (the lab's 3D size bound).
pub const SEGMENT_BYTES: u64 = 1024;

/// The Raft id of a simulated node (servers are the first nodes added: Raft ids are 1-based).
pub fn raft_id(id: SimId) -> NodeId {
    NodeId(u64::from(id.0) + 1)
}

/// The simulated node of a Raft id.
pub fn sim_id(id: NodeId) -> SimId {
    shoal_sim::NodeId((id.0 - 1) as u32)
}

/// One Raft server: the core, its storage on the simulated disk, and a state machine that
/// records the commands it applied.
pub struct Server {
    n: u64,
    /// The Raft core (`None` until started).
    pub raw: Option<RawNode<DurableStorage>>,
    /// (index, command) of every applied command, in order.
    pub applied: Vec<(u64, Vec<u8>)>,
    last_applied: u64,
    /// The Ready whose writes wait for their fsync.
    syncing: Option<Ready>,
    /// Take a snapshot every this many applied entries (the 3D tests use 10).
    snapshot_every: Option<u64>,
    /// Benchmarks: (command, simulated time in ns) of each apply of a command starting with
    /// `bench`.
    pub apply_times: Vec<(Vec<u8>, u64)>,
    /// What this server did, for the invariant checker.
    recorder: Recorder,
}

impl Server {
    /// Server of an `n`-node cluster (Raft ids `1..=n`), reporting to `journal`.
    pub fn new(n: u64, snapshot_every: Option<u64>, journal: Journal) -> Server {
        Server {
            n,
            raw: None,
            applied: Vec::new(),
            last_applied: 0,
            syncing: None,
            snapshot_every,
            apply_times: Vec::new(),
            recorder: Recorder::new(journal),
        }
    }

    fn raw(&mut self) -> &mut RawNode<DurableStorage> {
        self.raw.as_mut().expect("started")
    }

    /// The Raft status. Panics before start.
    pub fn status(&self) -> shoal_raft::Status {
        self.raw.as_ref().expect("started").status()
    }

    /// Whether it is up and leads.
    pub fn is_leader(&self) -> bool {
        self.raw
            .as_ref()
            .is_some_and(|r| r.status().role == Role::Leader)
    }

    /// Proposes `data`; the index it got if the node accepted it (it leads).
    pub fn propose(&mut self, ctx: &mut Ctx<'_, Message>, data: Vec<u8>) -> Option<LogIndex> {
        let r = self.raw().propose(data).ok();
        self.drive(ctx);
        r
    }

    /// Writes a Ready's state, then waits for the simulated fsync before the rest.
    fn drive(&mut self, ctx: &mut Ctx<'_, Message>) {
        if self.syncing.is_some() {
            return;
        }
        let raw = self.raw.as_mut().expect("started");
        if !raw.has_ready() {
            return;
        }
        let mut rd = raw.ready();
        let st = raw.status();
        let leader_term = (st.role == Role::Leader).then_some(st.term.0);
        for m in std::mem::take(&mut rd.messages) {
            ctx.send(sim_id(m.to), m);
        }
        let storage = raw.storage_mut();
        let disk = ctx.disk();
        if let Some(s) = &rd.snapshot {
            storage.apply_snapshot(disk, s.clone()).expect("snapshot");
        }
        storage.append(disk, &rd.entries).expect("append");
        if let Some(hs) = rd.hard_state {
            storage.set_hard_state(disk, hs).expect("hard state");
        }
        if let Some(s) = &rd.snapshot {
            self.recorder.snapshot(s.meta.index.0, s.meta.term.0, true);
        }
        self.recorder.append(ctx.id(), leader_term, &rd.entries);
        self.syncing = Some(rd);
        let latency = Duration::from_micros(ctx.rng().gen_range(200..2000));
        ctx.set_timer(latency, TIMER_SYNC);
    }

    fn finish_sync(&mut self, ctx: &mut Ctx<'_, Message>) {
        let Some(mut rd) = self.syncing.take() else {
            return;
        };
        let raw = self.raw.as_mut().expect("started");
        raw.storage_mut().sync(ctx.disk()).expect("sync");
        for m in std::mem::take(&mut rd.persisted_messages) {
            ctx.send(sim_id(m.to), m);
        }
        let me = ctx.id();
        let node_term = raw.status().term.0;
        if let Some(s) = &rd.snapshot {
            self.applied = postcard::from_bytes(&s.data).expect("snapshot decodes");
            self.last_applied = s.meta.index.0;
            for (i, d) in &self.applied {
                self.recorder.observe(Obs::Applied {
                    node: me,
                    index: *i,
                    term: None,
                    hash: digest(d),
                    node_term,
                });
            }
        }
        for e in &rd.committed_entries {
            assert_eq!(e.index.0, self.last_applied + 1, "out-of-order apply");
            self.last_applied = e.index.0;
            self.recorder.applied(me, e, node_term);
            if e.kind == EntryKind::Normal {
                self.applied.push((e.index.0, e.data.clone()));
                if e.data.starts_with(b"bench") {
                    self.apply_times
                        .push((e.data.clone(), ctx.now().as_nanos()));
                }
            }
        }
        if let Some(s) = rd.compact.take() {
            let (index, term) = (s.meta.index.0, s.meta.term.0);
            raw.storage_mut().compact(ctx.disk(), s).expect("compact");
            self.recorder.snapshot(index, term, false);
        }
        let raw = self.raw.as_mut().expect("started");
        raw.advance();
        if let Some(every) = self.snapshot_every {
            let first = raw.status().first_index.0;
            if self.last_applied >= first + every {
                let data = postcard::to_allocvec(&self.applied).expect("encode");
                let _ = raw.snapshot(LogIndex(self.last_applied), data);
            }
        }
        self.drive(ctx);
    }
}

impl RaftHost for Server {
    fn raft(&self) -> Option<&RawNode<DurableStorage>> {
        self.raw.as_ref()
    }
}

impl Node<Message> for Server {
    fn on_start(&mut self, ctx: &mut Ctx<'_, Message>) {
        let id = raft_id(ctx.id());
        let storage_config = StorageConfig {
            max_segment_bytes: SEGMENT_BYTES,
        };
        let storage = DurableStorage::open(ctx.disk(), CLUSTER_ID, id.0, storage_config)
            .expect("storage opens");
        let snap = storage.snapshot().expect("snapshot");
        if !snap.data.is_empty() {
            self.applied = postcard::from_bytes(&snap.data).expect("snapshot decodes");
        }
        // The recovered log is checked like a written one (torn writes must not break it).
        self.recorder
            .recovered(ctx.id(), &storage)
            .expect("recovered log reads");
        self.last_applied = snap.meta.index.0;
        let mut cfg = Config::new(id, (1..=self.n).map(NodeId).collect());
        cfg.election_tick = ELECTION_TICKS;
        cfg.heartbeat_tick = HEARTBEAT_TICKS;
        cfg.rng_seed = ctx.rng().gen();
        cfg.applied = snap.meta.index;
        self.raw = Some(RawNode::new(cfg, storage).expect("node starts"));
        ctx.set_timer(TICK, TIMER_TICK);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, Message>, _from: SimId, msg: Message) {
        let _ = self.raw().step(msg);
        self.drive(ctx);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, Message>, token: u64) {
        match token {
            TIMER_TICK => {
                self.raw().tick();
                self.drive(ctx);
                ctx.set_timer(TICK, TIMER_TICK);
            }
            _ => self.finish_sync(ctx),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster-wide checks on the servers' final state

/// The server `id` if it is up and started.
pub fn server(sim: &Sim<Message>, id: SimId) -> Option<&Server> {
    sim.node::<Server>(id).filter(|s| s.raw.is_some())
}

/// How many servers applied `cmd`.
pub fn count_applied(sim: &Sim<Message>, cmd: &[u8]) -> usize {
    sim.node_ids()
        .into_iter()
        .filter_map(|id| sim.node::<Server>(id))
        .filter(|s| s.applied.iter().any(|(_, d)| d == cmd))
        .count()
}

/// Every command any server among `ids` that is up applied (so committed) is applied on
/// every one of them that is up: no acknowledged write lost. Call after healing and a final
/// command applied everywhere.
pub fn check_nothing_lost(sim: &Sim<Message>, ids: &[SimId]) -> Result<(), String> {
    let mut everything = BTreeSet::new();
    for &id in ids {
        if let Some(s) = server(sim, id) {
            everything.extend(s.applied.iter().cloned());
        }
    }
    for &id in ids {
        let Some(s) = server(sim, id) else { continue };
        let mine: BTreeSet<_> = s.applied.iter().cloned().collect();
        if let Some(missing) = everything.difference(&mine).next() {
            return Err(format!("{id} lacks committed entry {missing:?}"));
        }
    }
    Ok(())
}

/// Log Matching (Figure 3) between every pair of servers that are up: if two logs have an
/// entry with the same index and term, they are identical up to it.
pub fn check_log_matching(sim: &Sim<Message>, ids: &[SimId]) -> Result<(), String> {
    let up: Vec<(SimId, &RawNode<DurableStorage>)> = ids
        .iter()
        .filter_map(|&id| {
            server(sim, id)
                .and_then(|s| s.raw.as_ref())
                .map(|r| (id, r))
        })
        .collect();
    for (i, (a_id, a)) in up.iter().enumerate() {
        for (b_id, b) in up.iter().skip(i + 1) {
            let (sa, sb) = (a.status(), b.status());
            let lo = sa.first_index.max(sb.first_index);
            let mut idx = sa.last_index.min(sb.last_index);
            while idx >= lo && idx.0 > 0 {
                if a.log_term(idx) == b.log_term(idx) {
                    let ea = a.log_entries(lo, idx.next()).map_err(|e| e.to_string())?;
                    let eb = b.log_entries(lo, idx.next()).map_err(|e| e.to_string())?;
                    if ea != eb {
                        return Err(format!(
                            "log matching: {a_id} and {b_id} agree at {idx} but differ before"
                        ));
                    }
                    break;
                }
                idx = idx.prev();
            }
        }
    }
    Ok(())
}

/// State machine safety across all servers (up or not): no two commands applied at one index.
pub fn check_applied_agree(sim: &Sim<Message>, ids: &[SimId]) -> Result<(), String> {
    let mut seen: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    for &id in ids {
        if let Some(s) = sim.node::<Server>(id) {
            for (i, d) in &s.applied {
                if let Some(prev) = seen.insert(*i, d.clone()) {
                    if &prev != d {
                        return Err(format!("two commands applied at {i}"));
                    }
                }
            }
        }
    }
    Ok(())
}
