//! The nemesis: from the seed, a stream of random faults — partitions of every shape, crashes
//! and restarts, network model changes — and a full heal.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::net::{NetConfig, Partition};
use crate::sim::{stream_rng, Message, Sim, STREAM_NEMESIS};
use crate::{NodeId, SimTime};

/// Default shortest pause between two nemesis actions.
pub const DEFAULT_NEMESIS_MIN_INTERVAL: Duration = Duration::from_millis(200);
/// Default longest pause between two nemesis actions (exclusive).
pub const DEFAULT_NEMESIS_MAX_INTERVAL: Duration = Duration::from_millis(2_000);
/// Duplication probability of the nemesis's "duplicating" network model.
pub const NEMESIS_DUPLICATE_PROBABILITY: f64 = 0.05;

/// What the nemesis may do, and to whom.
#[derive(Clone, Debug)]
pub struct NemesisConfig {
    /// The nodes it may crash and partition (usually the servers, not the clients).
    pub targets: Vec<NodeId>,
    /// Shortest pause between actions.
    pub min_interval: Duration,
    /// Longest pause between actions (exclusive).
    pub max_interval: Duration,
    /// At most this many targets down at once (default: a minority, `(n - 1) / 2`).
    pub max_crashed: usize,
    /// Whether it partitions.
    pub partitions: bool,
    /// Whether it crashes and restarts nodes.
    pub crashes: bool,
    /// Whether it changes the network model (loss, delay, reordering, duplication).
    pub net_changes: bool,
}

impl NemesisConfig {
    /// Every kind of fault on `targets`, with default pacing and at most a minority down.
    pub fn new(targets: Vec<NodeId>) -> Self {
        let max_crashed = targets.len().saturating_sub(1) / 2;
        NemesisConfig {
            targets,
            min_interval: DEFAULT_NEMESIS_MIN_INTERVAL,
            max_interval: DEFAULT_NEMESIS_MAX_INTERVAL,
            max_crashed,
            partitions: true,
            crashes: true,
            net_changes: true,
        }
    }
}

pub(crate) struct NemesisState {
    config: NemesisConfig,
    rng: ChaCha8Rng,
    generation: u64,
}

#[derive(Clone, Copy)]
enum Action {
    Partition,
    HealPartition,
    Crash,
    Restart,
    NetChange,
}

/// A random partition shape over `nodes` (at least two).
/// With fewer than two nodes there is nothing to cut: the shape is one group.
pub fn random_partition<R: Rng>(rng: &mut R, nodes: &[NodeId]) -> Partition {
    if nodes.len() < 2 {
        return Partition::Groups(vec![nodes.to_vec()]);
    }
    let mut shuffled = nodes.to_vec();
    shuffled.shuffle(rng);
    let n = shuffled.len();
    match rng.gen_range(0..5) {
        0 => Partition::Isolate(shuffled[0]),
        1 => {
            // Majority / minority.
            let minority = (n - 1) / 2;
            let cut = minority.max(1);
            Partition::split(&shuffled[..cut], &shuffled[cut..])
        }
        2 if n >= 3 => {
            let bridge = shuffled[0];
            let rest = &shuffled[1..];
            let half = rest.len() / 2;
            Partition::bridge(&rest[..half], bridge, &rest[half..])
        }
        3 if n >= 4 => Partition::Ring(shuffled),
        _ => {
            // Random groups: each node picks one of up to three groups.
            let groups_n = rng.gen_range(2..=3.min(n));
            let mut groups = vec![Vec::new(); groups_n];
            for &x in &shuffled {
                groups[rng.gen_range(0..groups_n)].push(x);
            }
            groups.retain(|g| !g.is_empty());
            Partition::Groups(groups)
        }
    }
}

/// A random network model for the nemesis to switch to.
pub fn random_net<R: Rng>(rng: &mut R) -> NetConfig {
    match rng.gen_range(0..4) {
        0 => NetConfig::reliable(),
        1 => NetConfig::unreliable(),
        2 => NetConfig::unreliable().with_long_reordering(),
        _ => NetConfig::reliable().with_duplication(NEMESIS_DUPLICATE_PROBABILITY),
    }
}

