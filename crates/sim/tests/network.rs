//! The network model: loss, delay bounds, long reordering, duplication, partitions, counters.
//! Every assertion is deterministic (fixed seeds), none depends on wall-clock timing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{received_ids, send_data, Probe, TMsg};
use shoal_sim::{Delay, NetConfig, NodeId, Partition, Sim, SimConfig};

fn probes(seed: u64, n: u32, net: NetConfig) -> Sim<TMsg> {
    let mut sim = Sim::new(
        seed,
        SimConfig {
            net,
            ..SimConfig::default()
        },
    );
    for _ in 0..n {
        sim.add_node(|_| Probe::default());
    }
    sim.run_for(Duration::from_millis(1)); // boot
    sim
}

const A: NodeId = NodeId(0);
const B: NodeId = NodeId(1);

#[test]
fn loss_rate_is_close_to_the_configured_probability() {
    const MESSAGES: u64 = 20_000;
    for seed in 0..3 {
        let mut sim = probes(seed, 2, NetConfig::reliable().with_loss(0.1));
        for id in 0..MESSAGES {
            send_data(&mut sim, A, B, id);
        }
        sim.run_for(Duration::from_secs(1));
        let got = received_ids(&sim, B).len() as f64 / MESSAGES as f64;
        // Binomial standard deviation is 0.2%; 1% is five of them.
        assert!(
            (got - 0.9).abs() < 0.01,
            "seed {seed}: delivered fraction {got}"
        );
        let stats = sim.link_stats(A, B);
        assert_eq!(stats.msgs_sent, MESSAGES);
        assert_eq!(stats.msgs_delivered + stats.msgs_dropped, MESSAGES);
    }
}

#[test]
fn delays_stay_within_uniform_bounds() {
    let net = NetConfig::reliable().with_delay(Delay::Uniform {
        min: Duration::from_millis(5),
        max: Duration::from_millis(27),
    });
    let mut sim = probes(1, 2, net);
    for id in 0..5_000 {
        send_data(&mut sim, A, B, id);
    }
    sim.run_for(Duration::from_secs(1));
    let p = sim.node::<Probe>(B).expect("up");
    assert_eq!(p.received.len(), 5_000);
    let mut min = u64::MAX;
    let mut max = 0;
    for (at, _, m) in &p.received {
        if let TMsg::Data { sent_nanos, .. } = m {
            let d = at.as_nanos() - sent_nanos;
            min = min.min(d);
            max = max.max(d);
        }
    }
    assert!(
        min >= 5_000_000 && max < 27_000_000,
        "delays in [{min}, {max}] ns"
    );
    // The range is well covered.
    assert!(min < 6_000_000 && max > 26_000_000);
}

#[test]
fn long_reordering_delays_two_thirds_and_reorders() {
    let net = NetConfig::unreliable()
        .with_loss(0.0)
        .with_long_reordering();
    let mut sim = probes(2, 2, net);
    const MESSAGES: u64 = 6_000;
    for id in 0..MESSAGES {
        send_data(&mut sim, A, B, id);
    }
    sim.run_for(Duration::from_secs(5));
    let p = sim.node::<Probe>(B).expect("up");
    assert_eq!(p.received.len() as u64, MESSAGES);
    let mut long = 0;
    for (at, _, m) in &p.received {
        if let TMsg::Data { sent_nanos, .. } = m {
            let d = Duration::from_nanos(at.as_nanos() - sent_nanos);
            assert!(d <= net.max_delay(), "delay {d:?}");
            if d >= Duration::from_millis(200) {
                long += 1;
            }
        }
    }
    let frac = long as f64 / MESSAGES as f64;
    assert!((frac - 600.0 / 900.0).abs() < 0.03, "long fraction {frac}");
    let ids = received_ids(&sim, B);
    let inversions = ids.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(inversions > 1_000, "only {inversions} reorderings");
}

#[test]
fn duplication_delivers_extra_copies() {
    let mut sim = probes(3, 2, NetConfig::reliable().with_duplication(0.3));
    const MESSAGES: u64 = 10_000;
    for id in 0..MESSAGES {
        send_data(&mut sim, A, B, id);
    }
    sim.run_for(Duration::from_secs(1));
    let ids = received_ids(&sim, B);
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    for id in &ids {
        *counts.entry(*id).or_default() += 1;
    }
    assert_eq!(counts.len() as u64, MESSAGES, "every message arrives");
    let dups = counts.values().filter(|&&c| c == 2).count() as u64;
    assert!(counts.values().all(|&c| c <= 2));
    let stats = sim.link_stats(A, B);
    assert_eq!(stats.msgs_duplicated, dups);
    assert_eq!(stats.msgs_delivered, MESSAGES + dups);
    let frac = dups as f64 / MESSAGES as f64;
    assert!((frac - 0.3).abs() < 0.02, "duplicated fraction {frac}");
}

