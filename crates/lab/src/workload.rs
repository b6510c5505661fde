//! The workloads of `shoal sim --workload raft|kv|shard|mr` (mr: [`crate::mr`]): a whole cluster running the real
//! protocol under the nemesis, checked after every event and at the end, summed up in a
//! [`Report`]. The sharded KV's (**shard**) lives with the rest of its world in
//! [`crate::shard::workload`]; this module names it and shares the runner.
//!
//! Both run on the reliable network with the nemesis on the servers for `duration` (partitions
//! of every shape, crashes with torn writes, pauses, loss, delay, reordering and duplication),
//! the five Figure-3 properties checked after every event ([`crate::invariants`]); then heal,
//! check that progress resumed (a final write commits) and check what the clients saw.
//!
//! - **raft**: 7 [`Server`]s, 5 bootstrap voters and 2 that start empty, taking a snapshot
//!   every 20 applied entries; every 100 ms each node that leads is handed a proposal, and
//!   every 300 ms the newest leader is handed a random membership change
//!   ([`crate::membership::random_membership_change`]: add a learner or a voter, promote,
//!   remove — the leader too —, or a joint change of two voters), so membership changes are
//!   one more fault among the nemesis's. The Figure-3 checks hold across configurations.
//!   At the end: the final command is applied on every member of the final configuration
//!   within 60 s, no two commands at one index on any server, logs match, and every command
//!   applied anywhere is applied on every final member. The report counts the membership
//!   changes committed.
//! - **kv**: 5 [`RaftNode`]s snapshotting whenever the Raft state passes 2,000 bytes (so
//!   snapshots, compactions and snapshot installs happen all the time), 4 [`Client`]s putting
//!   at the last version they know and reading back on 5 keys. At the end: every client
//!   finishes, a final put is acknowledged, the replicas converge, and the history is
//!   linearizable under `shoal check`'s versioned-KV model (a step budget, so the verdict is
//!   the same on every machine).
//!
//! The same seed and duration give the same [`Report`], field for field.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use shoal_check::Budget;
use shoal_kv::{Outcome, RsmConfig};
use shoal_raft::{Message, NodeId};
use shoal_sim::{Failure, FaultSummary, NemesisConfig, NetConfig, Sim, SimConfig, SimTime};
use shoal_wire::kv::{Expected, KvOp, KvResult};

use crate::invariants::{Invariants, Journal};
use crate::kv_client::{
    all_finished, check_kv_history, client_violation, put_counts, Client, SimId, Work, M,
};
use crate::kv_node::{RaftNode, TICK};
use crate::membership::{leader_membership, members_applied, random_membership_change, Choices};
use crate::raft_node::{
    check_applied_agree, check_log_matching, check_nothing_lost, count_applied, Server,
};
pub use crate::shard::run_shard;

/// Servers in the kv workload's cluster, and the bootstrap voters of the raft workload's.
pub const SERVERS: u64 = 5;
/// raft: servers that start outside the membership (empty), for membership changes to add.
pub const RAFT_SPARES: u64 = 2;
/// raft: a random membership change is proposed every this many rounds.
pub const RAFT_CHANGE_EVERY: u64 = 3;
/// raft: each server snapshots every this many applied entries.
pub const RAFT_SNAPSHOT_EVERY: u64 = 20;
/// raft: one proposal per leader per round of this length.
pub const RAFT_ROUND: Duration = Duration::from_millis(100);
/// kv: snapshot when the persisted Raft state passes this many bytes (small: snapshots all
/// the time).
pub const KV_SNAPSHOT_BYTES: u64 = 2_000;
/// kv: log segment size (small, so compaction frees segments soon after a snapshot).
pub const KV_SEGMENT_BYTES: u64 = 1024;
/// kv: clients.
pub const KV_CLIENTS: usize = 4;
/// kv: keys the clients share.
pub const KV_KEYS: usize = 5;
/// kv: search steps the linearizability check may take (a step budget gives the same verdict
/// on every machine, unlike a time budget).
pub const KV_CHECK_STEPS: u64 = 20_000_000;
/// How long after healing the clients (kv) or the final write may take.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Which protocol a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Bare Raft: proposals through the leader.
    Raft,
    /// The replicated KV: clerks with a put/get workload.
    Kv,
    /// The sharded KV: a controller reconfiguring, groups migrating shards, routing clients
    /// with a put/get workload ([`crate::shard::workload`]).
    Shard,
    /// MapReduce: the coordinator's event machine and workers running the app's functions,
    /// under crashes, pauses, lost map output and a faulty network ([`crate::mr`]).
    Mr,
}

