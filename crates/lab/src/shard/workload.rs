//! The **shard** workload of `shoal sim --workload shard`: the sharded KV whole, under the
//! nemesis, with reconfiguration as one more fault.
//!
//! A controller store of 3 [`StoreNode`]s, 4 replica groups of 3 [`GroupNode`]s (10 shards), a
//! [`ControllerNode`] and 3 [`ShardClientNode`]s putting at the last version they know and
//! reading back on 8 keys. The run submits a first Join of groups 1 and 2, then, every 1–3 s
//! while the controller is idle, a random Join, Leave or Move drawn from the controller's
//! latest configuration. The nemesis crashes, restarts, pauses and partitions the store
//! servers, the group servers and the controller (at most 3 of them down at once) and changes
//! the network (loss, delay, reordering, duplication). On top of it, faults **aimed at the
//! migration's windows** ([`ShardRun::aim`]): the old owner's leader crashed between a
//! shard's freeze and its delete, the new owner's leader crashed while the install is due, the
//! controller crashed in the middle of a change; and CockroachDB's trick, a shard moved right
//! after a client's newest write to it ([`ShardRun::move_after_write`]). And **stale control
//! messages**: every request the controller sends a group is recorded, and now and then one of
//! them, often from an older configuration, is delivered again by a [`Replayer`] (a delayed
//! duplicate, or a message from a controller long dead): a message from an older
//! configuration must change nothing. After every event: Figure 3 on the
//! store and on every group, and the shard invariant ([`super::ShardInvariant`]). At the end:
//! heal; the controller finishes its change; every client finishes; each shard is served by
//! exactly the group the latest configuration names; a fresh client's put and get succeed;
//! and the clients' history is linearizable under the versioned-KV model.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use shoal_check::Budget;
use shoal_kv::Outcome;
use shoal_raft::Role;
use shoal_shard::{shard_of, Config, Gid, Op, ShardState};
use shoal_sim::rand::seq::SliceRandom;
use shoal_sim::rand::{Rng, SeedableRng};
use shoal_sim::{ChaCha8Rng, Ctx, Failure, NemesisConfig, Node, Sim};
use shoal_wire::kv::{Expected, KvOp, KvResult};
use shoal_wire::shard::{ControlOp, ControlRequest, FROZEN_ROUND};

use super::{ControllerNode, CtlLog, GroupNode, ShardClientNode, ShardWork, World, WorldSpec, SM};
use crate::kv_client::{check_kv_history, SimId};
use crate::workload::{catching, Report, Workload, KV_CHECK_STEPS, SETTLE_LIMIT};

/// shard: the groups' ids.
pub const SHARD_GIDS: [Gid; 4] = [1, 2, 3, 4];
/// shard: the cluster's shard count (the lab's).
pub const SHARD_SHARDS: u32 = 10;
/// shard: routing clients.
pub const SHARD_CLIENTS: usize = 3;
/// shard: keys the clients share (12: some shards hold several, so their moves take several
/// chunks).
pub const SHARD_KEYS: usize = 12;
/// shard: most nodes the nemesis holds down (crashed or paused) at once.
pub const SHARD_MAX_DOWN: usize = 3;
/// shard: pause between two reconfigurations, in ms (the next one waits for the controller
/// to be idle too).
const RECONFIG_PAUSE_MS: std::ops::Range<u64> = 300..1_500;
/// How often the run looks at the controller.
const STEP: Duration = Duration::from_millis(100);
/// How often the nemesis phase looks for a migration window to aim at (a freeze-to-delete
/// window on a healthy network lasts a few tens of milliseconds).
const AIM_STEP: Duration = Duration::from_millis(5);
/// The run's own random stream (reconfigurations), apart from the simulation's.
const RECONFIG_STREAM: u64 = 0x5ead_c0f1;
/// Chance, per look while a migration window is open, of an aimed crash.
const AIM_CHANCE: f64 = 0.02;
/// Chance, per look while the controller drives a change, of crashing it.
const AIM_CONTROLLER_CHANCE: f64 = 0.002;
/// How long an aimed victim stays down, in ms.
const AIM_DOWN_MS: std::ops::Range<u64> = 50..1_500;
/// Chance that a client's newest acknowledged write is followed at once by a Move of its
/// shard (when the controller is idle).
const MOVE_AFTER_WRITE_CHANCE: f64 = 0.3;

