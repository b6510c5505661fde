//! The MapReduce coordinator in the simulator (`shoal sim --workload mr`): over many seeds,
//! each running one of the apps (wordcount, indexer, grep, sort, terasort), workers crash,
//! pause and lose their map output while the network drops, delays, reorders, duplicates and
//! partitions; the outputs must equal the sequential reference, appear atomically, be durable
//! the instant the job is declared done, and (sort apps) be in total order. A failure prints
//! its seed and the command that replays it.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_lab::mr::{
    app_from_spec, app_spec, check_total_order, generate_inputs, plan_record_splits, plan_splits,
    run_mr, run_mr_with, sequential_reference, MrApp, MrOptions, Sabotage, SharedInputs,
    MR_SPLIT_BYTES, MR_SPLIT_RECORDS,
};
use shoal_lab::Workload;
use shoal_sim::rand::SeedableRng;

/// The fault phase of each run (virtual time).
const DURATION: Duration = Duration::from_secs(10);

#[test]
fn the_mr_job_survives_crashes_pauses_lost_output_and_a_faulty_network() {
    shoal_sim::check_seeds!(30, |seed| {
        let r = run_mr(seed, DURATION);
        let app = r.app.unwrap_or("?");
        eprintln!(
            "seed {seed} ({app}): {} events, {} attempts, {} outputs, {} faults, ended at {}",
            r.events,
            r.ops,
            r.committed,
            r.faults.total(),
            r.sim_time
        );
        assert_eq!(r.app, Some(MrApp::for_seed(seed).name()));
        r.outcome.map_err(|f| {
            shoal_sim::Failure::new(format!(
                "{}\nreplay: shoal sim --workload mr --app {app} --seed {seed} --duration {}s{}",
                f.message,
                DURATION.as_secs(),
                f.context.map(|c| format!("\n{c}")).unwrap_or_default()
            ))
        })
    });
}

#[test]
fn seeds_take_every_app_in_turn_and_names_parse_back() {
    let apps: Vec<MrApp> = (0..5).map(MrApp::for_seed).collect();
    assert_eq!(apps, MrApp::ALL);
    for app in MrApp::ALL {
        assert_eq!(MrApp::parse(app.name()), Some(app));
    }
    assert_eq!(MrApp::parse("stream"), None);
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
    // A chosen app replays too (the inputs' temporary directory is not part of the run).
    let sort = MrOptions {
        app: Some(MrApp::Sort),
        ..MrOptions::default()
    };
    let c = run_mr_with(7, Duration::from_secs(3), sort);
    assert_eq!(c, run_mr_with(7, Duration::from_secs(3), sort));
    assert_eq!(c.app, Some("sort"));
    assert!(c.outcome.is_ok(), "{:?}", c.outcome);
}

/// The planted bugs prove the end-of-run checks can fail: an output renamed into place but
/// reported before the directory fsync, or fetched without an fsync of its data, is visible
/// and right when the job ends — only the crash at that instant shows it is not durable.
#[test]
fn a_job_done_before_its_outputs_are_durable_is_caught() {
    for sabotage in [Sabotage::PlacedBeforeDirSync, Sabotage::FetchedWithoutFsync] {
        let mut caught = 0;
        for seed in 0..10 {
            let options = MrOptions {
                app: Some(MrApp::WordCount),
                sabotage,
            };
            let r = run_mr_with(seed, Duration::from_secs(2), options);
            if let Err(f) = &r.outcome {
                assert!(
                    f.message.contains("is not durable when the job is done"),
                    "{sabotage:?}, seed {seed}: {}",
                    f.message
                );
                caught += 1;
            }
        }
        // Half the seeds crash losing every unsynced byte: those always catch it.
        assert!(
            caught >= 3,
            "{sabotage:?}: only {caught} of 10 seeds caught"
        );
    }
}

