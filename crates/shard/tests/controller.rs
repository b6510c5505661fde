//! The shard controller driven in-process against real components, no mocks: its store is a
//! single-node replicated KV server (`KvRsm`, whose lease clock expires leases; the single
//! server `SingleServer` never expires one), the groups are single-node `GroupHost`s, all over
//! in-memory disks. A deterministic pump (FIFO message queue, virtual time advanced to the next
//! timer, the store's clock ticked on the way) carries the messages.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use shoal_kv::{KvRsm, Limits, RsmConfig};
use shoal_raft::{Config as RaftConfig, NodeId};
use shoal_replica::SnapshotPolicy;
use shoal_shard::layout::{config_key, Record, LATEST_KEY, LOCK_KEY};
use shoal_shard::{
    shard_of, Config, Controller, ControllerConfig, CtlAction, CtlPhase, Gid, GroupHost, Op,
    ShardState,
};
use shoal_storage::{DurableStorage, MemDisk, StorageConfig};
use shoal_wire::kv::{Expected, KvOp, KvReply, KvRequest, KvResult};
use shoal_wire::shard::{ControlOp, ControlReply, ControlRequest, ShardReply, ShardRequest};

const SHARDS: u32 = 6;
const TTL_MS: u64 = 1_000;
const RETRY: Duration = Duration::from_millis(100);

/// The controllers' store: one replicated KV server, its own leader.
struct Store {
    rsm: KvRsm,
    disk: MemDisk,
    tick_ms: u64,
}

impl Store {
    fn new() -> Store {
        let mut disk = MemDisk::new();
        let storage = DurableStorage::open(&mut disk, 1, 1, StorageConfig::default()).unwrap();
        let raft = RaftConfig::new(NodeId(1), vec![NodeId(1)]);
        let config = RsmConfig::default();
        let mut store = Store {
            rsm: KvRsm::new(raft, storage, config).unwrap(),
            disk,
            tick_ms: config.tick_ms,
        };
        store.rsm.raw_mut().campaign();
        store.drive();
        store
    }

    fn drive(&mut self) {
        let replica = self.rsm.replica_mut();
        while let Some(u) = replica.write_ready(&mut self.disk).expect("write") {
            replica.sync(&mut self.disk).expect("sync");
            let synced = replica.on_synced(&mut self.disk, u).expect("on_synced");
            if let Some(job) = synced.snapshot {
                let prepared = job.prepare(&mut self.disk);
                replica
                    .install_snapshot(&mut self.disk, prepared)
                    .expect("install snapshot");
            }
        }
    }

    fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u64)> {
        self.rsm.store().get(key).map(|(v, ver)| (v.to_vec(), ver))
    }

    fn record(&self) -> Option<(Record, u64)> {
        self.get(LATEST_KEY)
            .map(|(v, ver)| (Record::decode(&v).expect("a record"), ver))
    }

    fn history(&self, n: u64) -> Option<Config> {
        self.get(&config_key(n))
            .map(|(v, _)| Config::decode(&v).expect("a configuration"))
    }
}

/// A server of a group (node `id` of `n`).
struct Group {
    host: GroupHost,
    disk: MemDisk,
    /// Raft messages to send.
    raft_out: Vec<shoal_raft::Message>,
    next_request: u64,
    /// Sessions opened, per shard (sessions are per shard).
    sessions: BTreeMap<u32, u64>,
}

impl Group {
    fn new(gid: Gid, id: u64, n: u64) -> Group {
        let mut disk = MemDisk::new();
        let storage = DurableStorage::open(&mut disk, gid, id, StorageConfig::default()).unwrap();
        let raft = RaftConfig::new(NodeId(id), (1..=n).map(NodeId).collect());
        let host = GroupHost::new(
            raft,
            storage,
            gid,
            SHARDS,
            Limits::default(),
            SnapshotPolicy::default(),
        )
        .unwrap();
        let mut g = Group {
            host,
            disk,
            raft_out: Vec::new(),
            next_request: 1,
            sessions: BTreeMap::new(),
        };
        if n == 1 {
            g.host.raw_mut().campaign();
            g.drive();
        }
        g
    }

    fn drive(&mut self) {
        let replica = self.host.replica_mut();
        while let Some(u) = replica.write_ready(&mut self.disk).expect("write") {
            self.raft_out.extend(u.messages.iter().cloned());
            replica.sync(&mut self.disk).expect("sync");
            let synced = replica.on_synced(&mut self.disk, u).expect("on_synced");
            self.raft_out.extend(synced.messages);
            if let Some(job) = synced.snapshot {
                let prepared = job.prepare(&mut self.disk);
                replica
                    .install_snapshot(&mut self.disk, prepared)
                    .expect("install snapshot");
            }
        }
    }

