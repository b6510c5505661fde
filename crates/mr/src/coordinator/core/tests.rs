//! Deterministic tests of the coordinator state machine: time is passed in, no I/O.

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn coordinator(maps: u32, reduces: u32, backup_tasks: bool) -> Coordinator {
    Coordinator::new(CoordinatorConfig {
        maps,
        reduces,
        task_timeout: TIMEOUT,
        max_attempts: 3,
        backup_tasks,
    })
}

fn drain(c: &mut Coordinator) -> Vec<Output> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

fn map(task: u32, attempt: u32) -> AttemptRef {
    AttemptRef {
        kind: TaskKind::Map,
        task,
        attempt,
    }
}

fn reduce(task: u32, attempt: u32) -> AttemptRef {
    AttemptRef {
        kind: TaskKind::Reduce,
        task,
        attempt,
    }
}

fn register(c: &mut Coordinator, now: Duration, n: u64) -> Vec<WorkerId> {
    (0..n)
        .map(|i| c.register_worker(now, &format!("w{i}"), &format!("10.0.0.{i}:7000")))
        .collect()
}

/// The single assignment in `outs` for `worker`.
fn assigned(outs: &[Output], worker: WorkerId) -> Option<AttemptRef> {
    outs.iter().find_map(|o| match o {
        Output::AssignMap { worker: w, attempt } if *w == worker => Some(*attempt),
        Output::AssignReduce {
            worker: w, attempt, ..
        } if *w == worker => Some(*attempt),
        _ => None,
    })
}

fn none() -> BTreeMap<String, u64> {
    BTreeMap::new()
}

/// Runs `c` to completion with `workers`, each finishing immediately; returns the outputs.
fn finish_all(c: &mut Coordinator, now: Duration, workers: &[WorkerId]) -> Vec<Output> {
    let mut all = Vec::new();
    for &w in workers {
        c.request_task(now, w);
    }
    for _ in 0..1000 {
        let outs = drain(c);
        if outs.is_empty() {
            break;
        }
        for o in &outs {
            match o {
                Output::AssignMap { worker, attempt }
                | Output::AssignReduce {
                    worker, attempt, ..
                } => {
                    c.task_done(now, *worker, *attempt, none());
                    c.request_task(now, *worker);
                }
                Output::Commit { attempt, .. } => {
                    c.commit_done(now, *attempt, Ok(()));
                }
                _ => {}
            }
        }
        all.extend(outs);
    }
    all
}

#[test]
fn maps_in_order_then_reduces_after_all_maps() {
    let mut c = coordinator(3, 2, false);
    let w = register(&mut c, secs(0), 2);
    c.request_task(secs(0), w[0]);
    c.request_task(secs(0), w[1]);
    let outs = drain(&mut c);
    assert_eq!(assigned(&outs, w[0]), Some(map(0, 0)));
    assert_eq!(assigned(&outs, w[1]), Some(map(1, 0)));
    assert_eq!(
        c.task_done(secs(1), w[0], map(0, 0), none()),
        Disposition::Accepted
    );
    c.request_task(secs(1), w[0]);
    assert_eq!(assigned(&drain(&mut c), w[0]), Some(map(2, 0)));
    c.task_done(secs(2), w[0], map(2, 0), none());
    c.request_task(secs(2), w[0]);
    // Map 1 still runs: no reduce yet, and no duplicate (not overdue, backups off).
    assert_eq!(drain(&mut c), vec![]);
    c.task_done(secs(3), w[1], map(1, 0), none());
    let outs = drain(&mut c);
    match &outs[..] {
        [Output::AssignReduce {
            worker,
            attempt,
            inputs,
        }] => {
            assert_eq!((*worker, *attempt), (w[0], reduce(0, 0)));
            let tasks: Vec<u32> = inputs.iter().map(|l| l.map_task).collect();
            assert_eq!(tasks, vec![0, 1, 2]);
            assert_eq!(inputs[1].shuffle_addr, "10.0.0.1:7000");
        }
        other => panic!("expected one reduce assignment, got {other:?}"),
    }
}

