//! Leases in the simulator (KvRsm over Raft over simulated disks): a lease's keys vanish on
//! every replica when it expires; keep-alives keep it; a leader crash or partition neither
//! ends a lease before TTL after its last acknowledged renewal was sent, nor keeps it much past
//! that (the bound of `docs/kv.md`, "Leases"); a snapshot carries leases through a restart of
//! every server. The versioned-KV history of the clients running beside stays linearizable.
//! `SHOAL_SEEDS=N` runs more seeds, `SHOAL_SEED=S` replays one.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use shoal_kv::{Action, Clerk, ClerkConfig, Outcome, RsmConfig};
use shoal_raft::Role;
use shoal_sim::{check_seeds, Ctx, Failure, NetConfig, Node, Sim, SimConfig, SimTime};
use shoal_wire::kv::{Expected, KvMessage, KvOp, KvResult};

/// The lease clock's checkpoint period in these tests.
const CHECKPOINT_MS: u64 = 500;
/// The longest election timeout (randomized in [ELECTION_TICKS, 2 × ELECTION_TICKS) ticks):
/// also a new leader's floor for every lease.
const ELECTION_MAX_MS: u64 = 2 * ELECTION_TICKS as u64 * 10;
/// Timer token of the lease client's own pauses (clerk tokens never have it).
const PAUSE: u64 = 1 << 62;

/// Grants a lease, puts `key` under it, then keeps it alive every `every` until `until`.
struct LeaseClient {
    clerk: Clerk,
    ttl_ms: u64,
    key: String,
    every: Duration,
    until: SimTime,
    /// When the operation in flight was first sent.
    started: SimTime,
    current: Option<KvOp>,
    lease: Option<u64>,
    /// Send time of the latest acknowledged grant or keep-alive: the lease lives at least
    /// until this + TTL.
    renewed_at: Option<SimTime>,
    put_done: bool,
    /// A keep-alive found the lease gone.
    lost: bool,
    violation: Option<String>,
}

impl LeaseClient {
    fn new(id: u64, servers: Vec<u64>, ttl_ms: u64, key: &str, every: Duration) -> Self {
        LeaseClient {
            clerk: Clerk::new(ClerkConfig::new(id, servers)).expect("servers"),
            ttl_ms,
            key: key.into(),
            every,
            until: SimTime::ZERO,
            started: SimTime::ZERO,
            current: None,
            lease: None,
            renewed_at: None,
            put_done: false,
            lost: false,
            violation: None,
        }
    }

    fn run(&mut self, ctx: &mut Ctx<'_, M>, op: KvOp) {
        self.started = ctx.now();
        self.current = Some(op.clone());
        match self.clerk.start(op) {
            Ok(actions) => self.perform(ctx, actions),
            Err(e) => self.violation = Some(format!("clerk refused: {e}")),
        }
    }

    fn perform(&mut self, ctx: &mut Ctx<'_, M>, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { server, request } => {
                    ctx.send(server_sim(server), KvMessage::Request(request))
                }
                Action::SetTimer { after, token } => {
                    ctx.set_timer(after, token);
                }
                Action::Finished(outcome) => self.finished(ctx, outcome),
            }
        }
    }

    fn finished(&mut self, ctx: &mut Ctx<'_, M>, outcome: Outcome) {
        let Some(op) = self.current.take() else {
            return;
        };
        match (op, outcome) {
            (KvOp::LeaseGrant { .. }, Outcome::Done(KvResult::LeaseGranted { id, .. })) => {
                self.lease = Some(id);
                self.renewed_at = Some(self.started);
                let put = KvOp::PutLease {
                    key: self.key.clone().into_bytes(),
                    value: b"v".to_vec(),
                    expected: Expected::Any,
                    lease: id,
                };
                self.run(ctx, put);
            }
            (KvOp::PutLease { .. }, Outcome::Done(KvResult::Written { .. })) => {
                self.put_done = true;
                ctx.set_timer(self.every, PAUSE);
            }
            (KvOp::LeaseKeepAlive { .. }, Outcome::Done(KvResult::LeaseKept { .. })) => {
                self.renewed_at = Some(self.started);
                ctx.set_timer(self.every, PAUSE);
            }
            (KvOp::LeaseKeepAlive { .. }, Outcome::Done(KvResult::LeaseNotFound { .. })) => {
                self.lost = true;
            }
            (KvOp::LeaseKeepAlive { .. }, Outcome::Maybe) => {
                ctx.set_timer(self.every, PAUSE);
            }
            (op, other) => self.violation = Some(format!("{op:?} answered {other:?}")),
        }
    }
}