    /// One client request through `handle_request`, driven to its reply.
    fn call(&mut self, client: u64, shard: u32, op: KvOp) -> ShardReply {
        let request = self.next_request;
        self.next_request += 1;
        let config = self.host.machine().config().num;
        self.host.handle_request(
            9,
            ShardRequest {
                client,
                request,
                shard,
                config,
                op,
                serializable: false,
            },
        );
        self.drive();
        let mut replies = self.host.take_replies();
        assert_eq!(replies.len(), 1, "{replies:?}");
        replies.pop().unwrap().1
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        let shard = shard_of(key, SHARDS);
        let session = match self.sessions.get(&shard) {
            Some(&s) => s,
            None => match self.call(500, shard, KvOp::Register) {
                ShardReply::Done {
                    result: KvResult::Registered { session },
                    ..
                } => {
                    self.sessions.insert(shard, session);
                    session
                }
                other => panic!("register: {other:?}"),
            },
        };
        let op = KvOp::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            expected: Expected::Any,
        };
        match self.call(session, shard, op) {
            ShardReply::Done {
                result: KvResult::Written { .. },
                ..
            } => {}
            other => panic!("put: {other:?}"),
        }
    }

    fn get(&mut self, key: &[u8]) -> ShardReply {
        let shard = shard_of(key, SHARDS);
        self.call(501, shard, KvOp::Get { key: key.to_vec() })
    }
}

#[derive(Debug)]
enum Msg {
    /// Between the servers of a group.
    Raft {
        name: String,
        msg: shoal_raft::Message,
    },
    ToStore {
        ctl: usize,
        req: KvRequest,
    },
    FromStore {
        ctl: usize,
        reply: KvReply,
    },
    ToGroup {
        ctl: usize,
        gid: Gid,
        name: String,
        req: ControlRequest,
    },
    FromGroup {
        ctl: usize,
        gid: Gid,
        name: String,
        reply: ControlReply,
    },
}

impl Msg {
    fn ctl(&self) -> Option<usize> {
        match self {
            Msg::ToStore { ctl, .. }
            | Msg::FromStore { ctl, .. }
            | Msg::ToGroup { ctl, .. }
            | Msg::FromGroup { ctl, .. } => Some(*ctl),
            Msg::Raft { .. } => None,
        }
    }
}

struct Ctl {
    c: Controller,
    alive: bool,
    /// Cut off: its messages wait in `held`, its timers do not fire.
    paused: bool,
    held: Vec<Msg>,
    results: BTreeMap<u64, Result<u64, String>>,
}

struct World {
    now: u64,
    next_tick: u64,
    store: Store,
    groups: BTreeMap<String, (Gid, Group)>,
    ctls: Vec<Ctl>,
    queue: VecDeque<Msg>,
    timers: BTreeMap<(u64, u64), (usize, u64)>,
    seq: u64,
    /// Group servers whose requests are lost.
    muted: BTreeSet<String>,
    /// Control operations delivered to groups: (controller, gid, op).
    delivered: Vec<(usize, Gid, ControlOp)>,
    /// Requests lost to muted servers.
    lost: usize,
    /// Controllers whose store traffic is lost (both ways).
    store_cut: BTreeSet<usize>,
    /// Group requests each controller sent (delivered or lost).
    group_sends: BTreeMap<usize, usize>,
    /// Group servers cut off from everyone (Raft and controllers); their clocks stop.
    isolated: BTreeSet<String>,
    /// (controller, server) of every control request delivered.
    to_servers: Vec<(usize, String)>,
}

/// The group with three servers; the others have one.
const BIG: Gid = 9;

/// The name of the (first) server of `gid`.
fn name(gid: Gid) -> String {
    server_names(gid).remove(0)
}

/// The servers of `gid`, node 1 first: `g9a`, `g9b`, `g9c` for [`BIG`], `g<gid>` otherwise.
fn server_names(gid: Gid) -> Vec<String> {
    if gid == BIG {
        ["a", "b", "c"]
            .iter()
            .map(|n| format!("g{gid}{n}"))
            .collect()
    } else {
        vec![format!("g{gid}")]
    }
}

fn servers(gids: &[Gid]) -> BTreeMap<Gid, Vec<String>> {
    gids.iter().map(|&g| (g, server_names(g))).collect()
}

/// A key of `shard`, the `i`th one.
fn key_in(shard: u32, i: usize) -> Vec<u8> {
    (0..)
        .map(|n| format!("key{n}").into_bytes())
        .filter(|k| shard_of(k, SHARDS) == shard)
        .nth(i)
        .unwrap()
}

impl World {
    fn new(gids: &[Gid]) -> World {
        let store = Store::new();
        World {
            now: 0,
            next_tick: store.tick_ms,
            store,
            groups: gids
                .iter()
                .flat_map(|&g| {
                    let names = server_names(g);
                    let n = names.len() as u64;
                    names
                        .into_iter()
                        .zip(1..)
                        .map(move |(name, id)| (name, (g, Group::new(g, id, n))))
                })
                .collect(),
            ctls: Vec::new(),
            queue: VecDeque::new(),
            timers: BTreeMap::new(),
            seq: 0,
            muted: BTreeSet::new(),
            delivered: Vec::new(),
            lost: 0,
            store_cut: BTreeSet::new(),
            group_sends: BTreeMap::new(),
            isolated: BTreeSet::new(),
            to_servers: Vec::new(),
        }
    }

