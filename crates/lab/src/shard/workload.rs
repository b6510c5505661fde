//! The **shard** workload of `shoal sim --workload shard`: the sharded KV whole, under the
//! nemesis, with reconfiguration as one more fault.
//!
//! A controller store of 3 [`StoreNode`]s, 4 replica groups of 3 [`GroupNode`]s (10 shards), a
//! [`ControllerNode`] and 3 [`ShardClientNode`]s putting at the last version they know and
//! reading back on 8 keys. The run submits a first Join of groups 1 and 2, then, every 1–3 s
//! while the controller is idle, a random Join, Leave or Move drawn from the controller's
//! latest configuration. The nemesis crashes, restarts, pauses and partitions the store
//! servers, the group servers and the controller (at most 3 of them down at once) and changes
//! the network (loss, delay, reordering, duplication). After every event: Figure 3 on the
//! store and on every group, and the shard invariant ([`super::ShardInvariant`]). At the end:
//! heal; the controller finishes its change; every client finishes; each shard is served by
//! exactly the group the latest configuration names; a fresh client's put and get succeed;
//! and the clients' history is linearizable under the versioned-KV model.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use shoal_check::Budget;
use shoal_kv::Outcome;
use shoal_shard::{Gid, Op};
use shoal_sim::rand::seq::SliceRandom;
use shoal_sim::rand::{Rng, SeedableRng};
use shoal_sim::{ChaCha8Rng, Failure, NemesisConfig, Sim};
use shoal_wire::kv::{Expected, KvOp, KvResult};

use super::{ControllerNode, CtlLog, ShardClientNode, ShardWork, World, WorldSpec, SM};
use crate::kv_client::{check_kv_history, SimId};
use crate::workload::{catching, Report, Workload, KV_CHECK_STEPS, SETTLE_LIMIT};

/// shard: the groups' ids.
pub const SHARD_GIDS: [Gid; 4] = [1, 2, 3, 4];
/// shard: the cluster's shard count (the lab's).
pub const SHARD_SHARDS: u32 = 10;
/// shard: routing clients.
pub const SHARD_CLIENTS: usize = 3;
/// shard: keys the clients share.
pub const SHARD_KEYS: usize = 8;
/// shard: most nodes the nemesis holds down (crashed or paused) at once.
pub const SHARD_MAX_DOWN: usize = 3;
/// shard: pause between two reconfigurations, in ms (the next one waits for the controller
/// to be idle too).
const RECONFIG_PAUSE_MS: std::ops::Range<u64> = 300..1_500;
/// How often the run looks at the controller.
const STEP: Duration = Duration::from_millis(100);
/// The run's own random stream (reconfigurations), apart from the simulation's.
const RECONFIG_STREAM: u64 = 0x5ead_c0f1;

struct ShardRun {
    w: World,
    ctl: SimId,
    log: Rc<RefCell<CtlLog>>,
    clients: Vec<SimId>,
    rng: ChaCha8Rng,
    next_ticket: u64,
    gave_up: Option<String>,
}

/// What a shard run did besides the clients' work (for tests that assert the run exercised
/// what it claims to).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Operations submitted to the controller (over all its incarnations).
    pub submitted: u64,
    /// Of those, the ones that finished with a new configuration.
    pub applied: u64,
    /// The latest configuration's number at the end.
    pub latest: u64,
    /// Snapshots the group servers took.
    pub snapshots_taken: u64,
    /// Snapshots the group servers installed from their leader.
    pub snapshots_installed: u64,
    /// Times the shard invariant's ghosts moved.
    pub ghost_updates: u64,
}

/// The shard workload for `seed`: see the module's documentation.
pub fn run_shard(seed: u64, duration: Duration) -> Report {
    run_shard_with_stats(seed, duration).0
}

/// [`run_shard`], with what the run did besides the clients' work.
pub fn run_shard_with_stats(seed: u64, duration: Duration) -> (Report, ShardStats) {
    let stats = RefCell::new(ShardStats::default());
    let report = catching(Workload::Shard, seed, duration, || {
        let spec = WorldSpec {
            store_servers: 3,
            gids: SHARD_GIDS.to_vec(),
            group_size: 3,
            shards: SHARD_SHARDS,
            ..WorldSpec::default()
        };
        let mut w = World::new(seed, spec);
        let log = Rc::new(RefCell::new(CtlLog::default()));
        let (dir, l) = (w.dir.clone(), log.clone());
        let ctl = w
            .sim
            .add_node(move |_| ControllerNode::new(dir.clone(), SHARD_SHARDS, l.clone()));
        let mut run = ShardRun {
            w,
            ctl,
            log,
            clients: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed ^ RECONFIG_STREAM),
            next_ticket: 1,
            gave_up: None,
        };
        let outcome = run.body(duration);
        *stats.borrow_mut() = run.stats();
        let ok_puts = run
            .clients
            .iter()
            .filter_map(|&c| run.w.sim.node::<ShardClientNode>(c))
            .map(|c| c.ok_puts)
            .sum();
        Report {
            workload: Workload::Shard,
            seed,
            duration,
            faults: run.w.sim.fault_summary().clone(),
            events: run.w.sim.events_processed(),
            sim_time: run.w.sim.now(),
            ops: run.w.sim.history_len() as u64,
            committed: ok_puts,
            history_gave_up: run.gave_up.clone(),
            trace_hash: run.w.sim.trace_hash(),
            outcome,
        }
    });
    (report, stats.into_inner())
}

