//! `shoal mr` where a new user hurts it: a full output or scratch disk, SIGTERM and SIGKILL of
//! `mr run`, a directory and `.gz` files as inputs, a worker pointed at nothing or at a KV
//! server, a busy `--http` port, `--out` naming a file, host names, and a failed job's message.
// Real-process tests wait on wall-clock time (liveness bounds only, never assertions on speed).
#![allow(clippy::disallowed_methods)]

mod mr_support;
mod proc_support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mr_support::*;
use proc_support::{children_of, running};

/// Liveness bound of a job that must end (the old code looped for ever on a full disk).
const JOB_BOUND: Duration = Duration::from_secs(60);

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (with the reason printed) only when this process may not mount (not root, or
    /// a container without CAP_SYS_ADMIN); CI runs as root, where mounting works.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            let denied = why.contains("permission denied")
                || why.contains("Operation not permitted")
                || why.contains("must be superuser")
                || why.contains("only root");
            assert!(
                denied,
                "mount failed for another reason than permission: {why}"
            );
            eprintln!("SKIPPED: mounting a tmpfs is not permitted here: {why}");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Names in `dir` starting with `prefix`.
fn entries_starting(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Runs `cmd` to its end with a liveness bound; returns (exit code, stdout, stderr).
fn run_bounded(mut cmd: Command, bound: Duration) -> (Option<i32>, String, String) {
    let procs = Procs::default();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shoal");
    let i = procs.add(child);
    let Some(status) = procs.wait_with_output(i, bound) else {
        panic!("still running after {bound:?}: {:?}", cmd);
    };
    status
}

/// `shoal mr run` with $TMPDIR (its scratch) in `tmp`.
fn mr_run(tmp: &Path) -> Command {
    std::fs::create_dir_all(tmp).unwrap();
    let mut cmd = shoal();
    cmd.args(["mr", "run"])
        .env("TMPDIR", tmp)
        .env("NO_COLOR", "1");
    cmd
}

/// Before: the reduce commits were retried for ever (attempt 156 after 10 minutes) and each
/// failed attempt's files stayed in the scratch directory (17 GB). Now the job fails at once,
/// naming the directory, and leaves no scratch, no attempt directories and no partial output.
#[test]
fn full_output_disk_fails_the_job_at_once_naming_the_directory() {
    let lab = Lab::new();
    let Some(_mnt) = Tmpfs::mount(&lab.path().join("mnt"), "1m") else {
        return;
    };
    let out = lab.path().join("mnt/out");
    let tmp = lab.path().join("tmp");
    // The indexer's output of the eight books is about 3 MB: three times the disk.
    let mut cmd = mr_run(&tmp);
    cmd.args(["--app", "indexer", "--out"])
        .arg(&out)
        .args(books());
    let (code, _, stderr) = run_bounded(cmd, JOB_BOUND);
    assert_eq!(code, Some(1), "{stderr}");
    let want = format!(
        "output directory {} is full (No space left on device): free space or choose another --out",
        out.display()
    );
    assert_eq!(stderr.matches(&want).count(), 1, "said once: {stderr}");
    assert!(stderr.contains("error: job failed: "), "{stderr}");
    assert_eq!(entries_starting(&tmp, "shoal-mr-"), Vec::<String>::new());
    // Nothing but the final status page (`_status.*`, if it fit) is left.
    let left: Vec<PathBuf> = files_under(&out)
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('_'))
        })
        .collect();
    assert_eq!(left, Vec::<PathBuf>::new(), "partial output");
}

/// A full scratch disk (the workers' directories) fails the job with a message naming the
/// worker's directory, and the failed attempts' files are gone.
#[test]
fn full_scratch_disk_fails_the_job_naming_the_worker_directory() {
    let lab = Lab::new();
    let tmp = lab.path().join("tmp");
    let Some(_mnt) = Tmpfs::mount(&tmp, "1m") else {
        return;
    };
    let mut cmd = mr_run(&tmp);
    cmd.args(["--app", "indexer", "--out"])
        .arg(lab.out())
        .args(books());
    let (code, _, stderr) = run_bounded(cmd, JOB_BOUND);
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: job failed: "), "{stderr}");
    assert!(
        last.contains("worker directory ")
            && last.contains("is full (No space left on device): free space or choose another"),
        "{stderr}"
    );
    assert_eq!(
        files_under(&tmp),
        Vec::<PathBuf>::new(),
        "left in the scratch"
    );
}