    /// The leading (reachable) server of `gid`.
    fn group(&mut self, gid: Gid) -> &mut Group {
        let leader = server_names(gid)
            .into_iter()
            .find(|n| {
                !self.isolated.contains(n)
                    && self.groups[n].1.host.raw().status().role == shoal_raft::Role::Leader
            })
            .expect("the group has a leader");
        &mut self.groups.get_mut(&leader).unwrap().1
    }

    /// Adds a controller and starts it.
    fn controller(&mut self, ctl_name: &str) -> usize {
        let i = self.ctls.len();
        let mut cfg = ControllerConfig::new(
            ctl_name.as_bytes().to_vec(),
            100 + i as u64,
            vec![1],
            SHARDS,
        );
        cfg.lease_ttl_ms = TTL_MS;
        cfg.retry_timeout = RETRY;
        cfg.max_parallel_moves = 2;
        // A few keys per chunk: moves travel in several chunks and stages.
        cfg.chunk_bytes = 16;
        let mut c = Controller::new(cfg).unwrap();
        let actions = c.start();
        self.ctls.push(Ctl {
            c,
            alive: true,
            paused: false,
            held: Vec::new(),
            results: BTreeMap::new(),
        });
        self.act(i, actions);
        i
    }

    fn act(&mut self, ctl: usize, actions: Vec<CtlAction>) {
        for a in actions {
            match a {
                CtlAction::Store { server, request } => {
                    assert_eq!(server, 1);
                    self.queue.push_back(Msg::ToStore { ctl, req: request });
                }
                CtlAction::Group {
                    gid,
                    server,
                    request,
                } => self.queue.push_back(Msg::ToGroup {
                    ctl,
                    gid,
                    name: server,
                    req: request,
                }),
                CtlAction::SetTimer { after, token } => {
                    self.seq += 1;
                    let at = self.now + after.as_millis() as u64;
                    self.timers.insert((at, self.seq), (ctl, token));
                }
                CtlAction::Finished { ticket, result } => {
                    let old = self.ctls[ctl].results.insert(ticket, result);
                    assert!(old.is_none(), "ticket {ticket} finished twice");
                }
            }
        }
    }

    fn submit(&mut self, ctl: usize, ticket: u64, op: Op) {
        let a = self.ctls[ctl].c.submit(ticket, op);
        self.act(ctl, a);
    }

    fn query(&mut self, ctl: usize, ticket: u64, num: Option<u64>) {
        let a = self.ctls[ctl].c.submit_query(ticket, num);
        self.act(ctl, a);
    }

    fn deliver(&mut self, msg: Msg) {
        let Some(ctl) = msg.ctl() else {
            if let Msg::Raft { name, msg } = msg {
                self.deliver_raft(name, msg);
            }
            return;
        };
        if !self.ctls[ctl].alive {
            return;
        }
        if self.ctls[ctl].paused {
            self.ctls[ctl].held.push(msg);
            return;
        }
        if matches!(msg, Msg::ToStore { .. } | Msg::FromStore { .. })
            && self.store_cut.contains(&ctl)
        {
            return;
        }
        if let Msg::ToGroup { .. } = msg {
            *self.group_sends.entry(ctl).or_default() += 1;
        }
        match msg {
            // Handled above.
            Msg::Raft { .. } => {}
            Msg::ToStore { ctl, req } => {
                self.store.rsm.handle_request(ctl as u64, req);
                self.store.drive();
                self.store_replies();
            }
            Msg::FromStore { ctl, reply } => {
                let a = self.ctls[ctl].c.on_store_reply(reply);
                self.act(ctl, a);
            }
            Msg::ToGroup {
                ctl,
                gid,
                name,
                req,
            } => {
                if self.muted.contains(&name) || self.isolated.contains(&name) {
                    self.lost += 1;
                    return;
                }
                self.delivered.push((ctl, gid, req.op.clone()));
                self.to_servers.push((ctl, name.clone()));
                let (_, g) = self.groups.get_mut(&name).expect("a known group server");
                g.host.handle_control(ctl as u64, req);
                self.flush_group(&name);
            }
            Msg::FromGroup {
                ctl,
                gid,
                name,
                reply,
            } => {
                let a = self.ctls[ctl].c.on_group_reply(gid, &name, reply);
                self.act(ctl, a);
            }
        }
    }

    fn deliver_raft(&mut self, name: String, msg: shoal_raft::Message) {
        let from = server_names(self.groups[&name].0)[msg.from.0 as usize - 1].clone();
        if self.isolated.contains(&name) || self.isolated.contains(&from) {
            return;
        }
        self.groups.get_mut(&name).unwrap().1.host.step(msg);
        self.flush_group(&name);
    }

    /// Drives group server `name`'s pipeline; queues its Raft messages and control replies.
    fn flush_group(&mut self, name: &str) {
        let (gid, g) = self.groups.get_mut(name).unwrap();
        let gid = *gid;
        g.drive();
        let names = server_names(gid);
        for msg in std::mem::take(&mut g.raft_out) {
            let to = names[msg.to.0 as usize - 1].clone();
            self.queue.push_back(Msg::Raft { name: to, msg });
        }
        for (to, reply) in g.host.take_control_replies() {
            self.queue.push_back(Msg::FromGroup {
                ctl: to as usize,
                gid,
                name: name.to_string(),
                reply,
            });
        }
    }

