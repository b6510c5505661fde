//! The nemesis applies every kind of fault from the seed, and `heal_all` undoes them.

use std::time::Duration;

use shoal_sim::scenarios::{heartbeat_cluster, HeartbeatNode};
use shoal_sim::{NemesisConfig, NetConfig, NodeId, SimConfig, TraceKind};

#[test]
fn nemesis_mixes_every_fault_and_heal_all_undoes_them() {
    let mut sim = heartbeat_cluster(
        21,
        5,
        NetConfig::reliable(),
        Some(4),
        SimConfig {
            trace_tail_len: 1_000_000,
            ..SimConfig::default()
        },
    );
    let servers = sim.node_ids();
    sim.start_nemesis(NemesisConfig::new(servers.clone()));
    let mut max_down = 0;
    for _ in 0..600 {
        sim.run_for(Duration::from_millis(100));
        let down = servers.iter().filter(|&&id| !sim.is_up(id)).count();
        max_down = max_down.max(down);
    }
    assert!(
        (1..=2).contains(&max_down),
        "at most a minority down, saw {max_down}"
    );
    let actions: Vec<String> = sim
        .trace_tail()
        .filter_map(|e| match &e.kind {
            TraceKind::Control { action } => Some(action.clone()),
            _ => None,
        })
        .collect();
    for needle in [
        "Isolate",
        "Groups",
        "Ring",
        "heal",
        "crashes",
        "restarts",
        "set net",
        "long_delay: Some",
    ] {
        assert!(
            actions.iter().any(|a| a.contains(needle)),
            "no {needle:?} among {} actions",
            actions.len()
        );
    }
    assert!(sim
        .trace_tail()
        .any(|e| matches!(e.kind, TraceKind::Crash { .. })));

    sim.heal_all();
    let quiet_from = sim.trace_len();
    sim.run_for(Duration::from_secs(5));
    for &a in &servers {
        assert!(sim.is_up(a));
        for &b in &servers {
            assert!(sim.is_connected(a, b));
        }
    }
    // No more faults after heal_all, and every node hears from every peer.
    assert!(!sim
        .trace_tail()
        .filter(|e| e.index >= quiet_from)
        .any(|e| matches!(e.kind, TraceKind::Control { .. } | TraceKind::Crash { .. })));
    for id in servers {
        let n = sim.node::<HeartbeatNode>(id).expect("up");
        assert!(n.acks_received > 0, "{id} got no acks after healing");
    }
    assert!(sim.durable_bytes(NodeId(0)) > 0);
}
