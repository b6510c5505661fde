//! Crash semantics of the simulated disk, fsync timing, the persist barrier, and timers
//! across crashes.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Probe, TMsg};
use shoal_sim::{CrashPolicy, Delay, NetConfig, NodeId, Sim, SimConfig, SECTOR_BYTES};

const N: NodeId = NodeId(0);
const PEER: NodeId = NodeId(1);

fn sim_with(seed: u64, crash_policy: CrashPolicy) -> Sim<TMsg> {
    let mut sim = Sim::new(
        seed,
        SimConfig {
            crash_policy,
            net: NetConfig::reliable().with_delay(Delay::Fixed(Duration::from_millis(1))),
            fsync_latency: Delay::Fixed(Duration::from_millis(5)),
            ..SimConfig::default()
        },
    );
    sim.add_node(|_| Probe::default());
    sim.add_node(|_| Probe::default());
    sim.run_for(Duration::from_millis(1));
    sim
}

/// Runs `f` on node N's context (disk and fsync access).
fn on_n<R>(sim: &mut Sim<TMsg>, f: impl FnOnce(&mut shoal_sim::Ctx<'_, TMsg>) -> R) -> R {
    sim.call::<Probe, _>(N, |_, ctx| f(ctx)).expect("node up")
}

/// Creates `name` with `content` and makes both durable (file fsync + dir fsync, completed).
fn durable_file(sim: &mut Sim<TMsg>, name: &str, content: &[u8]) {
    on_n(sim, |ctx| {
        ctx.disk().create(name).expect("create");
        ctx.disk().write_at(name, 0, content).expect("write");
        ctx.fsync(name).expect("fsync");
        ctx.fsync_dir();
    });
    sim.run_for(Duration::from_millis(20));
    assert_eq!(
        sim.disk(N).and_then(|d| d.durable_len(name)),
        Some(content.len() as u64)
    );
}

fn crash_restart(sim: &mut Sim<TMsg>) {
    sim.crash(N);
    sim.restart(N);
}

fn read(sim: &Sim<TMsg>, name: &str) -> Option<Vec<u8>> {
    sim.disk(N).and_then(|d| d.read_all(name).ok())
}

#[test]
fn unsynced_data_and_names_are_lost() {
    let mut sim = sim_with(1, CrashPolicy::LoseUnsynced);
    durable_file(&mut sim, "log", b"synced");
    on_n(&mut sim, |ctx| {
        ctx.disk().append("log", b"-unsynced").expect("append");
        ctx.disk().create("new").expect("create");
        ctx.disk().write_at("new", 0, b"data").expect("write");
        // File data synced, but its name never is: strict POSIX loses the file.
        ctx.fsync("new").expect("fsync");
    });
    sim.run_for(Duration::from_millis(20));
    assert_eq!(read(&sim, "log").as_deref(), Some(&b"synced-unsynced"[..]));
    crash_restart(&mut sim);
    assert_eq!(read(&sim, "log").as_deref(), Some(&b"synced"[..]));
    assert_eq!(read(&sim, "new"), None);
    assert_eq!(sim.durable_bytes(N), 6);
}

#[test]
fn a_crash_before_fsync_completes_loses_its_data() {
    let mut sim = sim_with(2, CrashPolicy::LoseUnsynced);
    durable_file(&mut sim, "log", b"a");
    on_n(&mut sim, |ctx| {
        ctx.disk().append("log", b"b").expect("append");
        ctx.fsync("log").expect("fsync");
    });
    sim.run_for(Duration::from_millis(4)); // fsync takes 5 ms
    crash_restart(&mut sim);
    assert_eq!(read(&sim, "log").as_deref(), Some(&b"a"[..]));
    // The fsync's completion never reaches the new incarnation.
    sim.run_for(Duration::from_millis(20));
    assert!(sim.node::<Probe>(N).expect("up").fsyncs.is_empty());
}

#[test]
fn fsync_covers_only_writes_before_it_and_completes_in_order() {
    let mut sim = sim_with(3, CrashPolicy::LoseUnsynced);
    durable_file(&mut sim, "log", b"");
    let (f1, f2) = on_n(&mut sim, |ctx| {
        ctx.disk().append("log", b"one").expect("append");
        let f1 = ctx.fsync("log").expect("fsync");
        ctx.disk().append("log", b"two").expect("append");
        let f2 = ctx.fsync_dir();
        (f1, f2)
    });
    sim.run_for(Duration::from_millis(20));
    let done: Vec<_> = sim
        .node::<Probe>(N)
        .expect("up")
        .fsyncs
        .iter()
        .map(|f| f.1)
        .collect();
    assert_eq!(done[done.len() - 2..], [f1, f2]);
    assert!(f1 < f2);
    crash_restart(&mut sim);
    assert_eq!(read(&sim, "log").as_deref(), Some(&b"one"[..]));
}

#[test]
fn a_random_prefix_of_unsynced_writes_survives() {
    let mut seen = BTreeSet::new();
    for seed in 0..40 {
        let mut sim = sim_with(
            seed,
            CrashPolicy::KeepRandomPrefix {
                torn_write_probability: 0.0,
            },
        );
        durable_file(&mut sim, "log", b"base");
        on_n(&mut sim, |ctx| {
            for i in 0..10u8 {
                ctx.disk().append("log", &[i; 100]).expect("append");
            }
        });
        crash_restart(&mut sim);
        let data = read(&sim, "log").expect("file survives");
        assert_eq!((data.len() - 4) % 100, 0, "whole writes only");
        let k = (data.len() - 4) / 100;
        // It is a prefix: the writes that survived are the first k, intact.
        for i in 0..k {
            assert!(data[4 + i * 100..4 + (i + 1) * 100]
                .iter()
                .all(|&b| b == i as u8));
        }
        seen.insert(k);
    }
    assert!(seen.len() >= 6, "prefix lengths seen: {seen:?}");
    assert!(seen.contains(&0) && seen.contains(&10), "{seen:?}");
}

#[test]
fn a_torn_write_keeps_a_prefix_ending_on_a_sector_boundary() {
    let mut torn = 0;
    for seed in 0..40 {
        let mut sim = sim_with(
            seed,
            CrashPolicy::KeepRandomPrefix {
                torn_write_probability: 1.0,
            },
        );
        durable_file(&mut sim, "log", &[]);
        let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        on_n(&mut sim, |ctx| {
            ctx.disk().write_at("log", 100, &block).expect("write")
        });
        crash_restart(&mut sim);
        let data = read(&sim, "log").expect("file survives");
        if data.is_empty() || data.len() == 4196 {
            continue; // the write was lost whole (crossed no boundary) or kept whole
        }
        torn += 1;
        assert_eq!(
            data.len() as u64 % SECTOR_BYTES,
            0,
            "torn at {}",
            data.len()
        );
        assert!(data[..100].iter().all(|&b| b == 0));
        assert_eq!(&data[100..], &block[..data.len() - 100]);
    }
    assert!(torn >= 10, "only {torn} torn writes in 40 crashes");
}

#[test]
fn rename_is_atomic_and_durable_only_after_a_directory_fsync() {
    // Replace "state" by writing "tmp", fsyncing it, renaming it over "state".
    let replace = |sim: &mut Sim<TMsg>, sync_dir_after_rename: bool| {
        on_n(sim, |ctx| {
            ctx.disk().create("tmp").expect("create");
            ctx.disk().write_at("tmp", 0, b"new state").expect("write");
            ctx.fsync("tmp").expect("fsync");
            ctx.fsync_dir();
        });
        sim.run_for(Duration::from_millis(20));
        on_n(sim, |ctx| {
            ctx.disk().rename("tmp", "state").expect("rename");
            if sync_dir_after_rename {
                ctx.fsync_dir();
            }
        });
        sim.run_for(Duration::from_millis(20));
    };

    let mut sim = sim_with(4, CrashPolicy::LoseUnsynced);
    durable_file(&mut sim, "state", b"old");
    replace(&mut sim, false);
    assert_eq!(read(&sim, "state").as_deref(), Some(&b"new state"[..]));
    crash_restart(&mut sim);
    assert_eq!(read(&sim, "state").as_deref(), Some(&b"old"[..]));
    assert_eq!(read(&sim, "tmp").as_deref(), Some(&b"new state"[..]));

    let mut sim = sim_with(4, CrashPolicy::LoseUnsynced);
    durable_file(&mut sim, "state", b"old");
    replace(&mut sim, true);
    crash_restart(&mut sim);
    assert_eq!(read(&sim, "state").as_deref(), Some(&b"new state"[..]));
    assert_eq!(read(&sim, "tmp"), None);

    // With random write-back, the result is the old or the new file, never a mix.
    let mut outcomes = BTreeSet::new();
    for seed in 0..30 {
        let mut sim = sim_with(seed, CrashPolicy::default());
        durable_file(&mut sim, "state", b"old");
        replace(&mut sim, false);
        crash_restart(&mut sim);
        let state = read(&sim, "state").expect("state exists");
        assert!(state == b"old" || state == b"new state", "{state:?}");
        outcomes.insert(state);
    }
    assert_eq!(outcomes.len(), 2);
}

#[test]
fn a_process_crash_keeps_the_page_cache() {
    let mut sim = sim_with(5, CrashPolicy::KeepAll);
    on_n(&mut sim, |ctx| {
        ctx.disk().create("f").expect("create");
        ctx.disk().append("f", b"unsynced").expect("append");
    });
    crash_restart(&mut sim);
    assert_eq!(read(&sim, "f").as_deref(), Some(&b"unsynced"[..]));
}

#[test]
fn sends_after_an_fsync_wait_for_it() {
    let mut sim = sim_with(6, CrashPolicy::LoseUnsynced);
    durable_file(&mut sim, "log", b"");
    let start = sim.now();
    on_n(&mut sim, |ctx| {
        ctx.disk().append("log", b"vote").expect("append");
        ctx.fsync("log").expect("fsync");
        ctx.send(PEER, TMsg::Blob(b"after persist".to_vec()));
        ctx.send_now(PEER, TMsg::Blob(b"independent".to_vec()));
    });
    sim.run_for(Duration::from_millis(20));
    let got = &sim.node::<Probe>(PEER).expect("up").received;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].2, TMsg::Blob(b"independent".to_vec()));
    assert_eq!(got[0].0, start + Duration::from_millis(1));
    assert_eq!(got[1].2, TMsg::Blob(b"after persist".to_vec()));
    // fsync 5 ms, then 1 ms on the wire.
    assert_eq!(got[1].0, start + Duration::from_millis(6));

    // A crash before the fsync completes loses the held message.
    on_n(&mut sim, |ctx| {
        ctx.disk().append("log", b"vote2").expect("append");
        ctx.fsync("log").expect("fsync");
        ctx.send(PEER, TMsg::Blob(b"never".to_vec()));
    });
    sim.run_for(Duration::from_millis(2));
    crash_restart(&mut sim);
    sim.run_for(Duration::from_millis(20));
    assert_eq!(sim.node::<Probe>(PEER).expect("up").received.len(), 2);
}