/// Sends one message on every directed link among `n` nodes and returns which arrived.
fn reachable(sim: &mut Sim<TMsg>, n: u32) -> Vec<(u32, u32)> {
    let mut pairs = Vec::new();
    for a in 0..n {
        for b in 0..n {
            if a != b {
                send_data(sim, NodeId(a), NodeId(b), u64::from(a * 100 + b));
            }
        }
    }
    sim.run_for(Duration::from_millis(100));
    for b in 0..n {
        let got = received_ids(sim, NodeId(b));
        for id in got {
            let a = (id / 100) as u32;
            if id % 100 == u64::from(b) && !pairs.contains(&(a, b)) {
                pairs.push((a, b));
            }
        }
        sim.call::<Probe, _>(NodeId(b), |p, _| p.received.clear())
            .expect("up");
    }
    pairs.sort_unstable();
    pairs
}

/// Which directed links a partition shape leaves connected.
type Connectivity = Box<dyn Fn(u32, u32) -> bool>;

fn expect(n: u32, connected: impl Fn(u32, u32) -> bool) -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    for a in 0..n {
        for b in 0..n {
            if a != b && connected(a, b) {
                v.push((a, b));
            }
        }
    }
    v
}

#[test]
fn each_partition_shape_cuts_exactly_the_right_links() {
    // Nodes 0..5 are servers, node 5 a client the shapes do not name.
    let n = 6;
    let ids: Vec<NodeId> = (0..5).map(NodeId).collect();
    let mut sim = probes(4, n, NetConfig::reliable());
    let all = expect(n, |_, _| true);
    assert_eq!(reachable(&mut sim, n), all);

    let client = 5;
    let shapes: Vec<(Partition, Connectivity)> = vec![
        (
            Partition::Isolate(NodeId(2)),
            Box::new(|a, b| a != 2 && b != 2),
        ),
        (
            Partition::split(&ids[..2], &ids[2..]),
            Box::new(move |a, b| a == client || b == client || (a < 2) == (b < 2)),
        ),
        (
            // 0,1 | bridge 2 | 3,4
            Partition::bridge(&ids[..2], NodeId(2), &ids[3..]),
            Box::new(move |a, b| {
                a == client || b == client || a == 2 || b == 2 || (a < 2) == (b < 2)
            }),
        ),
        (
            Partition::Ring(ids.clone()),
            Box::new(move |a, b| {
                a == client || b == client || {
                    let d = a.abs_diff(b);
                    d == 1 || d == 4
                }
            }),
        ),
        (
            Partition::OneWay {
                from: NodeId(0),
                to: NodeId(1),
            },
            Box::new(|a, b| !(a == 0 && b == 1)),
        ),
    ];
    for (shape, connected) in shapes {
        sim.apply_partition(&shape);
        let want = expect(n, &connected);
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    assert_eq!(
                        sim.is_connected(NodeId(a), NodeId(b)),
                        connected(a, b),
                        "{shape:?}: link {a}->{b}"
                    );
                }
            }
        }
        assert_eq!(reachable(&mut sim, n), want, "{shape:?}");
        sim.heal();
        assert_eq!(reachable(&mut sim, n), all, "heal after {shape:?}");
    }
}

#[test]
fn scheduled_partition_and_heal_take_effect_at_their_time() {
    let mut sim = probes(5, 3, NetConfig::reliable());
    let t0 = sim.now();
    sim.schedule(
        t0 + Duration::from_millis(100),
        shoal_sim::Control::Partition(Partition::Isolate(NodeId(0))),
    );
    sim.schedule(t0 + Duration::from_millis(200), shoal_sim::Control::Heal);
    sim.run_for(Duration::from_millis(50));
    assert!(sim.is_connected(A, B));
    sim.run_for(Duration::from_millis(100));
    assert!(!sim.is_connected(A, B) && !sim.is_connected(B, A));
    assert!(sim.is_connected(B, NodeId(2)));
    sim.run_for(Duration::from_millis(100));
    assert!(sim.is_connected(A, B));
}