/// Chance, per look of the nemesis phase, that the replayer delivers a recorded control
/// request again (about one every half second of virtual time).
const REPLAY_CHANCE: f64 = 0.01;
/// Control requests kept for replay: the most recent ones, so replays reach back several
/// configurations.
const REPLAY_KEEP: usize = 256;

/// Delivers recorded control requests again, from its own address (a delayed duplicate or a
/// dead controller's message). It ignores the answers but counts them.
#[derive(Default)]
pub struct Replayer {
    /// Answers received.
    pub answers: u64,
}

impl Node<SM> for Replayer {
    fn on_start(&mut self, _ctx: &mut Ctx<'_, SM>) {}

    fn on_message(&mut self, _ctx: &mut Ctx<'_, SM>, _from: SimId, msg: SM) {
        if matches!(msg, SM::ControlReply(_)) {
            self.answers += 1;
        }
    }

    fn on_timer(&mut self, _ctx: &mut Ctx<'_, SM>, _token: u64) {}
}

/// Which migration window an aimed crash hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aim {
    /// The old owner's leader, a shard frozen there (between freeze and delete).
    OldOwnerLeader,
    /// The new owner's leader, a shard frozen at its old owner and not yet served here
    /// (the install due).
    NewOwnerLeader,
    /// The controller, mid-change.
    Controller,
}

struct ShardRun {
    w: World,
    ctl: SimId,
    log: Rc<RefCell<CtlLog>>,
    clients: Vec<SimId>,
    rng: ChaCha8Rng,
    next_ticket: u64,
    gave_up: Option<String>,
    /// The aimed crash's victim still down, and when it restarts (ns).
    victim: Option<(SimId, u64)>,
    /// Per client: how many of its results were looked at for a move-after-write.
    seen_results: Vec<usize>,
    aimed: AimStats,
    replayer: SimId,
    /// The controller's recent control requests: (group server, request).
    recorded: Rc<RefCell<Vec<(SimId, ControlRequest)>>>,
    /// What the controller sent to copy shards.
    copies: Rc<RefCell<CopyCounts>>,
}

/// A move: (shard, configuration).
type MoveId = (u32, u64);

/// Requests the controller sent to copy shards (resends included).
#[derive(Debug, Clone, Default)]
struct CopyCounts {
    stages: u64,
    later_chunks: u64,
    copy_starts: u64,
    touched_tails: u64,
    touched_tails_with_keys: u64,
    /// `CopyRound`s sent: (shard, configuration, round), each once.
    copy_rounds: BTreeSet<(u32, u64, u32)>,
    /// Per move (shard, configuration): the keys staged by delta rounds, (round, key).
    delta_keys: BTreeMap<MoveId, BTreeSet<(u32, Vec<u8>)>>,
    /// Per move: the most keys a tail of a shard copied while serving carried.
    tail_keys: BTreeMap<MoveId, u64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct AimStats {
    old_owner: u64,
    new_owner: u64,
    controller: u64,
    moves_after_write: u64,
    replays: u64,
    stale_replays: u64,
    stale_stage_replays: u64,
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
    /// Aimed crashes of an old owner's leader between a shard's freeze and its delete.
    pub aimed_old_owner: u64,
    /// Aimed crashes of a new owner's leader while a shard's install was due.
    pub aimed_new_owner: u64,
    /// Aimed crashes of the controller in the middle of a change.
    pub aimed_controller: u64,
    /// Moves submitted right after a client's write to the moved shard was acknowledged.
    pub moves_after_write: u64,
    /// Control requests delivered again by the replayer.
    pub replays: u64,
    /// Of those, the ones whose configuration is older than the latest (stale messages).
    pub stale_replays: u64,
    /// Of those, `Stage`s (chunks of a copy) of an older configuration.
    pub stale_stage_replays: u64,
    /// `Stage` requests with keys the controller sent (chunks of shards copied, resends
    /// included).
    pub stages_sent: u64,
    /// `ExportChunk` requests past a shard's first chunk (moves of several chunks).
    pub later_chunks_sent: u64,
    /// `CopyStart` requests (copies of a shard while it serves).
    pub copy_starts_sent: u64,
    /// `Install`s of a tail of a shard copied while it served.
    pub touched_tails_sent: u64,
    /// Of those, the ones carrying keys written during the copy.
    pub touched_tails_with_keys: u64,
    /// Delta rounds started (`CopyRound`s, each (shard, configuration, round) once; the last
    /// round of a copy is never staged: its keys ride in the tail).
    pub copy_rounds_sent: u64,
    /// Moves with keys staged by a delta round.
    pub moves_with_deltas: u64,
    /// Over those moves: the keys their delta rounds staged, each (round, key) once ...
    pub delta_keys_staged: u64,
    /// ... and the keys their tails carried (the most of any tail sent for the move).
    pub tail_keys_after_deltas: u64,
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
        let ctl = w.sim.add_node(move |_| {
            // Delta rounds whatever their size: every copy while serving stages the keys
            // written meanwhile, and more rounds while they shrink.
            ControllerNode::new(dir.clone(), SHARD_SHARDS, l.clone()).with_delta_min_bytes(0)
        });
        let replayer = w.sim.add_node(|_| Replayer::default());
        let recorded: Rc<RefCell<Vec<(SimId, ControlRequest)>>> = Rc::default();
        let rec = recorded.clone();
        let copies: Rc<RefCell<CopyCounts>> = Rc::default();
        let counted = copies.clone();
        w.sim.set_message_filter(move |from, to, msg| {
            if let (true, SM::Control(req)) = (from == ctl, msg) {
                match &req.op {
                    ControlOp::Stage { items, .. } if !items.is_empty() => {
                        counted.borrow_mut().stages += 1
                    }
                    ControlOp::StageRound {
                        shard,
                        config,
                        round,
                        items,
                        absent,
                    } => {
                        let mut c = counted.borrow_mut();
                        c.stages += u64::from(!items.is_empty());
                        if (1..FROZEN_ROUND).contains(round) {
                            let keys = items.iter().map(|i| &i.key).chain(absent);
                            let set = c.delta_keys.entry((*shard, *config)).or_default();
                            set.extend(keys.map(|k| (*round, k.clone())));
                        }
                    }
                    ControlOp::CopyRound {
                        shard,
                        config,
                        round,
                    } => {
                        counted
                            .borrow_mut()
                            .copy_rounds
                            .insert((*shard, *config, *round));
                    }
                    ControlOp::ExportChunk { after: Some(_), .. } => {
                        counted.borrow_mut().later_chunks += 1
                    }
                    ControlOp::CopyStart { .. } => counted.borrow_mut().copy_starts += 1,
                    ControlOp::Install {
                        shard,
                        config,
                        data,
                    } => {
                        if let Some(keys) = shoal_shard::ShardMachine::tail_touched_keys(data) {
                            let mut c = counted.borrow_mut();
                            c.touched_tails += 1;
                            c.touched_tails_with_keys += u64::from(keys > 0);
                            let most = c.tail_keys.entry((*shard, *config)).or_default();
                            *most = (*most).max(keys as u64);
                        }
                    }
                    _ => {}
                }
                let mut rec = rec.borrow_mut();
                if rec.len() == REPLAY_KEEP {
                    rec.remove(0);
                }
                rec.push((to, req.clone()));
            }
            true
        });
        let mut run = ShardRun {
            w,
            ctl,
            log,
            clients: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed ^ RECONFIG_STREAM),
            next_ticket: 1,
            gave_up: None,
            victim: None,
            seen_results: Vec::new(),
            aimed: AimStats::default(),
            replayer,
            recorded,
            copies,
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
            membership_changes: None,
            app: None,
            trace_hash: run.w.sim.trace_hash(),
            outcome,
        }
    });
    (report, stats.into_inner())
}