    fn store_replies(&mut self) {
        for (to, reply) in self.store.rsm.take_replies() {
            self.queue.push_back(Msg::FromStore {
                ctl: to as usize,
                reply,
            });
        }
    }

    /// Advances virtual time to `t`, ticking the store's clock (its lease expiries) on the way.
    fn advance(&mut self, t: u64) {
        while self.next_tick <= t {
            self.now = self.next_tick;
            self.store.rsm.tick();
            self.store.drive();
            self.store_replies();
            let names: Vec<String> = self.groups.keys().cloned().collect();
            for name in names {
                if !self.isolated.contains(&name) {
                    self.groups.get_mut(&name).unwrap().1.host.tick();
                    self.flush_group(&name);
                }
            }
            self.next_tick += self.store.tick_ms;
        }
        self.now = self.now.max(t);
    }

    /// One event no later than `limit`: a message, else the earliest live timer. False if none.
    fn step(&mut self, limit: u64) -> bool {
        if let Some(msg) = self.queue.pop_front() {
            self.deliver(msg);
            return true;
        }
        let ctls = &self.ctls;
        self.timers.retain(|_, (c, _)| ctls[*c].alive);
        let next = self
            .timers
            .iter()
            .find(|(_, (c, _))| !self.ctls[*c].paused)
            .map(|(&k, &v)| (k, v));
        match next {
            Some(((at, seq), (ctl, token))) if at <= limit => {
                self.timers.remove(&(at, seq));
                self.advance(at);
                let a = self.ctls[ctl].c.on_timer(token);
                self.act(ctl, a);
                true
            }
            _ => false,
        }
    }

    /// Runs until `done` holds (true) or `ms` of virtual time pass (false).
    fn run_until(&mut self, ms: u64, done: impl Fn(&World) -> bool) -> bool {
        let limit = self.now + ms;
        // Every retry waits for a timer: a long burst of messages at one instant is a hot loop.
        let mut burst = 0;
        let mut at = self.now;
        loop {
            if self.now != at {
                (at, burst) = (self.now, 0);
            }
            burst += 1;
            assert!(burst < 100_000, "a hot loop at {} ms", self.now);
            if done(self) {
                return true;
            }
            if !self.step(limit) {
                self.advance(limit);
                return done(self);
            }
        }
    }

    /// Runs everything due in the next `ms` of virtual time.
    fn run_for(&mut self, ms: u64) {
        self.run_until(ms, |_| false);
    }

    fn result(&self, ctl: usize, ticket: u64) -> Option<Result<u64, String>> {
        self.ctls[ctl].results.get(&ticket).cloned()
    }

    /// Runs until ticket `ticket` of `ctl` finishes; its result.
    fn finish(&mut self, ctl: usize, ticket: u64) -> Result<u64, String> {
        assert!(
            self.run_until(60_000, |w| w.result(ctl, ticket).is_some()),
            "ticket {ticket} did not finish: {:?}",
            self.ctls[ctl].c.status()
        );
        self.result(ctl, ticket).unwrap()
    }

    fn idle(&mut self, ctl: usize) {
        assert!(
            self.run_until(60_000, |w| w.ctls[ctl].c.status().phase == CtlPhase::Idle),
            "{:?}",
            self.ctls[ctl].c.status()
        );
    }

    /// Every shard is served by its owner in the store's latest configuration, which every
    /// group has adopted; the other groups hold nothing.
    fn assert_placed(&mut self) {
        let (record, _) = self.store.record().unwrap();
        assert!(record.complete);
        let config = record.config;
        for (name, (gid, g)) in &self.groups {
            if self.isolated.contains(name) {
                continue;
            }
            let m = g.host.machine();
            if config.groups.contains_key(gid) {
                assert_eq!(m.config(), &config, "group {gid} adopted the latest");
            }
            for s in 0..SHARDS {
                let held = m.shard(s).map(|sh| (sh.state, sh.config));
                if config.owner(s) == Some(*gid) {
                    assert_eq!(held.map(|h| h.0), Some(ShardState::Serving), "shard {s}");
                    assert!(m.serves(s), "{name} of group {gid} serves shard {s}");
                } else {
                    assert_eq!(held, None, "group {gid} still holds shard {s}");
                }
            }
        }
    }
}

/// The first controller creates configuration 0 (complete, in the history); the first join
/// makes configuration 1 with every shard at group 1, complete, adopted by the group, which
/// serves every shard from an empty store.
#[test]
fn first_join_creates_configuration_one_complete() {
    let mut w = World::new(&[1]);
    let a = w.controller("a");
    w.idle(a);
    let s = w.ctls[a].c.status();
    assert!(s.holds_lock);
    assert_eq!((s.latest, s.complete), (Some(0), true));
    assert_eq!(w.store.history(0), Some(Config::empty(SHARDS).unwrap()));
    let (lock, _) = w.store.get(LOCK_KEY).expect("the lock is held");
    assert_eq!(lock, b"a");

    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    let (record, _) = w.store.record().unwrap();
    assert_eq!(record.config.num, 1);
    assert_eq!(record.config.shards, vec![1; SHARDS as usize]);
    assert!(record.complete);
    assert_eq!(w.store.history(1), Some(record.config.clone()));
    assert_eq!(w.group(1).host.machine().config().num, 1);
    w.assert_placed();
    // The group serves a write at once.
    w.group(1).put(b"hello", b"world");
}

