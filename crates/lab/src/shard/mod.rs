//! The sharded KV (`shoal-shard`) in the simulator: the message type of a shard simulation
//! ([`SM`]), the [`Directory`] of who is who, the simulated group server ([`GroupNode`]), the
//! per-event shard invariant ([`ShardInvariant`]) and the [`World`] that puts a controller
//! store (three [`RaftNode`]s) and replica groups together under every checker.
//!
//! Node layout of a world: the store servers first (sim ids `0..S`, Raft ids `1..=S`, as
//! [`RaftNode`] expects), then each group's servers in gid order. A group server's Raft id is
//! its place in its group (`1..=R`), and its name in `Config.groups` is `g{gid}-{i}`
//! ([`Directory::server_name`]): the names the controller writes and the clients route by.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_kv::RsmConfig;
use shoal_shard::Gid;
use shoal_sim::{Failure, Sim, SimConfig};
use shoal_wire::kv::KvMessage;
use shoal_wire::shard::{ControlReply, ControlRequest, ShardReply, ShardRequest};

use crate::invariants::{Invariants, Journal};
use crate::kv_client::SimId;
use crate::kv_node::{KvEnvelope, RaftNode, TICK};

mod client_node;
mod controller_node;
mod group_node;
mod invariant;
pub mod workload;

pub use client_node::{ShardClientNode, ShardWork};
pub use controller_node::{ControllerNode, CtlLog};
pub use group_node::{GroupNode, SnapshotStats};
pub use invariant::{ShardInvariant, ShardView};
pub use workload::{run_shard, run_shard_with_stats, ShardStats};

/// The message type of a shard simulation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SM {
    /// The controller store's traffic: its servers' Raft messages, KV requests and replies.
    Kv(KvMessage),
    /// A Raft message between two servers of one replica group.
    GroupRaft(shoal_raft::Message),
    /// A client's request to a group server.
    Shard(ShardRequest),
    /// A group server's reply to a client.
    ShardReply(ShardReply),
    /// The controller's request to a group server.
    Control(ControlRequest),
    /// A group server's answer to the controller.
    ControlReply(ControlReply),
}

impl KvEnvelope for SM {
    fn wrap(m: KvMessage) -> Self {
        SM::Kv(m)
    }
    fn into_kv(self) -> Option<KvMessage> {
        match self {
            SM::Kv(m) => Some(m),
            _ => None,
        }
    }
}

/// A controller-store server of a shard world.
pub type StoreNode = RaftNode<SM>;

/// Who is who in a shard world: store server ids and group server names against sim ids.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    /// Store server `i` (Raft id, 1-based) is `store[i - 1]`.
    store: Vec<SimId>,
    /// Each group's servers, in Raft id order (`[i - 1]` is Raft id `i`).
    groups: BTreeMap<Gid, Vec<SimId>>,
    names: BTreeMap<String, SimId>,
    by_sim: BTreeMap<SimId, (Gid, u64)>,
}

impl Directory {
    /// The name of server `i` (1-based Raft id) of group `gid` in `Config.groups`.
    pub fn server_name(gid: Gid, i: u64) -> String {
        format!("g{gid}-{i}")
    }

    /// Records the next store server at `sim`; its Raft id (1-based).
    pub fn add_store(&mut self, sim: SimId) -> u64 {
        self.store.push(sim);
        self.store.len() as u64
    }

    /// Records the next server of group `gid` at `sim`; its Raft id (1-based).
    pub fn add_group_server(&mut self, gid: Gid, sim: SimId) -> u64 {
        let members = self.groups.entry(gid).or_default();
        members.push(sim);
        let i = members.len() as u64;
        self.names.insert(Self::server_name(gid, i), sim);
        self.by_sim.insert(sim, (gid, i));
        i
    }

    /// The sim id of store server `server` (Raft id).
    pub fn store_sim(&self, server: u64) -> Option<SimId> {
        let i = usize::try_from(server.checked_sub(1)?).ok()?;
        self.store.get(i).copied()
    }

    /// The store servers' Raft ids.
    pub fn store_ids(&self) -> Vec<u64> {
        (1..=self.store.len() as u64).collect()
    }

    /// The store servers' sim ids.
    pub fn store_sims(&self) -> &[SimId] {
        &self.store
    }

    /// The sim id of the group server named `name` (`g{gid}-{i}`).
    pub fn sim_of(&self, name: &str) -> Option<SimId> {
        self.names.get(name).copied()
    }

    /// (gid, Raft id) of the group server at `sim`.
    pub fn group_server(&self, sim: SimId) -> Option<(Gid, u64)> {
        self.by_sim.get(&sim).copied()
    }

    /// The gids, in order.
    pub fn gids(&self) -> Vec<Gid> {
        self.groups.keys().copied().collect()
    }

    /// Group `gid`'s servers' sim ids, in Raft id order.
    pub fn group(&self, gid: Gid) -> &[SimId] {
        self.groups.get(&gid).map_or(&[], Vec::as_slice)
    }

    /// Group `gid`'s server names, in Raft id order (its entry in `Config.groups`).
    pub fn group_names(&self, gid: Gid) -> Vec<String> {
        (1..=self.group(gid).len() as u64)
            .map(|i| Self::server_name(gid, i))
            .collect()
    }

    /// Every group server's sim id, in gid then Raft id order.
    pub fn group_sims(&self) -> Vec<SimId> {
        self.groups.values().flatten().copied().collect()
    }
}