/// Starts `mr run` on a job that takes long (slow workers), waits until its workers run, and
/// returns (its processes, its index, the worker pids, its scratch directory).
fn start_long_job(lab: &Lab, tmp: &Path) -> (Procs, usize, Vec<u32>, PathBuf) {
    let procs = Procs::default();
    let mut cmd = mr_run(tmp);
    cmd.args([
        "--workers",
        "2",
        "--slow-workers",
        "2",
        "--slow-factor",
        "1000",
    ])
    .arg("--out")
    .arg(lab.out())
    .args(books())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let i = procs.add(cmd.spawn().expect("spawn mr run"));
    let pid = procs.pid(i);
    let scratch = tmp.join(format!("shoal-mr-run-{pid}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Each worker made its own directory: both are up and registered their dirs.
        let workers: usize = (0..2)
            .map(|w| {
                entries_starting(&scratch.join(format!("worker-{w}")), "shoal-mr-worker-").len()
            })
            .sum();
        let kids = children_of(pid);
        if workers == 2 && kids.len() == 2 {
            return (procs, i, kids, scratch);
        }
        assert!(Instant::now() < deadline, "workers did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` to a running `mr run`; checks it exits with `code` and `message`, its workers
/// gone and its scratch directory removed.
fn stop_mr_run_with(sig: &str, code: i32, message: &str) {
    let lab = Lab::new();
    let tmp = lab.path().join("tmp");
    let (procs, i, workers, scratch) = start_long_job(&lab, &tmp);
    signal(procs.pid(i), sig);
    let (got, _, stderr) = procs
        .wait_with_output(i, Duration::from_secs(20))
        .expect("mr run exits on the signal");
    assert_eq!(got, Some(code), "{stderr}");
    assert!(stderr.contains(message), "{stderr}");
    for w in workers {
        assert!(!running(w), "worker {w} outlived mr run");
    }
    assert!(!scratch.exists(), "scratch {} left", scratch.display());
    // Before: an abandoned job left no final page. Now the driver writes it, phase
    // "abandoned" with the signal as the reason, and no partial output.
    let json = std::fs::read_to_string(lab.out().join("_status.json")).expect("_status.json");
    let status: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(status["phase"], "abandoned", "{json}");
    let reason = status["outcome"]["Abandoned"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains(&format!("SIG{sig}")), "{json}");
    let html = std::fs::read_to_string(lab.out().join("_status.html")).expect("_status.html");
    assert!(html.contains("The job was abandoned"), "{html}");
    assert!(
        entries_starting(&lab.out(), "mr-out-").is_empty(),
        "outputs of an abandoned job left"
    );
}

/// Before: Ctrl-C on `mr coordinator` left no final page. Now the job is abandoned through its
/// driver: exit 130, `_status.json` with phase "abandoned" and the reason, `_status.html`
/// saying so.
#[test]
fn ctrl_c_on_the_coordinator_writes_the_final_page_as_abandoned() {
    let lab = Lab::new();
    let mut cmd = shoal();
    cmd.args(["mr", "coordinator", "--listen", "127.0.0.1:0", "--out"])
        .arg(lab.out())
        .args(&books()[..1])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the coordinator");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    expect_line(&rx, "listening on", Duration::from_secs(20));
    signal(child.id(), "INT");
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the coordinator did not exit on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: the job is abandoned"),
        "{stderr}"
    );
    let json = std::fs::read_to_string(lab.out().join("_status.json")).expect("_status.json");
    let status: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(status["phase"], "abandoned", "{json}");
    assert!(
        status["outcome"]["Abandoned"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("SIGINT")),
        "{json}"
    );
    assert!(lab.out().join("_status.html").exists());
}

/// Before: SIGTERM killed `mr run` with no message, its workers ran on for 10 s and its
/// scratch directory stayed for ever. Now it cleans up as Ctrl-C does, with exit code 143.
#[test]
fn sigterm_stops_mr_run_like_ctrl_c() {
    stop_mr_run_with("TERM", 143, "terminated: stopping the workers");
}

/// Ctrl-C (SIGINT): the same, with exit code 130.
#[test]
fn sigint_stops_mr_run_and_cleans_up() {
    stop_mr_run_with("INT", 130, "interrupted: stopping the workers");
}

/// Before: workers of a SIGKILLed `mr run` ran on (10 s, then a message after the prompt).
/// Now they die with it; the next `mr run` removes the scratch directory it left.
#[test]
fn sigkill_of_mr_run_takes_its_workers_down() {
    let lab = Lab::new();
    let tmp = lab.path().join("tmp");
    let (procs, i, workers, scratch) = start_long_job(&lab, &tmp);
    signal(procs.pid(i), "KILL");
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|&w| running(w)) {
        assert!(
            Instant::now() < deadline,
            "workers outlived a SIGKILLed mr run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    procs.kill(i); // reap
    assert!(scratch.exists(), "nothing could remove it");
    let small = lab.path().join("small.txt");
    std::fs::write(&small, "a b a\n").unwrap();
    let mut cmd = mr_run(&tmp);
    cmd.args(["--workers", "1", "--reduces", "1", "-o", "json", "--out"])
        .arg(lab.path().join("out2"))
        .arg(&small);
    let (code, stdout, stderr) = run_bounded(cmd, JOB_BOUND);
    assert_eq!(code, Some(0), "{stderr}");
    // `-o json`: the summary is the only thing on stdout, one JSON document.
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(
        (
            summary["input_bytes"].as_u64(),
            summary["reduce_tasks"].as_u64(),
            summary["top_words"][0].clone()
        ),
        (Some(6), Some(1), serde_json::json!(["a", 2])),
        "{stdout}"
    );
    assert!(
        !scratch.exists(),
        "the next mr run removes a dead run's scratch"
    );
}

/// Before: "input d is a directory, not a file", and a .gz file was counted as bytes. Now a
/// directory stands for its files (hidden `_`/`.` files skipped) and .gz is decompressed: the
/// output equals the sequential run on the plain files.
#[test]
fn directory_and_gz_inputs_are_read_like_their_plain_files() {
    let lab = Lab::new();
    let books = books();
    let dir = lab.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&books[0], dir.join("a.txt")).unwrap();
    let gz = gzip(&std::fs::read(&books[1]).unwrap());
    std::fs::write(dir.join("b.txt.gz"), gz).unwrap();
    std::fs::write(dir.join("_SUCCESS"), "").unwrap();
    std::fs::write(dir.join(".a.txt.crc"), "not text \u{1}").unwrap();
    let tmp = lab.path().join("tmp");
    let mut cmd = mr_run(&tmp);
    cmd.args(["--split-size", "100KiB", "--out"])
        .arg(lab.out())
        .arg(&dir);
    let (code, stdout, stderr) = run_bounded(cmd, JOB_BOUND);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("over 2 file(s)"), "{stdout}");
    assert_same(&lab.output(), &lab.seq(&[], &books[..2]));
    // `mr seq` reads the directory the same way.
    assert_same(&lab.seq(&[], &[dir]), &lab.seq(&[], &books[..2]));
}

/// `data` compressed by the system's gzip (not by the crate the code under test uses).
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("gzip output");
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Reads `child`'s stderr lines into a channel.
fn stderr_lines(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line containing `want`; returns the lines seen.
fn expect_line(rx: &mpsc::Receiver<String>, want: &str, bound: Duration) -> Vec<String> {
    let deadline = Instant::now() + bound;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(want);
                seen.push(line);
                if hit {
                    return seen;
                }
            }
            Err(_) => panic!("no line with {want:?} within {bound:?}; got {seen:#?}"),
        }
    }
}