#[test]
fn byte_counters_count_exact_frames() {
    let mut sim = probes(6, 2, NetConfig::reliable());
    let msg = TMsg::Blob(vec![7; 300]);
    let mut frame = Vec::new();
    shoal_wire::encode_frame(&msg, shoal_wire::DEFAULT_MAX_FRAME_BYTES, &mut frame)
        .expect("encodes");
    for _ in 0..10 {
        let m = msg.clone();
        sim.call::<Probe, _>(A, |_, ctx| ctx.send(B, m))
            .expect("up");
    }
    sim.run_for(Duration::from_millis(10));
    let s = sim.link_stats(A, B);
    assert_eq!(s.msgs_sent, 10);
    assert_eq!(s.bytes_sent, 10 * frame.len() as u64);
    assert_eq!(s.bytes_delivered, s.bytes_sent);
    let node = sim.node_stats(A);
    assert_eq!(node.outgoing.bytes_sent, s.bytes_sent);
    assert_eq!(sim.node_stats(B).incoming.msgs_delivered, 10);
    assert_eq!(sim.link_stats(B, A), Default::default());
}

#[test]
fn encoded_delivery_gives_the_same_run() {
    let run = |deliver_encoded: bool| {
        let mut sim = Sim::new(
            9,
            SimConfig {
                net: NetConfig::unreliable().with_duplication(0.1),
                deliver_encoded,
                ..SimConfig::default()
            },
        );
        sim.add_node(|_| Probe::default());
        sim.add_node(|_| Probe::default());
        sim.run_for(Duration::from_millis(1));
        for id in 0..500 {
            send_data(&mut sim, A, B, id);
            sim.call::<Probe, _>(B, |_, ctx| ctx.send(A, TMsg::Blob(vec![id as u8; 40])))
                .expect("up");
        }
        sim.run_for(Duration::from_secs(1));
        (sim.trace_hash(), received_ids(&sim, B))
    };
    assert_eq!(run(false), run(true));
}

#[test]
fn messages_to_a_restarted_node_are_discarded() {
    let net = NetConfig::reliable().with_delay(Delay::Fixed(Duration::from_millis(10)));
    let mut sim = probes(7, 2, net);
    send_data(&mut sim, A, B, 1);
    sim.run_for(Duration::from_millis(5));
    sim.crash(B);
    sim.restart(B);
    send_data(&mut sim, A, B, 2);
    sim.run_for(Duration::from_millis(20));
    assert_eq!(received_ids(&sim, B), vec![2]);
    // Sending to a down node is dropped at once.
    sim.crash(B);
    send_data(&mut sim, A, B, 3);
    assert_eq!(sim.link_stats(A, B).msgs_dropped, 2);
}

#[test]
fn a_message_filter_drops_what_the_test_says() {
    let mut sim = probes(8, 3, NetConfig::reliable());
    sim.set_message_filter(|from, to, msg| {
        !(from == A && to == B && matches!(msg, TMsg::Data { id, .. } if id % 2 == 0))
    });
    for id in 0..10 {
        send_data(&mut sim, A, B, id);
        send_data(&mut sim, A, NodeId(2), id);
    }
    sim.run_for(Duration::from_millis(10));
    let mut got = received_ids(&sim, B);
    got.sort_unstable();
    assert_eq!(got, vec![1, 3, 5, 7, 9]);
    assert_eq!(received_ids(&sim, NodeId(2)).len(), 10);
    assert_eq!(sim.link_stats(A, B).msgs_dropped, 5);
    sim.clear_message_filter();
    send_data(&mut sim, A, B, 10);
    sim.run_for(Duration::from_millis(10));
    assert_eq!(received_ids(&sim, B).last(), Some(&10));
}

#[test]
fn run_checked_stops_at_the_first_violation() {
    let mut sim = probes(9, 2, NetConfig::reliable());
    for id in 0..10 {
        send_data(&mut sim, A, B, id);
    }
    let result = sim.run_checked(Duration::from_secs(1), |s| {
        if received_ids(s, B).len() > 3 {
            Err("B received more than 3".to_string())
        } else {
            Ok(())
        }
    });
    let failure = result.expect_err("violated");
    assert_eq!(failure.message, "B received more than 3");
    assert_eq!(
        received_ids(&sim, B).len(),
        4,
        "stopped right after the violating event"
    );
    assert!(failure.context.is_some_and(|c| c.contains("recv")));
}