/// The shape of a shard world.
#[derive(Debug, Clone)]
pub struct WorldSpec {
    /// Controller-store servers.
    pub store_servers: u64,
    /// The groups' ids.
    pub gids: Vec<Gid>,
    /// Servers per group.
    pub group_size: u64,
    /// The cluster's shard count.
    pub shards: u32,
    /// A group server snapshots once its live log passes this many bytes (small: snapshots
    /// and their installs happen in every test).
    pub group_snapshot_bytes: u64,
    /// The store servers snapshot once their Raft state passes this many bytes.
    pub store_snapshot_bytes: u64,
}

impl Default for WorldSpec {
    fn default() -> Self {
        WorldSpec {
            store_servers: 3,
            gids: vec![1, 2, 3],
            group_size: 3,
            shards: 10,
            group_snapshot_bytes: 4_000,
            store_snapshot_bytes: 4_000,
        }
    }
}

/// Log segment size of every server of a shard world (small: compaction frees segments).
pub const SEGMENT_BYTES: u64 = 1024;

/// Every checker of a shard world: Figure 3 on the store and on each group (separate Raft
/// clusters, separate journals), and the shard invariant across groups.
pub struct Checks {
    store: Invariants,
    groups: BTreeMap<Gid, Invariants>,
    /// The shard invariant (its counters are public through its methods).
    pub shards: ShardInvariant,
}

impl Checks {
    /// Checks everything after one event.
    pub fn check(&mut self, sim: &Sim<SM>, dir: &Directory) -> Result<(), String> {
        self.store.check::<SM, StoreNode>(sim, dir.store_sims())?;
        for (gid, inv) in &mut self.groups {
            inv.check::<SM, GroupNode>(sim, dir.group(*gid))
                .map_err(|e| format!("group {gid}: {e}"))?;
        }
        self.shards.check_sim(sim, dir)
    }
}

/// A shard simulation: the store, the groups, and their checkers. Workloads add their own
/// actors (a controller, clients, a script) to `sim`.
pub struct World {
    /// The simulation.
    pub sim: Sim<SM>,
    /// Who is who.
    pub dir: Directory,
    /// The checkers, run after every event by [`World::run_checked`].
    pub checks: Checks,
    /// The shape it was built with.
    pub spec: WorldSpec,
    /// The group servers' snapshot counts, over every incarnation.
    pub snapshots: Rc<SnapshotStats>,
}

impl World {
    /// Builds the store servers and the groups of `spec` (nothing runs yet).
    pub fn new(seed: u64, spec: WorldSpec) -> World {
        let mut sim = Sim::new(seed, SimConfig::default());
        let mut dir = Directory::default();
        let store_journal = Journal::default();
        let config = RsmConfig {
            snapshot_bytes: Some(spec.store_snapshot_bytes),
            tick_ms: TICK.as_millis() as u64,
            ..RsmConfig::default()
        };
        for _ in 0..spec.store_servers {
            let (n, journal) = (spec.store_servers, store_journal.clone());
            let id = sim.add_node(move |_| {
                StoreNode::new(n, config, SEGMENT_BYTES).with_journal(journal.clone())
            });
            dir.add_store(id);
        }
        // The group servers' sim ids are known before they are added (ids are handed out in
        // order), so every server's factory can hold its peers.
        let first = sim.node_count() as u32;
        for (g, &gid) in spec.gids.iter().enumerate() {
            for i in 0..spec.group_size {
                let id = shoal_sim::NodeId(first + (g as u64 * spec.group_size + i) as u32);
                dir.add_group_server(gid, id);
            }
        }
        let mut groups = BTreeMap::new();
        let snapshots = Rc::new(SnapshotStats::default());
        for &gid in &spec.gids {
            let journal = Journal::default();
            let peers = dir.group(gid).to_vec();
            for &want in &peers {
                let (peers, journal) = (peers.clone(), journal.clone());
                let (shards, bytes) = (spec.shards, spec.group_snapshot_bytes);
                let stats = snapshots.clone();
                let id = sim.add_node(move |_| {
                    GroupNode::new(gid, peers.clone(), shards, bytes)
                        .with_journal(journal.clone())
                        .with_stats(stats.clone())
                });
                assert_eq!(id, want, "group servers are added in directory order");
            }
            groups.insert(gid, Invariants::new(journal));
        }
        World {
            sim,
            dir,
            checks: Checks {
                store: Invariants::new(store_journal),
                groups,
                shards: ShardInvariant::default(),
            },
            spec,
            snapshots,
        }
    }

    /// Runs for `d`, every checker after every event.
    pub fn run_checked(&mut self, d: Duration) -> Result<(), Failure> {
        let (sim, checks, dir) = (&mut self.sim, &mut self.checks, &self.dir);
        sim.run_checked(d, |sim| checks.check(sim, dir))
    }

    /// Runs (checked) until `done` holds, at most `max`, looking every `step`; whether it held.
    pub fn run_until(
        &mut self,
        max: Duration,
        step: Duration,
        done: impl Fn(&Sim<SM>) -> bool,
    ) -> Result<bool, Failure> {
        let limit = (self.sim.now() + max).as_nanos();
        while !done(&self.sim) {
            if self.sim.now().as_nanos() >= limit {
                return Ok(false);
            }
            self.run_checked(step)?;
        }
        Ok(true)
    }
}
