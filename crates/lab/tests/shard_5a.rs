//! Lab 5A (shardkv1, SCENARIOS.md "Lab 5 – shardkv1") ported to the simulator, one test per
//! scenario, each over several seeds (`check_seeds!`: a failure prints its seed and replay
//! command; `SHOAL_SEEDS=N` / `SHOAL_SEED=S`).
//!
//! The lab's shape: 12 shards, groups of 3 servers, 60 keys "k0".."k59" holding 20-byte
//! values at version 1, gid 1 owning every shard at the start, new gids 2, 3, …, joins and
//! leaves one gid at a time 200 ms apart, each checked against the controller's latest
//! configuration (the lab's `joinGroups` / `leaveGroups`). The controller's store is a 3-server
//! Shoal KV cluster (the lab's is one kvsrv). Every event of every run is followed by Figure 3
//! on the store and on each group and by the shard invariant (`World::run_checked`).
//!
//! Ports of the lab's forms to our model:
//! - The lab's `InitConfig` makes configuration 1 owning every shard with gid 1; ours starts
//!   at configuration 0 (empty) and the first Join of group 1 makes configuration 1, the same
//!   configuration (`Lab::init`).
//! - "Shut down" a server or group = crash it in the simulator (it restarts from its disk).
//! - The lab's time bounds ("within 2 s", "in 4 s") are in **virtual** time.
//! - "Unreliable" = `NetConfig::unreliable()` (10% loss per message, delays U[0, 27) ms, so
//!   reordering) with 5% duplication (the nemesis's duplication rate), on every link.
//! - The lab's `Query()` is the configuration the controller holds as latest, and, where a
//!   scenario is about the query itself, the one a fresh routing client reads from the store.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use shoal_check::models::{KvInput, KvOutput};
use shoal_check::Budget;
use shoal_kv::Outcome;
use shoal_lab::kv_client::{check_kv_history, SimId};
use shoal_lab::shard::{ControllerNode, CtlLog, GroupNode, ShardClientNode, ShardWork, World};
use shoal_lab::shard::{WorldSpec, SM};
use shoal_lab::workload::KV_CHECK_STEPS;
use shoal_raft::Role;
use shoal_shard::{diff, shard_of, Config, Gid, Op, ShardId};
use shoal_sim::{Failure, NetConfig, Sim, NEMESIS_DUPLICATE_PROBABILITY};
use shoal_wire::kv::{Expected, KvOp, KvResult};

/// The lab's `NShards`.
const SHARDS: u32 = 12;
/// The lab's test data: keys "k0".."k59".
const NKEYS: usize = 60;
/// The lab's value size.
const VALUE_BYTES: usize = 20;
/// Group servers snapshot past this many log bytes (small, so that snapshots are taken and
/// installed in these runs as well).
const GROUP_SNAPSHOT_BYTES: u64 = 4_000;
/// How often a wait looks at the world.
const STEP: Duration = Duration::from_millis(10);
/// The lab's pause between two joins or leaves.
const CHANGE_PAUSE: Duration = Duration::from_millis(200);
/// A Join or Leave must finish within this (virtual) time on a healthy world.
const CHANGE_LIMIT: Duration = Duration::from_secs(30);
/// A batch of client operations must finish within this (virtual) time on a healthy world.
const OP_LIMIT: Duration = Duration::from_secs(20);
/// checkShutdownSharding's and ProgressShutdown's window: 2 s.
const SHUTDOWN_WINDOW: Duration = Duration::from_secs(2);

fn keys() -> Vec<String> {
    (0..NKEYS).map(|i| format!("k{i}")).collect()
}

fn shard(key: &str) -> ShardId {
    shard_of(key.as_bytes(), SHARDS)
}

fn get(key: &str) -> KvOp {
    KvOp::Get {
        key: key.as_bytes().to_vec(),
    }
}

/// A value of `len` bytes, distinct per key, seed and round.
fn value(key: &str, seed: u64, round: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{key}/{seed}/{round}/").into_bytes();
    let fill = b'a' + (seed % 26) as u8;
    v.resize(len.max(v.len()), fill);
    v.truncate(len);
    v
}

/// A test's world: the store, the groups, the controller, the clients, and what the test
/// knows each key holds.
struct Lab {
    w: World,
    seed: u64,
    ctl: SimId,
    log: Rc<RefCell<CtlLog>>,
    next_ticket: u64,
    /// Per key: the value and version last acknowledged.
    data: BTreeMap<String, (Vec<u8>, u64)>,
    clients: Vec<SimId>,
}