impl Workload {
    /// The name `shoal sim --workload` takes.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Raft => "raft",
            Workload::Kv => "kv",
            Workload::Shard => "shard",
            Workload::Mr => "mr",
        }
    }

    /// Runs this workload for `seed`.
    pub fn run(self, seed: u64, duration: Duration) -> Report {
        match self {
            Workload::Raft => run_raft(seed, duration),
            Workload::Kv => run_kv(seed, duration),
            Workload::Shard => run_shard(seed, duration),
            Workload::Mr => crate::mr::run_mr(seed, duration),
        }
    }
}

/// What one run did and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The workload.
    pub workload: Workload,
    /// The seed.
    pub seed: u64,
    /// The nemesis phase's length.
    pub duration: Duration,
    /// Every fault and repair the nemesis (and the final heal) applied.
    pub faults: FaultSummary,
    /// Simulator events processed (each followed by the invariant checks).
    pub events: u64,
    /// Virtual time at the end.
    pub sim_time: SimTime,
    /// raft: commands proposed; kv: operations in the client history.
    pub ops: u64,
    /// raft: distinct commands committed; kv: puts acknowledged.
    pub committed: u64,
    /// kv: `Some(reason)` if the linearizability check gave up within its step budget.
    pub history_gave_up: Option<String>,
    /// raft: the membership changes committed (requested changes some server applied; the
    /// automatic leave of a joint configuration not counted); `None` for the others.
    pub membership_changes: Option<u64>,
    /// mr: the app the job ran ([`crate::mr::MrApp::name`]); `None` for the others.
    pub app: Option<&'static str>,
    /// The run's trace hash (equal hashes: the same run).
    pub trace_hash: u64,
    /// `Ok` or the first violation, with the trace tail.
    pub outcome: Result<(), Failure>,
}

/// Runs `body` and turns a panic anywhere in the simulation into a failed [`Report`].
pub(crate) fn catching(
    workload: Workload,
    seed: u64,
    duration: Duration,
    body: impl FnOnce() -> Report,
) -> Report {
    // A trace left by an earlier panic must not be mistaken for this run's.
    let _ = shoal_sim::take_panic_trace();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(report) => report,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic payload)".to_string());
            Report {
                workload,
                seed,
                duration,
                faults: FaultSummary::default(),
                events: 0,
                sim_time: SimTime::ZERO,
                ops: 0,
                committed: 0,
                history_gave_up: None,
                membership_changes: None,
                app: None,
                trace_hash: 0,
                outcome: Err(Failure {
                    message: format!("panicked: {msg}"),
                    context: shoal_sim::take_panic_trace(),
                }),
            }
        }
    }
}

fn new_sim<Msg: shoal_sim::Message>(seed: u64) -> Sim<Msg> {
    Sim::new(
        seed,
        SimConfig {
            net: NetConfig::reliable(),
            ..SimConfig::default()
        },
    )
}

// ---------------------------------------------------------------------------------------------
// raft

struct RaftRun {
    sim: Sim<Message>,
    ids: Vec<SimId>,
    inv: Invariants,
    proposed: u64,
    choices: Choices,
}

/// The raft workload for `seed`: see the module's documentation.
pub fn run_raft(seed: u64, duration: Duration) -> Report {
    catching(Workload::Raft, seed, duration, || {
        let mut sim = new_sim(seed);
        let journal = Journal::default();
        let n = SERVERS + RAFT_SPARES;
        let ids = (0..n)
            .map(|i| {
                let journal = journal.clone();
                let bootstrap: Vec<NodeId> = if i < SERVERS {
                    (1..=SERVERS).map(NodeId).collect()
                } else {
                    Vec::new()
                };
                sim.add_node(move |_| {
                    Server::new(n, Some(RAFT_SNAPSHOT_EVERY), journal.clone())
                        .with_voters(bootstrap.clone())
                })
            })
            .collect();
        let mut run = RaftRun {
            sim,
            ids,
            inv: Invariants::new(journal),
            proposed: 0,
            choices: Choices(seed ^ 0x6d65_6d62),
        };
        let outcome = run.body(duration);
        let mut committed = BTreeSet::new();
        for &id in &run.ids {
            if let Some(s) = run.sim.node::<Server>(id) {
                committed.extend(s.applied().iter().cloned());
            }
        }
        Report {
            workload: Workload::Raft,
            seed,
            duration,
            faults: run.sim.fault_summary().clone(),
            events: run.sim.events_processed(),
            sim_time: run.sim.now(),
            ops: run.proposed,
            committed: committed.len() as u64,
            history_gave_up: None,
            membership_changes: Some(run.inv.conf_changes_committed()),
            app: None,
            trace_hash: run.sim.trace_hash(),
            outcome,
        }
    })
}

