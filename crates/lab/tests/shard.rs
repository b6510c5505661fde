//! The shard workload (`shoal sim --workload shard`) over seeds: the whole sharded KV under
//! the nemesis with reconfiguration as a fault, the shard invariant and Figure 3 after every
//! event, the clients' history linearizable. A failing seed prints its replay command.

use std::cell::RefCell;
use std::time::Duration;

use shoal_lab::run_shard;
use shoal_lab::shard::{run_shard_with_stats, ShardStats};

/// The nemesis phase of each seed.
const DURATION: Duration = Duration::from_secs(10);

#[test]
fn the_sharded_kv_survives_the_nemesis_and_reconfiguration() {
    let seen = RefCell::new(Vec::new());
    shoal_sim::check_seeds!(200, |seed| {
        let (r, stats) = run_shard_with_stats(seed, DURATION);
        eprintln!(
            "seed {seed}: {} events, {} ops, {} puts acked, {} faults, {stats:?}, history \
             check gave up: {:?}",
            r.events,
            r.ops,
            r.committed,
            r.faults.total(),
            r.history_gave_up
        );
        seen.borrow_mut()
            .push((r.ops, r.committed, r.history_gave_up.is_none(), stats));
        r.outcome
    });
    // The runs exercised what they claim: clients worked, histories got a verdict, the
    // controller reconfigured (the first join on every seed, four changes a seed on average;
    // a seed whose controller spent the run crashed or cut off may do fewer), and group
    // servers took and installed snapshots.
    let seen = seen.into_inner();
    let sum = |f: fn(&ShardStats) -> u64| seen.iter().map(|s| f(&s.3)).sum::<u64>();
    eprintln!(
        "{} seeds: {} CopyStart requests, {} tails of shards copied while serving ({} with keys \
         written during the copy), {} stages, {} stale replays ({} stages); {} delta rounds \
         started, {} moves with keys staged by delta rounds: {} keys staged by them, {} keys in \
         those moves' tails",
        seen.len(),
        sum(|s| s.copy_starts_sent),
        sum(|s| s.touched_tails_sent),
        sum(|s| s.touched_tails_with_keys),
        sum(|s| s.stages_sent),
        sum(|s| s.stale_replays),
        sum(|s| s.stale_stage_replays),
        sum(|s| s.copy_rounds_sent),
        sum(|s| s.moves_with_deltas),
        sum(|s| s.delta_keys_staged),
        sum(|s| s.tail_keys_after_deltas),
    );
    assert!(seen.iter().all(|s| s.0 > 0 && s.1 > 0), "{seen:?}");
    assert!(seen.iter().any(|s| s.2), "no history got a verdict");
    assert!(seen.iter().all(|s| s.3.latest >= 1), "{seen:?}");
    if seen.len() >= 10 {
        // Not for a single replayed seed.
        assert!(sum(|s| s.applied) >= 4 * seen.len() as u64, "{seen:?}");
    }
    if seen.len() >= 10 {
        assert!(sum(|s| s.snapshots_taken) > 0, "no snapshots");
        assert!(sum(|s| s.snapshots_installed) > 0, "no snapshot installs");
        // The faults aimed at the migration's windows and the move right after a write
        // happened (each of them on some seeds).
        assert!(
            sum(|s| s.aimed_old_owner) > 0,
            "no old owner's leader crashed mid-move"
        );
        assert!(
            sum(|s| s.aimed_new_owner) > 0,
            "no new owner's leader crashed mid-install"
        );
        assert!(
            sum(|s| s.aimed_controller) > 0,
            "no controller crashed mid-change"
        );
        assert!(
            sum(|s| s.moves_after_write) > 0,
            "no shard moved right after a write"
        );
        assert!(
            sum(|s| s.stale_replays) > 0,
            "no control request of an older configuration was delivered again"
        );
        // Shards moved with data, in several chunks (one key a chunk in the simulator).
        assert!(sum(|s| s.stages_sent) > 0, "no chunk was staged");
        assert!(
            sum(|s| s.later_chunks_sent) > 0,
            "no shard moved in more than one chunk"
        );
        assert!(
            sum(|s| s.stale_stage_replays) > 0,
            "no chunk of an older configuration was staged again"
        );
        // Shards copied while they served, and tails carrying the keys written meanwhile.
        assert!(
            sum(|s| s.copy_starts_sent) > 0,
            "no shard copied while serving"
        );
        assert!(
            sum(|s| s.touched_tails_with_keys) > 0,
            "no key written while its shard was copied"
        );
        // Delta rounds: the keys written during the copy staged again while the shard
        // served, so that the frozen tails carried fewer keys than the rounds did.
        assert!(sum(|s| s.copy_rounds_sent) > 0, "no delta round started");
        assert!(
            sum(|s| s.moves_with_deltas) > 0,
            "no delta round staged a key written during a copy"
        );
        assert!(
            sum(|s| s.tail_keys_after_deltas) < sum(|s| s.delta_keys_staged),
            "the tails after delta rounds were not smaller than the rounds"
        );
    }
}

#[test]
fn a_shard_run_is_a_function_of_seed_and_duration() {
    let d = Duration::from_secs(3);
    let a = run_shard(4, d);
    assert!(a.outcome.is_ok(), "{:?}", a.outcome);
    assert!(a.events > 0 && a.ops > 0, "{a:?}");
    assert_eq!(a, run_shard(4, d));
    assert_ne!(a.trace_hash, run_shard(5, d).trace_hash);
}