/// A second group's join moves half the shards with their data (written before the move,
/// read back at the new owner); its leave moves them back, writes made meanwhile included.
#[test]
fn join_moves_half_the_shards_with_data_and_leave_moves_them_back() {
    let mut w = World::new(&[1, 2]);
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    let keys: Vec<Vec<u8>> = (0..SHARDS).map(|s| key_in(s, 0)).collect();
    for k in &keys {
        w.group(1).put(k, k);
    }

    w.submit(a, 2, Op::Join(servers(&[2])));
    assert_eq!(w.finish(a, 2), Ok(2));
    let (record, _) = w.store.record().unwrap();
    assert_eq!(record.moves.len(), SHARDS as usize / 2);
    assert!(record.moves.iter().all(|m| m.from == 1 && m.to == 2));
    w.assert_placed();
    // At most `max_parallel_moves` (2) moves between their Freeze and their Delete at a time,
    // and more than one at some point.
    let mut open = BTreeSet::new();
    let mut most = 0;
    for (_, _, op) in &w.delivered {
        match op {
            ControlOp::Freeze { shard, .. } => {
                open.insert(*shard);
            }
            ControlOp::Delete { shard, .. } => {
                open.remove(shard);
            }
            _ => {}
        }
        most = most.max(open.len());
    }
    assert_eq!(most, 2);
    for k in &keys {
        let owner = record.config.owner(shard_of(k, SHARDS)).unwrap();
        match w.group(owner).get(k) {
            ShardReply::Done {
                result: KvResult::Found { value, .. },
                ..
            } => assert_eq!(&value, k),
            other => panic!("{other:?} at group {owner}"),
        }
        let other = 3 - owner;
        assert!(matches!(
            w.group(other).get(k),
            ShardReply::WrongGroup { config: 2, .. }
        ));
        // A write at the new owner, to be carried back.
        w.group(owner).put(k, b"second");
    }
    let status = w.ctls[a].c.status();
    assert_eq!(status.phase, CtlPhase::Idle);

    w.submit(a, 3, Op::Leave(vec![2]));
    assert_eq!(w.finish(a, 3), Ok(3));
    let (record, _) = w.store.record().unwrap();
    assert_eq!(record.config.shards, vec![1; SHARDS as usize]);
    w.assert_placed();
    // The leaving group adopted configuration 3 too, and holds nothing.
    assert_eq!(w.group(2).host.machine().config().num, 3);
    assert_eq!(w.group(2).host.machine().shards().count(), 0);
    for k in &keys {
        match w.group(1).get(k) {
            ShardReply::Done {
                result: KvResult::Found { value, .. },
                ..
            } => assert_eq!(value, b"second"),
            other => panic!("{other:?}"),
        }
    }
    for n in 0..=3 {
        assert_eq!(w.store.history(n).map(|c| c.num), Some(n));
    }
}

/// Refused operations finish with the model's error and write nothing; queries read the
/// history.
#[test]
fn refusals_write_nothing_and_queries_read_the_history() {
    let mut w = World::new(&[1]);
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    let before = w.store.record().unwrap();
    let refused = [
        (2, Op::Join(servers(&[1])), "already a member"),
        (3, Op::Leave(vec![1]), "last group"),
        (
            4,
            Op::Move {
                shard: SHARDS,
                gid: 1,
            },
            "unknown shard",
        ),
        (5, Op::Leave(vec![9]), "not a member"),
    ];
    for (ticket, op, why) in refused {
        w.submit(a, ticket, op);
        let err = w.finish(a, ticket).unwrap_err();
        assert!(err.contains(why), "{err}");
    }
    assert_eq!(w.store.record().unwrap(), before, "nothing written");
    assert_eq!(w.store.history(2), None);

    w.query(a, 10, None);
    assert_eq!(w.finish(a, 10), Ok(1));
    w.query(a, 11, Some(0));
    assert_eq!(w.finish(a, 11), Ok(0));
    assert_eq!(w.ctls[a].c.config(0), Some(&Config::empty(SHARDS).unwrap()));
    w.query(a, 12, Some(1));
    assert_eq!(w.finish(a, 12), Ok(1));
    assert_eq!(w.ctls[a].c.config(1), Some(&before.0.config));
    w.query(a, 13, Some(7));
    assert!(w.finish(a, 13).unwrap_err().contains("no configuration 7"));
}