/// Before: silent for the whole --coordinator-timeout, then "giving up (the job may have
/// finished)" although it never connected. Now it says what is wrong at once.
#[test]
fn worker_says_at_once_that_nothing_listens() {
    let procs = Procs::default();
    let mut child = shoal()
        .args(["mr", "worker", "--coordinator", "127.0.0.1:1"])
        .args(["--coordinator-timeout", "120s"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    let rx = stderr_lines(&mut child);
    procs.add(child);
    // Far less than the 120 s it keeps trying: the message comes at the first refusal.
    expect_line(
        &rx,
        "connecting to 127.0.0.1:1: connection refused — is the coordinator running?",
        Duration::from_secs(20),
    );
    drop(procs);

    // And when it gives up, it does not pretend the job may have finished.
    let mut cmd = shoal();
    cmd.args(["mr", "worker", "--coordinator", "127.0.0.1:1"])
        .args(["--coordinator-timeout", "500ms"]);
    let (code, _, stderr) = run_bounded(cmd, JOB_BOUND);
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("cannot reach a coordinator at 127.0.0.1:1 (connection refused)")
            && last.contains("is the coordinator running?")
            && !last.contains("may have finished"),
        "{stderr}"
    );
}

/// Before: against a KV server's port the worker logged "lost the coordinator; reconnecting"
/// 4 times a second for 10 s. Now it says at once that the port is not a coordinator.
#[test]
fn worker_pointed_at_a_kv_server_says_it_is_not_a_coordinator() {
    let lab = Lab::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let procs = Procs::default();
    let kv = shoal()
        .args(["kv", "server", "--id", "1", "--listen", &addr])
        .args(["--peers", &format!("1={addr}"), "--data"])
        .arg(lab.path().join("kv"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kv server");
    procs.add(kv);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "kv server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut cmd = shoal();
    cmd.args(["mr", "worker", "--coordinator", &addr])
        .args(["--coordinator-timeout", "120s"]);
    // Bounded far below the 120 s it would otherwise keep trying.
    let (code, _, stderr) = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{addr}: that port is not a MapReduce coordinator")),
        "{stderr}"
    );
    assert!(!stderr.contains("reconnecting"), "{stderr}");
}

/// Before: "listening on …" was printed, then the busy --http port failed the command. Now
/// both ports are bound first: nothing is announced.
#[test]
fn coordinator_with_a_busy_http_port_fails_before_listening() {
    let lab = Lab::new();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = busy.local_addr().unwrap().to_string();
    let mut cmd = shoal();
    cmd.args([
        "mr",
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--http",
        &http,
    ])
    .arg("--out")
    .arg(lab.out())
    .args(&books()[..1]);
    let (code, stdout, stderr) = run_bounded(cmd, JOB_BOUND);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!stdout.contains("listening on"), "announced: {stdout}");
    assert!(
        stderr.contains(&format!("cannot serve the status page on --http {http}")),
        "{stderr}"
    );
    drop(busy);
}

/// Before: the failed job's line was printed 4 times (each worker and the coordinator).
#[test]
fn a_failed_job_is_reported_once() {
    let lab = Lab::new();
    let mut cmd = mr_run(&lab.path().join("tmp"));
    cmd.args([
        "--app",
        "stream",
        "--mapper",
        "echo 'mapper exploded' >&2; exit 3",
    ])
    .args(["--max-attempts", "1", "--out"])
    .arg(lab.out())
    .args(&books()[..2]);
    let (code, _, stderr) = run_bounded(cmd, JOB_BOUND);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.matches("job failed").count(), 1, "{stderr}");
}