impl Node<M> for LeaseClient {
    fn on_start(&mut self, ctx: &mut Ctx<'_, M>) {
        let ttl_ms = self.ttl_ms;
        self.run(ctx, KvOp::LeaseGrant { ttl_ms });
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, M>, _from: SimId, msg: M) {
        if let KvMessage::Reply(r) = msg {
            let actions = self.clerk.on_reply(r);
            self.perform(ctx, actions);
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, M>, token: u64) {
        if token == PAUSE {
            if let (Some(id), true) = (self.lease, ctx.now() < self.until) {
                self.run(ctx, KvOp::LeaseKeepAlive { id });
            }
        } else {
            let actions = self.clerk.on_timer(token);
            self.perform(ctx, actions);
        }
    }
}

struct Cluster {
    sim: Sim<M>,
    servers: Vec<SimId>,
    /// Per server: the key seen present since its last start.
    seen: BTreeMap<SimId, bool>,
    /// Per server: when the key was first seen gone after being present.
    gone_at: BTreeMap<SimId, SimTime>,
}

impl Cluster {
    fn new(seed: u64, n: u64, snapshot_bytes: Option<u64>) -> Cluster {
        let mut sim = Sim::new(
            seed,
            SimConfig {
                net: NetConfig::reliable(),
                ..SimConfig::default()
            },
        );
        let config = RsmConfig {
            snapshot_bytes,
            tick_ms: TICK.as_millis() as u64,
            lease_checkpoint_ms: CHECKPOINT_MS,
            ..RsmConfig::default()
        };
        let servers = (0..n)
            .map(|_| sim.add_node(move |_| RaftNode::new(n, config, 1024)))
            .collect();
        Cluster {
            sim,
            servers,
            seen: BTreeMap::new(),
            gone_at: BTreeMap::new(),
        }
    }

    fn node(&self, id: SimId) -> Option<&RaftNode> {
        self.sim.node::<RaftNode>(id).filter(|n| n.rsm.is_some())
    }

    fn leader(&self) -> Option<SimId> {
        self.servers.iter().copied().find(|&id| {
            self.node(id)
                .and_then(|n| n.rsm.as_ref())
                .is_some_and(|r| r.raw().status().role == Role::Leader)
        })
    }

    fn has_key(&self, id: SimId, key: &str) -> Option<bool> {
        let rsm = self.node(id)?.rsm.as_ref()?;
        Some(rsm.store().get(key.as_bytes()).is_some())
    }

    /// Runs for `d` in steps of one tick, recording when each server saw the key go.
    fn run_watching(&mut self, d: Duration, key: &str) {
        let end = self.sim.now() + d;
        while self.sim.now() < end {
            self.sim.run_for(TICK);
            for &s in &self.servers.clone() {
                match self.has_key(s, key) {
                    None => {
                        self.seen.insert(s, false);
                    }
                    Some(true) => {
                        self.seen.insert(s, true);
                    }
                    Some(false) => {
                        if self.seen.get(&s) == Some(&true) && !self.gone_at.contains_key(&s) {
                            self.gone_at.insert(s, self.sim.now());
                        }
                    }
                }
            }
        }
    }

    fn crash(&mut self, id: SimId) {
        self.sim.crash(id);
        self.seen.insert(id, false);
    }

