//! Inputs from anywhere (issue 16): workers on a "host" without the inputs (their own working
//! directory, which holds none of the files) take part in a job; they read each split from the
//! coordinator, which serves only the job's inputs. The output must equal `shoal mr seq`'s.
//! (The refusals — a path that is not an input, a changed input, a connection lost mid-fetch —
//! are tested in `crates/mr/src/shuffle.rs`.) About 5 s in debug.
// Real-process tests wait on wall-clock time (liveness bounds only, never assertions on speed).
#![allow(clippy::disallowed_methods)]

mod mr_support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use mr_support::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn workers_without_the_inputs_read_them_from_the_coordinator() {
    let lab = Lab::new();
    // The inputs, under relative paths of the coordinator's directory (the lab).
    std::fs::create_dir(lab.path().join("in")).unwrap();
    let mut inputs = Vec::new();
    for book in books().iter().take(4) {
        let name = PathBuf::from("in").join(book.file_name().unwrap());
        std::fs::copy(book, lab.path().join(&name)).unwrap();
        inputs.push(name);
    }
    // Small splits: most start inside a file, so ranges (not only whole files) are served.
    let c = lab.coordinator(&["--split-size", "200KiB", "--reduces", "3"], &inputs);

    let mut logs = Vec::new();
    let mut homes = Vec::new();
    for i in 0..2 {
        let home = tempfile::tempdir().unwrap();
        let log = lab.path().join(format!("worker-{i}.log"));
        let child = shoal()
            .current_dir(home.path())
            .env("SHOAL_LOG", "info")
            .args(["mr", "worker", "--coordinator", &c.addr, "--work-dir", "."])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn worker");
        lab.procs.add(child);
        logs.push(log);
        homes.push(home);
    }
    lab.expect_success(&c, JOB_TIMEOUT);
    assert_same(&lab.output(), &lab.seq(&[], &inputs));

    // Each worker said why it read from the coordinator, once per input at most.
    let mut said = 0;
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        for input in &inputs {
            let line = format!("input {} not readable here", input.display());
            let n = text.matches(&line).count();
            assert!(n <= 1, "said {n} times for {}: {text}", input.display());
            said += n;
        }
        if text.contains("not readable here") {
            assert!(
                text.contains("reading it from the coordinator"),
                "log does not say where the input is read: {text}"
            );
        }
    }
    assert!(
        said >= inputs.len(),
        "every input was read remotely by some worker, and said so (said {said} times)"
    );
}