/// Before: "cannot create output directory ofile: File exists (os error 17): File exists (os
/// error 17)".
#[test]
fn out_naming_a_file_says_so_once() {
    let lab = Lab::new();
    let file = lab.path().join("ofile");
    std::fs::write(&file, "x").unwrap();
    let mut cmd = mr_run(&lab.path().join("tmp"));
    cmd.arg("--out").arg(&file).args(&books()[..1]);
    let (code, _, stderr) = run_bounded(cmd, JOB_BOUND);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!("error: --out {} is a file, not a directory", file.display())
    );
}

/// Host names in --listen, --http and --coordinator (before: "invalid socket address
/// syntax").
#[test]
fn host_names_for_listen_http_and_coordinator() {
    let lab = Lab::new();
    let small = lab.path().join("small.txt");
    std::fs::write(&small, "to be or not to be\n").unwrap();
    let log = std::fs::File::create(lab.path().join("c.log")).unwrap();
    let mut child = shoal()
        .args([
            "mr",
            "coordinator",
            "--listen",
            "localhost:0",
            "--http",
            "localhost:0",
        ])
        .args(["--reduces", "2", "--out"])
        .arg(lab.out())
        .arg(&small)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn coordinator");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let c = lab.procs.add(child);
    // `listening on` is the first line (the status page line follows); read up to it.
    let first = lines
        .by_ref()
        .map(|l| l.expect("utf-8"))
        .find(|l| l.starts_with("listening on "))
        .expect("a `listening on` line");
    let port = first
        .strip_prefix("listening on ")
        .and_then(|a| a.rsplit(':').next())
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    let w = shoal()
        .args([
            "mr",
            "worker",
            "--coordinator",
            &format!("localhost:{port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker");
    lab.procs.add(w);
    let status = lab.procs.wait(c, JOB_BOUND).expect("coordinator exits");
    assert!(status.success(), "{status}");
    assert_eq!(
        lab.output(),
        ["be 2", "not 1", "or 1", "to 2"].map(String::from).to_vec()
    );
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}