    fn client(&self, id: SimId) -> Result<&LeaseClient, Failure> {
        let c = self
            .sim
            .node::<LeaseClient>(id)
            .ok_or_else(|| self.sim.failure("no lease client"))?;
        if let Some(v) = &c.violation {
            return Err(self.sim.failure(v.clone()));
        }
        Ok(c)
    }

    /// No server saw the key go before TTL after the last acknowledged renewal was sent.
    fn check_not_early(&self, client: SimId, ttl_ms: u64) -> Result<SimTime, Failure> {
        let c = self.client(client)?;
        let renewed = c
            .renewed_at
            .ok_or_else(|| self.sim.failure("lease never granted"))?;
        let earliest = renewed + Duration::from_millis(ttl_ms);
        for (s, at) in &self.gone_at {
            if *at < earliest {
                return Err(self.sim.failure(format!(
                    "server {s} deleted the leased key at {at}, before {earliest} (TTL after \
                     the last acknowledged renewal, sent at {renewed})"
                )));
            }
        }
        Ok(earliest)
    }

    /// Every running server deleted the key and forgot `client`'s lease, by `latest`.
    fn check_gone_everywhere(
        &self,
        client: SimId,
        key: &str,
        latest: SimTime,
    ) -> Result<(), Failure> {
        let id = self.client(client)?.lease.ok_or("no lease")?;
        for &s in &self.servers {
            let Some(rsm) = self.node(s).and_then(|n| n.rsm.as_ref()) else {
                continue;
            };
            if rsm.store().get(key.as_bytes()).is_some() || rsm.store().lease_renewals(id).is_some()
            {
                return Err(self
                    .sim
                    .failure(format!("server {s} still has the lease's key")));
            }
            match self.gone_at.get(&s) {
                Some(at) if *at <= latest => {}
                other => {
                    return Err(self.sim.failure(format!(
                        "server {s} deleted the key at {other:?}, after {latest}"
                    )))
                }
            }
        }
        Ok(())
    }
}

fn add_lease_client(
    c: &mut Cluster,
    ttl_ms: u64,
    key: &str,
    every: Duration,
    keep_for: Duration,
) -> SimId {
    let servers: Vec<u64> = (1..=c.servers.len() as u64).collect();
    let until = c.sim.now() + keep_for;
    let key = key.to_string();
    c.sim.add_node(move |id| {
        let mut l = LeaseClient::new(u64::from(id.0), servers.clone(), ttl_ms, &key, every);
        l.until = until;
        l
    })
}

/// Versioned-KV clients beside the leases (their history is checked).
fn add_kv_clients(c: &mut Cluster, until: SimTime) -> Vec<SimId> {
    let servers: Vec<u64> = (1..=c.servers.len() as u64).collect();
    (0..2)
        .map(|_| {
            let servers = servers.clone();
            let work = Work::PutLoop {
                keys: vec!["a".into(), "b".into()],
                until,
            };
            c.sim
                .add_node(move |id| Client::new(u64::from(id.0), servers.clone(), work.clone()))
        })
        .collect()
}

fn wait_leader(c: &mut Cluster) -> Result<SimId, Failure> {
    for _ in 0..100 {
        if let Some(l) = c.leader() {
            return Ok(l);
        }
        c.sim.run_for(Duration::from_millis(50));
    }
    Err(c.sim.failure("no leader"))
}

/// Without keep-alives a lease's key vanishes on every replica once its TTL passed (not
/// before), within a tick and a commit after; with keep-alives it stays for as long as they
/// go on (well past its TTL), then goes the same way.
#[test]
fn leases_expire_on_every_replica_and_keep_alives_keep_them() {
    check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, None);
        wait_leader(&mut c)?;
        let ttl = 1_000;
        let idle = add_lease_client(&mut c, ttl, "idle", Duration::from_secs(60), Duration::ZERO);
        let kept = add_lease_client(
            &mut c,
            ttl,
            "kept",
            Duration::from_millis(300),
            Duration::from_secs(3),
        );
        let until = c.sim.now() + Duration::from_secs(4);
        let kv = add_kv_clients(&mut c, until);
        c.run_watching(Duration::from_millis(500), "idle");
        if !c.client(idle)?.put_done || !c.client(kept)?.put_done {
            return Err(c.sim.failure("leased puts not done within 500 ms"));
        }
        c.run_watching(Duration::from_secs(2), "idle");
        let earliest = c.check_not_early(idle, ttl)?;
        // A tick to notice, a commit to apply on every replica.
        c.check_gone_everywhere(idle, "idle", earliest + Duration::from_millis(200))?;
        // The kept lease outlived three TTLs.
        for &s in &c.servers {
            if c.has_key(s, "kept") != Some(true) {
                return Err(c.sim.failure(format!("server {s} lost a kept-alive key")));
            }
        }
        c.seen.clear();
        c.gone_at.clear();
        c.run_watching(Duration::from_secs(3), "kept");
        if c.client(kept)?.lost {
            return Err(c.sim.failure("a keep-alive found its lease gone"));
        }
        let earliest = c.check_not_early(kept, ttl)?;
        c.check_gone_everywhere(kept, "kept", earliest + Duration::from_millis(200))?;
        c.sim
            .run_until_true(Duration::from_secs(5), |s| all_finished(s, &kv));
        client_violation(&c.sim, &kv)?;
        check_history(&c.sim)?;
        Ok(())
    });
}

