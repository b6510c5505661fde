//! The sharded KV's per-event invariant (issue 13): *at any moment at most one group accepts
//! writes for a shard, and a group serving a shard holds every write acknowledged for it.*
//!
//! Per group the checker keeps a **high-water ghost**: what the group's replica with the
//! highest applied index ever seen holds, per shard (served or not, its own position). A
//! group's applied state only moves forward and two replicas at one applied index hold the
//! same state (State Machine Safety, checked separately), so the ghost is the group's
//! committed state as far as any replica has applied it: a write accepted by the group is
//! applied in log order, against exactly this state. A restarted replica replays from its
//! snapshot, behind the ghost: the high-water mark ignores it until it passes.
//!
//! After every event:
//! 1. for each shard, at most one group's ghost serves it (`ShardMachine::serves`);
//! 2. the serving group's shard position (`store.applied()`, the shard's own counter, which
//!    travels with it) is at least the highest position the shard ever reached in any group:
//!    no applied (hence no acknowledged) write was lost across a migration.

use std::collections::BTreeMap;

use shoal_shard::{Gid, ShardId, ShardMachine, ShardState};
use shoal_sim::Sim;

use super::{Directory, GroupNode, SM};

/// What a group's ghost holds of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardView {
    /// The group serves the shard (Serving, and its adopted configuration gives it the shard).
    pub serves: bool,
    /// Serving or frozen.
    pub state: ShardState,
    /// The configuration number that gave the shard its state.
    pub config: u64,
    /// The shard's own position (writes applied to it, wherever they were applied).
    pub position: u64,
}

#[derive(Debug, Clone, Default)]
struct Ghost {
    /// The applied index of the replica it was taken from.
    applied: u64,
    /// The adopted configuration's number.
    config: u64,
    shards: BTreeMap<ShardId, ShardView>,
}

/// The checker's memory across events of one run.
#[derive(Debug, Clone, Default)]
pub struct ShardInvariant {
    ghosts: BTreeMap<Gid, Ghost>,
    /// Per shard: the highest position it reached anywhere, and the group seen holding it.
    high: BTreeMap<ShardId, (u64, Gid)>,
    /// Ghost updates so far (how much the checker saw: tests assert it saw something).
    updates: u64,
}

impl ShardInvariant {
    /// A replica of group `gid` has applied up to `applied` and holds `machine`: the group's
    /// ghost moves to it if it is ahead.
    pub fn observe(&mut self, gid: Gid, applied: u64, machine: &ShardMachine) {
        let ghost = self.ghosts.entry(gid).or_default();
        if applied <= ghost.applied && ghost.applied > 0 {
            return;
        }
        ghost.applied = applied;
        ghost.config = machine.config().num;
        ghost.shards = machine
            .shards()
            .map(|(s, sh)| {
                let view = ShardView {
                    serves: machine.serves(s),
                    state: sh.state,
                    config: sh.config,
                    position: sh.store.applied(),
                };
                (s, view)
            })
            .collect();
        self.updates += 1;
    }

    /// Ghost updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// What group `gid`'s ghost holds of `shard`.
    pub fn view(&self, gid: Gid, shard: ShardId) -> Option<ShardView> {
        self.ghosts.get(&gid)?.shards.get(&shard).copied()
    }

    /// The group whose ghost serves `shard`, if one does.
    pub fn server_of(&self, shard: ShardId) -> Option<Gid> {
        self.ghosts
            .iter()
            .find(|(_, g)| g.shards.get(&shard).is_some_and(|v| v.serves))
            .map(|(&gid, _)| gid)
    }

    /// The highest position `shard` ever reached in any group.
    pub fn high_water(&self, shard: ShardId) -> u64 {
        self.high.get(&shard).map_or(0, |h| h.0)
    }

    /// Checks both properties over the ghosts as they are now.
    pub fn check(&mut self) -> Result<(), String> {
        for (&gid, ghost) in &self.ghosts {
            for (&s, v) in &ghost.shards {
                let high = self.high.entry(s).or_insert((v.position, gid));
                if v.position > high.0 {
                    *high = (v.position, gid);
                }
            }
        }
        let mut serving: BTreeMap<ShardId, (Gid, ShardView)> = BTreeMap::new();
        for (&gid, ghost) in &self.ghosts {
            for (&s, v) in ghost.shards.iter().filter(|(_, v)| v.serves) {
                if let Some((other, ov)) = serving.insert(s, (gid, *v)) {
                    return Err(format!(
                        "shard {s} is served by two groups: {other} (configuration {}, \
                         {:?} at {}) and {gid} (configuration {}, {:?} at {})",
                        self.ghosts[&other].config,
                        ov.state,
                        ov.config,
                        ghost.config,
                        v.state,
                        v.config
                    ));
                }
                let (high, holder) = self.high[&s];
                if v.position < high {
                    return Err(format!(
                        "group {gid} serves shard {s} at position {} but the shard reached \
                         position {high} in group {holder}: applied writes were lost",
                        v.position
                    ));
                }
            }
        }
        Ok(())
    }

    /// Observes every running group server of `dir` in `sim`, then checks.
    pub fn check_sim(&mut self, sim: &Sim<SM>, dir: &Directory) -> Result<(), String> {
        for gid in dir.gids() {
            for &id in dir.group(gid) {
                if let Some(host) = sim.node::<GroupNode>(id).and_then(|n| n.host.as_ref()) {
                    self.observe(gid, host.replica().applied().0, host.machine());
                }
            }
        }
        self.check()
    }
}