#[test]
fn job_done_only_after_every_reduce_is_committed() {
    let mut c = coordinator(2, 2, false);
    let w = register(&mut c, secs(0), 1);
    c.request_task(secs(0), w[0]);
    for m in 0..2 {
        let a = assigned(&drain(&mut c), w[0]).unwrap();
        assert_eq!(a, map(m, 0));
        c.task_done(secs(1), w[0], a, none());
        c.request_task(secs(1), w[0]);
    }
    for r in 0..2 {
        let outs = drain(&mut c);
        assert_eq!(assigned(&outs, w[0]), Some(reduce(r, 0)));
        c.task_done(secs(2), w[0], reduce(r, 0), none());
        let outs = drain(&mut c);
        assert!(matches!(outs[..], [Output::Commit { attempt, .. }] if attempt == reduce(r, 0)));
        assert!(c.outcome().is_none());
        c.commit_done(secs(2), reduce(r, 0), Ok(()));
        c.request_task(secs(2), w[0]);
    }
    assert_eq!(drain(&mut c), vec![Output::JobDone]);
    assert_eq!(c.outcome(), Some(&JobOutcome::Done));
}

#[test]
fn silent_worker_loses_its_task_and_late_result_is_ignored() {
    let mut c = coordinator(1, 1, false);
    let w = register(&mut c, secs(0), 2);
    c.request_task(secs(0), w[0]);
    assert_eq!(assigned(&drain(&mut c), w[0]), Some(map(0, 0)));
    c.request_task(secs(0), w[1]);
    assert_eq!(drain(&mut c), vec![]);
    // w1 keeps sending heartbeats, w0 is silent.
    for s in 1..=10 {
        c.heard_from(secs(s), w[1]);
        c.tick(secs(s));
        if s < 10 {
            assert_eq!(
                drain(&mut c),
                vec![],
                "nothing happens before the timeout ({s} s)"
            );
        }
    }
    let outs = drain(&mut c);
    assert!(outs.contains(&Output::Disconnect { worker: w[0] }));
    assert_eq!(assigned(&outs, w[1]), Some(map(0, 1)));
    // The first attempt's late result is ignored, the second one wins.
    assert_eq!(
        c.task_done(secs(11), w[0], map(0, 0), none()),
        Disposition::Ignored
    );
    assert_eq!(
        c.task_done(secs(12), w[1], map(0, 1), none()),
        Disposition::Accepted
    );
}

#[test]
fn long_task_on_a_live_worker_is_not_taken_away() {
    let mut c = coordinator(1, 1, false);
    let w = register(&mut c, secs(0), 2);
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    c.request_task(secs(0), w[1]);
    for s in 1..10 {
        c.heard_from(secs(s), w[0]);
        c.heard_from(secs(s), w[1]);
        c.tick(secs(s));
    }
    assert_eq!(
        drain(&mut c),
        vec![],
        "a live worker's task is neither lost nor duplicated"
    );
    // Past the timeout it is duplicated, but the original keeps running and can still win.
    c.heard_from(secs(10), w[0]);
    c.heard_from(secs(10), w[1]);
    c.tick(secs(10));
    assert_eq!(assigned(&drain(&mut c), w[1]), Some(map(0, 1)));
    assert_eq!(
        c.task_done(secs(11), w[0], map(0, 0), none()),
        Disposition::Accepted
    );
    assert_eq!(
        c.task_done(secs(12), w[1], map(0, 1), none()),
        Disposition::Ignored
    );
}