/// The leader crashes (or is cut off from the others) while a lease runs without
/// keep-alives: the key is not deleted before TTL after the grant was sent (a new leader
/// honours the remaining time), and it is deleted at most two election timeouts and the new
/// leader's floor (one more election timeout) after that.
fn failover(seed: u64, partition: bool) -> Result<(), Failure> {
    let mut c = Cluster::new(seed, 5, None);
    let old = wait_leader(&mut c)?;
    let ttl = 2_000;
    let lease = add_lease_client(&mut c, ttl, "k", Duration::from_secs(60), Duration::ZERO);
    let until = c.sim.now() + Duration::from_secs(5);
    let kv = add_kv_clients(&mut c, until);
    c.run_watching(Duration::from_millis(1_200), "k");
    if !c.client(lease)?.put_done {
        return Err(c.sim.failure("leased put not done"));
    }
    if partition {
        let rest: Vec<SimId> = c.sim.node_ids().into_iter().filter(|&n| n != old).collect();
        c.sim.partition(&[&[old], &rest]);
        // The cut-off leader never sees the expiry commit: leave it out of the checks.
        c.seen.insert(old, false);
    } else {
        c.crash(old);
    }
    let servers = c.servers.clone();
    c.servers.retain(|&s| s != old);
    c.run_watching(Duration::from_secs(4), "k");
    let earliest = c.check_not_early(lease, ttl)?;
    let slack = Duration::from_millis(3 * ELECTION_MAX_MS + 300);
    c.check_gone_everywhere(lease, "k", earliest + slack)?;
    c.servers = servers;
    if partition {
        c.sim.heal();
    } else {
        c.sim.restart(old);
    }
    c.sim
        .run_until_true(Duration::from_secs(10), |s| all_finished(s, &kv));
    c.sim.run_for(Duration::from_secs(2));
    // The old leader caught up: the key is gone there too.
    if c.has_key(old, "k") != Some(false) {
        return Err(c.sim.failure("the old leader still has the key"));
    }
    client_violation(&c.sim, &kv)?;
    check_history(&c.sim)?;
    Ok(())
}

#[test]
fn leader_crash_neither_shortens_nor_much_extends_a_lease() {
    check_seeds!(3, |seed| failover(seed, false));
}

#[test]
fn leader_partition_neither_shortens_nor_much_extends_a_lease() {
    check_seeds!(3, |seed| failover(seed, true));
}

