//! The simulated Raft server: the replica shell (`shoal_replica::Replica`) hosting a state
//! machine that records the commands it applied, over `DurableStorage` on the node's simulated
//! disk, driven by the shell's simulator driver ([`SimPipeline`]) — the code production runs.
//! Every Ready's writes go to the disk, the fsync completes after a simulated latency (a
//! timer), and only then are the dependent messages sent, entries applied and the node
//! advanced; snapshot jobs are prepared and installed as later events. A crash in between
//! loses or tears the unsynced writes. It reports what it writes, applies and compacts to the
//! Figure-3 [`Journal`]. Cluster-wide checks on its nodes are below it.

use std::collections::BTreeSet;
use std::time::Duration;

use shoal_raft::{Config, LogIndex, Message, NodeId, RawNode, Ready, Role};
use shoal_replica::sim::{Observer, SimPipeline};
use shoal_replica::{Replica, ReplicaConfig, SnapshotPolicy};
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

/// The state machine of a test server: the commands it applied, in order.
#[derive(Debug, Default)]
pub struct AppliedLog {
    /// (index, command) of every applied command, in order.
    pub applied: Vec<(u64, Vec<u8>)>,
    /// Benchmarks: (command, simulated time in ns) of each apply of a command starting with
    /// `bench`.
    pub apply_times: Vec<(Vec<u8>, u64)>,
    /// The simulated time, set by the node before it drives the replica.
    now: u64,
}

impl shoal_replica::StateMachine for AppliedLog {
    type Output = ();
    type Snapshot = Vec<u8>;

    fn apply(&mut self, index: LogIndex, command: &[u8]) -> Result<Option<()>, String> {
        self.applied.push((index.0, command.to_vec()));
        if command.starts_with(b"bench") {
            self.apply_times.push((command.to_vec(), self.now));
        }
        Ok(Some(()))
    }