impl Lab {
    /// Groups 1..=`groups`, 3 servers each, 12 shards; nothing joined yet.
    fn new(seed: u64, groups: u64, group_snapshot_bytes: u64) -> Lab {
        let spec = WorldSpec {
            store_servers: 3,
            gids: (1..=groups).collect(),
            group_size: 3,
            shards: SHARDS,
            group_snapshot_bytes,
            ..WorldSpec::default()
        };
        let mut w = World::new(seed, spec);
        let log = Rc::new(RefCell::new(CtlLog::default()));
        let (dir, l) = (w.dir.clone(), log.clone());
        let ctl = w
            .sim
            .add_node(move |_| ControllerNode::new(dir.clone(), SHARDS, l.clone()));
        Lab {
            w,
            seed,
            ctl,
            log,
            next_ticket: 1,
            data: BTreeMap::new(),
            clients: Vec::new(),
        }
    }

    fn fail(&self, message: impl Into<String>) -> Failure {
        self.w.sim.failure(message)
    }

    /// The lab's unreliable network on every link, from now on.
    fn unreliable(&mut self) {
        self.w
            .sim
            .set_net(NetConfig::unreliable().with_duplication(NEMESIS_DUPLICATE_PROBABILITY));
    }

    /// The controller's latest configuration (the lab's `Query()`).
    fn latest(&self) -> Option<Config> {
        let ctl = self.w.sim.node::<ControllerNode>(self.ctl)?.ctl.as_ref()?;
        ctl.latest().map(|r| r.config.clone())
    }

    fn query(&self) -> Result<Config, Failure> {
        self.latest()
            .ok_or_else(|| self.fail("the controller holds no configuration"))
    }

    fn latest_num(&self) -> u64 {
        self.latest().map_or(0, |c| c.num)
    }

    fn check_violations(&self) -> Result<(), Failure> {
        if let Some(v) = &self.log.borrow().violation {
            return Err(self.fail(format!("controller: {v}")));
        }
        for &c in &self.clients {
            let v = self.w.sim.node::<ShardClientNode>(c);
            if let Some(v) = v.and_then(|n| n.violation.clone()) {
                return Err(self.fail(format!("client {c}: {v}")));
            }
        }
        Ok(())
    }

    /// Submits `op` to the controller; its ticket.
    fn start(&mut self, op: Op) -> Result<u64, Failure> {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let submitted = self
            .w
            .sim
            .call::<ControllerNode, _>(self.ctl, |c, ctx| c.submit(ctx, ticket, op));
        submitted.map_err(|e| self.fail(format!("the controller took no operation: {e:?}")))?;
        Ok(ticket)
    }

    fn result(&self, ticket: u64) -> Option<Result<u64, String>> {
        let log = self.log.borrow();
        log.finished
            .iter()
            .find(|f| f.0 == ticket)
            .map(|f| f.1.clone())
    }

    /// Runs until the controller finished `ticket` (the change driven at the groups and
    /// marked complete: the lab's synchronous Join/Leave), at most [`CHANGE_LIMIT`]; the new
    /// configuration's number.
    fn finish(&mut self, ticket: u64) -> Result<u64, Failure> {
        let log = self.log.clone();
        let done = move |_: &Sim<SM>| log.borrow().finished.iter().any(|f| f.0 == ticket);
        if !self.w.run_until(CHANGE_LIMIT, STEP, done)? {
            let status = self
                .w
                .sim
                .node::<ControllerNode>(self.ctl)
                .and_then(|c| c.ctl.as_ref())
                .map(|c| format!("{:?}", c.status()));
            return Err(self.fail(format!(
                "ticket {ticket} not finished within {CHANGE_LIMIT:?}: {status:?}"
            )));
        }
        self.check_violations()?;
        match self.result(ticket) {
            Some(Ok(n)) => Ok(n),
            other => Err(self.fail(format!("ticket {ticket} answered {other:?}"))),
        }
    }

    /// Joins (`member`) or leaves one gid and checks the lab's way: the number rose by one
    /// and the gid is a member exactly when it joined; then the lab's 200 ms pause.
    fn change(&mut self, gid: Gid, member: bool) -> Result<(), Failure> {
        let before = self.latest_num();
        let op = if member {
            Op::Join(BTreeMap::from([(gid, self.w.dir.group_names(gid))]))
        } else {
            Op::Leave(vec![gid])
        };
        let ticket = self.start(op)?;
        let n = self.finish(ticket)?;
        let latest = self.query()?;
        if n != before + 1 || latest.num != n || latest.groups.contains_key(&gid) != member {
            return Err(self.fail(format!(
                "{} of {gid}: configuration {before} -> {n}, latest {latest:?}",
                if member { "join" } else { "leave" }
            )));
        }
        self.w.run_checked(CHANGE_PAUSE)
    }

    /// The lab's `joinGroups`.
    fn join(&mut self, gids: &[Gid]) -> Result<(), Failure> {
        gids.iter().try_for_each(|&g| self.change(g, true))
    }

    /// The lab's `leaveGroups`.
    fn leave(&mut self, gids: &[Gid]) -> Result<(), Failure> {
        gids.iter().try_for_each(|&g| self.change(g, false))
    }

