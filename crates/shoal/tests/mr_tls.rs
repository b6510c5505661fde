//! MapReduce over TLS (issue 17), with certificates made by `shoal cert`: a coordinator and
//! two workers given `--cert/--key/--ca` run a job whose output equals `shoal mr seq`'s, with
//! every connection through mutual TLS — workers to the coordinator, reduce fetches between
//! workers, the coordinator fetching reduce outputs, and one worker (started where the inputs
//! are not) reading its splits from the coordinator. Before they do, a worker without a
//! certificate and a worker of another CA are refused with a clear error on both sides. And the
//! non-loopback rule: plain TCP off loopback is refused unless `--insecure`. About 10 s in debug.
// Real-process tests wait on wall-clock time (liveness bounds only, never assertions on speed).
#![allow(clippy::disallowed_methods)]

mod mr_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mr_support::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(90);

fn ok(args: &[&str]) {
    let out = shoal().args(args).output().expect("run shoal");
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--cert DIR/NAME.pem --key DIR/NAME-key.pem --ca DIR/ca.pem`.
fn tls(dir: &Path, name: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).display().to_string();
    vec![
        "--cert".into(),
        p(format!("{name}.pem")),
        "--key".into(),
        p(format!("{name}-key.pem")),
        "--ca".into(),
        p("ca.pem".into()),
    ]
}

/// Runs a worker of `addr` to its end (bounded) and returns its exit code and stderr.
fn run_worker(lab: &Lab, addr: &str, extra: &[String]) -> (Option<i32>, String) {
    let child = shoal()
        .current_dir(lab.path())
        .args(["mr", "worker", "--coordinator", addr])
        .args(["--coordinator-timeout", "3s", "--work-dir"])
        .arg(lab.path())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    let i = lab.procs.add(child);
    let (code, _, stderr) = lab
        .procs
        .wait_with_output(i, Duration::from_secs(30))
        .expect("the refused worker exits");
    (code, stderr)
}

/// Waits until the coordinator's log has a line holding every one of `parts`.
fn wait_log(lab: &Lab, coord: &Coord, parts: &[&str]) {
    let start = Instant::now();
    loop {
        let log = lab.log(coord);
        if log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{parts:?} not in the coordinator's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_tls_job_matches_seq_and_workers_without_a_valid_certificate_are_refused() {
    let lab = Lab::new();
    let (certs, other) = (lab.path().join("certs"), lab.path().join("other"));
    let s = |p: &Path| p.display().to_string();
    ok(&["cert", "init", "--dir", &s(&certs)]);
    ok(&["cert", "init", "--dir", &s(&other)]);
    for (dir, name) in [
        (&certs, "coord"),
        (&certs, "w1"),
        (&certs, "w2"),
        (&other, "w3"),
    ] {
        ok(&[
            "cert",
            "node",
            "--dir",
            &s(dir),
            "--name",
            name,
            "--ip",
            "127.0.0.1",
        ]);
    }
    // Inputs under relative paths of the lab (the coordinator's directory): worker 2 runs in
    // an empty directory and reads its splits from the coordinator.
    std::fs::create_dir(lab.path().join("in")).unwrap();
    let mut inputs = Vec::new();
    for book in books().iter().take(3) {
        let name = PathBuf::from("in").join(book.file_name().unwrap());
        std::fs::copy(book, lab.path().join(&name)).unwrap();
        inputs.push(name);
    }
    let coord_tls = tls(&certs, "coord");
    let mut args: Vec<&str> = vec!["--split-size", "300KiB", "--reduces", "3"];
    args.extend(coord_tls.iter().map(String::as_str));
    let c = lab.coordinator(&args, &inputs);

    // No certificate at all (plain TCP to the TLS port): refused in words, on both sides.
    let (code, stderr) = run_worker(&lab, &c.addr, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("coordinator refused this worker: this coordinator serves TLS only")
            && stderr.contains("--cert, --key and --ca"),
        "{stderr}"
    );
    wait_log(&lab, &c, &["handshake refused", "serves TLS only"]);

    // A certificate of another CA: the TLS handshake fails; each side names the cause.
    let (code, stderr) = run_worker(&lab, &c.addr, &tls(&other, "w3"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("not signed by the CA given with --ca"),
        "{stderr}"
    );
    wait_log(&lab, &c, &["TLS handshake failed"]);

    // Certified workers run the job; the refused ones took no part in it.
    lab.worker(
        &c,
        &tls(&certs, "w1")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let home = tempfile::tempdir().unwrap();
    let child = shoal()
        .current_dir(home.path())
        .args(["mr", "worker", "--coordinator", &c.addr, "--work-dir", "."])
        .args(tls(&certs, "w2"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker");
    lab.procs.add(child);
    lab.expect_success(&c, JOB_TIMEOUT);
    assert_same(&lab.output(), &lab.seq(&[], &inputs));
    let status = final_status(&lab.out());
    let workers = status["workers"].as_array().map_or(0, Vec::len);
    assert_eq!(
        workers, 2,
        "only the certified workers registered: {status}"
    );
}

#[test]
fn plain_tcp_off_loopback_is_refused_unless_insecure() {
    let lab = Lab::new();
    std::fs::write(lab.path().join("in.txt"), "to be or not to be\n").unwrap();
    let coordinator = |extra: &[&str]| {
        shoal()
            .current_dir(lab.path())
            .args(["mr", "coordinator", "--listen", "0.0.0.0:0", "--out", "out"])
            .args(extra)
            .arg("in.txt")
            .stdin(Stdio::null())
            .output()
            .expect("run coordinator")
    };
    let out = coordinator(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for part in ["without TLS", "--cert, --key and --ca", "--insecure"] {
        assert!(stderr.contains(part), "{part:?} not in: {stderr}");
    }
    let worker = shoal()
        .args(["mr", "worker", "--coordinator", "127.0.0.1:9"])
        .args(["--shuffle-listen", "0.0.0.0:0"])
        .output()
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&worker.stderr);
    assert_eq!(worker.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--shuffle-listen") && stderr.contains("--insecure"),
        "{stderr}"
    );
    // --insecure: the coordinator starts (and announces its address).
    let mut child = shoal()
        .current_dir(lab.path())
        .args(["mr", "coordinator", "--listen", "0.0.0.0:0", "--insecure"])
        .args(["--out", "out", "in.txt"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn coordinator");
    let stdout = child.stdout.take().unwrap();
    let i = lab.procs.add(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert!(line.starts_with("listening on 0.0.0.0:"), "{line:?}");
    lab.procs.kill(i);
}
