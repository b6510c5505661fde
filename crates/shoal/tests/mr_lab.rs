//! The classic MapReduce lab tests (`test-mr.sh` / `mr_test.go`), ported to real `shoal`
//! processes: the eight books, 8 map tasks, 10 reduce tasks.
// Real-process tests wait on wall-clock time (liveness bounds only, never assertions on speed).
#![allow(clippy::disallowed_methods)]

mod mr_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mr_support::*;

/// Liveness bound of a lab test (the lab uses 45 s per process).
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

fn run_app(app: &str, workers: usize, coordinator_args: &[&str]) -> Lab {
    let lab = Lab::new();
    let mut args = vec!["--app", app];
    args.extend_from_slice(coordinator_args);
    let c = lab.coordinator(&args, &books());
    for _ in 0..workers {
        lab.worker(&c, &[]);
    }
    lab.expect_success(&c, JOB_TIMEOUT);
    // Workers exit on their own once told the job is done.
    for i in 1..lab.procs.len() {
        let status = lab.procs.wait(i, Duration::from_secs(15));
        assert!(
            status.is_some_and(|s| s.success()),
            "worker {i} did not exit cleanly: {status:?}"
        );
    }
    lab
}

#[test]
fn wc() {
    let lab = run_app("wordcount", 3, &[]);
    let want = lab.seq(&["--app", "wordcount"], &books());
    assert_same(&lab.output(), &want);
    assert_eq!(mr_outs(&lab.out()).len(), 10);
}

#[test]
fn indexer() {
    let lab = run_app("indexer", 2, &[]);
    let want = lab.seq(&["--app", "indexer"], &books());
    assert_same(&lab.output(), &want);
}

#[test]
fn map_parallelism() {
    let lab = run_app("mtiming", 2, &[]);
    let out = lab.output();
    let times = out.iter().filter(|l| l.starts_with("times-")).count();
    assert_eq!(
        times, 2,
        "expected exactly two workers to run maps: {out:?}"
    );
    assert!(
        out.iter()
            .any(|l| l.starts_with("parallel-") && l.ends_with(" 2")),
        "map tasks did not run in parallel: {out:?}"
    );
}

#[test]
fn reduce_parallelism() {
    let lab = run_app("rtiming", 2, &[]);
    let out = lab.output();
    let parallel = out
        .iter()
        .filter(|l| {
            let b = l.as_bytes();
            b.len() == 3 && b[0].is_ascii_lowercase() && &b[1..] == b" 2"
        })
        .count();
    assert!(
        parallel >= 2,
        "reduce tasks did not run in parallel: {out:?}"
    );
}

#[test]
fn job_count() {
    // Backup tasks deliberately run a map task twice; this test checks nothing else does.
    let lab = run_app("jobcount", 4, &["--backup-tasks", "off"]);
    assert_eq!(lab.output(), vec!["a 8".to_string()]);
}

#[test]
fn early_exit() {
    let lab = Lab::new();
    let c = lab.coordinator(&["--app", "early_exit"], &books());
    for _ in 0..3 {
        lab.worker(&c, &[]);
    }
    let deadline = Instant::now() + JOB_TIMEOUT;
    let snapshot = loop {
        if !lab.procs.exited().is_empty() {
            break lab.output();
        }
        assert!(Instant::now() < deadline, "nobody finished");
        std::thread::sleep(Duration::from_millis(10));
    };
    lab.expect_success(&c, JOB_TIMEOUT);
    for i in 1..lab.procs.len() {
        lab.procs.wait(i, Duration::from_secs(15));
    }
    assert_same(&snapshot, &lab.output());
    assert_same(&lab.output(), &lab.seq(&["--app", "early_exit"], &books()));
}

/// Workers that crash (exit) or hang at random (the `crash` app), restarted every second by
/// loops, plus SIGKILLs from outside: the output must equal `nocrash`'s sequential one.
///
/// The lab runs one worker and three restart loops over a shared file system, where a crashed
/// worker's map output survives. Here it lives on the worker's own disk and is lost with it
/// (paper §3.3), so a worker that crashes after several map tasks takes all of them along;
/// with four workers the job spends most of its time redoing maps (100+ s). Seven loops spread
/// the outputs thinner and keep the test around 20 s.
const CRASH_RESTART_LOOPS: usize = 7;

#[test]
fn crash() {
    let lab = Lab::new();
    let c = lab.coordinator(&["--app", "crash", "--task-timeout", "2s"], &books());
    lab.worker(&c, &["--coordinator-timeout", "3s"]);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for k in 0..CRASH_RESTART_LOOPS {
        let procs = lab.procs.clone();
        let done = done.clone();
        let addr = c.addr.clone();
        let dir = lab.path().to_path_buf();
        loops.push(std::thread::spawn(move || {
            let mut current: Option<usize> = None;
            let mut round = 0u32;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let alive = current.is_some_and(|i| procs.try_wait(i).is_none());
                if !alive {
                    let child = shoal()
                        .current_dir(&dir)
                        .args(["mr", "worker", "--coordinator", &addr])
                        .args(["--coordinator-timeout", "3s", "--work-dir"])
                        .arg(dir.join("work"))
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .expect("spawn worker");
                    current = Some(procs.add(child));
                } else if k == 0 && round % 7 == 6 {
                    // One loop also SIGKILLs its worker now and then.
                    if let Some(i) = current {
                        procs.kill(i);
                    }
                }
                round += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }
    std::fs::create_dir_all(lab.path().join("work")).unwrap();
    let result = lab.procs.wait(c.index, Duration::from_secs(150));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    for l in loops {
        let _ = l.join();
    }
    assert!(
        result.is_some_and(|s| s.success()),
        "coordinator: {result:?}: {}",
        lab.log(&c)
    );
    let log = lab.log(&c);
    assert!(log.contains("worker lost"), "no worker was lost:\n{log}");
    let want = lab.seq(&["--app", "nocrash"], &books());
    assert_same(&lab.output(), &want);
    // Every output file is there once.
    let names: BTreeSet<String> = mr_outs(&lab.out())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 10);
}