    /// The lab's `InitConfig`: configuration 1, every shard at gid 1.
    fn init(&mut self) -> Result<(), Failure> {
        // Nodes boot when the simulation first runs.
        let ctl = self.ctl;
        let up = move |sim: &Sim<SM>| sim.node::<ControllerNode>(ctl).is_some();
        if !self.w.run_until(OP_LIMIT, STEP, up)? {
            return Err(self.fail("the controller never started"));
        }
        self.join(&[1])?;
        let c = self.query()?;
        if c.num != 1 || c.shards.iter().any(|&g| g != 1) {
            return Err(self.fail(format!("the initial configuration is {c:?}")));
        }
        Ok(())
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

    fn finished(&self, id: SimId) -> bool {
        self.w
            .sim
            .node::<ShardClientNode>(id)
            .is_some_and(|n| n.finished)
    }

    fn results(&self, id: SimId) -> Vec<(KvOp, Outcome)> {
        self.w
            .sim
            .node::<ShardClientNode>(id)
            .map(|n| n.results.clone())
            .unwrap_or_default()
    }

    /// Runs until every client of `ids` finished its script, at most `limit`.
    fn wait_clients(&mut self, ids: &[SimId], limit: Duration, what: &str) -> Result<(), Failure> {
        let watched = ids.to_vec();
        let done = move |sim: &Sim<SM>| {
            watched
                .iter()
                .all(|&c| sim.node::<ShardClientNode>(c).is_some_and(|n| n.finished))
        };
        if !self.w.run_until(limit, STEP, done)? {
            let stuck: Vec<String> = ids
                .iter()
                .filter(|&&c| !self.finished(c))
                .filter_map(|&c| self.w.sim.node::<ShardClientNode>(c).map(|n| (c, n)))
                .map(|(c, n)| format!("{c} at {}", n.describe()))
                .collect();
            return Err(self.fail(format!(
                "{what}: not finished within {limit:?} (configuration {}): {}",
                self.latest_num(),
                stuck.join("; ")
            )));
        }
        self.check_violations()
    }

    /// Runs one client per script until all finished (at most `limit`); their results.
    fn run_scripts(
        &mut self,
        scripts: Vec<Vec<KvOp>>,
        limit: Duration,
        what: &str,
    ) -> Result<Vec<Vec<(KvOp, Outcome)>>, Failure> {
        let ids: Vec<SimId> = scripts
            .into_iter()
            .map(|s| self.add_client(ShardWork::Script(s)))
            .collect();
        self.wait_clients(&ids, limit, what)?;
        Ok(ids.iter().map(|&c| self.results(c)).collect())
    }

    /// Whether `outcome` of a get of `key` is what the test knows the key holds.
    fn check_read(&self, key: &str, outcome: &Outcome) -> Result<(), Failure> {
        let want = self.data.get(key);
        match (outcome, want) {
            (Outcome::Done(KvResult::Found { value, version }), Some((v, n)))
                if value == v && version == n =>
            {
                Ok(())
            }
            _ => Err(self.fail(format!(
                "get {key} answered {outcome:?}, want {:?}",
                want.map(|(v, n)| (String::from_utf8_lossy(v), n))
            ))),
        }
    }

    /// The lab's `SpreadPuts`: every key put once (version 0 → 1) with a `len`-byte value,
    /// by one clerk (round `round` of values; later rounds put at the version held).
    fn put_all(&mut self, len: usize, round: u64) -> Result<(), Failure> {
        let wanted: Vec<(String, Vec<u8>, u64)> = keys()
            .into_iter()
            .map(|k| {
                let v = value(&k, self.seed, round, len);
                let at = self.data.get(&k).map_or(0, |d| d.1);
                (k, v, at)
            })
            .collect();
        let script = wanted
            .iter()
            .map(|(k, v, at)| KvOp::Put {
                key: k.as_bytes().to_vec(),
                value: v.clone(),
                expected: Expected::Version(*at),
            })
            .collect();
        let results = self.run_scripts(vec![script], OP_LIMIT, "puts")?.remove(0);
        let mut unsure = Vec::new();
        for ((k, v, at), (_, outcome)) in wanted.into_iter().zip(results) {
            match outcome {
                Outcome::Done(KvResult::Written { version }) if version == at + 1 => {
                    self.data.insert(k, (v, version));
                }
                // A resent conditional put answered "mismatch": it may have applied.
                Outcome::Maybe => unsure.push((k, v, at + 1)),
                other => return Err(self.fail(format!("put {k} answered {other:?}"))),
            }
        }
        if unsure.is_empty() {
            return Ok(());
        }
        let script = unsure.iter().map(|(k, ..)| get(k)).collect();
        let results = self.run_scripts(vec![script], OP_LIMIT, "gets")?.remove(0);
        for ((k, v, at), (_, outcome)) in unsure.into_iter().zip(results) {
            match outcome {
                Outcome::Done(KvResult::Found { value, version })
                    if value == v && version == at =>
                {
                    self.data.insert(k, (v, version));
                }
                other => {
                    return Err(self.fail(format!(
                        "put {k} answered maybe and a get then found {other:?}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// The lab's `CheckGet` over every key, by one clerk, within [`OP_LIMIT`].
    fn check_gets(&mut self) -> Result<(), Failure> {
        let keys = keys();
        let script = keys.iter().map(|k| get(k)).collect();
        let results = self.run_scripts(vec![script], OP_LIMIT, "gets")?.remove(0);
        for (k, (_, outcome)) in keys.iter().zip(&results) {
            self.check_read(k, outcome)?;
        }
        Ok(())
    }

    fn shutdown(&mut self, gid: Gid) {
        for id in self.w.dir.group(gid).to_vec() {
            self.w.sim.crash(id);
        }
    }

    fn restart(&mut self, gid: Gid) {
        for id in self.w.dir.group(gid).to_vec() {
            self.w.sim.restart(id);
        }
    }

    /// The lab's `checkShutdownSharding(g)`: group `g` shut down, 60 concurrent gets, each
    /// from a new clerk; after 2 s fewer than 60 may have completed, each correctly. Ported
    /// stronger: exactly the gets of keys whose shard `g` does not own complete in the 2 s
    /// (the others' groups are up: shards of live groups are never paused), none of `g`'s.
    /// Then `g` restarts and the waiting gets complete, correctly.
    fn check_shutdown_sharding(&mut self, gid: Gid) -> Result<(), Failure> {
        let latest = self.query()?;
        let owned: BTreeSet<ShardId> = latest.shards_of(gid).into_iter().collect();
        if owned.is_empty() {
            return Err(self.fail(format!(
                "group {gid} owns no shard in {latest:?}: the check would prove nothing"
            )));
        }
        self.shutdown(gid);
        let keys = keys();
        let ids: Vec<SimId> = keys
            .iter()
            .map(|k| self.add_client(ShardWork::Script(vec![get(k)])))
            .collect();
        self.w.run_checked(SHUTDOWN_WINDOW)?;
        self.check_violations()?;
        let mut completed = 0;
        for (k, &id) in keys.iter().zip(&ids) {
            let down = owned.contains(&shard(k));
            match (self.finished(id), down) {
                (true, false) => {
                    completed += 1;
                    self.check_read(k, &self.results(id)[0].1)?;
                }
                (true, true) => {
                    return Err(self.fail(format!(
                        "get {k} completed while its shard's group {gid} is down: {:?}",
                        self.results(id)
                    )))
                }
                (false, false) => {
                    return Err(self.fail(format!(
                        "get {k} (shard {}, group {:?} up) did not complete within {:?}",
                        shard(k),
                        latest.owner(shard(k)),
                        SHUTDOWN_WINDOW
                    )))
                }
                (false, true) => {}
            }
        }
        if completed >= NKEYS {
            return Err(self.fail("every get completed with a group down"));
        }
        self.restart(gid);
        self.wait_clients(&ids, OP_LIMIT, "gets after the restart")?;
        for (k, &id) in keys.iter().zip(&ids) {
            self.check_read(k, &self.results(id)[0].1)?;
        }
        Ok(())
    }

    /// The up server of `gid` that leads (highest term).
    fn leader_of(&self, gid: Gid) -> Option<SimId> {
        self.w
            .dir
            .group(gid)
            .iter()
            .filter(|&&id| self.w.sim.is_up(id))
            .filter_map(|&id| {
                let host = self.w.sim.node::<GroupNode>(id)?.host.as_ref()?;
                let st = host.raw().status();
                (st.role == Role::Leader).then_some((st.term, id))
            })
            .max()
            .map(|(_, id)| id)
    }

    /// The largest on-disk snapshot among `gid`'s servers (the lab's `SnapshotSize()`), and
    /// the largest state a snapshot taken now would hold ([`GroupNode::state_bytes`]).
    fn snapshot_bytes(&self, gid: Gid) -> (u64, u64) {
        let mut disk = 0;
        let mut state = 0;
        for &id in self.w.dir.group(gid) {
            let file = self.w.sim.disk(id).and_then(|d| {
                [
                    shoal_storage::SNAPSHOT_FILE,
                    shoal_storage::LEGACY_SNAPSHOT_FILE,
                ]
                .iter()
                .find_map(|f| d.len(f).ok())
            });
            disk = disk.max(file.unwrap_or(0));
            let node = self.w.sim.node::<GroupNode>(id);
            state = state.max(node.and_then(GroupNode::state_bytes).unwrap_or(0));
        }
        (disk, state)
    }

    /// Waits until every server of every group has applied its leader's commit (so that the
    /// sizes compared are of caught-up replicas).
    fn settle(&mut self) -> Result<(), Failure> {
        self.w.run_checked(Duration::from_secs(1))
    }
}

/// The lab's setup used by most scenarios: `groups` groups built, configuration 1 (group 1
/// owns every shard), the 60 keys put with 20-byte values.
fn lab(seed: u64, groups: u64) -> Result<Lab, Failure> {
    let mut lab = Lab::new(seed, groups, GROUP_SNAPSHOT_BYTES);
    lab.init()?;
    lab.put_all(VALUE_BYTES, 1)?;
    Ok(lab)
}

// ---------------------------------------------------------------------------------------------
// The scenarios

/// TestInitQuery5A: after the initial configuration, `Query()` gives number 1 with shard 0
/// (every shard) at gid 1, balanced (max ≤ min + 1: one group, all 12). The query is asked
/// twice: the controller's latest, and a fresh routing client's read of the store (whose
/// configuration must be the same, byte for byte).
#[test]
fn init_query_gives_configuration_one_with_every_shard_at_group_one() {
    shoal_sim::check_seeds!(20, |seed| {
        let mut lab = Lab::new(seed, 1, GROUP_SNAPSHOT_BYTES);
        lab.init()?;
        let c = lab.query()?;
        let counts = c.counts();
        let balanced = counts.values().max() <= Some(&(counts.values().min().unwrap_or(&0) + 1));
        if c.num != 1 || c.shards[0] != 1 || counts.get(&1) != Some(&SHARDS) || !balanced {
            return Err(lab.fail(format!("configuration {c:?}")));
        }
        let reader = lab.add_client(ShardWork::Script(vec![get("k0")]));
        lab.wait_clients(&[reader], OP_LIMIT, "the query")?;
        let seen = lab
            .w
            .sim
            .node::<ShardClientNode>(reader)
            .and_then(|n| n.config().cloned());
        if seen.as_ref() != Some(&c) {
            return Err(lab.fail(format!(
                "a client read {seen:?}, the controller holds {c:?}"
            )));
        }
        // A key never put is missing.
        match &lab.results(reader)[0].1 {
            Outcome::Done(KvResult::NoKey) => Ok(()),
            other => Err(lab.fail(format!("get of a fresh key answered {other:?}"))),
        }
    });
}

/// TestStaticOneShardGroup5A: puts and gets on one group; then its Raft leader is shut down
/// (crashed) and every get must still succeed, with the right values, within [`OP_LIMIT`].
#[test]
fn static_one_shard_group_serves_gets_after_its_leader_is_shut_down() {
    shoal_sim::check_seeds!(20, |seed| {
        let mut lab = lab(seed, 1)?;
        lab.check_gets()?;
        let leader = lab
            .leader_of(1)
            .ok_or_else(|| lab.fail("group 1 has no leader"))?;
        lab.w.sim.crash(leader);
        lab.check_gets()?;
        if lab.leader_of(1).is_none_or(|l| l == leader) {
            return Err(lab.fail("no new leader served the gets"));
        }
        Ok(())
    });
}

/// TestJoinBasic5A: group 2 joins: the number rises by one and 2 is a member (checked by
/// `Lab::change`); the data moved with its shards (gets); then checkShutdownSharding on
/// group 1 and on group 2, gets after each.
#[test]
fn join_basic_moves_shards_and_both_groups_serve_their_own() {
    shoal_sim::check_seeds!(10, |seed| {
        let mut lab = lab(seed, 2)?;
        lab.join(&[2])?;
        let c = lab.query()?;
        if c.shards_of(2).len() != SHARDS as usize / 2 {
            return Err(lab.fail(format!("group 2 got {:?}", c.shards_of(2))));
        }
        lab.check_gets()?;
        lab.check_shutdown_sharding(1)?;
        lab.check_gets()?;
        lab.check_shutdown_sharding(2)?;
        lab.check_gets()
    });
}

/// TestDeleteBasic5A (maxraftstate 10 000, 1000-byte values): after group 2 joins, the
/// snapshots of groups 1 and 2 together hold at most group 1's snapshot before the join plus
/// 10 000 bytes: group 1 deleted the shards it gave away. The lab pushes gets through Raft so
/// that every peer snapshots again; our reads take no log entry (read-index), so each of the
/// 5 rounds gets every key and then puts it again at the same size (the state keeps its size,
/// the log grows and every server snapshots). Measured both ways: the on-disk snapshot file
/// (the lab's `SnapshotSize`, largest of the group's servers) and the bytes a snapshot taken
/// now would hold (`GroupNode::state_bytes`); both must keep the bound, and group 1's state
/// before must hold the data (the bound is not vacuous).
#[test]
fn delete_basic_frees_the_shards_a_group_gave_away() {
    const BIG_VALUE: usize = 1_000;
    const MAXRAFTSTATE: u64 = 10_000;
    const SLACK: u64 = 10_000;
    shoal_sim::check_seeds!(10, |seed| {
        let mut lab = Lab::new(seed, 2, MAXRAFTSTATE);
        lab.init()?;
        lab.put_all(BIG_VALUE, 1)?;
        lab.settle()?;
        let (disk1, state1) = lab.snapshot_bytes(1);
        let data = (NKEYS * BIG_VALUE) as u64;
        if state1 < data || disk1 < data / 2 {
            return Err(lab.fail(format!(
                "group 1 before the join: snapshot {disk1} bytes, state {state1}: the data \
                 ({data} bytes) is not there"
            )));
        }
        lab.join(&[2])?;
        for round in 2..7 {
            lab.check_gets()?;
            lab.put_all(BIG_VALUE, round)?;
        }
        lab.check_gets()?;
        lab.settle()?;
        let ((d1, s1), (d2, s2)) = (lab.snapshot_bytes(1), lab.snapshot_bytes(2));
        eprintln!(
            "seed {seed}: before {disk1} on disk / {state1} state; after {d1} + {d2} on disk, \
             {s1} + {s2} state"
        );
        if d1 + d2 > disk1 + SLACK || s1 + s2 > state1 + SLACK {
            return Err(lab.fail(format!(
                "snapshots after the join: {d1} + {d2} bytes on disk (state {s1} + {s2}), \
                 before: {disk1} (state {state1}); the bound is before + {SLACK}"
            )));
        }
        Ok(())
    });
}

/// TestJoinLeaveBasic5A: join 2, leave 1, shut group 1 down: gets (group 2 holds every
/// shard); restart group 1 and rejoin it: gets; checkShutdownSharding on group 2.
#[test]
fn join_leave_basic_moves_everything_away_and_back() {
    shoal_sim::check_seeds!(10, |seed| {
        let mut lab = lab(seed, 2)?;
        lab.join(&[2])?;
        lab.leave(&[1])?;
        if lab.query()?.shards.iter().any(|&g| g != 2) {
            return Err(lab.fail(format!("after leave 1: {:?}", lab.query()?)));
        }
        lab.shutdown(1);
        lab.check_gets()?;
        lab.restart(1);
        lab.join(&[1])?;
        lab.check_gets()?;
        lab.check_shutdown_sharding(2)?;
        lab.check_gets()
    });
}

/// TestManyJoinLeave{Reliable,Unreliable}5A: 8 groups join one at a time, checkShutdownSharding
/// on one of them, all 8 leave, gets (every shard back at group 1).
fn many_join_leave(seed: u64, unreliable: bool) -> Result<(), Failure> {
    let mut lab = Lab::new(seed, 9, GROUP_SNAPSHOT_BYTES);
    if unreliable {
        lab.unreliable();
    }
    lab.init()?;
    lab.put_all(VALUE_BYTES, 1)?;
    let gids: Vec<Gid> = (2..=9).collect();
    lab.join(&gids)?;
    lab.check_gets()?;
    lab.check_shutdown_sharding(gids[seed as usize % gids.len()])?;
    lab.leave(&gids)?;
    if lab.query()?.shards.iter().any(|&g| g != 1) {
        return Err(lab.fail(format!("after every leave: {:?}", lab.query()?)));
    }
    lab.check_gets()
}

/// TestManyJoinLeaveReliable5A.
#[test]
fn many_join_leave_reliable() {
    shoal_sim::check_seeds!(6, |seed| many_join_leave(seed, false));
}

/// TestManyJoinLeaveUnreliable5A (lossy, duplicating, reordering network throughout).
#[test]
fn many_join_leave_unreliable() {
    shoal_sim::check_seeds!(4, |seed| many_join_leave(seed, true));
}

/// TestShutdown5A: groups 2 and 3 join, then gids 1–3 are all shut down and restarted (from
/// their disks): every get answers the value put.
#[test]
fn shutdown_of_every_group_and_restart_keeps_the_data() {
    shoal_sim::check_seeds!(10, |seed| {
        let mut lab = lab(seed, 3)?;
        lab.join(&[2, 3])?;
        for gid in 1..=3 {
            lab.shutdown(gid);
        }
        lab.w.run_checked(Duration::from_millis(500))?;
        for gid in 1..=3 {
            lab.restart(gid);
        }
        lab.check_gets()
    });
}

/// TestProgressShutdown5A: 4 groups join, 2 of them are shut down: the gets of keys on the
/// live groups, each from a new clerk, all concurrently, finish within 2 s (virtual), with
/// the right values.
#[test]
fn progress_shutdown_gets_on_live_groups_finish_within_two_seconds() {
    shoal_sim::check_seeds!(10, |seed| {
        let mut lab = lab(seed, 5)?;
        lab.join(&[2, 3, 4, 5])?;
        let down = [2 + seed % 4, 2 + (seed + 1) % 4];
        for g in down {
            lab.shutdown(g);
        }
        let c = lab.query()?;
        let live: Vec<String> = keys()
            .into_iter()
            .filter(|k| c.owner(shard(k)).is_some_and(|g| !down.contains(&g)))
            .collect();
        if live.is_empty() || live.len() == NKEYS {
            return Err(lab.fail(format!("{} live keys: nothing to check", live.len())));
        }
        let ids: Vec<SimId> = live
            .iter()
            .map(|k| lab.add_client(ShardWork::Script(vec![get(k)])))
            .collect();
        lab.wait_clients(&ids, SHUTDOWN_WINDOW, "gets on live groups")?;
        for (k, &id) in live.iter().zip(&ids) {
            lab.check_read(k, &lab.results(id)[0].1)?;
        }
        Ok(())
    });
}

/// The shards a loop of Join `gid` / Leave `gid` starting from `c` ever moves (the pure
/// rebalancing rule, 8 rounds: the controller applies the same rule).
fn moving_shards(c: &Config, gid: Gid, names: Vec<String>) -> BTreeSet<ShardId> {
    let mut moving = BTreeSet::new();
    let mut c = c.clone();
    for _ in 0..8 {
        let joined = shoal_shard::join(&c, &BTreeMap::from([(gid, names.clone())])).expect("join");
        let left = shoal_shard::leave(&joined, &[gid]).expect("leave");
        for m in diff(&c, &joined)
            .expect("diff")
            .into_iter()
            .chain(diff(&joined, &left).expect("diff"))
        {
            moving.insert(m.shard);
        }
        c = left;
    }
    moving
}

/// TestProgressJoin5A: 4 groups join; then a background loop joins and leaves gid 6 (200 ms
/// apart, like the lab's) while one clerk gets keys of shards that loop never moves: at least
/// 100 gets complete within 4 s (virtual), every one correct, and the loop completed at least
/// one join and one leave meanwhile (so migrations did run). Stronger than the lab: no single
/// get takes as long as the clerk's retry timeout (the unmoved shards never pause).
#[test]
fn progress_join_gets_on_unmoved_shards_continue_during_joins_and_leaves() {
    const WINDOW: Duration = Duration::from_secs(4);
    const MIN_GETS: usize = 100;
    const MOVER: Gid = 6;
    /// Beyond the lab: no get on an unmoved shard even waits for a resend (the clerk's retry
    /// timeout); they take ~10 ms at most here.
    const MAX_GET: Duration = shoal_kv::clerk::DEFAULT_RETRY_TIMEOUT;
    shoal_sim::check_seeds!(8, |seed| {
        let mut lab = lab(seed, 6)?;
        lab.join(&[2, 3, 4, 5])?;
        let c = lab.query()?;
        let moving = moving_shards(&c, MOVER, lab.w.dir.group_names(MOVER));
        let still: Vec<String> = keys()
            .into_iter()
            .filter(|k| !moving.contains(&shard(k)))
            .collect();
        if moving.is_empty() || still.is_empty() {
            return Err(lab.fail(format!("moving shards {moving:?}: nothing to check")));
        }
        // More gets than can finish in the window: the clerk is stopped at its end.
        let script: Vec<KvOp> = still.iter().cycle().take(50_000).map(|k| get(k)).collect();
        let getter = lab.add_client(ShardWork::Script(script));
        let end = lab.w.sim.now() + WINDOW;
        let mut pending: Option<u64> = None;
        let mut next_at = lab.w.sim.now();
        let (mut joins, mut leaves) = (0, 0);
        let mut member = false;
        while lab.w.sim.now() < end {
            if let Some(t) = pending {
                if let Some(r) = lab.result(t) {
                    r.map_err(|e| lab.fail(format!("the background change failed: {e}")))?;
                    member = !member;
                    if member {
                        joins += 1;
                    } else {
                        leaves += 1;
                    }
                    pending = None;
                    next_at = lab.w.sim.now() + CHANGE_PAUSE;
                }
            }
            if pending.is_none() && lab.w.sim.now() >= next_at {
                let op = if member {
                    Op::Leave(vec![MOVER])
                } else {
                    Op::Join(BTreeMap::from([(MOVER, lab.w.dir.group_names(MOVER))]))
                };
                pending = Some(lab.start(op)?);
            }
            let left = end.as_nanos() - lab.w.sim.now().as_nanos();
            lab.w.run_checked(STEP.min(Duration::from_nanos(left)))?;
        }
        lab.check_violations()?;
        let results = lab.results(getter);
        // The longest a get of the loop took (finished or still out at the window's end).
        let ops = lab
            .w
            .sim
            .history::<KvInput, KvOutput>()
            .map_err(|e| lab.fail(format!("history: {e:?}")))?;
        let now = lab.w.sim.now();
        let slowest = ops
            .iter()
            .filter(|o| o.client == getter)
            .map(|o| o.returned_at.unwrap_or(now).as_nanos() - o.called_at.as_nanos())
            .max()
            .map(Duration::from_nanos)
            .unwrap_or_default();
        lab.w.sim.crash(getter);
        for (op, outcome) in &results {
            let KvOp::Get { key } = op else { continue };
            lab.check_read(&String::from_utf8_lossy(key), outcome)?;
        }
        eprintln!(
            "seed {seed}: {} gets in {WINDOW:?} on {} keys outside shards {moving:?}; {joins} \
             joins, {leaves} leaves, slowest get {slowest:?}",
            results.len(),
            still.len()
        );
        if results.len() < MIN_GETS || joins == 0 || leaves == 0 {
            return Err(lab.fail(format!(
                "{} gets completed in {WINDOW:?} (at least {MIN_GETS} wanted) during {joins} \
                 joins and {leaves} leaves",
                results.len()
            )));
        }
        if slowest >= MAX_GET {
            return Err(lab.fail(format!(
                "a get on an unmoved shard took {slowest:?} during the joins and leaves"
            )));
        }
        if let Some(t) = pending {
            lab.finish(t)?;
        }
        lab.check_gets()
    });
}

/// TestOne/ManyConcurrentClerk{Reliable,Unreliable}5A: `clerks` clerks run the lab's
/// OneClientPut loop (put at the last version known, then get, random keys among the 60) for
/// 20 s (virtual) while 8 groups join and then leave, one at a time; then the history of every
/// operation must be linearizable under the versioned-KV model (the lab's porcupine check), the
/// checker must reach a verdict, every clerk must have had puts acknowledged, and the joins
/// must have completed within the clerks' 20 s (the changes really ran under load).
fn concurrent_clerks(seed: u64, clerks: usize, unreliable: bool) -> Result<(), Failure> {
    const RUN: Duration = Duration::from_secs(20);
    let mut lab = Lab::new(seed, 9, GROUP_SNAPSHOT_BYTES);
    if unreliable {
        lab.unreliable();
    }
    lab.init()?;
    let until = lab.w.sim.now() + RUN;
    let ids: Vec<SimId> = (0..clerks)
        .map(|_| {
            lab.add_client(ShardWork::PutLoop {
                keys: keys(),
                until,
            })
        })
        .collect();
    let gids: Vec<Gid> = (2..=9).collect();
    lab.join(&gids)?;
    let joined_at = lab.w.sim.now();
    lab.leave(&gids)?;
    let changes_done_at = lab.w.sim.now();
    lab.wait_clients(&ids, RUN + OP_LIMIT, "the clerks")?;
    let ok_puts: Vec<u64> = ids
        .iter()
        .filter_map(|&c| lab.w.sim.node::<ShardClientNode>(c).map(|n| n.ok_puts))
        .collect();
    let checked = check_kv_history(&lab.w.sim, Budget::steps(KV_CHECK_STEPS))?;
    eprintln!(
        "seed {seed}: {} operations, puts acknowledged per clerk {ok_puts:?}, joins done at \
         {joined_at:?}, leaves at {changes_done_at:?}, checker gave up: {:?}",
        checked.ops, checked.gave_up
    );
    if let Some(why) = checked.gave_up {
        return Err(lab.fail(format!("the linearizability check gave up: {why}")));
    }
    if ok_puts.len() != clerks || ok_puts.contains(&0) {
        return Err(lab.fail(format!("puts acknowledged per clerk: {ok_puts:?}")));
    }
    // The reconfigurations ran while the clerks did: every join at least (on the unreliable
    // network the leaves may finish after the clerks' 20 s). Each move is copied while its
    // shard serves and then frozen for its tail: two rounds of moves per change, not one, so
    // on the unreliable network the eight joins may end up to half a run after the clerks
    // (seed 0: 23.8 s).
    let allowance = if unreliable { RUN / 2 } else { Duration::ZERO };
    if joined_at > until + allowance {
        return Err(lab.fail(format!(
            "the joins ran past the clerks' {RUN:?} ({joined_at:?})"
        )));
    }
    Ok(())
}

/// TestOneConcurrentClerkReliable5A.
#[test]
fn one_concurrent_clerk_reliable() {
    shoal_sim::check_seeds!(4, |seed| concurrent_clerks(seed, 1, false));
}

/// TestManyConcurrentClerkReliable5A (10 clerks).
#[test]
fn many_concurrent_clerks_reliable() {
    shoal_sim::check_seeds!(3, |seed| concurrent_clerks(seed, 10, false));
}

/// TestOneConcurrentClerkUnreliable5A.
#[test]
fn one_concurrent_clerk_unreliable() {
    shoal_sim::check_seeds!(4, |seed| concurrent_clerks(seed, 1, true));
}

/// TestManyConcurrentClerkUnreliable5A (10 clerks).
#[test]
fn many_concurrent_clerks_unreliable() {
    shoal_sim::check_seeds!(4, |seed| concurrent_clerks(seed, 10, true));
}