impl ShardRun {
    fn stats(&self) -> ShardStats {
        let log = self.log.borrow();
        let latest = self
            .controller()
            .and_then(|c| c.ctl.as_ref())
            .and_then(|c| c.latest())
            .map_or(0, |r| r.config.num);
        ShardStats {
            submitted: log.submitted.len() as u64,
            applied: log.finished.iter().filter(|f| f.1.is_ok()).count() as u64,
            latest,
            snapshots_taken: self.w.snapshots.taken.get(),
            snapshots_installed: self.w.snapshots.installed.get(),
            ghost_updates: self.w.checks.shards.updates(),
        }
    }

    fn add_clients(&mut self, work: &[ShardWork]) -> Vec<SimId> {
        let ids: Vec<SimId> = work
            .iter()
            .map(|work| {
                let (dir, work) = (self.w.dir.clone(), work.clone());
                self.w.sim.add_node(move |id| {
                    ShardClientNode::new(u64::from(id.0), dir.clone(), work.clone())
                })
            })
            .collect();
        self.clients.extend(&ids);
        ids
    }

    /// The controller's latest configuration number, if it is up and has read one.
    fn latest_num(&self) -> Option<u64> {
        let ctl = self.controller()?.ctl.as_ref()?;
        Some(ctl.latest()?.config.num)
    }

    fn controller(&self) -> Option<&ControllerNode> {
        self.w.sim.node::<ControllerNode>(self.ctl)
    }

    /// A random operation on the controller's latest configuration: a Join of a group that is
    /// not a member, a Leave of a member (never the last), or a Move of a shard to a member.
    /// The first one joins groups 1 and 2.
    fn random_op(&mut self) -> Option<Op> {
        let latest = self.controller()?.ctl.as_ref()?.latest()?.config.clone();
        let members: Vec<Gid> = latest.groups.keys().copied().collect();
        let outside: Vec<Gid> = SHARD_GIDS
            .iter()
            .copied()
            .filter(|g| !members.contains(g))
            .collect();
        let names = |gids: &[Gid]| {
            gids.iter()
                .map(|&g| (g, self.w.dir.group_names(g)))
                .collect()
        };
        if members.is_empty() {
            return Some(Op::Join(names(&SHARD_GIDS[..2])));
        }
        let mut candidates = Vec::new();
        if let Some(&gid) = outside.choose(&mut self.rng) {
            candidates.push(Op::Join(names(&[gid])));
        }
        if members.len() > 1 {
            candidates.push(Op::Leave(vec![*members.choose(&mut self.rng)?]));
        }
        candidates.push(Op::Move {
            shard: self.rng.gen_range(0..SHARD_SHARDS),
            gid: *members.choose(&mut self.rng)?,
        });
        candidates.choose(&mut self.rng).cloned()
    }

