//! MapReduce with real processes beyond the lab: lost map output in the reduce phase, the
//! status page, streaming apps, spills, bad inputs, garbage on the wire, failing apps, backup
//! tasks and the quick start.
// Real-process tests wait on wall-clock time (liveness bounds only, never assertions on speed).
#![allow(clippy::disallowed_methods)]

mod mr_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mr_support::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// A worker is SIGKILLed in the reduce phase after finishing map tasks: its map output is lost
/// with its disk and must be recomputed; the output is still correct. Also checks the status
/// page (HTML and JSON) while the job runs.
#[test]
fn worker_killed_in_reduce_phase_map_output_is_recomputed() {
    let lab = Lab::new();
    let c = lab.coordinator(
        &[
            "--app",
            "early_exit",
            "--task-timeout",
            "3s",
            "--http",
            "127.0.0.1:0",
        ],
        &books(),
    );
    let http = c.http.clone().expect("status address");
    let w1 = lab.worker(&c, &[]);
    let w2 = lab.worker(&c, &[]);
    let deadline = Instant::now() + JOB_TIMEOUT;
    // Wait for the reduce phase, then kill a worker that won map tasks.
    let victim_pid = loop {
        assert!(Instant::now() < deadline, "never reached the reduce phase");
        std::thread::sleep(Duration::from_millis(50));
        let Some(s) = status(&http) else { continue };
        if s["phase"] != "reduce" {
            continue;
        }
        let winner = s["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|m| m["winner_worker"].as_u64())
            .expect("a map winner");
        let worker = s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"].as_u64() == Some(winner))
            .expect("winner is listed");
        assert!(worker["last_heartbeat_ms_ago"].is_u64());
        let name = worker["name"].as_str().unwrap();
        let pid: u32 = name.rsplit(':').next().unwrap().parse().unwrap();
        break pid;
    };
    let html = http_get(&http, "/").expect("status page");
    assert!(html.contains("<html") && html.contains("reduce"), "{html}");
    let victim = if lab.procs.pid(w1) == victim_pid {
        w1
    } else {
        w2
    };
    assert_eq!(lab.procs.pid(victim), victim_pid);
    lab.procs.kill(victim);
    lab.expect_success(&c, JOB_TIMEOUT);
    let log = lab.log(&c);
    assert!(
        log.contains("re-executing"),
        "no map re-execution logged:\n{log}"
    );
    assert_same(&lab.output(), &lab.seq(&["--app", "early_exit"], &books()));
    // The final page and JSON stay in the output directory: the victim's winning map attempts
    // are marked as having lost their output, and the map tasks ran again elsewhere.
    let fin = final_status(&lab.out());
    assert_eq!(fin["phase"], "done");
    assert_eq!(fin["summary"]["maps_done"], fin["maps_total"]);
    let lost: Vec<_> = attempts_of_pid(&fin, victim_pid)
        .into_iter()
        .filter(|a| a["output_lost"] == true)
        .collect();
    assert!(!lost.is_empty(), "no lost output marked: {fin}");
    let html = std::fs::read_to_string(lab.out().join("_status.html")).unwrap();
    assert!(
        html.contains("(lost)</text>"),
        "the victim's lane says lost"
    );
}

#[test]
fn stream_app_with_shipped_scripts() {
    let lab = Lab::new();
    let map = lab.path().join("map.sh");
    let reduce = lab.path().join("reduce.sh");
    std::fs::write(
        &map,
        "#!/bin/sh\ntr -cs 'A-Za-z' '\\n' | grep -v '^$' | awk '{ print $0 \"\\t1\" }'\n",
    )
    .unwrap();
    std::fs::write(
        &reduce,
        "#!/bin/sh\nawk -F'\\t' '{ c[$1] += $2 } END { for (k in c) print k \"\\t\" c[k] }'\n",
    )
    .unwrap();
    let app: Vec<String> = [
        "--app",
        "stream",
        "--mapper",
        "sh map.sh",
        "--reducer",
        "sh reduce.sh",
        "--ship",
        map.to_str().unwrap(),
        "--ship",
        reduce.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let app: Vec<&str> = app.iter().map(String::as_str).collect();
    let inputs = &books()[..3];
    let c = lab.coordinator(&app, inputs);
    lab.worker(&c, &[]);
    lab.worker(&c, &[]);
    lab.expect_success(&c, JOB_TIMEOUT);
    let got = lab.output();
    assert_same(&got, &lab.seq(&app, inputs));
    assert!(
        got.iter().any(|l| l.starts_with("Frankenstein ")),
        "{:?}",
        &got[..5]
    );
}

/// Intermediate data far larger than --memory: map output spills, reduces merge runs.
#[test]
fn intermediate_data_larger_than_memory() {
    let lab = Lab::new();
    let c = lab.coordinator(
        &["--app", "indexer", "--memory", "64KiB", "--reduces", "3"],
        &books(),
    );
    lab.worker(&c, &[]);
    lab.worker(&c, &[]);
    lab.expect_success(&c, JOB_TIMEOUT);
    assert_same(&lab.output(), &lab.seq(&["--app", "indexer"], &books()));
    assert_eq!(mr_outs(&lab.out()).len(), 3);
}

#[test]
fn missing_input_is_a_clear_error_before_the_job_starts() {
    let lab = Lab::new();
    let missing = lab.path().join("no-such-book.txt");
    let out = shoal()
        .current_dir(lab.path())
        .args(["mr", "coordinator", "--listen", "127.0.0.1:0", "--out"])
        .arg(lab.out())
        .arg(&books()[0])
        .arg(&missing)
        .stdin(Stdio::null())
        .output()
        .expect("run coordinator");
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("listening"), "started anyway: {stdout}");
    assert!(stderr.contains("no-such-book.txt"), "{stderr}");
}

#[test]
fn empty_file_and_invalid_utf8_are_processed() {
    let lab = Lab::new();
    let empty = lab.path().join("empty.txt");
    let binary = lab.path().join("binary.txt");
    std::fs::write(&empty, b"").unwrap();
    std::fs::write(
        &binary,
        b"caf\xc3\xa9 \xff\xfe broken \xc3\x28 bytes\nhello world hello\n\x00\x01 zero\n",
    )
    .unwrap();
    let inputs: Vec<PathBuf> = vec![empty, binary, books()[5].clone()];
    let c = lab.coordinator(&["--app", "wordcount"], &inputs);
    lab.worker(&c, &[]);
    lab.worker(&c, &[]);
    lab.expect_success(&c, JOB_TIMEOUT);
    let got = lab.output();
    assert_same(&got, &lab.seq(&["--app", "wordcount"], &inputs));
    assert!(got.iter().any(|l| l.starts_with("broken ")));
}

/// Connects, sends `bytes`, and checks the coordinator closes the connection.
fn expect_closed_after(addr: &str, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).expect("write");
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            // A refusal frame may come first; then the close.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed after garbage: {e}"),
        }
    }
}