impl ShardRun {
    fn stats(&self) -> ShardStats {
        let log = self.log.borrow();
        let latest = self.latest_num().unwrap_or(0);
        ShardStats {
            submitted: log.submitted.len() as u64,
            applied: log.finished.iter().filter(|f| f.1.is_ok()).count() as u64,
            latest,
            snapshots_taken: self.w.snapshots.taken.get(),
            snapshots_installed: self.w.snapshots.installed.get(),
            ghost_updates: self.w.checks.shards.updates(),
            aimed_old_owner: self.aimed.old_owner,
            aimed_new_owner: self.aimed.new_owner,
            aimed_controller: self.aimed.controller,
            moves_after_write: self.aimed.moves_after_write,
            replays: self.aimed.replays,
            stale_replays: self.aimed.stale_replays,
            stale_stage_replays: self.aimed.stale_stage_replays,
            stages_sent: self.copies.borrow().stages,
            later_chunks_sent: self.copies.borrow().later_chunks,
            copy_starts_sent: self.copies.borrow().copy_starts,
            touched_tails_sent: self.copies.borrow().touched_tails,
            touched_tails_with_keys: self.copies.borrow().touched_tails_with_keys,
            copy_rounds_sent: self.copies.borrow().copy_rounds.len() as u64,
            moves_with_deltas: self
                .copies
                .borrow()
                .delta_keys
                .values()
                .filter(|k| !k.is_empty())
                .count() as u64,
            delta_keys_staged: self
                .copies
                .borrow()
                .delta_keys
                .values()
                .map(|k| k.len() as u64)
                .sum(),
            tail_keys_after_deltas: {
                let c = self.copies.borrow();
                c.delta_keys
                    .iter()
                    .filter(|(_, k)| !k.is_empty())
                    .map(|(m, _)| c.tail_keys.get(m).copied().unwrap_or(0))
                    .sum()
            },
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
        self.seen_results.resize(self.clients.len(), 0);
        ids
    }

    /// The controller's latest configuration number, if it is up and has read one.
    fn latest_num(&self) -> Option<u64> {
        self.latest().map(|c| c.num)
    }

    /// The controller's latest configuration, if it is up and has read one.
    fn latest(&self) -> Option<&Config> {
        Some(&self.controller()?.ctl.as_ref()?.latest()?.config)
    }

    fn controller(&self) -> Option<&ControllerNode> {
        self.w.sim.node::<ControllerNode>(self.ctl)
    }

    /// A random operation on the controller's latest configuration: a Join of a group that is
    /// not a member, a Leave of a member (never the last), or a Move of a shard to a member.
    /// The first one joins groups 1 and 2.
    fn random_op(&mut self) -> Option<Op> {
        let latest = self.latest()?.clone();
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
        self.submit(op)
    }

    /// Submits `op` to the controller; whether it took it.
    fn submit(&mut self, op: Op) -> bool {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.w
            .sim
            .call::<ControllerNode, _>(self.ctl, |c, ctx| c.submit(ctx, ticket, op))
            .is_ok()
    }

    /// The leader of group `gid` (the up server that believes it leads, highest term), if any.
    fn leader_of(&self, gid: Gid) -> Option<SimId> {
        self.w
            .dir
            .group(gid)
            .iter()
            .filter(|&&id| self.w.sim.is_up(id) && !self.w.sim.is_paused(id))
            .filter_map(|&id| {
                let host = self.w.sim.node::<GroupNode>(id)?.host.as_ref()?;
                let st = host.raw().status();
                (st.role == Role::Leader).then_some((st.term, id))
            })
            .max()
            .map(|(_, id)| id)
    }

    /// Nodes of the nemesis's targets down or paused now.
    fn down_count(&self, targets: &[SimId]) -> usize {
        targets
            .iter()
            .filter(|&&id| !self.w.sim.is_up(id) || self.w.sim.is_paused(id))
            .count()
    }

    /// Faults aimed at the migration's windows, looked for every step of the nemesis phase:
    /// restarts the last victim when its time is up; otherwise, with at most one aimed victim
    /// down and the nemesis's bound on nodes down kept, crashes the old owner's leader of a
    /// frozen shard (between its freeze and its delete), the new owner's leader while that
    /// shard's install is due, or the controller while it drives a change.
    fn aim(&mut self, targets: &[SimId]) {
        let now = self.w.sim.now().as_nanos();
        if let Some((id, at)) = self.victim {
            if now < at {
                return;
            }
            self.w.sim.restart(id);
            self.victim = None;
        }
        if self.down_count(targets) >= SHARD_MAX_DOWN {
            return;
        }
        let Some(latest) = self.latest().cloned() else {
            return;
        };
        let changing = self
            .controller()
            .and_then(|c| c.ctl.as_ref())
            .is_some_and(|c| c.status().phase == shoal_shard::CtlPhase::Changing);
        let mut windows: Vec<(Aim, SimId)> = Vec::new();
        for shard in 0..SHARD_SHARDS {
            let owner = latest.owner(shard);
            for &gid in &SHARD_GIDS {
                let frozen = self
                    .w
                    .checks
                    .shards
                    .view(gid, shard)
                    .is_some_and(|v| v.state == ShardState::Frozen);
                if !frozen || Some(gid) == owner {
                    continue;
                }
                if let Some(l) = self.leader_of(gid) {
                    windows.push((Aim::OldOwnerLeader, l));
                }
                let installed = owner.is_some_and(|o| {
                    self.w
                        .checks
                        .shards
                        .view(o, shard)
                        .is_some_and(|v| v.serves)
                });
                if let (Some(o), false) = (owner, installed) {
                    if let Some(l) = self.leader_of(o) {
                        windows.push((Aim::NewOwnerLeader, l));
                    }
                }
            }
        }
        let aim = if !windows.is_empty() && self.rng.gen_bool(AIM_CHANCE) {
            windows.choose(&mut self.rng).copied()
        } else if changing && self.rng.gen_bool(AIM_CONTROLLER_CHANCE) {
            Some((Aim::Controller, self.ctl))
        } else {
            None
        };
        let Some((aim, id)) = aim else { return };
        match aim {
            Aim::OldOwnerLeader => self.aimed.old_owner += 1,
            Aim::NewOwnerLeader => self.aimed.new_owner += 1,
            Aim::Controller => self.aimed.controller += 1,
        }
        self.w.sim.note(format!("aimed crash of {id}: {aim:?}"));
        self.w.sim.crash(id);
        let down = self.rng.gen_range(AIM_DOWN_MS) * 1_000_000;
        self.victim = Some((id, now + down));
    }

    /// Now and then delivers a recorded control request again, from the replayer.
    fn replay(&mut self) {
        if !self.rng.gen_bool(REPLAY_CHANCE) {
            return;
        }
        let picked = self.recorded.borrow().choose(&mut self.rng).cloned();
        let Some((to, req)) = picked else { return };
        let latest = self.latest_num().unwrap_or(0);
        let num = match &req.op {
            ControlOp::Adopt { config } => {
                shoal_shard::Config::decode(config).map_or(latest, |c| c.num)
            }
            ControlOp::Freeze { config, .. }
            | ControlOp::Export { config, .. }
            | ControlOp::Install { config, .. }
            | ControlOp::Delete { config, .. }
            | ControlOp::ExportChunk { config, .. }
            | ControlOp::Stage { config, .. }
            | ControlOp::CopyStart { config, .. }
            | ControlOp::CopyRound { config, .. }
            | ControlOp::ExportDelta { config, .. }
            | ControlOp::StageRound { config, .. } => *config,
            ControlOp::Adopted | ControlOp::Shards => latest,
        };
        self.aimed.replays += 1;
        if num < latest {
            self.aimed.stale_replays += 1;
            if matches!(
                req.op,
                ControlOp::Stage { .. } | ControlOp::StageRound { .. }
            ) {
                self.aimed.stale_stage_replays += 1;
            }
        }
        let what = match &req.op {
            ControlOp::Adopt { .. } => "Adopt".to_string(),
            ControlOp::Adopted => "Adopted".to_string(),
            ControlOp::Shards => "Shards".to_string(),
            ControlOp::Freeze { shard, .. } => format!("Freeze shard {shard}"),
            ControlOp::Export { shard, .. } => format!("Export shard {shard}"),
            ControlOp::Install { shard, .. } => format!("Install shard {shard}"),
            ControlOp::Delete { shard, .. } => format!("Delete shard {shard}"),
            ControlOp::ExportChunk { shard, .. } => format!("ExportChunk shard {shard}"),
            ControlOp::Stage { shard, .. } => format!("Stage shard {shard}"),
            ControlOp::CopyStart { shard, .. } => format!("CopyStart shard {shard}"),
            ControlOp::CopyRound { shard, round, .. } => {
                format!("CopyRound {round} shard {shard}")
            }
            ControlOp::ExportDelta { shard, .. } => format!("ExportDelta shard {shard}"),
            ControlOp::StageRound { shard, round, .. } => {
                format!("StageRound {round} shard {shard}")
            }
        };
        self.w
            .sim
            .note(format!("replay to {to}: {what} at configuration {num}"));
        let _ = self
            .w
            .sim
            .call::<Replayer, _>(self.replayer, |_, ctx| ctx.send(to, SM::Control(req)));
    }

    /// CockroachDB's trick: when a client's newest result is an acknowledged write and the
    /// controller is idle, sometimes move that key's shard at once to another member group.
    /// Whether it submitted a move.
    fn move_after_write(&mut self) -> bool {
        let mut written = None;
        for (i, &c) in self.clients.iter().enumerate() {
            let Some(n) = self.w.sim.node::<ShardClientNode>(c) else {
                continue;
            };
            if n.results.len() > self.seen_results[i] {
                self.seen_results[i] = n.results.len();
                if let Some((KvOp::Put { key, .. }, Outcome::Done(KvResult::Written { .. }))) =
                    n.results.last()
                {
                    written = Some(key.clone());
                }
            }
        }
        let Some(key) = written else { return false };
        if !self.rng.gen_bool(MOVE_AFTER_WRITE_CHANCE)
            || !self.controller().is_some_and(ControllerNode::is_idle)
        {
            return false;
        }
        let Some(latest) = self.latest().cloned() else {
            return false;
        };
        let shard = shard_of(&key, SHARD_SHARDS);
        let others: Vec<Gid> = latest
            .groups
            .keys()
            .copied()
            .filter(|&g| Some(g) != latest.owner(shard))
            .collect();
        let Some(&gid) = others.choose(&mut self.rng) else {
            return false;
        };
        let moved = self.submit(Op::Move { shard, gid });
        if moved {
            self.aimed.moves_after_write += 1;
        }
        moved
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
        let mut nemesis = NemesisConfig::new(targets.clone());
        nemesis.max_crashed = SHARD_MAX_DOWN;
        self.w.sim.start_nemesis(nemesis);
        let end = until.as_nanos();
        let mut next_op_at = 0;
        while self.w.sim.now().as_nanos() < end {
            let now = self.w.sim.now().as_nanos();
            if now >= next_op_at && (self.move_after_write() || self.reconfigure()) {
                let pause = self.rng.gen_range(RECONFIG_PAUSE_MS);
                next_op_at = now + pause * 1_000_000;
            }
            self.aim(&targets);
            self.replay();
            let left = Duration::from_nanos(end - now);
            self.w.run_checked(AIM_STEP.min(left))?;
            self.check_violations()?;
        }
        if let Some((id, _)) = self.victim.take() {
            self.w.sim.restart(id);
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
            .latest()
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
