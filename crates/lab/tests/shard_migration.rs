//! The sharded KV's groups in the simulator, without controller or clients: a scripted actor
//! ([`Migrator`]) adopts configurations, writes through raw `ShardRequest`s and moves shards
//! from group 1 to group 2 (Freeze → Export → Install → Delete, retried on NotLeader and
//! timeouts) while the nemesis crashes, partitions and pauses the group servers. Every event
//! is followed by Figure 3 on each group and the shard invariant; at the end the data is at
//! the new owner. The invariant is also shown to catch mutations: by hand (two groups serving,
//! a stale export installed) and live (an Install without Freeze).

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use shoal_lab::shard::{Directory, GroupNode, ShardInvariant, World, WorldSpec, SM};
use shoal_shard::{diff, join, Config, Gid, GroupEntry, ShardId, ShardMachine};
use shoal_sim::rand::Rng;
use shoal_sim::{Ctx, Failure, NemesisConfig, Node, NodeId};
use shoal_wire::kv::{Expected, KvOp, KvRequest, KvResult};
use shoal_wire::shard::{ControlOp, ControlReply, ControlRequest, ControlStatus};
use shoal_wire::shard::{ShardReply, ShardRequest};

const SHARDS: u32 = 10;
const KEYS: usize = 12;
/// How long one attempt waits for its answer before trying the next server.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(200);
/// Pause before retrying after NotLeader / WrongLeader / WrongGroup.
const BACKOFF: Duration = Duration::from_millis(20);
/// The pause between two tasks is drawn from this range (ms): the script spans ~10 s of
/// simulated time, many nemesis faults.
const THINK_MS: std::ops::Range<u64> = 20..200;
/// The id the migrator registers with (any id: it only recognises the reply).
const REGISTER_CLIENT: u64 = 77;

/// One step of the script.
#[derive(Debug, Clone)]
enum Task {
    Adopt {
        gid: Gid,
        config: Config,
    },
    Freeze {
        gid: Gid,
        shard: ShardId,
        config: u64,
    },
    Export {
        gid: Gid,
        shard: ShardId,
        config: u64,
    },
    Install {
        gid: Gid,
        shard: ShardId,
        config: u64,
    },
    Delete {
        gid: Gid,
        shard: ShardId,
        config: u64,
    },
    Register {
        gid: Gid,
        shard: ShardId,
    },
    Put {
        gid: Gid,
        key: String,
        value: String,
    },
    /// A read that must find `want` (value, version).
    Get {
        gid: Gid,
        key: String,
        want: (String, u64),
    },
}