#[test]
fn lost_worker_map_outputs_are_re_executed_during_reduce_phase() {
    let mut c = coordinator(2, 2, false);
    let w = register(&mut c, secs(0), 2);
    c.request_task(secs(0), w[0]);
    c.request_task(secs(0), w[1]);
    drain(&mut c);
    c.task_done(secs(1), w[0], map(0, 0), none());
    c.task_done(secs(1), w[1], map(1, 0), none());
    c.request_task(secs(1), w[1]);
    assert_eq!(assigned(&drain(&mut c), w[1]), Some(reduce(0, 0)));
    // w0 (holding map 0's output) dies.
    c.worker_lost(secs(2), w[0]);
    let outs = drain(&mut c);
    assert_eq!(outs, vec![Output::Disconnect { worker: w[0] }]);
    let status = c.status(secs(2));
    assert_eq!(status.maps[0].state, TaskState::Pending);
    assert_eq!(status.maps[1].state, TaskState::Done);
    // The reducer reports it cannot fetch map 0: it gets the map task to redo.
    c.fetch_failed(secs(3), w[1], reduce(0, 0), 0, 0);
    c.request_task(secs(3), w[1]);
    assert_eq!(assigned(&drain(&mut c), w[1]), Some(map(0, 1)));
    c.task_done(secs(4), w[1], map(0, 1), none());
    c.request_task(secs(4), w[1]);
    let outs = drain(&mut c);
    match &outs[..] {
        [Output::AssignReduce {
            attempt, inputs, ..
        }] => {
            assert_eq!(*attempt, reduce(0, 1));
            assert_eq!(inputs[0].attempt, 1);
            assert_eq!(inputs[0].shuffle_addr, "10.0.0.1:7000");
        }
        other => panic!("{other:?}"),
    }
    // The attempt log, for the status page's timeline: (task, attempt, worker, start, end,
    // outcome, output lost later).
    let log: Vec<_> = c
        .status(secs(4))
        .attempts
        .iter()
        .map(|a| {
            let end = a.end_ms;
            (
                a.kind.clone(),
                a.task,
                a.attempt,
                a.worker,
                a.start_ms,
                end,
                a.outcome,
                a.output_lost,
            )
        })
        .collect();
    use crate::status::AttemptOutcome::*;
    let m = || "map".to_string();
    let r = || "reduce".to_string();
    assert_eq!(
        log,
        vec![
            (m(), 0, 0, w[0].0, 0, Some(1000), Won, true),
            (m(), 1, 0, w[1].0, 0, Some(1000), Won, false),
            (r(), 0, 0, w[1].0, 1000, Some(3000), FetchFailed, false),
            (m(), 0, 1, w[1].0, 3000, Some(4000), Won, false),
            (r(), 0, 1, w[1].0, 4000, None, Running, false),
        ]
    );
}

#[test]
fn fetch_failure_re_executes_the_map_task() {
    let mut c = coordinator(1, 1, false);
    let w = register(&mut c, secs(0), 2);
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    c.task_done(secs(1), w[0], map(0, 0), none());
    c.request_task(secs(1), w[1]);
    assert_eq!(assigned(&drain(&mut c), w[1]), Some(reduce(0, 0)));
    assert_eq!(
        c.fetch_failed(secs(2), w[1], reduce(0, 0), 0, 0),
        Disposition::Accepted
    );
    c.request_task(secs(2), w[0]);
    assert_eq!(assigned(&drain(&mut c), w[0]), Some(map(0, 1)));
    assert_eq!(
        c.status(secs(2)).reduces[0].failures,
        0,
        "not the reduce's fault"
    );
}

#[test]
fn completed_maps_survive_worker_loss_once_all_reduces_are_done() {
    let mut c = coordinator(1, 1, false);
    let w = register(&mut c, secs(0), 2);
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    c.task_done(secs(1), w[0], map(0, 0), none());
    c.request_task(secs(1), w[1]);
    drain(&mut c);
    c.task_done(secs(2), w[1], reduce(0, 0), none());
    drain(&mut c);
    c.worker_lost(secs(3), w[0]);
    assert_eq!(c.status(secs(3)).maps[0].state, TaskState::Done);
    c.commit_done(secs(3), reduce(0, 0), Ok(()));
    assert_eq!(
        drain(&mut c),
        vec![Output::Disconnect { worker: w[0] }, Output::JobDone]
    );
}

#[test]
fn reducer_lost_before_commit_runs_the_reduce_again() {
    let mut c = coordinator(1, 1, false);
    let w = register(&mut c, secs(0), 2);
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    c.task_done(secs(1), w[0], map(0, 0), none());
    c.request_task(secs(1), w[1]);
    drain(&mut c);
    c.task_done(secs(2), w[1], reduce(0, 0), none());
    drain(&mut c);
    assert!(c.awaiting_commit(reduce(0, 0)));
    c.worker_lost(secs(3), w[1]);
    assert!(
        !c.awaiting_commit(reduce(0, 0)),
        "a superseded output is never placed"
    );
    // The commit in flight fails, and its result is ignored anyway.
    assert_eq!(
        c.commit_done(
            secs(3),
            reduce(0, 0),
            Err(CommitError::Retryable("connection refused".into()))
        ),
        Disposition::Ignored
    );
    c.request_task(secs(3), w[0]);
    assert_eq!(assigned(&drain(&mut c), w[0]), Some(reduce(0, 1)));
}