impl RaftRun {
    fn run_checked(&mut self, d: Duration) -> Result<(), Failure> {
        let (sim, inv, ids) = (&mut self.sim, &mut self.inv, &self.ids);
        sim.run_checked(d, |sim| inv.check::<Message, Server>(sim, ids))
    }

    fn check(&self, r: Result<(), String>) -> Result<(), Failure> {
        r.map_err(|m| self.sim.failure(m))
    }

    /// Proposes `cmd` on every node that thinks it leads.
    fn propose_on_leaders(&mut self, cmd: &[u8]) {
        for &id in &self.ids.clone() {
            let r = self.sim.call::<Server, _>(id, |s, ctx| {
                s.is_leader() && s.propose(ctx, cmd.to_vec()).is_some()
            });
            if matches!(r, Ok(true)) {
                self.proposed += 1;
            }
        }
    }

    fn body(&mut self, duration: Duration) -> Result<(), Failure> {
        self.sim.start_nemesis(NemesisConfig::new(self.ids.clone()));
        let end = (self.sim.now() + duration).as_nanos();
        let mut round = 0u64;
        while self.sim.now().as_nanos() < end {
            for &id in &self.ids.clone() {
                self.propose_on_leaders(format!("n{round}-{id}").as_bytes());
            }
            if round.is_multiple_of(RAFT_CHANGE_EVERY) {
                random_membership_change(&mut self.sim, &self.ids, &mut self.choices);
            }
            let left = Duration::from_nanos(end - self.sim.now().as_nanos());
            self.run_checked(RAFT_ROUND.min(left))?;
            self.check(check_applied_agree(&self.sim, &self.ids))?;
            round += 1;
        }
        self.sim.heal_all();
        self.run_checked(Duration::from_secs(1))?;
        let members = self.commit_everywhere(b"final")?;
        self.run_checked(Duration::from_millis(500))?;
        self.check(check_applied_agree(&self.sim, &self.ids))?;
        self.check(check_log_matching(&self.sim, &self.ids))?;
        self.check(check_nothing_lost(&self.sim, &members))
    }