/// A controller dropped after the old owner froze a shard leaves the change incomplete; a new
/// controller waits for the first one's lease to expire, then finishes that change before the
/// operation it was given.
#[test]
fn a_new_controller_finishes_an_interrupted_change_first() {
    let mut w = World::new(&[1, 2]);
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    let keys: Vec<Vec<u8>> = (0..SHARDS).map(|s| key_in(s, 1)).collect();
    for k in &keys {
        w.group(1).put(k, b"v");
    }
    w.submit(a, 2, Op::Join(servers(&[2])));
    assert!(w.run_until(10_000, |w| w
        .delivered
        .iter()
        .any(|(_, _, op)| matches!(op, ControlOp::Freeze { .. }))));
    // Let the freeze's reply reach nobody: the first controller is gone.
    w.ctls[a].alive = false;
    let killed = w.now;
    let (record, _) = w.store.record().unwrap();
    assert_eq!(record.config.num, 2);
    assert!(!record.complete);
    let frozen: Vec<u32> = w
        .group(1)
        .host
        .machine()
        .shards()
        .filter(|(_, s)| s.state == ShardState::Frozen)
        .map(|(s, _)| s)
        .collect();
    assert!(!frozen.is_empty());

    let b = w.controller("b");
    w.submit(b, 1, Op::Leave(vec![2]));
    // The first controller's lease lives on for a while: the second one waits.
    w.run_for(TTL_MS / 2);
    let s = w.ctls[b].c.status();
    assert_eq!(s.phase, CtlPhase::Locking);
    assert!(!s.holds_lock);
    assert!(!w.store.record().unwrap().0.complete);
    assert_eq!(w.store.get(LOCK_KEY).unwrap().0, b"a");

    w.idle(b);
    assert!(w.now >= killed + TTL_MS / 2);
    assert!(w.ctls[b].c.status().holds_lock);
    // Configuration 2 was finished, then the leave ran as configuration 3.
    assert_eq!(w.finish(b, 1), Ok(3));
    assert!(w
        .delivered
        .iter()
        .any(|(c, _, op)| *c == b && matches!(op, ControlOp::Install { config: 2, .. })));
    w.assert_placed();
    for k in &keys {
        match w.group(1).get(k) {
            ShardReply::Done {
                result: KvResult::Found { value, .. },
                ..
            } => assert_eq!(value, b"v"),
            other => panic!("{other:?}"),
        }
    }
}

/// Two controllers: only the lock holder drives. The holder, cut off with its conditional put
/// in flight, loses its lease; the other acquires and installs its own change; the stale put
/// then fails on the version and overwrites nothing, and the stale controller goes back to
/// waiting for the lock.
#[test]
fn two_controllers_one_drives_and_a_stale_put_cannot_overwrite() {
    let mut w = World::new(&[1, 2, 3]);
    let a = w.controller("a");
    w.idle(a);
    let b = w.controller("b");
    w.submit(a, 1, Op::Join(servers(&[1])));
    w.submit(b, 1, Op::Join(servers(&[2])));
    assert_eq!(w.finish(a, 1), Ok(1));
    w.run_for(TTL_MS * 3);
    let s = w.ctls[b].c.status();
    assert_eq!(
        (s.phase, s.holds_lock, s.queued),
        (CtlPhase::Locking, false, 1)
    );
    assert_eq!(
        w.result(b, 1),
        None,
        "the waiting controller drives nothing"
    );
    assert!(w.delivered.iter().all(|(c, _, _)| *c == a));

    // The holder is cut off; its conditional put of configuration 2 is held.
    w.ctls[a].paused = true;
    w.submit(a, 2, Op::Move { shard: 0, gid: 1 });
    assert!(w.run_until(1_000, |w| !w.ctls[a].held.is_empty()));
    // Its lease expires; the other controller takes over and installs its join.
    assert_eq!(w.finish(b, 1), Ok(2));
    let (record, version) = w.store.record().unwrap();
    assert!(record.config.groups.contains_key(&2));
    assert!(w.ctls[a].c.status().holds_lock, "it does not know yet");

    // Reconnected: the stale put is refused on the version.
    w.ctls[a].paused = false;
    let held = std::mem::take(&mut w.ctls[a].held);
    w.queue.extend(held);
    w.run_for(TTL_MS);
    assert_eq!(w.store.record().unwrap(), (record.clone(), version));
    assert_eq!(w.store.history(2), Some(record.config));
    assert_eq!(w.result(a, 2), None);
    let s = w.ctls[a].c.status();
    assert_eq!(s.phase, CtlPhase::Locking);
    assert!(!s.holds_lock);
    assert_eq!(w.store.get(LOCK_KEY).unwrap().0, b"b");
    w.assert_placed();

    // The lock holder goes on; the other's operation stays queued.
    w.submit(b, 2, Op::Join(servers(&[3])));
    assert_eq!(w.finish(b, 2), Ok(3));
    assert_eq!(w.result(a, 2), None);
    w.assert_placed();
}