#[test]
fn backup_tasks_near_the_end_of_a_phase() {
    let mut c = coordinator(4, 1, true);
    let w = register(&mut c, secs(0), 4);
    for &x in &w {
        c.request_task(secs(0), x);
    }
    drain(&mut c);
    // Three maps finish in 1 s; map 3 (on w3) straggles.
    for (i, &x) in w.iter().enumerate().take(3) {
        c.task_done(secs(1), x, map(i as u32, 0), none());
        c.request_task(secs(1), x);
    }
    assert_eq!(drain(&mut c), vec![], "not yet a straggler");
    let hb = |c: &mut Coordinator, t: Duration| {
        for &x in &w {
            c.heard_from(t, x);
        }
    };
    hb(&mut c, ms(1900));
    c.tick(ms(1900));
    assert_eq!(drain(&mut c), vec![]);
    hb(&mut c, secs(2));
    c.tick(secs(2));
    // Median 1 s × 2: a backup of map 3 goes to the first idle worker, only one.
    assert_eq!(
        drain(&mut c),
        vec![Output::AssignMap {
            worker: w[0],
            attempt: map(3, 1)
        }]
    );
    // The backup wins; the original's late result is ignored.
    assert_eq!(
        c.task_done(secs(3), w[0], map(3, 1), none()),
        Disposition::Accepted
    );
    drain(&mut c);
    assert_eq!(
        c.task_done(secs(4), w[3], map(3, 0), none()),
        Disposition::Ignored
    );
    // The loser's output will never be fetched: its worker is told to delete it.
    assert!(drain(&mut c).contains(&Output::Discard {
        worker: w[3],
        attempt: map(3, 0)
    }));
    // On the timeline: the backup is marked, the original lost the race.
    let status = c.status(secs(4));
    let original = status
        .attempts
        .iter()
        .find(|a| a.task == 3 && a.attempt == 0);
    let backup = status
        .attempts
        .iter()
        .find(|a| a.task == 3 && a.attempt == 1);
    use crate::status::AttemptOutcome::{Superseded, Won};
    assert_eq!(
        original.map(|a| (a.backup, a.outcome, a.end_ms)),
        Some((false, Superseded, Some(4000)))
    );
    assert_eq!(
        backup.map(|a| (a.backup, a.outcome, a.start_ms, a.end_ms)),
        Some((true, Won, 2000, Some(3000)))
    );
}

#[test]
fn no_backup_tasks_when_off() {
    let mut c = coordinator(2, 1, false);
    let w = register(&mut c, secs(0), 2);
    c.request_task(secs(0), w[0]);
    c.request_task(secs(0), w[1]);
    drain(&mut c);
    c.task_done(secs(1), w[0], map(0, 0), none());
    c.request_task(secs(1), w[0]);
    for s in 2..10 {
        c.heard_from(secs(s), w[0]);
        c.heard_from(secs(s), w[1]);
        c.tick(secs(s));
    }
    assert_eq!(drain(&mut c), vec![]);
}

#[test]
fn max_attempts_fails_the_job_naming_the_task() {
    let mut c = coordinator(1, 1, false);
    let w = register(&mut c, secs(0), 1);
    for attempt in 0..3 {
        c.request_task(secs(attempt), w[0]);
        assert_eq!(assigned(&drain(&mut c), w[0]), Some(map(0, attempt as u32)));
        c.task_failed(secs(attempt), w[0], map(0, attempt as u32), "boom");
    }
    assert_eq!(
        drain(&mut c),
        vec![Output::JobFailed {
            attempt: map(0, 2),
            error: "boom".into()
        }]
    );
    assert_eq!(
        c.outcome(),
        Some(&JobOutcome::Failed {
            task: "map 0".into(),
            error: "boom".into()
        })
    );
    c.request_task(secs(5), w[0]);
    assert_eq!(
        drain(&mut c),
        vec![],
        "nothing is assigned after the job failed"
    );
}

#[test]
fn worker_loss_does_not_count_as_failure() {
    let mut c = coordinator(1, 1, false);
    for i in 0..10 {
        let w = c.register_worker(secs(i), "x", "a:1");
        c.request_task(secs(i), w);
        assert_eq!(assigned(&drain(&mut c), w).map(|a| a.task), Some(0));
        c.worker_lost(secs(i), w);
        drain(&mut c);
    }
    assert!(c.outcome().is_none());
}