/// With snapshots on, every server is crashed and restarted while a lease is kept alive: the
/// servers restore the lease (and its key's attachment) from their snapshot, the lease lives
/// through it, and it still expires once the keep-alives stop.
#[test]
fn leases_survive_snapshot_and_restart() {
    check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, Some(2_000));
        wait_leader(&mut c)?;
        let ttl = 3_000;
        let lease = add_lease_client(
            &mut c,
            ttl,
            "k",
            Duration::from_millis(500),
            Duration::from_secs(6),
        );
        let until = c.sim.now() + Duration::from_secs(6);
        let kv = add_kv_clients(&mut c, until);
        c.run_watching(Duration::from_secs(2), "k");
        let id = c.client(lease)?.lease.ok_or("no lease")?;
        for s in c.servers.clone() {
            c.crash(s);
        }
        c.sim.run_for(Duration::from_millis(500));
        for s in c.servers.clone() {
            c.sim.restart(s);
        }
        c.run_watching(Duration::from_millis(100), "k");
        let mut from_snapshot = false;
        for &s in &c.servers {
            let rsm = c.node(s).and_then(|n| n.rsm.as_ref()).ok_or("restarted")?;
            if rsm.store().key_lease(b"k") != Some(id) {
                return Err(c.sim.failure(format!("server {s} lost the key's lease")));
            }
            from_snapshot |= rsm.raw().status().first_index.0 > id;
        }
        if !from_snapshot {
            return Err(c
                .sim
                .failure("no server restored the lease from a snapshot"));
        }
        c.run_watching(Duration::from_secs(9), "k");
        if c.client(lease)?.lost {
            return Err(c.sim.failure("the lease was lost across the restart"));
        }
        let earliest = c.check_not_early(lease, ttl)?;
        let slack = Duration::from_millis(3 * ELECTION_MAX_MS + CHECKPOINT_MS + 300);
        c.check_gone_everywhere(lease, "k", earliest + slack)?;
        c.sim
            .run_until_true(Duration::from_secs(10), |s| all_finished(s, &kv));
        client_violation(&c.sim, &kv)?;
        check_history(&c.sim)?;
        Ok(())
    });
}

/// A client looping on a lock held under a lease of its own (`Lock::with_lease`): grant,
/// acquire, hold `hold` (no keep-alive: far shorter than the TTL), release, revoke, again
/// until `until`.
struct LeasedLocker {
    clerk: Clerk,
    ttl_ms: u64,
    hold: Duration,
    until: SimTime,
    lock: Option<shoal_kv::Lock>,
    lease: Option<u64>,
    current: Option<KvOp>,
    phase: LockerPhase,
    /// Since when it holds the lock, if it does.
    holding_since: Option<SimTime>,
    /// When it got the lock, and when it began releasing it.
    held: Vec<(SimTime, SimTime)>,
    /// Fencing versions seen, in order.
    versions: Vec<u64>,
    /// When the latest grant was first sent.
    grant_sent: SimTime,
    violation: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockerPhase {
    Granting,
    Locking,
    Holding,
    Revoking,
    Done,
}

impl LeasedLocker {
    fn start_op(&mut self, ctx: &mut Ctx<'_, M>, op: KvOp) {
        self.current = Some(op.clone());
        match self.clerk.start(op) {
            Ok(actions) => self.perform(ctx, actions),
            Err(e) => self.violation = Some(format!("clerk refused: {e}")),
        }
    }