impl<M: Message> Sim<M> {
    /// Starts the nemesis: from now on, every `U[min_interval, max_interval)` it applies one
    /// random fault to `config.targets`, drawing from its own stream of the seed. Replaces a
    /// running nemesis.
    pub fn start_nemesis(&mut self, config: NemesisConfig) {
        let generation = self.nemesis.as_ref().map_or(0, |n| n.generation + 1);
        let rng = stream_rng(self.seed(), STREAM_NEMESIS, generation, 0);
        self.nemesis = Some(NemesisState {
            config,
            rng,
            generation,
        });
        self.control_note(format!("nemesis starts (generation {generation})"));
        self.schedule_next_nemesis_step();
    }

    /// Stops the nemesis; faults it applied stay until healed.
    pub fn stop_nemesis(&mut self) {
        if let Some(n) = &mut self.nemesis {
            // Bumping the generation orphans the already scheduled step.
            n.generation += 1;
            n.config.targets.clear();
            self.control_note("nemesis stops".to_string());
        }
    }

    /// Stops the nemesis and undoes every fault: reconnects all links, restores the initial
    /// network model, and restarts every crashed node.
    pub fn heal_all(&mut self) {
        self.stop_nemesis();
        self.heal();
        let net = self.initial_net();
        self.set_net(net);
        for id in self.node_ids() {
            if !self.is_up(id) {
                self.restart(id);
            }
        }
    }

    fn schedule_next_nemesis_step(&mut self) {
        let now = self.now();
        let Some(n) = &mut self.nemesis else { return };
        let lo = crate::time::duration_nanos(n.config.min_interval);
        let hi = crate::time::duration_nanos(n.config.max_interval);
        let pause = if hi > lo { n.rng.gen_range(lo..hi) } else { lo };
        let at = SimTime::from_nanos(now.as_nanos().saturating_add(pause));
        let generation = n.generation;
        self.schedule_nemesis_step(at, generation);
    }

    pub(crate) fn nemesis_step(&mut self, generation: u64) {
        let down: BTreeSet<NodeId> = self
            .node_ids()
            .into_iter()
            .filter(|&id| !self.is_up(id))
            .collect();
        let Some(n) = &mut self.nemesis else { return };
        if n.generation != generation || n.config.targets.is_empty() {
            return;
        }
        let cfg = &n.config;
        let crashed: Vec<NodeId> = cfg
            .targets
            .iter()
            .copied()
            .filter(|t| down.contains(t))
            .collect();
        let up: Vec<NodeId> = cfg
            .targets
            .iter()
            .copied()
            .filter(|t| !down.contains(t))
            .collect();
        let mut actions = Vec::with_capacity(5);
        if cfg.partitions && cfg.targets.len() >= 2 {
            actions.push(Action::Partition);
            actions.push(Action::HealPartition);
        }
        if cfg.crashes {
            if crashed.len() < cfg.max_crashed && !up.is_empty() {
                actions.push(Action::Crash);
            }
            if !crashed.is_empty() {
                actions.push(Action::Restart);
            }
        }
        if cfg.net_changes {
            actions.push(Action::NetChange);
        }
        let Some(&action) = actions.choose(&mut n.rng) else {
            return;
        };
        match action {
            Action::Partition => {
                let p = random_partition(&mut n.rng, &cfg.targets.clone());
                self.apply_partition(&p);
            }
            Action::HealPartition => self.heal(),
            Action::Crash => {
                if let Some(&victim) = up.choose(&mut n.rng) {
                    self.control_note(format!("nemesis crashes {victim}"));
                    self.crash(victim);
                }
            }
            Action::Restart => {
                if let Some(&id) = crashed.choose(&mut n.rng) {
                    self.control_note(format!("nemesis restarts {id}"));
                    self.restart(id);
                }
            }
            Action::NetChange => {
                let net = random_net(&mut n.rng);
                self.set_net(net);
            }
        }
        self.schedule_next_nemesis_step();
    }
}