#[test]
fn timers_are_cancelled_by_a_crash_and_by_cancel_timer() {
    let mut sim = sim_with(7, CrashPolicy::default());
    on_n(&mut sim, |ctx| {
        ctx.set_timer(Duration::from_millis(100), 1);
        let t = ctx.set_timer(Duration::from_millis(10), 2);
        assert!(ctx.cancel_timer(t));
        assert!(!ctx.cancel_timer(t));
    });
    sim.run_for(Duration::from_millis(50));
    assert!(sim.node::<Probe>(N).expect("up").timers.is_empty());
    crash_restart(&mut sim);
    sim.run_for(Duration::from_millis(200));
    let p = sim.node::<Probe>(N).expect("up");
    assert!(
        p.timers.is_empty(),
        "old incarnation's timer fired: {:?}",
        p.timers
    );
    assert_eq!(p.starts, 1, "a fresh node from the factory");
}

#[test]
fn crash_with_overrides_the_policy_and_corrupt_flips_durable_bits() {
    let mut sim = sim_with(8, CrashPolicy::LoseUnsynced);
    durable_file(&mut sim, "f", b"abc");
    on_n(&mut sim, |ctx| {
        ctx.disk().append("f", b"def").expect("append")
    });
    sim.crash_with(N, CrashPolicy::KeepAll);
    sim.disk_mut(N)
        .expect("disk")
        .corrupt("f", 1, 0x01)
        .expect("exists");
    sim.restart(N);
    assert_eq!(read(&sim, "f").as_deref(), Some(&b"accdef"[..]));
}