impl Task {
    fn gid(&self) -> Gid {
        match self {
            Task::Adopt { gid, .. }
            | Task::Freeze { gid, .. }
            | Task::Export { gid, .. }
            | Task::Install { gid, .. }
            | Task::Delete { gid, .. }
            | Task::Register { gid, .. }
            | Task::Put { gid, .. }
            | Task::Get { gid, .. } => *gid,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Sent; the attempt's timeout is armed.
    Waiting,
    /// Waiting to retry.
    Backoff,
    /// Pausing between two tasks (so that the script spans many faults).
    Thinking,
}

/// The scripted actor: runs its tasks one at a time, each retried until it is decided.
struct Migrator {
    dir: Directory,
    tasks: VecDeque<Task>,
    phase: Phase,
    /// Bumped by every send and every backoff: tags and timer tokens of older attempts are
    /// ignored.
    attempt: u64,
    /// Per gid: the index of the server to try next.
    server: BTreeMap<Gid, usize>,
    /// The (client, request) of the current shard task, kept across its retries.
    ids: Option<(u64, u64)>,
    /// The configuration number the shard requests say they routed by.
    routed_by: u64,
    sessions: BTreeMap<ShardId, u64>,
    next_request: u64,
    exported: BTreeMap<ShardId, Vec<u8>>,
    /// Per key: the last acknowledged (value, version).
    acked: BTreeMap<String, (String, u64)>,
    done: bool,
    violation: Option<String>,
    retries: u64,
}

fn key_shard(key: &str) -> ShardId {
    shoal_shard::shard_of(key.as_bytes(), SHARDS)
}

impl Migrator {
    fn new(dir: Directory, tasks: Vec<Task>) -> Migrator {
        Migrator {
            dir,
            tasks: tasks.into(),
            phase: Phase::Idle,
            attempt: 0,
            server: BTreeMap::new(),
            ids: None,
            routed_by: 0,
            sessions: BTreeMap::new(),
            next_request: 1,
            exported: BTreeMap::new(),
            acked: BTreeMap::new(),
            done: false,
            violation: None,
            retries: 0,
        }
    }

    fn fail(&mut self, why: String) {
        if self.violation.is_none() {
            self.violation = Some(why);
        }
        self.phase = Phase::Idle;
    }

    fn target(&self, gid: Gid) -> NodeId {
        let servers = self.dir.group(gid);
        servers[self.server.get(&gid).copied().unwrap_or(0) % servers.len()]
    }

    fn next_server(&mut self, gid: Gid, hint: Option<u64>) {
        let n = self.dir.group(gid).len();
        let s = self.server.entry(gid).or_insert(0);
        *s = match hint {
            Some(h) if h >= 1 && (h as usize) <= n => h as usize - 1,
            _ => (*s + 1) % n,
        };
    }

    /// Starts the next task, or finishes.
    fn start_next(&mut self, ctx: &mut Ctx<'_, SM>) {
        self.ids = None;
        if self.violation.is_some() {
            return;
        }
        match self.tasks.front() {
            None => {
                self.done = true;
                self.phase = Phase::Idle;
            }
            Some(_) => self.send(ctx),
        }
    }

    /// Sends the current task to the server it is at.
    fn send(&mut self, ctx: &mut Ctx<'_, SM>) {
        let Some(task) = self.tasks.front().cloned() else {
            return;
        };
        self.attempt += 1;
        let to = self.target(task.gid());
        let control = |op| {
            SM::Control(ControlRequest {
                tag: self.attempt,
                gid: task.gid(),
                op,
            })
        };
        let msg = match &task {
            Task::Adopt { config, .. } => control(ControlOp::Adopt {
                config: config.encode(),
            }),
            Task::Freeze { shard, config, .. } => control(ControlOp::Freeze {
                shard: *shard,
                config: *config,
            }),
            Task::Export { shard, config, .. } => control(ControlOp::Export {
                shard: *shard,
                config: *config,
            }),
            Task::Install { shard, config, .. } => match self.exported.get(shard) {
                Some(data) => control(ControlOp::Install {
                    shard: *shard,
                    config: *config,
                    data: data.clone(),
                }),
                None => return self.fail(format!("install of shard {shard} before its export")),
            },
            Task::Delete { shard, config, .. } => control(ControlOp::Delete {
                shard: *shard,
                config: *config,
            }),
            Task::Register { shard, .. } => self.shard_request(*shard, KvOp::Register, None),
            Task::Put { key, value, .. } => {
                let shard = key_shard(key);
                let Some(&session) = self.sessions.get(&shard) else {
                    return self.fail(format!("put of {key} before shard {shard}'s session"));
                };
                let op = KvOp::Put {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    expected: Expected::Any,
                };
                self.shard_request(shard, op, Some(session))
            }
            Task::Get { key, .. } => {
                let op = KvOp::Get {
                    key: key.clone().into_bytes(),
                };
                self.shard_request(key_shard(key), op, Some(REGISTER_CLIENT))
            }
        };
        ctx.send(to, msg);
        ctx.set_timer(ATTEMPT_TIMEOUT, self.attempt);
        self.phase = Phase::Waiting;
    }

    /// A shard request for the current task, with the ids it keeps across retries.
    fn shard_request(&mut self, shard: ShardId, op: KvOp, client: Option<u64>) -> SM {
        let (client, request) = *self.ids.get_or_insert_with(|| {
            let request = self.next_request;
            self.next_request += 1;
            (client.unwrap_or(REGISTER_CLIENT), request)
        });
        SM::Shard(ShardRequest {
            client,
            request,
            shard,
            config: self.routed_by,
            op,
            serializable: false,
        })
    }

    fn retry_later(&mut self, ctx: &mut Ctx<'_, SM>, gid: Gid, hint: Option<u64>, move_on: bool) {
        if move_on {
            self.next_server(gid, hint);
        }
        self.retries += 1;
        self.attempt += 1;
        self.phase = Phase::Backoff;
        ctx.set_timer(BACKOFF, self.attempt);
    }

    fn task_done(&mut self, ctx: &mut Ctx<'_, SM>) {
        self.tasks.pop_front();
        self.ids = None;
        self.attempt += 1;
        self.phase = Phase::Thinking;
        let pause = Duration::from_millis(ctx.rng().gen_range(THINK_MS));
        ctx.set_timer(pause, self.attempt);
    }

    fn on_control(&mut self, ctx: &mut Ctx<'_, SM>, reply: ControlReply) {
        let Some(task) = self.tasks.front().cloned() else {
            return;
        };
        let gid = task.gid();
        match reply {
            ControlReply::Done { tag, status, .. } if tag == self.attempt => match status {
                ControlStatus::Applied | ControlStatus::AlreadyDone => self.task_done(ctx),
                other => self.fail(format!("{task:?} answered {other:?}")),
            },
            ControlReply::Exported { tag, data, .. } if tag == self.attempt => {
                let Task::Export { shard, .. } = task else {
                    return self.fail(format!("an export answered {task:?}"));
                };
                match data {
                    Some(data) => {
                        self.exported.insert(shard, data);
                        self.task_done(ctx);
                    }
                    None => self.fail(format!("{task:?}: nothing frozen to export")),
                }
            }
            ControlReply::NotLeader { tag, leader } if tag == self.attempt => {
                self.retry_later(ctx, gid, leader, true)
            }
            ControlReply::WrongGid { tag, gid: other } if tag == self.attempt => {
                self.fail(format!("{task:?} reached a server of group {other}"))
            }
            ControlReply::Invalid { tag, reason } if tag == self.attempt => {
                self.fail(format!("{task:?} is invalid: {reason}"))
            }
            _ => {}
        }
    }

    fn on_shard(&mut self, ctx: &mut Ctx<'_, SM>, reply: ShardReply) {
        let Some(task) = self.tasks.front().cloned() else {
            return;
        };
        if self.phase != Phase::Waiting || Some(reply.ids()) != self.ids {
            return;
        }
        let gid = task.gid();
        let result = match reply {
            ShardReply::Done { result, .. } => result,
            ShardReply::WrongLeader { leader, .. } => {
                return self.retry_later(ctx, gid, leader, true)
            }
            // A new leader may not have applied the entry that gave its group the shard yet.
            ShardReply::WrongGroup { .. } => return self.retry_later(ctx, gid, None, false),
        };
        match (&task, result) {
            (Task::Register { shard, .. }, KvResult::Registered { session }) => {
                self.sessions.insert(*shard, session);
            }
            (Task::Put { key, value, .. }, KvResult::Written { version }) => {
                let before = self.acked.get(key).map_or(0, |a| a.1);
                if version != before + 1 {
                    return self.fail(format!(
                        "put {key} got version {version}, the last acknowledged was {before}"
                    ));
                }
                self.acked.insert(key.clone(), (value.clone(), version));
            }
            (Task::Get { key, want, .. }, KvResult::Found { value, version }) => {
                let got = (String::from_utf8_lossy(&value).into_owned(), version);
                if &got != want {
                    return self.fail(format!("get {key}: {got:?}, want {want:?}"));
                }
            }
            (task, other) => return self.fail(format!("{task:?} answered {other:?}")),
        }
        self.task_done(ctx);
    }
}

impl Node<SM> for Migrator {
    fn on_start(&mut self, ctx: &mut Ctx<'_, SM>) {
        self.start_next(ctx);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, SM>, _from: NodeId, msg: SM) {
        if self.phase != Phase::Waiting {
            return;
        }
        match msg {
            SM::ControlReply(r) => self.on_control(ctx, r),
            SM::ShardReply(r) => self.on_shard(ctx, r),
            _ => {}
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, SM>, token: u64) {
        if token != self.attempt {
            return;
        }
        if self.phase == Phase::Thinking {
            return self.start_next(ctx);
        }
        let Some(gid) = self.tasks.front().map(Task::gid) else {
            return;
        };
        match self.phase {
            Phase::Waiting => {
                // No answer: the server is down, cut off or not leading; try the next one.
                self.retries += 1;
                self.next_server(gid, None);
                self.send(ctx);
            }
            Phase::Backoff => self.send(ctx),
            Phase::Thinking => self.start_next(ctx),
            Phase::Idle => {}
        }
    }
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("key{i}")).collect()
}

/// The script: group 1 gets every shard (configuration 1) and the keys are written; group 2
/// joins (configuration 2), both adopt it, every shard that moves goes Freeze → Export →
/// Install → Delete; the keys are written again at their owners and read back.
fn script(dir: &Directory) -> (Vec<Task>, Config, Config) {
    let (mut tasks, c1, c2) = first_part(dir);
    tasks.extend(second_part(&c1, &c2));
    (tasks, c1, c2)
}

/// Configuration 1 adopted by group 1 and the keys written there.
fn first_part(dir: &Directory) -> (Vec<Task>, Config, Config) {
    let c0 = Config::empty(SHARDS).expect("shard count");
    let g = |gid: Gid| BTreeMap::from([(gid, dir.group_names(gid))]);
    let c1 = join(&c0, &g(1)).expect("join 1");
    let c2 = join(&c1, &g(2)).expect("join 2");
    let mut tasks = vec![Task::Adopt {
        gid: 1,
        config: c1.clone(),
    }];
    let mut registered = Vec::new();
    for key in keys() {
        let shard = key_shard(&key);
        if !registered.contains(&shard) {
            registered.push(shard);
            tasks.push(Task::Register { gid: 1, shard });
        }
        tasks.push(Task::Put {
            gid: 1,
            value: format!("1-{key}"),
            key,
        });
    }
    (tasks, c1, c2)
}

/// Configuration 2 adopted, the moves, the keys written again at their owners and read back.
fn second_part(c1: &Config, c2: &Config) -> Vec<Task> {
    let owner = |c: &Config, key: &str| c.owner(key_shard(key)).expect("owned");
    let mut tasks = vec![
        Task::Adopt {
            gid: 2,
            config: c1.clone(),
        },
        Task::Adopt {
            gid: 1,
            config: c2.clone(),
        },
        Task::Adopt {
            gid: 2,
            config: c2.clone(),
        },
    ];
    for m in diff(c1, c2).expect("same shard count") {
        let (shard, config) = (m.shard, c2.num);
        tasks.extend([
            Task::Freeze {
                gid: m.from,
                shard,
                config,
            },
            Task::Export {
                gid: m.from,
                shard,
                config,
            },
            Task::Install {
                gid: m.to,
                shard,
                config,
            },
            Task::Delete {
                gid: m.from,
                shard,
                config,
            },
        ]);
    }
    for key in keys() {
        // Sessions migrate with their shard: the session registered at group 1 goes on at
        // the new owner.
        tasks.push(Task::Put {
            gid: owner(c2, &key),
            value: format!("2-{key}"),
            key,
        });
    }
    for key in keys() {
        tasks.push(Task::Get {
            gid: owner(c2, &key),
            want: (format!("2-{key}"), 2),
            key,
        });
    }
    tasks
}

fn spec() -> WorldSpec {
    WorldSpec {
        store_servers: 0,
        gids: vec![1, 2],
        shards: SHARDS,
        group_snapshot_bytes: 500,
        ..WorldSpec::default()
    }
}

fn migrator(w: &World, id: NodeId) -> Result<&Migrator, Failure> {
    w.sim
        .node::<Migrator>(id)
        .ok_or_else(|| w.sim.failure("the migrator is gone"))
}

/// What one seed's run saw, for the assertions across seeds.
#[derive(Default)]
struct Seen {
    snapshots: Cell<u64>,
    installs: Cell<u64>,
    retries: Cell<u64>,
    faults: Cell<u64>,
}

fn run_migration(seed: u64, seen: &Seen) -> Result<(), Failure> {
    let mut w = World::new(seed, spec());
    let (tasks, _c1, c2) = script(&w.dir);
    let dir = w.dir.clone();
    let actor = w
        .sim
        .add_node(move |_| Migrator::new(dir.clone(), tasks.clone()));
    w.sim.start_nemesis(NemesisConfig::new(w.dir.group_sims()));
    // Under faults for a while (the script may finish meanwhile), then healed to finish.
    let done = |sim: &shoal_sim::Sim<SM>| {
        sim.node::<Migrator>(actor)
            .is_some_and(|m| m.done || m.violation.is_some())
    };
    w.run_until(Duration::from_secs(30), Duration::from_millis(100), done)?;
    w.sim.heal_all();
    if !w.run_until(Duration::from_secs(60), Duration::from_millis(100), done)? {
        let left = migrator(&w, actor)?.tasks.front().cloned();
        return Err(w.sim.failure(format!(
            "the script did not finish after healing; at {left:?}"
        )));
    }
    let m = migrator(&w, actor)?;
    if let Some(v) = &m.violation {
        return Err(w.sim.failure(format!("the script saw: {v}")));
    }
    let retries = m.retries;
    seen.retries.set(seen.retries.get() + retries);
    seen.faults
        .set(seen.faults.get() + w.sim.fault_summary().total());
    let acked = m.acked.clone();
    // Let every server catch up, still checked, then look at their applied state.
    w.run_checked(Duration::from_secs(2))?;
    for key in keys() {
        let shard = key_shard(&key);
        let owner = c2.owner(shard).expect("owned");
        let want = acked.get(&key).cloned();
        if w.checks.shards.server_of(shard) != Some(owner) {
            return Err(w.sim.failure(format!(
                "shard {shard} is served by {:?}, not by its owner {owner}",
                w.checks.shards.server_of(shard)
            )));
        }
        for gid in w.dir.gids() {
            for &id in w.dir.group(gid) {
                let Some(host) = w.sim.node::<GroupNode>(id).and_then(|n| n.host.as_ref()) else {
                    continue;
                };
                let held = host.machine().shard(shard);
                if gid != owner {
                    // The old owner deleted what it gave away.
                    if held.is_some() {
                        return Err(w.sim.failure(format!(
                            "{id} of group {gid} still holds shard {shard} owned by {owner}"
                        )));
                    }
                    continue;
                }
                let found = held.and_then(|s| {
                    let get = KvOp::Get {
                        key: key.clone().into_bytes(),
                    };
                    match s.store.read(&get).ok()? {
                        KvResult::Found { value, version } => {
                            Some((String::from_utf8_lossy(&value).into_owned(), version))
                        }
                        _ => None,
                    }
                });
                if found != want {
                    return Err(w.sim.failure(format!(
                        "{id} of group {owner} holds {key} as {found:?}, acknowledged {want:?}"
                    )));
                }
            }
        }
    }
    if w.checks.shards.updates() == 0 {
        return Err(w
            .sim
            .failure("the shard invariant never saw a group's state"));
    }
    let (taken, installed) = (w.snapshots.taken.get(), w.snapshots.installed.get());
    seen.snapshots.set(seen.snapshots.get() + taken);
    seen.installs.set(seen.installs.get() + installed);
    eprintln!(
        "seed {seed}: {} events, {:?} simulated, {} retries, {} faults, {taken} snapshots taken, {installed} installed",
        w.sim.events_processed(),
        w.sim.now(),
        retries,
        w.sim.fault_summary().total()
    );
    Ok(())
}

#[test]
fn shards_migrate_under_faults_and_the_invariant_holds_after_every_event() {
    let seen = Seen::default();
    shoal_sim::check_seeds!(200, |seed| run_migration(seed, &seen));
    // The runs did what they claim: faults were injected, requests had to be retried, and
    // group servers took snapshots (so restarts restored from them) and lagging ones were
    // brought up to date by their leader's snapshot.
    assert!(seen.faults.get() > 0, "no faults");
    assert!(seen.retries.get() > 0, "no retries");
    assert!(seen.snapshots.get() > 0, "no group server ever snapshotted");
    assert!(
        seen.installs.get() > 0,
        "no group server ever installed a snapshot"
    );
}

// ---------------------------------------------------------------------------------------------
// The checker catches mutations

fn machine(gid: Gid) -> ShardMachine {
    ShardMachine::new(gid, SHARDS, shoal_kv::Limits::default()).expect("machine")
}

fn adopt(m: &mut ShardMachine, c: &Config) {
    let out = m.apply_entry(&GroupEntry::Adopt { config: c.clone() });
    assert_eq!(
        out,
        shoal_shard::GroupOutput::Control(shoal_shard::ControlOutcome::Applied)
    );
}

/// Registers and puts `n` times `key` at `m` (which serves the key's shard).
fn write(m: &mut ShardMachine, key: &str, n: u64) {
    let shard = key_shard(key);
    let config = m.config().num;
    let req = |client, request, op| GroupEntry::Client {
        shard,
        config,
        request: KvRequest {
            client,
            request,
            op,
            serializable: false,
        },
    };
    let reg = req(1, 1, KvOp::Register);
    let shoal_shard::GroupOutput::Kv(KvResult::Registered { session }) = m.apply_entry(&reg) else {
        panic!("registration refused");
    };
    for i in 0..n {
        let put = KvOp::Put {
            key: key.as_bytes().to_vec(),
            value: format!("{i}").into_bytes(),
            expected: Expected::Any,
        };
        let out = m.apply_entry(&req(session, i + 1, put));
        assert!(
            matches!(out, shoal_shard::GroupOutput::Kv(KvResult::Written { .. })),
            "{out:?}"
        );
    }
}

/// Group 1 serving every shard (configuration 1) with a key written `n` times, group 2 at
/// configuration 1 too, and configuration 2 (group 2 joined), which moves the key's shard to
/// group 2. Returns the key as well.
fn two_groups(n: u64) -> (ShardMachine, ShardMachine, Config, String) {
    let c0 = Config::empty(SHARDS).expect("shard count");
    let c1 = join(&c0, &BTreeMap::from([(1, vec!["a".to_string()])])).expect("join");
    let c2 = join(&c1, &BTreeMap::from([(2, vec!["b".to_string()])])).expect("join");
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| c2.owner(key_shard(k)) == Some(2))
        .expect("some shard moves to the new group");
    let (mut g1, mut g2) = (machine(1), machine(2));
    adopt(&mut g1, &c1);
    write(&mut g1, &key, n);
    adopt(&mut g2, &c1);
    (g1, g2, c2, key)
}

fn frozen_export(g: &ShardMachine, shard: ShardId, config: u64) -> Vec<u8> {
    let mut copy = g.clone();
    copy.apply_entry(&GroupEntry::Freeze { shard, config });
    copy.export(shard, config).expect("frozen shard exports")
}

#[test]
fn the_shard_invariant_passes_a_correct_migration_step_by_step() {
    let (mut g1, mut g2, c2, key) = two_groups(3);
    let shard = key_shard(&key);
    let mut inv = ShardInvariant::default();
    let step = |inv: &mut ShardInvariant, i: u64, g1: &ShardMachine, g2: &ShardMachine| {
        inv.observe(1, i, g1);
        inv.observe(2, i, g2);
        inv.check()
    };
    assert_eq!(step(&mut inv, 1, &g1, &g2), Ok(()));
    assert_eq!(inv.server_of(shard), Some(1));
    assert_eq!(inv.high_water(shard), 4, "a registration and 3 puts");
    adopt(&mut g1, &c2);
    adopt(&mut g2, &c2);
    assert_eq!(step(&mut inv, 2, &g1, &g2), Ok(()));
    assert_eq!(inv.server_of(shard), None, "a moving shard pauses");
    g1.apply_entry(&GroupEntry::Freeze {
        shard,
        config: c2.num,
    });
    let data = g1.export(shard, c2.num).expect("frozen");
    g2.apply_entry(&GroupEntry::Install {
        shard,
        config: c2.num,
        data,
    });
    assert_eq!(step(&mut inv, 3, &g1, &g2), Ok(()));
    assert_eq!(inv.server_of(shard), Some(2));
    // A replica behind the high-water mark (a restart replaying) changes nothing.
    inv.observe(2, 1, &machine(2));
    assert_eq!(inv.check(), Ok(()));
    assert_eq!(inv.server_of(shard), Some(2));
}

#[test]
fn the_shard_invariant_catches_an_install_without_freeze() {
    let (g1, mut g2, c2, key) = two_groups(2);
    let shard = key_shard(&key);
    // The mutation: group 1 never freezes (nor adopts the move), group 2 installs a copy.
    adopt(&mut g2, &c2);
    let data = frozen_export(&g1, shard, c2.num);
    g2.apply_entry(&GroupEntry::Install {
        shard,
        config: c2.num,
        data,
    });
    assert!(g1.serves(shard) && g2.serves(shard));
    let mut inv = ShardInvariant::default();
    inv.observe(1, 5, &g1);
    inv.observe(2, 5, &g2);
    let err = inv.check().expect_err("two groups serve the shard");
    assert!(
        err.starts_with(&format!("shard {shard} is served by two groups: 1")),
        "{err}"
    );
}

#[test]
fn the_shard_invariant_catches_a_stale_export_installed() {
    let (mut g1, mut g2, c2, key) = two_groups(2);
    let shard = key_shard(&key);
    // The mutation: the copy is taken before the last writes (a deposed leader's export, or
    // a freeze that let writes through), then the old owner applies more and freezes.
    let stale = frozen_export(&g1, shard, c2.num);
    write(&mut g1, &key, 3);
    let mut inv = ShardInvariant::default();
    inv.observe(1, 1, &g1);
    inv.observe(2, 1, &g2);
    assert_eq!(inv.check(), Ok(()));
    adopt(&mut g1, &c2);
    g1.apply_entry(&GroupEntry::Freeze {
        shard,
        config: c2.num,
    });
    adopt(&mut g2, &c2);
    g2.apply_entry(&GroupEntry::Install {
        shard,
        config: c2.num,
        data: stale,
    });
    assert!(g2.serves(shard) && !g1.serves(shard));
    inv.observe(1, 2, &g1);
    inv.observe(2, 2, &g2);
    let err = inv.check().expect_err("writes were lost");
    assert!(
        err.starts_with(&format!("group 2 serves shard {shard} at position 3")),
        "{err}"
    );
    assert!(err.contains("reached position 7 in group 1"), "{err}");
}

/// The live mutation: in a running world, a controller that installs at group 2 a copy of a
/// shard group 1 still serves (no Freeze at group 1) is caught by the per-event check as soon
/// as group 2 applies the Install.
#[test]
fn the_per_event_check_catches_an_install_without_freeze_in_a_running_world() {
    let mut w = World::new(3, spec());
    let (tasks, c1, c2) = first_part(&w.dir);
    let dir = w.dir.clone();
    let actor = w
        .sim
        .add_node(move |_| Migrator::new(dir.clone(), tasks.clone()));
    let done = |sim: &shoal_sim::Sim<SM>| sim.node::<Migrator>(actor).is_some_and(|m| m.done);
    assert_eq!(
        w.run_until(Duration::from_secs(20), Duration::from_millis(50), done),
        Ok(true)
    );
    let moved = diff(&c1, &c2).expect("diff")[0].shard;
    assert_eq!(w.checks.shards.server_of(moved), Some(1));
    // The mutated controller: copy the serving shard from group 1's leader (frozen on a copy
    // of its machine), then run group 2 through configurations 1 and 2 and install it there.
    let leader = w.dir.group(1).iter().copied().find(|&id| {
        w.sim
            .node::<GroupNode>(id)
            .and_then(|n| n.host.as_ref())
            .is_some_and(|h| h.raw().status().role == shoal_raft::Role::Leader)
    });
    let leader = leader.expect("group 1 has a leader");
    let g1 = w
        .sim
        .node::<GroupNode>(leader)
        .and_then(|n| n.host.as_ref())
        .expect("up")
        .machine()
        .clone();
    let data = frozen_export(&g1, moved, c2.num);
    let steps = vec![
        Task::Adopt {
            gid: 2,
            config: c1.clone(),
        },
        Task::Adopt {
            gid: 2,
            config: c2.clone(),
        },
        Task::Install {
            gid: 2,
            shard: moved,
            config: c2.num,
        },
    ];
    let dir = w.dir.clone();
    w.sim.add_node(move |_| {
        let mut m = Migrator::new(dir.clone(), steps.clone());
        m.exported.insert(moved, data.clone());
        m
    });
    let caught = w.run_checked(Duration::from_secs(20));
    let err = caught.expect_err("the invariant must catch two groups serving one shard");
    assert!(
        err.message
            .starts_with(&format!("shard {moved} is served by two groups: 1")),
        "{err}"
    );
}