    fn perform(&mut self, ctx: &mut Ctx<'_, M>, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { server, request } => {
                    ctx.send(server_sim(server), KvMessage::Request(request))
                }
                Action::SetTimer { after, token } => {
                    ctx.set_timer(after, token);
                }
                Action::Finished(outcome) => self.finished(ctx, outcome),
            }
        }
    }

    fn begin(&mut self, ctx: &mut Ctx<'_, M>) {
        if ctx.now() >= self.until {
            self.phase = LockerPhase::Done;
            return;
        }
        self.phase = LockerPhase::Granting;
        self.grant_sent = ctx.now();
        let ttl_ms = self.ttl_ms;
        self.start_op(ctx, KvOp::LeaseGrant { ttl_ms });
    }

    fn step(&mut self, ctx: &mut Ctx<'_, M>, step: shoal_kv::LockStep) {
        use shoal_kv::LockStep;
        match step {
            LockStep::Run(op) => self.start_op(ctx, op),
            LockStep::Wait(d) => {
                ctx.set_timer(d, PAUSE);
            }
            LockStep::Acquired => {
                self.holding_since = Some(ctx.now());
                let v = self.lock.as_ref().and_then(|l| l.version()).unwrap_or(0);
                if self.versions.last().is_some_and(|&last| v <= last) {
                    self.violation = Some(format!("fencing version went back to {v}"));
                }
                self.versions.push(v);
                self.phase = LockerPhase::Holding;
                ctx.set_timer(self.hold, PAUSE);
            }
            LockStep::Released => {
                self.phase = LockerPhase::Revoking;
                let id = self.lease.take().unwrap_or_default();
                self.start_op(ctx, KvOp::LeaseRevoke { id });
            }
            LockStep::LeaseLost => {
                // Our lease expired while we waited: start over with a new one.
                self.lease = None;
                self.lock = None;
                self.begin(ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Ctx<'_, M>, outcome: Outcome) {
        let Some(op) = self.current.take() else {
            return;
        };
        match (self.phase, op, outcome) {
            (LockerPhase::Granting, _, Outcome::Done(KvResult::LeaseGranted { id, .. })) => {
                self.lease = Some(id);
                let me = format!("c{}", self.clerk.client_id()).into_bytes();
                let mut lock = shoal_kv::Lock::with_lease(b"lock/x".to_vec(), me, id);
                let step = lock.acquire();
                self.lock = Some(lock);
                self.phase = LockerPhase::Locking;
                self.step(ctx, step);
            }
            (LockerPhase::Granting, _, _) => self.begin(ctx),
            (LockerPhase::Locking, _, outcome) => {
                let step = match self.lock.as_mut() {
                    Some(l) => l.on_outcome(outcome),
                    None => return,
                };
                self.step(ctx, step);
            }
            (LockerPhase::Revoking, _, _) => {
                self.lock = None;
                self.begin(ctx);
            }
            (phase, op, outcome) => {
                self.violation = Some(format!("{phase:?}: {op:?} answered {outcome:?}"));
            }
        }
    }
}

impl Node<M> for LeasedLocker {
    fn on_start(&mut self, ctx: &mut Ctx<'_, M>) {
        self.begin(ctx);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, M>, _from: SimId, msg: M) {
        if let KvMessage::Reply(r) = msg {
            let actions = self.clerk.on_reply(r);
            self.perform(ctx, actions);
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, M>, token: u64) {
        if token != PAUSE {
            let actions = self.clerk.on_timer(token);
            self.perform(ctx, actions);
            return;
        }
        match self.phase {
            LockerPhase::Locking => {
                let step = match self.lock.as_mut() {
                    Some(l) => l.on_wait_done(),
                    None => return,
                };
                self.step(ctx, step);
            }
            LockerPhase::Holding => {
                if let Some(since) = self.holding_since.take() {
                    self.held.push((since, ctx.now()));
                }
                self.phase = LockerPhase::Locking;
                let step = match self.lock.as_mut() {
                    Some(l) => l.release(),
                    None => return,
                };
                self.step(ctx, step);
            }
            _ => {}
        }
    }
}

/// Lockers on one leased lock (`Lock::with_lease`): never two holders, fencing versions only
/// grow; one locker is crashed while it holds the lock, and another gets the lock once the
/// dead holder's lease expired (TTL after its grant, plus a tick and a commit), not before.
#[test]
fn leased_lock_passes_on_when_its_holder_dies() {
    check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, None);
        wait_leader(&mut c)?;
        let servers: Vec<u64> = (1..=3).collect();
        let ttl_ms = 1_000;
        let until = c.sim.now() + Duration::from_secs(6);
        let lockers: Vec<SimId> = (0..3)
            .map(|_| {
                let servers = servers.clone();
                c.sim.add_node(move |id| LeasedLocker {
                    clerk: Clerk::new(ClerkConfig::new(u64::from(id.0), servers.clone()))
                        .expect("servers"),
                    ttl_ms,
                    hold: Duration::from_millis(20),
                    until,
                    lock: None,
                    lease: None,
                    current: None,
                    phase: LockerPhase::Granting,
                    holding_since: None,
                    held: Vec::new(),
                    versions: Vec::new(),
                    grant_sent: SimTime::ZERO,
                    violation: None,
                })
            })
            .collect();
        c.sim.run_for(Duration::from_secs(1));
        // Crash the first locker found holding the lock.
        let mut victim = None;
        for _ in 0..200 {
            victim = lockers.iter().copied().find(|&l| {
                c.sim
                    .node::<LeasedLocker>(l)
                    .is_some_and(|n| n.holding_since.is_some())
            });
            if victim.is_some() {
                break;
            }
            c.sim.run_for(Duration::from_millis(1));
        }
        let victim = victim.ok_or_else(|| c.sim.failure("nobody held the lock"))?;
        let crashed_at = c.sim.now();
        let mut all: Vec<(SimTime, SimTime, SimId)> = Vec::new();
        let mut victim_lease_ends = crashed_at;
        if let Some(n) = c.sim.node::<LeasedLocker>(victim) {
            victim_lease_ends = n.grant_sent + Duration::from_millis(ttl_ms);
            all.extend(n.held.iter().map(|&(a, b)| (a, b, victim)));
            let since = n.holding_since.unwrap_or(crashed_at);
            all.push((since, crashed_at, victim));
        }
        c.sim.crash(victim);
        c.sim.run_for(Duration::from_secs(6));
        let mut next_after_crash = None;
        for &l in &lockers {
            if l == victim {
                continue;
            }
            let n = c
                .sim
                .node::<LeasedLocker>(l)
                .ok_or_else(|| c.sim.failure("locker gone"))?;
            if let Some(v) = &n.violation {
                return Err(c.sim.failure(format!("locker {l}: {v}")));
            }
            all.extend(n.held.iter().map(|&(a, b)| (a, b, l)));
            let first = n.held.iter().map(|h| h.0).find(|&a| a > crashed_at);
            next_after_crash = match (next_after_crash, first) {
                (Some(x), Some(y)) => Some(std::cmp::min(x, y)),
                (x, y) => x.or(y),
            };
        }
        all.sort();
        for w in all.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(c.sim.failure(format!(
                    "two holders: {} held [{}, {}) and {} from {}",
                    w[0].2, w[0].0, w[0].1, w[1].2, w[1].0
                )));
            }
        }
        let next = next_after_crash
            .ok_or_else(|| c.sim.failure("nobody got the lock after its holder died"))?;
        if next < victim_lease_ends {
            return Err(c.sim.failure(format!(
                "the lock passed on at {next}, before the dead holder's lease could end \
                 ({victim_lease_ends})"
            )));
        }
        if all.len() < 10 {
            return Err(c
                .sim
                .failure(format!("only {} critical sections", all.len())));
        }
        // The dead holder's lease was granted before it acquired, so it expired at most TTL
        // after the crash; the lease could not have expired before the crash.
        let latest = crashed_at + Duration::from_millis(ttl_ms + 300);
        if next > latest {
            return Err(c.sim.failure(format!(
                "the lock passed on at {next}, more than TTL after its holder died at {crashed_at}"
            )));
        }
        Ok(())
    });
}
