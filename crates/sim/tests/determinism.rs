//! One seed, one run: the full event trace of a faulty scenario hashes the same every time,
//! and another seed gives another trace.

use std::time::Duration;

use shoal_sim::scenarios::{heartbeat_cluster, HeartbeatNode};
use shoal_sim::{NemesisConfig, NetConfig, NodeId, SimConfig};

/// A 5-node heartbeat cluster under the nemesis (partitions, crashes with disk damage,
/// network changes), then healed. Returns (trace hash, trace length, events).
fn faulty_run(seed: u64) -> (u64, u64, u64) {
    let mut sim = heartbeat_cluster(
        seed,
        5,
        NetConfig::unreliable().with_long_reordering(),
        Some(5),
        SimConfig::default(),
    );
    sim.start_nemesis(NemesisConfig::new(sim.node_ids()));
    sim.run_for(Duration::from_secs(20));
    sim.heal_all();
    sim.run_for(Duration::from_secs(5));
    (sim.trace_hash(), sim.trace_len(), sim.events_processed())
}

#[test]
fn same_seed_same_trace() {
    for seed in [0, 1, 42, u64::MAX] {
        let a = faulty_run(seed);
        let b = faulty_run(seed);
        assert_eq!(a, b, "seed {seed} did not replay");
        assert!(a.1 > 10_000, "the scenario did something");
    }
}

#[test]
fn different_seeds_different_traces() {
    let hashes: std::collections::BTreeSet<u64> = (0..8).map(|s| faulty_run(s).0).collect();
    assert_eq!(hashes.len(), 8);
}

#[test]
fn control_loop_actions_replay_too() {
    // Faults applied from the test between run_for calls are part of the run.
    let run = |seed| {
        let mut sim = heartbeat_cluster(
            seed,
            3,
            NetConfig::unreliable(),
            Some(3),
            SimConfig::default(),
        );
        sim.run_for(Duration::from_secs(1));
        sim.isolate(NodeId(0));
        sim.run_for(Duration::from_secs(1));
        sim.crash(NodeId(1));
        sim.heal();
        sim.run_for(Duration::from_millis(500));
        sim.restart(NodeId(1));
        sim.run_for(Duration::from_secs(1));
        let acks = sim
            .node::<HeartbeatNode>(NodeId(1))
            .map(|n| n.acks_received);
        (sim.trace_hash(), acks)
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5).0, run(6).0);
}

#[test]
fn the_harness_runs_many_seeds() {
    shoal_sim::check_seeds!(4, |seed| {
        let (hash, _, _) = faulty_run(seed);
        if hash == faulty_run(seed).0 {
            Ok(())
        } else {
            Err(format!("seed {seed} diverged"))
        }
    });
}