    fn snapshot(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.applied).unwrap_or_default()
    }

    fn restore(&mut self, _index: LogIndex, data: &mut dyn std::io::Read) -> Result<(), String> {
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        self.applied = postcard::from_bytes(&bytes).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// The checker's recorder, plus what only this state machine can tell: the commands a
/// snapshot from the leader holds count as applied (without their terms).
struct RaftObserver(Recorder);

impl Observer for RaftObserver {
    fn written(&mut self, me: SimId, leader_term: Option<u64>, ready: &Ready) {
        self.0.written(me, leader_term, ready);
    }

    fn applying(&mut self, me: SimId, term: u64, applied: u64, ready: &Ready) {
        if let Some(s) = &ready.snapshot {
            let cmds: Vec<(u64, Vec<u8>)> = postcard::from_bytes(&s.data).unwrap_or_default();
            for (i, d) in &cmds {
                self.0.observe(Obs::Applied {
                    node: me,
                    index: *i,
                    term: None,
                    hash: digest(d),
                    node_term: term,
                });
            }
        }
        self.0.applying(me, term, applied, ready);
    }

    fn compacted(&mut self, me: SimId, index: u64, term: u64) {
        self.0.compacted(me, index, term);
    }
}

fn route(m: Message) -> (SimId, Message) {
    (sim_id(m.to), m)
}

/// One Raft server: the replica shell over its storage on the simulated disk, hosting an
/// [`AppliedLog`].
pub struct Server {
    /// The bootstrap voters ([`Config::voters`]; empty for a server that joins).
    voters: Vec<NodeId>,
    replica: Option<Replica<AppliedLog, ()>>,
    pipeline: SimPipeline<Vec<u8>, Message>,
    /// Take a snapshot every this many applied entries (the 3D tests use 10).
    snapshot_every: Option<u64>,
    journal: Journal,
}

impl Server {
    /// Server of an `n`-node cluster (Raft ids `1..=n`), reporting to `journal`.
    pub fn new(n: u64, snapshot_every: Option<u64>, journal: Journal) -> Server {
        Server {
            voters: (1..=n).map(NodeId).collect(),
            replica: None,
            pipeline: SimPipeline::new(route),
            snapshot_every,
            journal,
        }
    }

    /// The same server with another bootstrap membership: `voters` (empty for a server that
    /// joins an existing cluster and learns the membership from its leader).
    pub fn with_voters(mut self, voters: Vec<NodeId>) -> Server {
        self.voters = voters;
        self
    }

    /// Proposes a membership change (see [`RawNode::propose_conf_change`]); the index of its
    /// entry if the node accepted it.
    pub fn propose_conf_change(
        &mut self,
        ctx: &mut Ctx<'_, Message>,
        steps: Vec<shoal_raft::ConfChangeStep>,
    ) -> Result<LogIndex, shoal_raft::Error> {
        let replica = self.replica.as_mut().expect("started");
        let r = replica.raw_mut().propose_conf_change(steps);
        self.drive(ctx, None);
        r
    }

    /// Whether it started (it is a fresh value until `on_start`).
    pub fn is_started(&self) -> bool {
        self.replica.is_some()
    }

    /// The Raft core, once started.
    pub fn raw(&self) -> Option<&RawNode<DurableStorage>> {
        self.replica.as_ref().map(|r| r.raw())
    }

    /// (index, command) of every command applied since the last restart (restored snapshots
    /// included), in order.
    pub fn applied(&self) -> &[(u64, Vec<u8>)] {
        self.replica
            .as_ref()
            .map_or(&[], |r| r.machine().applied.as_slice())
    }

    /// Benchmarks: (command, simulated time in ns) of each apply of a `bench…` command.
    pub fn apply_times(&self) -> &[(Vec<u8>, u64)] {
        self.replica
            .as_ref()
            .map_or(&[], |r| r.machine().apply_times.as_slice())
    }

    /// The Raft status. Panics before start.
    pub fn status(&self) -> shoal_raft::Status {
        self.replica.as_ref().expect("started").status()
    }

    /// Whether it is up and leads.
    pub fn is_leader(&self) -> bool {
        self.replica
            .as_ref()
            .is_some_and(|r| r.status().role == Role::Leader)
    }

    /// Proposes `data`; the index it got if the node accepted it (it leads).
    pub fn propose(&mut self, ctx: &mut Ctx<'_, Message>, data: Vec<u8>) -> Option<LogIndex> {
        let replica = self.replica.as_mut().expect("started");
        let r = replica.propose_untracked(data).ok();
        self.drive(ctx, None);
        r
    }

    /// Carries the pipeline on. The simulated servers' disks fail only by crashing, and they
    /// only commit what they proposed: an error here is a bug (the harness prints the seed).
    fn drive(&mut self, ctx: &mut Ctx<'_, Message>, token: Option<u64>) {
        let replica = self.replica.as_mut().expect("started");
        replica.machine_mut().now = ctx.now().as_nanos();
        let result = match token {
            Some(t) => self.pipeline.on_timer(ctx, replica, t).map(|_| ()),
            None => self.pipeline.drive(ctx, replica),
        };
        if let Err(e) = result {
            panic!("the replica pipeline failed: {e}");
        }
        // Nobody waits on proposals here (tests look at what was applied).
        replica.take_done();
    }
}

impl RaftHost for Server {
    fn raft(&self) -> Option<&RawNode<DurableStorage>> {
        self.raw()
    }
}

impl Node<Message> for Server {
    fn on_start(&mut self, ctx: &mut Ctx<'_, Message>) {
        let id = raft_id(ctx.id());
        let storage_config = StorageConfig {
            max_segment_bytes: SEGMENT_BYTES,
            ..StorageConfig::default()
        };
        let storage = DurableStorage::open(ctx.disk(), CLUSTER_ID, id.0, storage_config)
            .expect("storage opens");
        let mut recorder = Recorder::new(self.journal.clone());
        // The recovered log is checked like a written one (torn writes must not break it).
        recorder
            .recovered(ctx.id(), &storage)
            .expect("recovered log reads");
        self.pipeline = SimPipeline::new(route).with_observer(Box::new(RaftObserver(recorder)));
        let mut cfg = Config::new(id, self.voters.clone());
        cfg.election_tick = ELECTION_TICKS;
        cfg.heartbeat_tick = HEARTBEAT_TICKS;
        cfg.rng_seed = ctx.rng().gen();
        let config = ReplicaConfig {
            snapshot: SnapshotPolicy {
                log_bytes: None,
                entries: self.snapshot_every,
            },
            ..ReplicaConfig::default()
        };
        let replica =
            Replica::new(cfg, storage, AppliedLog::default(), config).expect("node starts");
        self.replica = Some(replica);
        ctx.set_timer(TICK, TIMER_TICK);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, Message>, _from: SimId, msg: Message) {
        let replica = self.replica.as_mut().expect("started");
        let _ = replica.step(msg);
        self.drive(ctx, None);
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, Message>, token: u64) {
        if token == TIMER_TICK {
            self.replica.as_mut().expect("started").tick();
            self.drive(ctx, None);
            ctx.set_timer(TICK, TIMER_TICK);
        } else {
            self.drive(ctx, Some(token));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster-wide checks on the servers' final state

/// The server `id` if it is up and started.
pub fn server(sim: &Sim<Message>, id: SimId) -> Option<&Server> {
    sim.node::<Server>(id).filter(|s| s.is_started())
}

/// How many servers applied `cmd`.
pub fn count_applied(sim: &Sim<Message>, cmd: &[u8]) -> usize {
    sim.node_ids()
        .into_iter()
        .filter_map(|id| sim.node::<Server>(id))
        .filter(|s| s.applied().iter().any(|(_, d)| d == cmd))
        .count()
}

/// Every command any server among `ids` that is up applied (so committed) is applied on
/// every one of them that is up: no acknowledged write lost. Call after healing and a final
/// command applied everywhere.
pub fn check_nothing_lost(sim: &Sim<Message>, ids: &[SimId]) -> Result<(), String> {
    let mut everything = BTreeSet::new();
    for &id in ids {
        if let Some(s) = server(sim, id) {
            everything.extend(s.applied().iter().cloned());
        }
    }
    for &id in ids {
        let Some(s) = server(sim, id) else { continue };
        let mine: BTreeSet<_> = s.applied().iter().cloned().collect();
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
        .filter_map(|&id| server(sim, id).and_then(|s| s.raw()).map(|r| (id, r)))
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
            for (i, d) in s.applied() {
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