#[test]
fn garbage_frames_close_the_connection_and_the_job_completes() {
    let lab = Lab::new();
    let c = lab.coordinator(&["--app", "wordcount"], &books());
    // An oversized frame header.
    expect_closed_after(&c.addr, &[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
    // Random bytes (bad checksum).
    expect_closed_after(&c.addr, b"GET / HTTP/1.1\r\nHost: coordinator\r\n\r\n");
    // A valid handshake, then a frame with a valid checksum and nonsense inside.
    let mut bytes = Vec::new();
    shoal_wire::encode_frame(
        &shoal_wire::Hello::new(
            shoal_wire::Role::Client,
            shoal_wire::mr::MR_CONTROL_CLUSTER_ID,
        ),
        1 << 20,
        &mut bytes,
    )
    .unwrap();
    let payload = [0xee_u8; 16];
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32c(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    expect_closed_after(&c.addr, &bytes);
    // A wrong protocol (a KV client's handshake) is refused too.
    let mut hello = Vec::new();
    shoal_wire::encode_frame(
        &shoal_wire::Hello::new(shoal_wire::Role::Peer { node_id: 1 }, 99),
        1 << 20,
        &mut hello,
    )
    .unwrap();
    expect_closed_after(&c.addr, &hello);
    // The coordinator still serves real workers.
    lab.worker(&c, &[]);
    lab.worker(&c, &[]);
    lab.expect_success(&c, JOB_TIMEOUT);
    assert_same(&lab.output(), &lab.seq(&["--app", "wordcount"], &books()));
}

/// CRC32C (Castagnoli), bitwise: enough for a test frame.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An app that always fails is retried, then the job fails naming the task, its input and
/// the error; the workers are told to exit.
#[test]
fn failing_app_fails_the_job_after_max_attempts() {
    let lab = Lab::new();
    let c = lab.coordinator(
        &[
            "--app",
            "stream",
            "--mapper",
            "echo 'mapper exploded' >&2; exit 3",
            "--max-attempts",
            "2",
        ],
        &books()[..2],
    );
    let w1 = lab.worker(&c, &[]);
    let w2 = lab.worker(&c, &[]);
    let status = lab
        .procs
        .wait(c.index, JOB_TIMEOUT)
        .expect("coordinator exits");
    assert_eq!(status.code(), Some(1));
    let log = lab.log(&c);
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("map "), "{log}");
    assert!(last.contains("failed 2 times"), "{log}");
    assert!(last.contains("pg-"), "input not named: {log}");
    assert!(last.contains("mapper exploded"), "error not shown: {log}");
    for w in [w1, w2] {
        let s = lab.procs.wait(w, Duration::from_secs(15));
        assert!(s.is_some(), "worker did not exit after the job failed");
    }
}

/// One worker 1000× slower: backup tasks finish its work elsewhere; the job completes (a
/// generous liveness bound, no timing assertion) with the right output.
#[test]
fn backup_tasks_rescue_a_slow_worker() {
    let lab = Lab::new();
    let out = lab.path().join("out");
    let child = shoal()
        .current_dir(lab.path())
        .args(["mr", "run", "--workers", "3", "--slow-workers", "1"])
        .args(["--slow-factor", "1000", "--app", "wordcount", "--out"])
        .arg(&out)
        .args(books())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let i = lab.procs.add(child);
    let s = lab.procs.wait(i, Duration::from_secs(60));
    assert!(s.is_some_and(|s| s.success()), "mr run: {s:?}");
    assert_same(&lab.output(), &lab.seq(&["--app", "wordcount"], &books()));
}

/// The README's first command: `shoal mr run` with no arguments counts the words of the
/// bundled books into ./mr-out and says so.
#[test]
fn quick_start_with_no_arguments() {
    let lab = Lab::new();
    let stdout_path = lab.path().join("run.out");
    let child = shoal()
        .current_dir(lab.path())
        .args(["mr", "run"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let i = lab.procs.add(child);
    let s = lab.procs.wait(i, Duration::from_secs(60));
    assert!(s.is_some_and(|s| s.success()), "mr run: {s:?}");
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    assert!(stdout.contains("Most frequent words"), "{stdout}");
    assert!(stdout.contains(" the "), "{stdout}");
    let got = sorted_lines(&mr_outs(&lab.path().join("mr-out")));
    assert_same(&got, &lab.seq(&["--app", "wordcount"], &books()));
}

/// A worker frozen with SIGSTOP in the middle of a reduce task stops heartbeating: after the
/// task timeout its work goes to another worker and the job completes. Thawed, it finds the
/// job over and exits.
#[test]
fn stopped_worker_is_declared_lost_and_its_task_reassigned() {
    let lab = Lab::new();
    let c = lab.coordinator(
        &[
            "--app",
            "early_exit",
            "--task-timeout",
            "2s",
            "--backup-tasks",
            "off",
            "--http",
            "127.0.0.1:0",
        ],
        &books(),
    );
    let http = c.http.clone().expect("status address");
    let w1 = lab.worker(&c, &["--coordinator-timeout", "3s"]);
    let w2 = lab.worker(&c, &["--coordinator-timeout", "3s"]);
    let deadline = Instant::now() + JOB_TIMEOUT;
    // Freeze a worker while it runs a reduce task.
    let frozen = loop {
        assert!(Instant::now() < deadline, "no reduce ever ran");
        std::thread::sleep(Duration::from_millis(20));
        let Some(s) = status(&http) else { continue };
        let busy = s["workers"].as_array().unwrap().iter().find(|w| {
            w["running"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|a| a.as_str().unwrap_or("").starts_with("reduce"))
            })
        });
        let Some(worker) = busy else { continue };
        let pid: u32 = worker["name"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let index = if lab.procs.pid(w1) == pid { w1 } else { w2 };
        signal(pid, "STOP");
        break index;
    };
    lab.expect_success(&c, JOB_TIMEOUT);
    assert_same(&lab.output(), &lab.seq(&["--app", "early_exit"], &books()));
    let log = lab.log(&c);
    assert!(log.contains("no heartbeat"), "{log}");
    signal(lab.procs.pid(frozen), "CONT");
    assert!(
        lab.procs.wait(frozen, Duration::from_secs(20)).is_some(),
        "thawed worker did not exit"
    );
}

/// Sends SIGSTOP/SIGCONT to a child with kill(1).
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}
