//! The failure report of the seed harness: seed, replay command, trace tail. Tested through
//! the non-panicking `try_run_seeds` and the formatting function.

use std::time::Duration;

use shoal_sim::scenarios::heartbeat_cluster;
use shoal_sim::{format_failure_report, try_run_seeds, Failure, NetConfig, SimConfig, TestId};

#[test]
fn failing_seed_report() {
    let id = shoal_sim::test_id!();
    assert_eq!(id.package, "shoal-sim");
    assert_eq!(id.target.as_deref(), Some("harness"));
    assert_eq!(id.test, "failing_seed_report");

    let report = try_run_seeds(&id, &[0, 1, 2, 3], |seed| {
        let mut sim =
            heartbeat_cluster(seed, 3, NetConfig::unreliable(), None, SimConfig::default());
        sim.run_for(Duration::from_secs(1));
        if seed == 2 {
            return Err(sim.failure("invariant violated: two leaders in term 3"));
        }
        Ok(())
    })
    .expect_err("seed 2 fails");
    assert!(
        report.contains("failed with seed 2: invariant violated: two leaders in term 3"),
        "{report}"
    );
    assert!(
        report.contains(
            "SHOAL_SEED=2 cargo test -p shoal-sim --test harness -- failing_seed_report --exact"
        ),
        "{report}"
    );
    assert!(report.contains("last events:"), "{report}");
    // The tail shows real trace lines with times, nodes and messages.
    let trace_lines = report
        .lines()
        .filter(|l| l.starts_with("[") && l.contains(" n"))
        .count();
    assert_eq!(
        trace_lines,
        shoal_sim::harness::REPORT_TRACE_TAIL,
        "{report}"
    );
    assert!(
        report.contains("Beat {") || report.contains("Ack {"),
        "{report}"
    );
}

#[test]
fn a_panic_inside_the_simulation_is_reported_with_its_trace() {
    let id = shoal_sim::test_id!();
    let report = try_run_seeds(&id, &[7], |seed| -> Result<(), Failure> {
        let mut sim = heartbeat_cluster(seed, 2, NetConfig::reliable(), None, SimConfig::default());
        sim.run_for(Duration::from_millis(500));
        panic!("assertion in protocol code");
    })
    .expect_err("panics");
    assert!(
        report.contains("failed with seed 7: panicked: assertion in protocol code"),
        "{report}"
    );
    assert!(
        report.contains("SHOAL_SEED=7 cargo test -p shoal-sim --test harness"),
        "{report}"
    );
    assert!(report.contains("seed 7 at 0.500000s"), "{report}");
    assert!(report.contains("timer 0"), "{report}");
}

#[test]
fn passing_seeds_report_their_count() {
    let id = shoal_sim::test_id!();
    assert_eq!(
        try_run_seeds(&id, &[1, 2, 3], |_| Ok::<(), String>(())),
        Ok(3)
    );
}

#[test]
fn report_format() {
    let id = TestId {
        package: "shoal-raft".into(),
        target: Some("elections".into()),
        test: "initial_election".into(),
    };
    let failure = Failure {
        message: "no leader after 5s".into(),
        context: Some("at 5.000000s, last events:\n[    4.990000s] #10 n1 timer 0".into()),
    };
    assert_eq!(
        format_failure_report(&id, 1234, &failure),
        "simulation test `initial_election` failed with seed 1234: no leader after 5s\n\n\
         replay this seed only:\n    \
         SHOAL_SEED=1234 cargo test -p shoal-raft --test elections -- initial_election --exact\n\n\
         at 5.000000s, last events:\n[    4.990000s] #10 n1 timer 0\n"
    );
}