    /// Progress resumed: `cmd`, proposed on the leader (again every 2 s until it sticks), is
    /// applied on every member of the newest leader's configuration within
    /// [`SETTLE_LIMIT`]; those members.
    fn commit_everywhere(&mut self, cmd: &[u8]) -> Result<Vec<SimId>, Failure> {
        let limit = (self.sim.now() + SETTLE_LIMIT).as_nanos();
        while self.sim.now().as_nanos() < limit {
            self.propose_on_leaders(cmd);
            for _ in 0..40 {
                self.run_checked(Duration::from_millis(50))?;
                if let Some(members) = members_applied(&self.sim, &self.ids, |d| d == cmd) {
                    return Ok(members);
                }
            }
        }
        let m = leader_membership(&self.sim, &self.ids).map(|(_, m)| m.to_string());
        Err(self.sim.failure(format!(
            "no progress after healing: {:?} not applied on every member within \
             {SETTLE_LIMIT:?} (the newest leader's membership: {m:?}; {} servers applied it)",
            String::from_utf8_lossy(cmd),
            count_applied(&self.sim, cmd)
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// kv

struct KvRun {
    sim: Sim<M>,
    servers: Vec<SimId>,
    clients: Vec<SimId>,
    inv: Invariants,
    gave_up: Option<String>,
}

/// The kv workload for `seed`: see the module's documentation.
pub fn run_kv(seed: u64, duration: Duration) -> Report {
    catching(Workload::Kv, seed, duration, || {
        let mut sim = new_sim(seed);
        let journal = Journal::default();
        let config = RsmConfig {
            snapshot_bytes: Some(KV_SNAPSHOT_BYTES),
            tick_ms: TICK.as_millis() as u64,
            ..RsmConfig::default()
        };
        let servers = (0..SERVERS)
            .map(|_| {
                let journal = journal.clone();
                sim.add_node(move |_| {
                    RaftNode::new(SERVERS, config, KV_SEGMENT_BYTES).with_journal(journal.clone())
                })
            })
            .collect();
        let mut run = KvRun {
            sim,
            servers,
            clients: Vec::new(),
            inv: Invariants::new(journal),
            gave_up: None,
        };
        let outcome = run.body(duration);
        let (ok_puts, _) = put_counts(&run.sim, &run.clients);
        Report {
            workload: Workload::Kv,
            seed,
            duration,
            faults: run.sim.fault_summary().clone(),
            events: run.sim.events_processed(),
            sim_time: run.sim.now(),
            ops: run.sim.history_len() as u64,
            committed: ok_puts,
            history_gave_up: run.gave_up.clone(),
            membership_changes: None,
            app: None,
            trace_hash: run.sim.trace_hash(),
            outcome,
        }
    })
}

impl KvRun {
    fn run_checked(&mut self, d: Duration) -> Result<(), Failure> {
        let (sim, inv, ids) = (&mut self.sim, &mut self.inv, &self.servers);
        sim.run_checked(d, |sim| inv.check::<M, RaftNode>(sim, ids))
    }

    fn add_clients(&mut self, work: &[Work]) -> Vec<SimId> {
        let servers: Vec<u64> = (1..=SERVERS).collect();
        let ids: Vec<SimId> = work
            .iter()
            .map(|w| {
                let (servers, w) = (servers.clone(), w.clone());
                self.sim
                    .add_node(move |id| Client::new(u64::from(id.0), servers.clone(), w.clone()))
            })
            .collect();
        self.clients.extend(&ids);
        ids
    }

    /// Runs (checked) until `done` holds, at most `max`; whether it held.
    fn run_until(
        &mut self,
        max: Duration,
        done: impl Fn(&Sim<M>) -> bool,
    ) -> Result<bool, Failure> {
        let limit = (self.sim.now() + max).as_nanos();
        while !done(&self.sim) {
            if self.sim.now().as_nanos() >= limit {
                return Ok(false);
            }
            self.run_checked(Duration::from_millis(100))?;
        }
        Ok(true)
    }

    fn body(&mut self, duration: Duration) -> Result<(), Failure> {
        let keys: Vec<String> = (0..KV_KEYS).map(|i| format!("k{i}")).collect();
        let until = self.sim.now() + duration;
        let work = Work::PutLoop { keys, until };
        let workers = self.add_clients(&vec![work; KV_CLIENTS]);
        self.sim
            .start_nemesis(NemesisConfig::new(self.servers.clone()));
        self.run_checked(duration)?;
        self.sim.heal_all();
        if !self.run_until(SETTLE_LIMIT, |sim| all_finished(sim, &workers))? {
            return Err(self.sim.failure("clients did not finish after healing"));
        }
        client_violation(&self.sim, &self.clients)?;
        // Progress resumed: a fresh client's put is acknowledged.
        let final_put = KvOp::Put {
            key: b"final".to_vec(),
            value: b"1".to_vec(),
            expected: Expected::Any,
        };
        let writer = self.add_clients(&[Work::Script(vec![final_put])]);
        if !self.run_until(SETTLE_LIMIT, |sim| all_finished(sim, &writer))? {
            return Err(self
                .sim
                .failure("no progress after healing: the final put never finished"));
        }
        let answer = self
            .sim
            .node::<Client>(writer[0])
            .and_then(|c| c.results.first().map(|(_, o)| o.clone()));
        if !matches!(answer, Some(Outcome::Done(KvResult::Written { .. }))) {
            return Err(self.sim.failure(format!(
                "no progress after healing: the final put answered {answer:?}"
            )));
        }
        // The replicas converge on one state.
        let servers = self.servers.clone();
        let converged = self.run_until(SETTLE_LIMIT, |sim| {
            let scan = KvOp::Scan {
                start: Vec::new(),
                end: None,
                limit: u32::MAX,
            };
            let states: Vec<_> = servers
                .iter()
                .filter_map(|&id| sim.node::<RaftNode>(id).and_then(|n| n.rsm.as_ref()))
                .map(|r| r.store().read(&scan).ok())
                .collect();
            states.len() == servers.len() && states.windows(2).all(|w| w[0] == w[1])
        })?;
        if !converged {
            return Err(self.sim.failure("replicas did not converge after healing"));
        }
        let checked = check_kv_history(&self.sim, Budget::steps(KV_CHECK_STEPS))?;
        self.gave_up = checked.gave_up;
        Ok(())
    }
}
