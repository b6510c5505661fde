//! The MapReduce coordinator in the simulator (`shoal sim --workload mr`): over many seeds,
//! workers crash, pause and lose their map output while the network drops, delays, reorders,
//! duplicates and partitions; the outputs must equal the sequential reference and appear
//! atomically. A failure prints its seed and the command that replays it.

use std::time::Duration;

use shoal_lab::mr::{plan_splits, run_mr, sequential_reference, MR_SPLIT_BYTES};
use shoal_lab::Workload;

/// The fault phase of each run (virtual time).
const DURATION: Duration = Duration::from_secs(10);

#[test]
fn the_mr_job_survives_crashes_pauses_lost_output_and_a_faulty_network() {
    shoal_sim::check_seeds!(30, |seed| {
        let r = run_mr(seed, DURATION);
        eprintln!(
            "seed {seed}: {} events, {} attempts, {} outputs, {} faults, ended at {}",
            r.events,
            r.ops,
            r.committed,
            r.faults.total(),
            r.sim_time
        );
        r.outcome.map_err(|f| {
            shoal_sim::Failure::new(format!(
                "{}\nreplay: shoal sim --workload mr --seed {seed} --duration {}s{}",
                f.message,
                DURATION.as_secs(),
                f.context.map(|c| format!("\n{c}")).unwrap_or_default()
            ))
        })
    });
}

#[test]
fn a_seed_replays_exactly() {
    let a = Workload::Mr.run(7, Duration::from_secs(3));
    let b = Workload::Mr.run(7, Duration::from_secs(3));
    assert_eq!(a, b);
    assert!(a.outcome.is_ok(), "{:?}", a.outcome);
    assert_ne!(
        a.trace_hash,
        Workload::Mr.run(8, Duration::from_secs(3)).trace_hash
    );
}

#[test]
fn splits_cover_every_byte_at_line_ends() {
    let inputs = std::collections::BTreeMap::from([
        ("a".to_string(), b"one two\n".repeat(100)),
        ("b".to_string(), b"no newline at the end".to_vec()),
    ]);
    let splits = plan_splits(&inputs);
    assert!(splits.len() > 2, "{splits:?}");
    for (name, bytes) in &inputs {
        let mut at = 0;
        for s in splits.iter().filter(|s| s.path.to_str() == Some(name)) {
            assert_eq!(s.offset, at);
            at += s.len;
            assert!(s.len as usize <= MR_SPLIT_BYTES + 8 || name == "b");
            assert!(at as usize == bytes.len() || bytes[at as usize - 1] == b'\n');
        }
        assert_eq!(at as usize, bytes.len());
    }
}

#[test]
fn the_reference_partitions_the_sequential_output() {
    let app = shoal_mr::apps::wordcount::WordCount;
    let inputs = std::collections::BTreeMap::from([("a".to_string(), b"b a b\nc\n".to_vec())]);
    let one = sequential_reference(&app, &inputs, 1).unwrap();
    assert_eq!(one, vec![b"a 1\nb 2\nc 1\n".to_vec()]);
    let three = sequential_reference(&app, &inputs, 3).unwrap();
    assert_eq!(three.concat().len(), one[0].len());
}
