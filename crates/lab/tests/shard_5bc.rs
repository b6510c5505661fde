//! Lab 5B and 5C of shardkv1 (SCENARIOS.md, "Lab 5 – shardkv1") in the simulator: the
//! controller stuck behind a group that is down, a controller that dies or is cut off in the
//! middle of a change and the new one that finishes it, several controllers at once, and the
//! old controller reconnected.
//!
//! The world: a controller store of 3 servers, replica groups of 3 servers, 12 shards (the
//! lab's NShards). Our configuration 0 is empty and the first Join (of group 1) makes
//! configuration 1: the lab's InitConfig (Num 1, group 1 owning every shard). "The controller
//! dies / is disconnected" is a crash of its `ControllerNode` or its isolation from every node;
//! "a new controller" is another `ControllerNode` (its own lock-holder name). Every bound of the
//! lab ("within 2 s") is in virtual time.
//!
//! After every 10 ms of virtual time (on top of Figure 3 and the shard invariant after every
//! event, [`World::run_checked`]) the [`StoreWatch`] reads every store server's state: a
//! configuration number, in the history or in the latest record, always holds the same
//! configuration (written once: a stale controller never overwrote the record); a server's
//! record never goes back to an older number as its applied index grows; each configuration is
//! the result of one submitted operation on the one before (one chain); and an operation a
//! cut-off controller left interrupted (installed, finished by another controller) is never
//! applied again when that controller comes back (it did: fixed in `shoal-shard`'s controller,
//! see `a_controller_back_after_its_change_was_finished_does_not_apply_it_again`).
//!
//! Seeds (`SHOAL_SEEDS=N` for more): 20 for TestJoinLeave5B, 16 for
//! TestPartitionControllerJoin5C, 8 for TestConcurrentReliable5C, 4 for TestRecoverCtrler5B,
//! TestAcquireLockConcurrentUnreliable5C and the unreliable partition recoveries, 3 and 2 for
//! the reliable ones (no clerks, clerks).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use shoal_check::Budget;
use shoal_kv::Outcome;
use shoal_lab::kv_client::{check_kv_history, SimId};
use shoal_lab::shard::{
    ControllerNode, CtlLog, Directory, ShardClientNode, ShardWork, StoreNode, World, WorldSpec, SM,
};
use shoal_lab::workload::KV_CHECK_STEPS;
use shoal_shard::layout::{config_key, Record, LATEST_KEY};
use shoal_shard::{apply, Config, Gid, Op};
use shoal_sim::rand::{Rng, SeedableRng};
use shoal_sim::{ChaCha8Rng, Failure, NetConfig, Sim, SimTime};
use shoal_wire::kv::{Expected, KvOp, KvResult};

/// The lab's NShards.
const SHARDS: u32 = 12;
/// Keys written at the start and read back (the lab's 60, fewer to keep runs short).
const KEYS: usize = 12;
/// How often the store watch and the test's own loops look.
const STEP: Duration = Duration::from_millis(10);
/// The lab's "within 2 s".
const TWO_SECONDS: Duration = Duration::from_secs(2);
/// How long a change that must finish may take when it has to wait for a lease to run out (the
/// controller's lease TTL is 3 s) and for restarted groups to elect leaders.
const RECOVERY_LIMIT: Duration = Duration::from_secs(15);
/// How long "must not finish" is watched.
const STUCK_WINDOW: Duration = Duration::from_secs(5);
/// The controllers' lease TTL (`ControllerConfig`'s default).
const LEASE_TTL: Duration = Duration::from_secs(3);
/// How long a paused lock holder stays paused: past its lease.
const PAUSE: Duration = Duration::from_secs(4);
/// Limit for clients and ordinary joins and leaves.
const LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The store watch

/// What the store servers held over the run (see the module's documentation).
#[derive(Default)]
struct StoreWatch {
    /// Every configuration seen, in the history or in a record, by number.
    configs: BTreeMap<u64, Config>,
    /// Configurations seen in a record marked complete.
    completed: BTreeMap<u64, Config>,
    /// Per store server: (applied index, record number) at the last look.
    last: BTreeMap<SimId, (u64, u64)>,
    /// Configurations whose place in the chain was checked.
    chained: u64,
}

impl StoreWatch {
    fn see(&mut self, num: u64, config: &Config, what: &str) -> Result<(), String> {
        if config.num != num {
            return Err(format!("{what} holds configuration {}", config.num));
        }
        match self.configs.get(&num) {
            Some(c) if c != config => Err(format!(
                "configuration {num} written twice: {c:?}, then {config:?} ({what})"
            )),
            Some(_) => Ok(()),
            None => {
                self.configs.insert(num, config.clone());
                Ok(())
            }
        }
    }