/// A group server that does not answer makes the move wait and retry, never fail; once it
/// answers, the change completes.
#[test]
fn a_silent_group_server_makes_the_change_wait_not_fail() {
    let mut w = World::new(&[1, 2]);
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    let k = key_in(5, 0);
    w.group(1).put(&k, b"moved");
    w.muted.insert(name(2));
    w.submit(a, 2, Op::Join(servers(&[2])));
    w.run_for(5_000);
    assert_eq!(w.result(a, 2), None);
    let s = w.ctls[a].c.status();
    assert_eq!(s.phase, CtlPhase::Changing);
    assert_eq!((s.latest, s.complete), (Some(2), false));
    // Waiting for the new group to adopt: no move started.
    assert_eq!((s.moves_pending, s.moves_done, s.queued), (3, 0, 1));
    assert!(s.holds_lock, "the lease is kept alive meanwhile");
    assert!(w.delivered.iter().all(|(_, g, _)| *g != 2));
    // Resent every retry timeout (100 ms) or so: not given up, not a hot loop.
    assert!((10..=200).contains(&w.lost), "{} requests lost", w.lost);

    w.muted.clear();
    assert_eq!(w.finish(a, 2), Ok(2));
    w.assert_placed();
    match w.group(2).get(&k) {
        ShardReply::Done {
            result: KvResult::Found { value, .. },
            ..
        } => assert_eq!(value, b"moved"),
        other => panic!("{other:?}"),
    }
}

/// A controller cut off from its store stops driving once no keep-alive has been confirmed for
/// a whole TTL (the store may have given its lock away), and goes back to the lock; reconnected,
/// it acquires again and finishes the change it had installed.
#[test]
fn a_controller_cut_off_from_its_store_stops_driving() {
    let mut w = World::new(&[1, 2]);
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    w.muted.insert(name(2));
    w.submit(a, 2, Op::Join(servers(&[2])));
    w.run_for(TTL_MS);
    assert_eq!(w.ctls[a].c.status().phase, CtlPhase::Changing);

    w.store_cut.insert(a);
    w.run_for(2 * TTL_MS);
    let s = w.ctls[a].c.status();
    assert_eq!(s.phase, CtlPhase::Locking);
    assert!(!s.holds_lock);
    assert!(s.last_problem.unwrap().contains("keep-alive"));
    let sends = w.group_sends[&a];
    w.run_for(2 * TTL_MS);
    assert_eq!(w.group_sends[&a], sends, "no group request after giving up");

    w.store_cut.clear();
    w.muted.clear();
    assert_eq!(w.finish(a, 2), Ok(2));
    w.assert_placed();
}

/// A controller that died between installing a record and writing it to the history: the next
/// one writes the history entry, drives the change and marks it complete.
#[test]
fn a_record_missing_from_the_history_is_written_and_driven() {
    let mut w = World::new(&[1, 2]);
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    w.group(1).put(&key_in(4, 0), b"x");
    w.ctls[a].alive = false;

    // What the dead controller's conditional put left: configuration 2, incomplete, no history.
    let (old, version) = w.store.record().unwrap();
    let next = shoal_shard::join(&old.config, &servers(&[2])).unwrap();
    let record = Record {
        moves: shoal_shard::diff(&old.config, &next).unwrap(),
        config: next.clone(),
        complete: false,
    };
    let send = |w: &mut World, client: u64, op: KvOp| {
        w.store.rsm.handle_request(
            77,
            KvRequest {
                client,
                request: 1,
                op,
                serializable: false,
            },
        );
        w.store.drive();
        let replies = w.store.rsm.take_replies();
        match replies.as_slice() {
            [(77, KvReply::Done { result, .. })] => result.clone(),
            other => panic!("{other:?}"),
        }
    };
    let KvResult::Registered { session } = send(&mut w, 900, KvOp::Register) else {
        panic!("no session");
    };
    let put = KvOp::Put {
        key: LATEST_KEY.to_vec(),
        value: record.encode(),
        expected: Expected::Version(version),
    };
    assert!(matches!(
        send(&mut w, session, put),
        KvResult::Written { .. }
    ));
    assert_eq!(w.store.history(2), None);

    let b = w.controller("b");
    w.idle(b);
    assert_eq!(w.store.history(2), Some(next));
    assert_eq!(w.ctls[b].c.status().latest, Some(2));
    w.assert_placed();
    match w.group(2).get(&key_in(4, 0)) {
        ShardReply::Done {
            result: KvResult::Found { value, .. },
            ..
        } => assert_eq!(value, b"x"),
        other => panic!("{other:?}"),
    }
}

/// A controller dropped right after the old owner deleted a moved shard: the next one replays
/// the move, finds no export (the shard is gone from the old owner), learns from the new owner
/// that it is installed there (an Install without data, answered AlreadyDone), and completes.
#[test]
fn a_replay_after_the_old_owner_deleted_the_shard_completes() {
    let mut w = World::new(&[1, 2]);
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    for s in 0..SHARDS {
        w.group(1).put(&key_in(s, 0), b"kept");
    }
    w.submit(a, 2, Op::Join(servers(&[2])));
    assert!(w.run_until(10_000, |w| w
        .delivered
        .iter()
        .any(|(_, _, op)| matches!(op, ControlOp::Delete { .. }))));
    w.ctls[a].alive = false;
    assert!(!w.store.record().unwrap().0.complete);

    let b = w.controller("b");
    w.idle(b);
    assert!(
        w.delivered.iter().any(|(c, g, op)| *c == b
            && *g == 2
            && matches!(op, ControlOp::Install { data, .. } if data.is_empty())),
        "the new owner was asked"
    );
    w.assert_placed();
    for s in 0..SHARDS {
        let owner = if s < SHARDS / 2 { 1 } else { 2 };
        match w.group(owner).get(&key_in(s, 0)) {
            ShardReply::Done {
                result: KvResult::Found { value, .. },
                ..
            } => assert_eq!(value, b"kept"),
            other => panic!("{other:?}"),
        }
    }
}