    /// Submits a random operation if the controller is up and idle; whether it did.
    fn reconfigure(&mut self) -> bool {
        if !self.controller().is_some_and(ControllerNode::is_idle) {
            return false;
        }
        let Some(op) = self.random_op() else {
            return false;
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.w
            .sim
            .call::<ControllerNode, _>(self.ctl, |c, ctx| c.submit(ctx, ticket, op))
            .is_ok()
    }

    fn check_violations(&self) -> Result<(), Failure> {
        if let Some(v) = &self.log.borrow().violation {
            return Err(self.w.sim.failure(format!("controller: {v}")));
        }
        for &c in &self.clients {
            if let Some(v) = self
                .w
                .sim
                .node::<ShardClientNode>(c)
                .and_then(|n| n.violation.clone())
            {
                return Err(self.w.sim.failure(format!("client {c}: {v}")));
            }
        }
        Ok(())
    }

    fn body(&mut self, duration: Duration) -> Result<(), Failure> {
        let keys: Vec<String> = (0..SHARD_KEYS).map(|i| format!("k{i}")).collect();
        let until = self.w.sim.now() + duration;
        let work = ShardWork::PutLoop { keys, until };
        let workers = self.add_clients(&vec![work; SHARD_CLIENTS]);
        let mut targets = self.w.dir.store_sims().to_vec();
        targets.extend(self.w.dir.group_sims());
        targets.push(self.ctl);
        let mut nemesis = NemesisConfig::new(targets);
        nemesis.max_crashed = SHARD_MAX_DOWN;
        self.w.sim.start_nemesis(nemesis);
        let end = until.as_nanos();
        let mut next_op_at = 0;
        while self.w.sim.now().as_nanos() < end {
            let now = self.w.sim.now().as_nanos();
            if now >= next_op_at && self.reconfigure() {
                let pause = self.rng.gen_range(RECONFIG_PAUSE_MS);
                next_op_at = now + pause * 1_000_000;
            }
            let left = Duration::from_nanos(end - now);
            self.w.run_checked(STEP.min(left))?;
            self.check_violations()?;
        }
        self.w.sim.heal_all();
        // A controller that spent the whole run down or cut off may not even have joined the
        // first groups: the clients need owners to finish.
        let limit = (self.w.sim.now() + SETTLE_LIMIT).as_nanos();
        while self.latest_num().is_none_or(|n| n == 0) && self.w.sim.now().as_nanos() < limit {
            self.reconfigure();
            self.w.run_checked(STEP)?;
        }
        let ctl = self.ctl;
        let idle = |sim: &Sim<SM>| {
            sim.node::<ControllerNode>(ctl)
                .is_some_and(ControllerNode::is_idle)
        };
        if !self.w.run_until(SETTLE_LIMIT, STEP, idle)? {
            let status = self
                .controller()
                .and_then(|c| c.ctl.as_ref())
                .map(|c| format!("{:?}", c.status()));
            return Err(self.w.sim.failure(format!(
                "the controller did not finish after healing: {status:?}"
            )));
        }
        let finished = |sim: &Sim<SM>| {
            workers
                .iter()
                .all(|&c| sim.node::<ShardClientNode>(c).is_some_and(|n| n.finished))
        };
        if !self.w.run_until(SETTLE_LIMIT, STEP, finished)? {
            let stuck: Vec<String> = workers
                .iter()
                .filter_map(|&c| self.w.sim.node::<ShardClientNode>(c).map(|n| (c, n)))
                .filter(|(_, n)| !n.finished)
                .map(|(c, n)| format!("{c} at {}", n.describe()))
                .collect();
            return Err(self.w.sim.failure(format!(
                "clients did not finish after healing (configuration {:?}): {}",
                self.latest_num(),
                stuck.join("; ")
            )));
        }
        self.check_violations()?;
        self.check_owners()?;
        self.final_put_get()?;
        let checked = check_kv_history(&self.w.sim, Budget::steps(KV_CHECK_STEPS))?;
        self.gave_up = checked.gave_up;
        Ok(())
    }

    /// Each shard is served by exactly the group the latest configuration names.
    fn check_owners(&self) -> Result<(), Failure> {
        let latest = self
            .controller()
            .and_then(|c| c.ctl.as_ref())
            .and_then(|c| c.latest())
            .map(|r| r.config.clone())
            .ok_or_else(|| self.w.sim.failure("the controller has no configuration"))?;
        for shard in 0..SHARD_SHARDS {
            let owner = latest.owner(shard);
            let server = self.w.checks.shards.server_of(shard);
            if server != owner {
                return Err(self.w.sim.failure(format!(
                    "after the change completed, shard {shard} is served by {server:?}, but \
                     configuration {} gives it to {owner:?}",
                    latest.num
                )));
            }
        }
        Ok(())
    }

    /// Progress resumed: a fresh client's put is acknowledged and read back.
    fn final_put_get(&mut self) -> Result<(), Failure> {
        let key = b"final".to_vec();
        let script = vec![
            KvOp::Put {
                key: key.clone(),
                value: b"1".to_vec(),
                expected: Expected::Any,
            },
            KvOp::Get { key },
        ];
        let writer = self.add_clients(&[ShardWork::Script(script)])[0];
        let done = |sim: &Sim<SM>| {
            sim.node::<ShardClientNode>(writer)
                .is_some_and(|n| n.finished)
        };
        if !self.w.run_until(SETTLE_LIMIT, STEP, done)? {
            return Err(self
                .w
                .sim
                .failure("no progress after healing: the final put and get never finished"));
        }
        let results = self
            .w
            .sim
            .node::<ShardClientNode>(writer)
            .map(|n| n.results.clone())
            .unwrap_or_default();
        let ok = matches!(
            results.as_slice(),
            [
                (_, Outcome::Done(KvResult::Written { .. })),
                (_, Outcome::Done(KvResult::Found { value, .. }))
            ] if value == b"1"
        );
        if !ok {
            return Err(self.w.sim.failure(format!(
                "no progress after healing: the final put and get answered {results:?}"
            )));
        }
        Ok(())
    }
}