#[test]
fn counters_come_from_winning_attempts_only() {
    let mut c = coordinator(1, 1, true);
    let w = register(&mut c, secs(0), 2);
    let counters = |n| BTreeMap::from([("map.output.records".to_string(), n)]);
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    c.request_task(secs(0), w[1]);
    c.heard_from(secs(10), w[0]);
    c.heard_from(secs(10), w[1]);
    c.tick(secs(10));
    assert_eq!(assigned(&drain(&mut c), w[1]), Some(map(0, 1)));
    c.heard_from(secs(11), w[0]);
    c.task_done(secs(11), w[1], map(0, 1), counters(5));
    c.task_done(secs(11), w[0], map(0, 0), counters(7));
    assert_eq!(c.counters(), counters(5));
}

#[test]
fn whole_job_with_many_workers_is_deterministic() {
    let run = || {
        let mut c = coordinator(8, 10, true);
        let w = register(&mut c, secs(0), 3);
        finish_all(&mut c, secs(1), &w)
    };
    let a = run();
    assert_eq!(a, run());
    assert_eq!(a.last(), Some(&Output::JobDone));
    let maps = a
        .iter()
        .filter(|o| matches!(o, Output::AssignMap { .. }))
        .count();
    assert_eq!(maps, 8, "every map task runs exactly once");
}

#[test]
fn empty_input_goes_straight_to_reduce() {
    let mut c = coordinator(0, 2, true);
    let w = register(&mut c, secs(0), 1);
    let outs = finish_all(&mut c, secs(0), &w);
    assert_eq!(outs.last(), Some(&Output::JobDone));
}

#[test]
fn unknown_and_stale_reports_are_ignored() {
    let mut c = coordinator(1, 1, false);
    let w = register(&mut c, secs(0), 2);
    assert_eq!(
        c.task_done(secs(0), WorkerId(99), map(0, 0), none()),
        Disposition::Ignored
    );
    assert_eq!(
        c.task_done(secs(0), w[0], map(0, 5), none()),
        Disposition::Ignored
    );
    assert_eq!(
        c.task_done(secs(0), w[0], map(42, 0), none()),
        Disposition::Ignored
    );
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    // Another worker cannot report w0's attempt.
    assert_eq!(
        c.task_done(secs(0), w[1], map(0, 0), none()),
        Disposition::Ignored
    );
    assert_eq!(
        c.task_done(secs(0), w[0], map(0, 0), none()),
        Disposition::Accepted
    );
}

#[test]
fn fetch_failure_of_a_superseded_map_attempt_keeps_the_new_winner() {
    let mut c = coordinator(1, 2, false);
    let w = register(&mut c, secs(0), 3);
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    c.task_done(secs(1), w[0], map(0, 0), none());
    c.request_task(secs(1), w[1]);
    assert_eq!(assigned(&drain(&mut c), w[1]), Some(reduce(0, 0)));
    // w0 dies: map 0 runs again on w2 and wins.
    c.worker_lost(secs(2), w[0]);
    c.request_task(secs(2), w[2]);
    assert_eq!(assigned(&drain(&mut c), w[2]), Some(map(0, 1)));
    c.task_done(secs(3), w[2], map(0, 1), none());
    // The old reduce attempt reports it could not fetch attempt 0: attempt 1 stays the winner.
    c.fetch_failed(secs(3), w[1], reduce(0, 0), 0, 0);
    assert_eq!(c.status(secs(3)).maps[0].state, TaskState::Done);
    assert_eq!(c.status(secs(3)).maps[0].winner_attempt, Some(1));
}

/// Runs map 0 and reduce 0 attempt `attempt` to a win on `w`; the commit is then due.
fn win_reduce(c: &mut Coordinator, now: Duration, w: WorkerId, attempt: u32) {
    c.request_task(now, w);
    assert_eq!(assigned(&drain(c), w), Some(reduce(0, attempt)));
    c.task_done(now, w, reduce(0, attempt), none());
    assert!(matches!(drain(c).as_slice(), [Output::Commit { .. }]));
}