/// A controller restarted under the same name while its first incarnation's lease still lives
/// takes the lock over at once (the key holds its name) and re-attaches it to its new lease: when
/// the old lease expires the lock stays, and a rival never gets it.
#[test]
fn a_restarted_controller_reattaches_the_lock_to_its_new_lease() {
    let mut w = World::new(&[1]);
    let a = w.controller("a");
    w.idle(a);
    w.ctls[a].alive = false;
    let a2 = w.controller("a");
    w.idle(a2);
    let rival = w.controller("r");
    w.run_for(5 * TTL_MS);
    assert_eq!(w.store.get(LOCK_KEY).unwrap().0, b"a");
    assert!(w.ctls[a2].c.status().holds_lock);
    assert_eq!(w.ctls[rival].c.status().phase, CtlPhase::Locking);
    w.submit(a2, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a2, 1), Ok(1));
    assert!(w.delivered.iter().all(|(c, _, _)| *c == a2));
}

/// A three-server group: the controller finds its leader, and when that leader is cut off it
/// times out, moves on to the other servers, follows their hints to the new leader and
/// completes the change there.
#[test]
fn the_controller_follows_a_group_to_its_new_leader() {
    let mut w = World::new(&[1, BIG]);
    let first = name(BIG);
    w.groups
        .get_mut(&first)
        .unwrap()
        .1
        .host
        .raw_mut()
        .campaign();
    w.flush_group(&first);
    w.run_until(1_000, |w| {
        w.groups[&first].1.host.raw().status().role == shoal_raft::Role::Leader
    });
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    let keys: Vec<Vec<u8>> = (0..SHARDS).map(|s| key_in(s, 0)).collect();
    for k in &keys {
        w.group(1).put(k, b"v");
    }
    w.submit(a, 2, Op::Join(servers(&[BIG])));
    assert_eq!(w.finish(a, 2), Ok(2));
    assert!(w
        .to_servers
        .iter()
        .all(|(_, n)| !n.starts_with("g9") || *n == first));
    w.run_for(500);
    w.assert_placed();

    // The leader is cut off; another server takes over.
    w.isolated.insert(first.clone());
    assert!(w.run_until(10_000, |w| server_names(BIG).iter().any(
        |n| *n != first && w.groups[n].1.host.raw().status().role == shoal_raft::Role::Leader
    )));
    let before = w.to_servers.len();
    w.submit(a, 3, Op::Leave(vec![BIG]));
    assert_eq!(w.finish(a, 3), Ok(3));
    let asked: BTreeSet<&String> = w.to_servers[before..]
        .iter()
        .map(|(_, n)| n)
        .filter(|n| n.starts_with("g9"))
        .collect();
    assert!(asked.len() >= 2, "{asked:?}");
    w.run_for(500);
    w.assert_placed();
    for k in &keys {
        match w.group(1).get(k) {
            ShardReply::Done {
                result: KvResult::Found { value, .. },
                ..
            } => assert_eq!(value, b"v"),
            other => panic!("{other:?}"),
        }
    }
}

/// A controller cut off after installing its change (its ticket never finished) comes back
/// once another controller has finished that change and gone on: when it gets the lock again
/// it must recognise its operation in the history and report it, not apply it a second time.
/// Without the history check it joined group 2 again (configuration 4) after group 2 had left,
/// a change nobody asked for (the simulator's partitionCtrler rounds of `shard_5bc.rs` found
/// it).
#[test]
fn a_controller_back_after_its_change_was_finished_does_not_apply_it_again() {
    let mut w = World::new(&[1, 2]);
    let a = w.controller("a");
    w.submit(a, 1, Op::Join(servers(&[1])));
    assert_eq!(w.finish(a, 1), Ok(1));
    // Group 2 silent: the join is installed as configuration 2 and waits for it.
    w.muted.insert(name(2));
    w.submit(a, 2, Op::Join(servers(&[2])));
    w.run_for(TTL_MS);
    let (record, _) = w.store.record().unwrap();
    assert_eq!((record.config.num, record.complete), (2, false));
    // Cut off from the store: it stops driving, its lease runs out.
    w.store_cut.insert(a);
    let b = w.controller("b");
    w.muted.clear();
    w.idle(b);
    assert!(
        w.store.record().unwrap().0.complete,
        "b finished configuration 2"
    );
    w.submit(b, 1, Op::Leave(vec![2]));
    assert_eq!(w.finish(b, 1), Ok(3));
    assert_eq!(w.result(a, 2), None);
    // b goes away; a comes back and gets the lock after b's lease.
    w.ctls[b].alive = false;
    w.store_cut.clear();
    assert_eq!(w.finish(a, 2), Ok(2), "its join was configuration 2");
    w.run_for(TTL_MS);
    let (record, _) = w.store.record().unwrap();
    assert_eq!(record.config.num, 3, "nothing applied again: {record:?}");
    assert!(!record.config.groups.contains_key(&2));
    w.assert_placed();
}