#[test]
fn splits_cover_every_byte_at_line_ends() {
    let inputs = BTreeMap::from([
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
fn record_splits_never_cut_a_record() {
    let inputs = BTreeMap::from([("r".to_string(), vec![b'\n'; 100 * 7])]);
    let splits = plan_record_splits(&inputs, 100, 3);
    let lens: Vec<u64> = splits.iter().map(|s| s.len).collect();
    assert_eq!(lens, [300, 300, 100]);
    assert_eq!(splits[2].offset, 600);
}

#[test]
fn the_reference_partitions_the_sequential_output_and_names_inputs_as_the_job_does() {
    let inputs = SharedInputs::write(BTreeMap::from([
        ("a".to_string(), b"b a b\nc\n".to_vec()),
        ("z".to_string(), b"c d\n".to_vec()),
    ]))
    .unwrap();
    let wc = shoal_mr::apps::wordcount::WordCount;
    let one = sequential_reference(MrApp::WordCount, &wc, &inputs, 1).unwrap();
    assert_eq!(one, vec![b"a 1\nb 2\nc 2\nd 1\n".to_vec()]);
    let three = sequential_reference(MrApp::WordCount, &wc, &inputs, 3).unwrap();
    assert_eq!(three.concat().len(), one[0].len());
    // The engine names inputs by path; the reference by the job's names.
    let indexer = shoal_mr::apps::indexer::Indexer;
    let index = sequential_reference(MrApp::Indexer, &indexer, &inputs, 1).unwrap();
    assert_eq!(index[0], b"a 1 a\nb 1 a\nc 2 a,z\nd 1 z\n");
}

#[test]
fn the_total_order_check_catches_disorder_within_and_across_outputs() {
    let ok = [b"a\nb\n".to_vec(), Vec::new(), b"c\nc\n".to_vec()];
    assert_eq!(check_total_order(MrApp::Sort, &ok), Ok(()));
    let within = [b"b\na\n".to_vec()];
    assert!(check_total_order(MrApp::Sort, &within).is_err());
    let across = [b"a\nc\n".to_vec(), b"b\n".to_vec()];
    assert!(check_total_order(MrApp::Sort, &across).is_err());
    // Equal keys belong to one output.
    let split_key = [b"a\n".to_vec(), b"a\n".to_vec()];
    assert!(check_total_order(MrApp::Sort, &split_key).is_err());
    // TeraSort orders by the 10-byte key only: equal keys, any rest.
    let mut records = Vec::new();
    records.extend_from_slice(&[b'k'; 100]);
    let mut second = [b'k'; 100];
    second[50] = 0;
    records.extend_from_slice(&second);
    assert_eq!(check_total_order(MrApp::TeraSort, &[records]), Ok(()));
}

/// The sort apps' job really partitions: the cut points the sampler places from the inputs
/// spread the records over several outputs, in total order, and the sort app's reference
/// holds every input record.
#[test]
fn the_sort_apps_cut_points_spread_the_records_in_total_order() {
    for kind in [MrApp::Sort, MrApp::TeraSort] {
        let mut spread = 0;
        for seed in 0..10u64 {
            let mut rng = shoal_sim::ChaCha8Rng::seed_from_u64(seed);
            let inputs = SharedInputs::write(generate_inputs(kind, &mut rng)).unwrap();
            let splits = match kind {
                MrApp::TeraSort => plan_record_splits(&inputs.files, 100, MR_SPLIT_RECORDS),
                _ => plan_splits(&inputs.files),
            };
            let spec = app_spec(kind, &mut rng, &inputs, &splits, 4).unwrap();
            let cuts = spec.sort.as_ref().map_or(0, |s| s.cut_points.len());
            assert!(cuts <= 3, "{kind:?}: {cuts} cut points for 4 partitions");
            let app = app_from_spec(&spec).unwrap();
            let parts = sequential_reference(kind, &*app, &inputs, 4).unwrap();
            check_total_order(kind, &parts).unwrap();
            let records: usize = parts.iter().map(|p| record_count(kind, p)).sum();
            let input: usize = inputs.files.values().map(|f| record_count(kind, f)).sum();
            assert_eq!(
                records, input,
                "{kind:?} seed {seed}: records lost or added"
            );
            if parts.iter().filter(|p| !p.is_empty()).count() >= 3 {
                spread += 1;
            }
        }
        assert!(
            spread >= 8,
            "{kind:?}: only {spread} of 10 inputs spread over 3+ outputs"
        );
    }
}

fn record_count(kind: MrApp, bytes: &[u8]) -> usize {
    match kind {
        MrApp::TeraSort => bytes.len() / 100,
        _ => bytes.split_inclusive(|&b| b == b'\n').count(),
    }
}