#[test]
fn failed_commits_count_toward_max_attempts() {
    // Before: a failed commit ran the reduce again without counting, forever (a full output
    // disk looped for as long as anyone waited).
    let mut c = coordinator(1, 1, false);
    let w = register(&mut c, secs(0), 1);
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    c.task_done(secs(0), w[0], map(0, 0), none());
    for attempt in 0..2 {
        win_reduce(&mut c, secs(1), w[0], attempt);
        let err = CommitError::Retryable("shuffle connection closed early".into());
        assert_eq!(
            c.commit_done(secs(1), reduce(0, attempt), Err(err)),
            Disposition::Accepted
        );
        assert!(
            c.outcome().is_none(),
            "a retryable failure runs the task again"
        );
    }
    win_reduce(&mut c, secs(2), w[0], 2);
    let err = CommitError::Retryable("shuffle connection closed early".into());
    c.commit_done(secs(2), reduce(0, 2), Err(err));
    assert_eq!(
        drain(&mut c),
        vec![Output::JobFailed {
            attempt: reduce(0, 2),
            error: "shuffle connection closed early".into()
        }],
        "the third failure of three allowed fails the job"
    );
    c.request_task(secs(3), w[0]);
    assert_eq!(drain(&mut c), vec![], "nothing runs after the job failed");
}

#[test]
fn an_unrecoverable_commit_failure_fails_the_job_at_once() {
    let mut c = coordinator(1, 2, false);
    let w = register(&mut c, secs(0), 1);
    c.request_task(secs(0), w[0]);
    drain(&mut c);
    c.task_done(secs(0), w[0], map(0, 0), none());
    win_reduce(&mut c, secs(1), w[0], 0);
    let full = "output directory /o is full (No space left on device): free space or choose \
                another --out";
    c.commit_done(
        secs(1),
        reduce(0, 0),
        Err(CommitError::Unrecoverable(full.into())),
    );
    assert_eq!(
        drain(&mut c),
        vec![Output::JobAborted {
            attempt: reduce(0, 0),
            error: full.into()
        }]
    );
    assert!(matches!(c.outcome(), Some(JobOutcome::Failed { .. })));
}

#[test]
fn the_light_status_is_the_full_one_without_the_attempt_log() {
    let mut c = coordinator(4, 2, false);
    let w = register(&mut c, secs(0), 2);
    finish_all(&mut c, secs(1), &w);
    let full = c.status(secs(2));
    assert!(full.attempts_included);
    assert_eq!(full.attempts.len(), 6);
    let light = c.status_without_attempts(secs(2));
    assert!(!light.attempts_included);
    assert!(light.attempts.is_empty());
    let mut filled = light;
    filled.attempts = full.attempts.clone();
    filled.attempts_included = true;
    assert_eq!(filled, full);
}

/// Measures what the driver's tick pays for the status on a job with a full attempt log
/// (50,000 attempts): the full snapshot (what every tick copied before) against the light one
/// (what a tick publishes now). Run by hand:
/// `cargo test -p shoal-mr --lib -- --ignored --nocapture status_cost` (`docs/mapreduce.md` has
/// the figures).
#[test]
#[ignore = "a measurement, run by hand"]
#[allow(clippy::disallowed_methods)] // Measures wall time.
fn status_cost_on_a_50000_attempt_log() {
    let maps = crate::status::MAX_RECORDED_ATTEMPTS as u32;
    let mut c = coordinator(maps, 10, false);
    let w = register(&mut c, secs(0), 1)[0];
    for i in 0..maps {
        c.request_task(secs(1), w);
        let outs = drain(&mut c);
        let attempt = assigned(&outs, w).expect("a map task");
        assert_eq!(attempt, map(i, 0));
        c.task_done(secs(1), w, attempt, none());
    }
    let rounds = 20;
    let time = |f: &dyn Fn() -> JobStatus| {
        let start = std::time::Instant::now();
        let mut n = 0;
        for _ in 0..rounds {
            n += f().attempts.len();
        }
        (start.elapsed() / rounds, n / rounds as usize)
    };
    let (full, full_n) = time(&|| c.status(secs(2)));
    let (light, light_n) = time(&|| c.status_without_attempts(secs(2)));
    assert_eq!((full_n, light_n), (maps as usize, 0));
    println!(
        "{maps} maps, {maps} attempts logged: status() {full:?}, status_without_attempts() \
         {light:?} per call"
    );
}