    fn check(&mut self, sim: &Sim<SM>, dir: &Directory, ops: &[Op]) -> Result<(), String> {
        for &id in dir.store_sims() {
            let Some(rsm) = sim.node::<StoreNode>(id).and_then(|n| n.rsm.as_ref()) else {
                continue;
            };
            let store = rsm.store();
            let applied = store.applied();
            let Some((bytes, _)) = store.get(LATEST_KEY) else {
                continue;
            };
            let record = Record::decode(bytes).map_err(|e| format!("{id}: the record: {e}"))?;
            let num = record.config.num;
            if let Some(&(was_applied, was_num)) = self.last.get(&id) {
                if applied >= was_applied && num < was_num {
                    return Err(format!(
                        "{id}: the record went back from configuration {was_num} to {num}"
                    ));
                }
            }
            self.last.insert(id, (applied, num));
            self.see(num, &record.config, "the record")?;
            if record.complete {
                self.completed.insert(num, record.config.clone());
            }
            for n in 0..=num {
                if let Some((bytes, _)) = store.get(&config_key(n)) {
                    let c = Config::decode(bytes)
                        .map_err(|e| format!("{id}: history entry {n}: {e}"))?;
                    self.see(n, &c, &format!("history entry {n}"))?;
                }
            }
        }
        // One chain: configuration n is one submitted operation applied to n - 1.
        while let (Some(prev), Some(next)) = (
            self.configs.get(&self.chained),
            self.configs.get(&(self.chained + 1)),
        ) {
            if !ops.iter().any(|op| apply(prev, op).as_ref() == Ok(next)) {
                return Err(format!(
                    "configuration {} is no submitted operation applied to {}: {next:?}",
                    self.chained + 1,
                    self.chained
                ));
            }
            self.chained += 1;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The lab

/// A controller node and what it did.
struct Ctl {
    id: SimId,
    log: Rc<RefCell<CtlLog>>,
}

/// A shard world with controllers, the store watch and the test's helpers.
struct Lab {
    w: World,
    ctls: Vec<Ctl>,
    next_ticket: u64,
    watch: StoreWatch,
    /// Every operation submitted to any controller.
    ops: Vec<Op>,
    rng: ChaCha8Rng,
    /// Keys written at the start, with their values.
    data: Vec<(String, String)>,
    clients: Vec<SimId>,
    /// Operations a controller left interrupted when it was cut off, with the configuration
    /// they were installed as: (controller, ticket, number, operation).
    interrupted: Vec<(usize, u64, u64, Op)>,
    /// Changes the looping controllers finished, over every round.
    loops: u64,
    /// Check that at most one controller believes it holds the lock (no partitions, no
    /// unreliable network: a cut-off holder may not know yet that its lease ran out).
    one_holder: bool,
    /// Controllers paused, or resumed less than a lease TTL ago: they may still believe they
    /// hold the lock they lost (left out of `one_holder`).
    stale_until: BTreeMap<usize, SimTime>,
}

impl Lab {
    fn new(seed: u64, gids: &[Gid], net: NetConfig) -> Lab {
        let spec = WorldSpec {
            store_servers: 3,
            gids: gids.to_vec(),
            group_size: 3,
            shards: SHARDS,
            ..WorldSpec::default()
        };
        let mut w = World::new(seed, spec);
        w.sim.set_net(net);
        Lab {
            w,
            ctls: Vec::new(),
            next_ticket: 1,
            watch: StoreWatch::default(),
            ops: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5bc),
            data: Vec::new(),
            clients: Vec::new(),
            interrupted: Vec::new(),
            loops: 0,
            one_holder: false,
            stale_until: BTreeMap::new(),
        }
    }

    fn fail(&self, why: impl Into<String>) -> Failure {
        self.w.sim.failure(why)
    }

    /// A new controller node; its index.
    fn add_controller(&mut self) -> usize {
        let log = Rc::new(RefCell::new(CtlLog::default()));
        let (dir, l) = (self.w.dir.clone(), log.clone());
        let id = self
            .w
            .sim
            .add_node(move |_| ControllerNode::new(dir.clone(), SHARDS, l.clone()));
        self.ctls.push(Ctl { id, log });
        // The node starts (and can take submissions) at its first event.
        while self.w.sim.node::<ControllerNode>(id).is_none() {
            self.w.sim.step();
        }
        self.ctls.len() - 1
    }

    fn controller(&self, c: usize) -> Option<&ControllerNode> {
        self.w.sim.node::<ControllerNode>(self.ctls[c].id)
    }

    /// Paused, or resumed less than a lease TTL ago.
    fn stale(&self, c: usize) -> bool {
        self.w.sim.is_paused(self.ctls[c].id)
            || self
                .stale_until
                .get(&c)
                .is_some_and(|&t| self.w.sim.now() < t)
    }

    fn holds_lock(&self, c: usize) -> bool {
        self.controller(c)
            .and_then(|n| n.ctl.as_ref())
            .is_some_and(|ctl| ctl.status().holds_lock)
    }

    /// Submits `op` to controller `c`; its ticket (`None`: the controller is down).
    fn submit(&mut self, c: usize, op: Op) -> Option<u64> {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.ops.push(op.clone());
        self.w
            .sim
            .call::<ControllerNode, _>(self.ctls[c].id, |n, ctx| n.submit(ctx, ticket, op))
            .ok()?;
        Some(ticket)
    }

    /// The result of `ticket` at controller `c`, once finished.
    fn result(&self, c: usize, ticket: u64) -> Option<Result<u64, String>> {
        let log = self.ctls[c].log.borrow();
        log.finished
            .iter()
            .find(|f| f.0 == ticket)
            .map(|f| f.1.clone())
    }

    /// The latest record of the store server furthest ahead.
    fn store_record(&self) -> Option<Record> {
        self.w
            .dir
            .store_sims()
            .iter()
            .filter_map(|&id| self.w.sim.node::<StoreNode>(id)?.rsm.as_ref())
            .map(|rsm| rsm.store())
            .max_by_key(|s| s.applied())
            .and_then(|s| Record::decode(s.get(LATEST_KEY)?.0).ok())
    }

    fn check(&mut self) -> Result<(), Failure> {
        let (sim, dir) = (&self.w.sim, &self.w.dir);
        self.watch
            .check(sim, dir, &self.ops)
            .map_err(|e| sim.failure(format!("the store: {e}")))?;
        for (i, c) in self.ctls.iter().enumerate() {
            if let Some(v) = &c.log.borrow().violation {
                return Err(sim.failure(format!("controller {i}: {v}")));
            }
        }
        for &c in &self.clients {
            if let Some(v) = sim
                .node::<ShardClientNode>(c)
                .and_then(|n| n.violation.clone())
            {
                return Err(sim.failure(format!("client {c}: {v}")));
            }
        }
        // An interrupted operation was applied once (as `num`, finished by another
        // controller): its controller, back, may report it but must not apply it again.
        for (c, ticket, num, op) in &self.interrupted {
            match self.result(*c, *ticket) {
                None => {}
                Some(Ok(n)) if n == *num => {}
                other => {
                    return Err(sim.failure(format!(
                        "controller {c}'s interrupted {op:?}, installed as configuration \
                         {num}, finished again: {other:?}"
                    )))
                }
            }
        }
        if self.one_holder {
            let holders: Vec<usize> = (0..self.ctls.len())
                .filter(|&c| self.holds_lock(c) && !self.stale(c))
                .collect();
            if holders.len() > 1 {
                return Err(sim.failure(format!("controllers {holders:?} all hold the lock")));
            }
        }
        Ok(())
    }

    /// Runs for `d`, every checker after every event, the store watch every [`STEP`].
    fn run(&mut self, d: Duration) -> Result<(), Failure> {
        let end = self.w.sim.now() + d;
        while self.w.sim.now() < end {
            let left = Duration::from_nanos(end.as_nanos() - self.w.sim.now().as_nanos());
            self.w.run_checked(STEP.min(left))?;
            self.check()?;
        }
        Ok(())
    }

    /// Runs until `done` holds, at most `max`; whether it held.
    fn wait(&mut self, max: Duration, done: impl Fn(&Lab) -> bool) -> Result<bool, Failure> {
        let end = self.w.sim.now() + max;
        while !done(self) {
            if self.w.sim.now() >= end {
                return Ok(false);
            }
            self.run(STEP)?;
        }
        Ok(true)
    }

    /// Runs until controller `c` finished `ticket`, at most `max`.
    fn wait_result(
        &mut self,
        c: usize,
        ticket: u64,
        max: Duration,
    ) -> Result<Option<Result<u64, String>>, Failure> {
        self.wait(max, |l| l.result(c, ticket).is_some())?;
        Ok(self.result(c, ticket))
    }

    fn join_op(&self, gid: Gid) -> Op {
        Op::Join(BTreeMap::from([(gid, self.w.dir.group_names(gid))]))
    }

    /// Submits `op` to `c` and requires it to finish within `max` with a new configuration,
    /// one past the store's latest, of which `gid` is a member exactly when `member`.
    fn change(&mut self, c: usize, op: Op, max: Duration) -> Result<u64, Failure> {
        let before = self.store_record().map_or(0, |r| r.config.num);
        let gid = match &op {
            Op::Join(g) => *g.keys().next().expect("a gid"),
            Op::Leave(g) => g[0],
            Op::Move { gid, .. } => *gid,
        };
        let member = !matches!(op, Op::Leave(_));
        let ticket = self
            .submit(c, op.clone())
            .ok_or_else(|| self.fail(format!("controller {c} is down")))?;
        match self.wait_result(c, ticket, max)? {
            Some(Ok(num)) if num == before + 1 => {}
            other => {
                return Err(self.fail(format!(
                    "{op:?} from configuration {before}: {other:?} after {max:?}"
                )))
            }
        }
        let record = self.store_record().ok_or_else(|| self.fail("no record"))?;
        if record.config.num != before + 1
            || !record.complete
            || record.config.groups.contains_key(&gid) != member
        {
            return Err(self.fail(format!("after {op:?} the store holds {record:?}")));
        }
        Ok(before + 1)
    }

    fn controller_idle(&self, c: usize) -> bool {
        self.controller(c).is_some_and(ControllerNode::is_idle)
    }

    fn crash_group(&mut self, gid: Gid) {
        for id in self.w.dir.group(gid).to_vec() {
            self.w.sim.crash(id);
        }
    }

    fn restart_group(&mut self, gid: Gid) {
        for id in self.w.dir.group(gid).to_vec() {
            self.w.sim.restart(id);
        }
    }

    /// Reconnects `id` with every node (the reverse of `Sim::isolate`, leaving other cuts).
    fn reconnect(&mut self, id: SimId) {
        for other in self.w.sim.node_ids() {
            if other != id {
                self.w.sim.connect(id, other);
                self.w.sim.connect(other, id);
            }
        }
    }

    fn add_client(&mut self, work: ShardWork) -> SimId {
        let dir = self.w.dir.clone();
        let id = self
            .w
            .sim
            .add_node(move |id| ShardClientNode::new(u64::from(id.0), dir.clone(), work.clone()));
        self.clients.push(id);
        id
    }

    /// Runs a script client to its end; its results.
    fn script(&mut self, ops: Vec<KvOp>, max: Duration) -> Result<Vec<(KvOp, Outcome)>, Failure> {
        let c = self.add_client(ShardWork::Script(ops));
        let done = |l: &Lab| {
            l.w.sim
                .node::<ShardClientNode>(c)
                .is_some_and(|n| n.finished)
        };
        if !self.wait(max, done)? {
            let at = self
                .w
                .sim
                .node::<ShardClientNode>(c)
                .map(ShardClientNode::describe);
            return Err(self.fail(format!("a client did not finish within {max:?}: {at:?}")));
        }
        Ok(self
            .w
            .sim
            .node::<ShardClientNode>(c)
            .map(|n| n.results.clone())
            .unwrap_or_default())
    }

    /// Writes the test data (the lab's keys at version 1).
    fn put_data(&mut self) -> Result<(), Failure> {
        self.data = (0..KEYS)
            .map(|i| {
                (
                    format!("k{i}"),
                    format!("value-{i}-{:08}", self.rng.gen::<u32>()),
                )
            })
            .collect();
        let ops = self
            .data
            .iter()
            .map(|(k, v)| KvOp::Put {
                key: k.clone().into_bytes(),
                value: v.clone().into_bytes(),
                expected: Expected::Version(0),
            })
            .collect();
        for (op, out) in self.script(ops, LIMIT)? {
            if !matches!(out, Outcome::Done(KvResult::Written { version: 1 })) {
                return Err(self.fail(format!("{op:?} answered {out:?}")));
            }
        }
        Ok(())
    }

    /// The lab's "Gets OK": a new client reads every key back.
    fn check_data(&mut self) -> Result<(), Failure> {
        let ops = self
            .data
            .iter()
            .map(|(k, _)| KvOp::Get {
                key: k.clone().into_bytes(),
            })
            .collect();
        let results = self.script(ops, LIMIT)?;
        for ((k, v), (_, out)) in self.data.iter().zip(&results) {
            let ok = matches!(out, Outcome::Done(KvResult::Found { value, version: 1 })
                if value == v.as_bytes());
            if !ok {
                return Err(self.fail(format!("get {k}: {out:?}, want {v:?} at version 1")));
            }
        }
        Ok(())
    }

    /// Every shard is served by exactly the owner the store's latest configuration names.
    fn check_owners(&self) -> Result<(), Failure> {
        let record = self.store_record().ok_or_else(|| self.fail("no record"))?;
        for shard in 0..SHARDS {
            let server = self.w.checks.shards.server_of(shard);
            if server != record.config.owner(shard) {
                return Err(self.fail(format!(
                    "shard {shard} is served by {server:?}, configuration {} names {:?}",
                    record.config.num,
                    record.config.owner(shard)
                )));
            }
        }
        Ok(())
    }

    /// The first controller, group 1 joined (configuration 1, the lab's InitConfig), the data
    /// written.
    fn init(&mut self) -> Result<usize, Failure> {
        let c = self.add_controller();
        let op = self.join_op(1);
        self.change(c, op, LIMIT)?;
        self.put_data()?;
        Ok(c)
    }

    /// One line on what the seed's run did.
    fn report(&self, seed: u64) {
        eprintln!(
            "seed {seed}: {} events, {} simulated, {} configurations, {} controllers, {} \
             changes looped",
            self.w.sim.events_processed(),
            self.w.sim.now(),
            self.watch.configs.len(),
            self.ctls.len(),
            self.loops
        );
    }

    /// The controller that holds the lock, is idle with nothing queued and is reachable (not
    /// isolated from the store), if one is.
    fn driver(&self) -> Option<usize> {
        (0..self.ctls.len()).find(|&c| {
            self.controller_idle(c)
                && self
                    .w
                    .dir
                    .store_sims()
                    .iter()
                    .any(|&s| self.w.sim.is_connected(self.ctls[c].id, s))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// partitionCtrler

/// The join/leave loop of partitionCtrler: the next operation on `gids` (groups other than
/// 1), from the store's latest configuration: a Leave of the one that is a member, else a Join
/// of the next in turn. The lab joins a fresh gid each time; ours cycle over two groups (a gid
/// that left joins again, as in 5A's TestJoinLeaveBasic), which keeps the world at 3 groups.
fn next_loop_op(lab: &Lab, gids: &[Gid]) -> Op {
    let latest = lab.store_record().map(|r| r.config);
    let member = |g: &Gid| latest.as_ref().is_some_and(|c| c.groups.contains_key(g));
    // Alternate: leave the member there is, else join the next one.
    match gids.iter().find(|g| member(g)) {
        Some(&g) => Op::Leave(vec![g]),
        None => {
            let pick = gids[lab.ops.len() % gids.len()];
            lab.join_op(pick)
        }
    }
}

/// One round of the lab's partitionCtrler, with `d` (an idle controller holding the lock)
/// looping joins and leaves of `gids`:
/// 1. `d` loops join/leave for 1.0–1.4 s (each one finishing, with a new configuration);
/// 2. group 1 is shut down: the change in flight (or the next one) cannot finish;
/// 3. 1 s later `d` is isolated from every node (and must not have finished it);
/// 4. (5C: a 1 s wait) group 1 is restarted;
/// 5. a new controller starts and the interrupted change is finished (by whichever controller
///    gets the lock: the new one, or in 5C an old one reconnected in an earlier round), within
///    [`RECOVERY_LIMIT`] (the old lease must run out first): the configuration one past the
///    last the loop finished is complete, the gid a member exactly when it was being joined;
///    every shard served by its owner; the data read back;
/// 6. with `reconnect`, `d` is reconnected and, for 3 s, changes nothing.
///
/// Returns the next driver: the controller then holding the lock, idle.
fn partition_ctrler(
    lab: &mut Lab,
    d: usize,
    gids: &[Gid],
    wait_before_restart: bool,
    reconnect: bool,
) -> Result<usize, Failure> {
    // 1. The loop.
    let loop_for = Duration::from_millis(lab.rng.gen_range(1_000..1_400));
    let mut before = lab.store_record().map_or(0, |r| r.config.num);
    let mut current: Option<(u64, Op)> = None;
    let mut loops = 0;
    let crash_at = lab.w.sim.now() + loop_for;
    let partition_at = crash_at + Duration::from_secs(1);
    let mut crashed = false;
    while lab.w.sim.now() < partition_at {
        if !crashed && lab.w.sim.now() >= crash_at {
            // 2. Group 1 down: the controller gets stuck in the middle of a change.
            lab.crash_group(1);
            crashed = true;
        }
        let finished = match &current {
            None => true,
            Some((t, op)) => match lab.result(d, *t) {
                None => false,
                // A change past group 1's last step may still finish after the shutdown.
                Some(Ok(num)) if num == before + 1 => {
                    before = num;
                    loops += 1;
                    true
                }
                other => {
                    return Err(lab.fail(format!(
                        "{op:?} from configuration {before} (group 1 down: {crashed}): {other:?}"
                    )))
                }
            },
        };
        if finished {
            let op = next_loop_op(lab, gids);
            let t = lab
                .submit(d, op.clone())
                .ok_or_else(|| lab.fail("the looping controller is down"))?;
            current = Some((t, op));
        }
        lab.run(STEP)?;
    }
    lab.loops += loops;
    let (ticket, op) = current.expect("an operation in flight");
    if let Some(r) = lab.result(d, ticket) {
        return Err(lab.fail(format!("{op:?} finished ({r:?}) while group 1 was down")));
    }
    // 3. The controller is cut off.
    let old = lab.ctls[d].id;
    lab.w.sim.isolate(old);
    if wait_before_restart {
        lab.run(Duration::from_secs(1))?;
    }
    // 4. Group 1 back.
    lab.restart_group(1);
    // 5. A new controller finishes the interrupted change.
    lab.add_controller();
    let want = before + 1;
    if !lab.wait(RECOVERY_LIMIT, |l| l.watch.completed.contains_key(&want))? {
        return Err(lab.fail(format!(
            "configuration {want} ({op:?}) was not completed within {RECOVERY_LIMIT:?}: the \
             store holds {:?}",
            lab.store_record()
        )));
    }
    lab.interrupted.push((d, ticket, want, op.clone()));
    let done = lab.watch.completed[&want].clone();
    let (gid, member) = match &op {
        Op::Join(g) => (*g.keys().next().expect("a gid"), true),
        Op::Leave(g) => (g[0], false),
        Op::Move { gid, .. } => (*gid, true),
    };
    if done.groups.contains_key(&gid) != member {
        return Err(lab.fail(format!(
            "the interrupted {op:?} was finished as configuration {want} = {done:?}"
        )));
    }
    if !lab.wait(RECOVERY_LIMIT, |l| l.driver().is_some())? {
        return Err(lab.fail("no controller is idle after the recovery"));
    }
    lab.check_owners()?;
    lab.check_data()?;
    // 6. The old controller reconnected changes nothing.
    if reconnect {
        let at = lab.store_record();
        lab.reconnect(old);
        lab.run(Duration::from_secs(3))?;
        let now = lab.store_record();
        if now != at {
            return Err(lab.fail(format!(
                "after the old controller was reconnected the record went from {at:?} to {now:?}"
            )));
        }
        if lab.holds_lock(d) {
            return Err(lab.fail("the old controller believes it holds the lock"));
        }
    }
    lab.driver()
        .ok_or_else(|| lab.fail("no idle controller after the round"))
}

/// The rounds of partitionCtrler over one world (`five_c`: the 1 s wait before group 1's
/// restart and the old controller reconnected); with `clerks`, 5 clients put (at the version
/// they last saw) and get one key through all the rounds (about 40 s of virtual time; the
/// lab's 60 s), each of them acknowledged puts, and their history must be linearizable under
/// the versioned-KV model (the lab's porcupine check; the checker may not give up).
fn partition_recovery(
    seed: u64,
    rounds: usize,
    net: NetConfig,
    five_c: bool,
    clerks: bool,
) -> Result<(), Failure> {
    let reliable = net.loss_probability == 0.0;
    let mut lab = Lab::new(seed, &[1, 2, 3], net);
    let mut d = lab.init()?;
    let mut workers = Vec::new();
    if clerks {
        let until = SimTime::from_nanos(u64::MAX);
        for _ in 0..5 {
            let work = ShardWork::PutLoop {
                keys: vec!["one-key".to_string()],
                until,
            };
            workers.push(lab.add_client(work));
        }
    }
    for _ in 0..rounds {
        d = partition_ctrler(&mut lab, d, &[2, 3], five_c, five_c)?;
    }
    if clerks {
        // The clerks worked through the rounds (each put answered) ...
        let puts: Vec<u64> = workers
            .iter()
            .filter_map(|&c| lab.w.sim.node::<ShardClientNode>(c))
            .map(|n| n.ok_puts)
            .collect();
        if puts.len() != workers.len() || puts.contains(&0) {
            return Err(lab.fail(format!("the clerks' acknowledged puts: {puts:?}")));
        }
        // ... then stop (an operation in flight stays open in the history, as it may or may
        // not have applied) and their history is checked.
        for &c in &workers {
            lab.w.sim.crash(c);
        }
        let checked = check_kv_history(&lab.w.sim, Budget::steps(KV_CHECK_STEPS))?;
        if let Some(why) = checked.gave_up {
            return Err(lab.fail(format!("the history check gave up: {why}")));
        }
    }
    // The loop did loop (on the unreliable network, with its long reorderings, a round may
    // finish no change before group 1 goes down, as in the lab).
    if reliable && lab.loops == 0 {
        return Err(lab.fail("the looping controllers finished no change"));
    }
    lab.report(seed);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5B

/// TestJoinLeave5B. With group 1 (the owner of every shard) down, the Join of group 2 does not
/// finish — for [`STUCK_WINDOW`] of virtual time, where the lab's window is 2 ns — and the
/// record says the change is incomplete with no moved shard served by group 2; group 1 restarted,
/// the Join finishes within 2 s with Num one higher. With group 2 down, Leave(1) does not
/// finish within 2 s (we watch [`STUCK_WINDOW`]); group 2 restarted, it finishes within 2 s.
/// The data is read back at the end.
#[test]
fn join_leave_5b() {
    shoal_sim::check_seeds!(20, |seed| {
        let mut lab = Lab::new(seed, &[1, 2], NetConfig::reliable());
        let c = lab.init()?;
        lab.crash_group(1);
        let op = lab.join_op(2);
        let t = lab.submit(c, op).ok_or_else(|| lab.fail("down"))?;
        lab.run(STUCK_WINDOW)?;
        if let Some(r) = lab.result(c, t) {
            return Err(lab.fail(format!("Join(2) finished with group 1 down: {r:?}")));
        }
        let r = lab.store_record().ok_or_else(|| lab.fail("no record"))?;
        if r.config.num != 2 || r.complete {
            return Err(lab.fail(format!("with group 1 down the store holds {r:?}")));
        }
        for m in &r.moves {
            // (Group 1, down, is not observed: its last state stays in the invariant.)
            if lab.w.checks.shards.server_of(m.shard) == Some(m.to) {
                return Err(lab.fail(format!("shard {} served by group 2 mid-move", m.shard)));
            }
        }
        lab.restart_group(1);
        match lab.wait_result(c, t, TWO_SECONDS)? {
            Some(Ok(2)) => {}
            other => {
                return Err(lab.fail(format!(
                    "Join(2) after group 1's restart: {other:?} within 2 s"
                )))
            }
        }
        lab.crash_group(2);
        let t = lab
            .submit(c, Op::Leave(vec![1]))
            .ok_or_else(|| lab.fail("down"))?;
        lab.run(STUCK_WINDOW)?;
        if let Some(r) = lab.result(c, t) {
            return Err(lab.fail(format!("Leave(1) finished with group 2 down: {r:?}")));
        }
        lab.restart_group(2);
        match lab.wait_result(c, t, TWO_SECONDS)? {
            Some(Ok(3)) => {}
            other => {
                return Err(lab.fail(format!(
                    "Leave(1) after group 2's restart: {other:?} within 2 s"
                )))
            }
        }
        let r = lab.store_record().ok_or_else(|| lab.fail("no record"))?;
        if !r.complete || r.config.groups.keys().copied().collect::<Vec<_>>() != vec![2] {
            return Err(lab.fail(format!("after Leave(1) the store holds {r:?}")));
        }
        lab.check_owners()?;
        lab.check_data()?;
        lab.report(seed);
        Ok(())
    });
}

/// TestRecoverCtrler5B: 5 rounds of partitionCtrler (see [`partition_ctrler`]), the old
/// controller isolated for good, a new controller each round.
#[test]
fn recover_ctrler_5b() {
    shoal_sim::check_seeds!(4, |seed| partition_recovery(
        seed,
        5,
        NetConfig::reliable(),
        false,
        false
    ));
}

// ---------------------------------------------------------------------------------------------
// 5C

/// TestConcurrentReliable5C / TestAcquireLockConcurrentUnreliable5C: 4 controllers at once,
/// each looping join/leave of its own gid. Ours hold the lock until they die (the lab's take
/// turns), so to make them take turns each lock holder, 2 s after it got the lock, is crashed
/// (and restarted at once, under a new name) or, every other time, paused for 4 s (past its
/// 3 s lease: it comes back believing it holds the lock, its work in flight, after another
/// took over); the run lasts 12 s rather than the lab's 2 s so that turns happen despite the
/// lease. (Making the put that marks a change complete unconditional is caught here: a
/// resumed controller sets the record back, "the record went back from configuration 84 to
/// 63", seed 5 of the reliable variant.) At most one drives: the store watch (written once, one chain) and,
/// on the reliable network, at most one controller believing it holds the lock at any look.
/// Afterwards the last change completes and every Get succeeds; changes were made (4
/// configurations, 2 on the unreliable network) and at least two controller incarnations held
/// the lock.
fn concurrent(seed: u64, net: NetConfig, reliable: bool) -> Result<(), Failure> {
    let mut lab = Lab::new(seed, &[1, 2, 3, 4, 5], net);
    lab.one_holder = reliable;
    let first = lab.init()?;
    let mut ctls = vec![first];
    for _ in 0..3 {
        ctls.push(lab.add_controller());
    }
    // Per controller (looping over gid 2 + its index): its ticket in flight. An operation
    // chosen from a record its own crashed put had not changed yet may be refused later.
    let mut tickets: Vec<Option<u64>> = vec![None; 4];
    let end = lab.w.sim.now() + Duration::from_secs(12);
    let mut next_crash = lab.w.sim.now() + TWO_SECONDS;
    // (controller, crashes so far): who held the lock, per incarnation.
    let mut turns = std::collections::BTreeSet::new();
    let mut crashes = vec![0u32; lab.ctls.len()];
    // Every other turn the holder is paused (a long GC pause) rather than crashed: it comes back
    // believing it holds the lock, with its work in flight, after another took over.
    let mut faults = 0;
    let mut paused: Option<(usize, SimTime)> = None;
    while lab.w.sim.now() < end {
        for (i, &c) in ctls.iter().enumerate() {
            let gid = 2 + i as Gid;
            let idle = match tickets[i] {
                None => true,
                Some(t) => lab.result(c, t).is_some(),
            };
            if idle {
                let member = lab
                    .store_record()
                    .is_some_and(|r| r.config.groups.contains_key(&gid));
                let op = if member {
                    Op::Leave(vec![gid])
                } else {
                    lab.join_op(gid)
                };
                tickets[i] = lab.submit(c, op);
            }
        }
        if let Some((p, at)) = paused {
            if lab.w.sim.now() >= at {
                lab.w.sim.resume(lab.ctls[p].id);
                lab.stale_until.insert(p, at + LEASE_TTL);
                paused = None;
            }
        }
        let holder = ctls
            .iter()
            .copied()
            .find(|&c| lab.holds_lock(c) && !lab.stale(c));
        if let Some(h) = holder {
            if turns.insert((h, crashes[h])) {
                // A new holder drives for 2 s before its fault.
                next_crash = lab.w.sim.now() + TWO_SECONDS;
            }
            if lab.w.sim.now() >= next_crash {
                let id = lab.ctls[h].id;
                if faults % 2 == 1 && paused.is_none() {
                    lab.w.sim.pause(id);
                    paused = Some((h, lab.w.sim.now() + PAUSE));
                } else {
                    crashes[h] += 1;
                    lab.w.sim.crash(id);
                    lab.w.sim.restart(id);
                    // Its queued work is gone with it: submit again.
                    tickets[ctls.iter().position(|&c| c == h).expect("one of them")] = None;
                }
                faults += 1;
                next_crash = lab.w.sim.now() + TWO_SECONDS;
            }
        }
        lab.run(STEP)?;
    }
    // The controllers' last changes run to completion, then the Gets.
    let done = |l: &Lab| l.store_record().is_some_and(|r| r.complete) && l.driver().is_some();
    if !lab.wait(RECOVERY_LIMIT, done)? {
        return Err(lab.fail(format!(
            "the last change did not complete: {:?}",
            lab.store_record()
        )));
    }
    // Changes were made (the unreliable network's long reorderings make them slow: fewer).
    let latest = lab.store_record().map_or(0, |r| r.config.num);
    if latest < if reliable { 4 } else { 2 } {
        return Err(lab.fail(format!("only {latest} configurations")));
    }
    if let Some(h) = lab.driver() {
        turns.insert((h, crashes[h]));
    }
    if turns.len() < 2 {
        return Err(lab.fail(format!(
            "only {turns:?} (controller, incarnation) held the lock"
        )));
    }
    lab.check_owners()?;
    lab.check_data()?;
    lab.report(seed);
    Ok(())
}

/// TestConcurrentReliable5C: [`concurrent`] on the reliable network, with at most one
/// controller believing it holds the lock at any look (two controllers sharing a lock-holder
/// name, as `ControllerNode` named them before, fail here: "controllers [0, 3] all hold the
/// lock").
#[test]
fn concurrent_reliable_5c() {
    shoal_sim::check_seeds!(8, |seed| concurrent(seed, NetConfig::reliable(), true));
}

/// TestAcquireLockConcurrentUnreliable5C: [`concurrent`] on the unreliable network (loss,
/// duplication, long reorderings).
#[test]
fn acquire_lock_concurrent_unreliable_5c() {
    shoal_sim::check_seeds!(4, |seed| concurrent(seed, NetConfig::unreliable(), false));
}

/// TestPartitionControllerJoin5C: a controller joining group 2 while group 2 is down is stuck
/// (not finished for 1 s), then isolated; 1 s later group 2 restarts; a new controller finishes
/// the join (group 2 a member, the change complete, Num one higher); the old controller,
/// reconnected, changes nothing for 5 s and the Gets succeed.
#[test]
fn partition_controller_join_5c() {
    shoal_sim::check_seeds!(16, |seed| {
        let mut lab = Lab::new(seed, &[1, 2], NetConfig::reliable());
        let a = lab.init()?;
        let before = lab.store_record().map_or(0, |r| r.config.num);
        lab.crash_group(2);
        let op = lab.join_op(2);
        let t = lab.submit(a, op).ok_or_else(|| lab.fail("down"))?;
        lab.run(Duration::from_secs(1))?;
        if let Some(r) = lab.result(a, t) {
            return Err(lab.fail(format!("Join(2) finished with group 2 down: {r:?}")));
        }
        let old = lab.ctls[a].id;
        lab.w.sim.isolate(old);
        lab.run(Duration::from_secs(1))?;
        lab.restart_group(2);
        let b = lab.add_controller();
        if !lab.wait(RECOVERY_LIMIT, |l| l.controller_idle(b))? {
            return Err(lab.fail("the new controller did not finish the join"));
        }
        let r = lab.store_record().ok_or_else(|| lab.fail("no record"))?;
        if r.config.num != before + 1 || !r.complete || !r.config.groups.contains_key(&2) {
            return Err(lab.fail(format!("after recovery the store holds {r:?}")));
        }
        lab.reconnect(old);
        lab.run(Duration::from_secs(5))?;
        let now = lab.store_record();
        if now.as_ref() != Some(&r) {
            return Err(lab.fail(format!("the old controller changed {r:?} into {now:?}")));
        }
        if !lab.controller_idle(b) || lab.controller(a).is_some_and(|n| n.is_idle()) {
            return Err(lab.fail("the old controller took over"));
        }
        lab.check_owners()?;
        lab.check_data()?;
        lab.report(seed);
        Ok(())
    });
}

/// TestPartitionRecoveryReliableNoClerk5C: partitionCtrler 5 times on a reliable network, a
/// 1 s wait before group 1's restart, the old controller reconnected after each recovery.
#[test]
fn partition_recovery_reliable_no_clerk_5c() {
    shoal_sim::check_seeds!(3, |seed| partition_recovery(
        seed,
        5,
        NetConfig::reliable(),
        true,
        false
    ));
}

/// TestPartitionRecoveryUnreliableNoClerk5C: the same, 3 rounds, on the unreliable network.
#[test]
fn partition_recovery_unreliable_no_clerk_5c() {
    shoal_sim::check_seeds!(4, |seed| partition_recovery(
        seed,
        3,
        NetConfig::unreliable(),
        true,
        false
    ));
}

/// TestPartitionRecoveryReliableClerks5C: 5 rounds with 5 clerks putting and getting one key
/// all along; their history is linearizable.
#[test]
fn partition_recovery_reliable_clerks_5c() {
    shoal_sim::check_seeds!(2, |seed| partition_recovery(
        seed,
        5,
        NetConfig::reliable(),
        true,
        true
    ));
}

/// TestPartitionRecoveryUnreliableClerks5C: 3 rounds, unreliable, with the 5 clerks.
#[test]
fn partition_recovery_unreliable_clerks_5c() {
    shoal_sim::check_seeds!(4, |seed| partition_recovery(
        seed,
        3,
        NetConfig::unreliable(),
        true,
        true
    ));
}
