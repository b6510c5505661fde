//! `shoal bench kv --quick` against a Shoal cluster it starts itself (and, when this build has
//! the `etcd` feature and /usr/bin/etcd exists, a quick `--compare`), plus its refusals of bad
//! input. Asserts on the structure of the JSON lines and that every measured operation was
//! answered; never on a timing.

use std::path::Path;
use std::process::{Command, Output};

fn shoal(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["bench", "kv"])
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("run shoal bench kv")
}

/// The JSON lines of a successful run.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line parses"))
        .collect()
}

/// A run line: the expected target, mode and clients, every measured op answered.
fn assert_run(v: &serde_json::Value, target: &str, mode: &str, clients: u64) {
    assert_eq!(v["kind"], "run", "{v}");
    assert_eq!(v["target"], target, "{v}");
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(v["clients"], clients, "{v}");
    assert_eq!(v["ops"], 200, "--quick measures 200 ops: {v}");
    assert_eq!(v["errors"], 0, "{v}");
    for field in [
        "secs",
        "ops_per_sec",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
    ] {
        assert!(v[field].as_f64().is_some(), "{field} missing: {v}");
    }
    assert!(v["p50_ms"].as_f64() <= v["max_ms"].as_f64(), "{v}");
}

/// The failover lines of one target: one per kill, then the summary.
fn assert_failover(lines: &[serde_json::Value], target: &str, kills: usize) {
    assert_eq!(lines.len(), kills + 1);
    for (k, v) in lines[..kills].iter().enumerate() {
        assert_eq!(v["kind"], "failover_kill", "{v}");
        assert_eq!(v["target"], target, "{v}");
        assert_eq!(v["kill"], k as u64, "{v}");
        assert!(v["failover_ms"].as_f64().is_some(), "{v}");
    }
    let summary = &lines[kills];
    assert_eq!(summary["kind"], "failover", "{summary}");
    assert_eq!(summary["target"], target, "{summary}");
    assert_eq!(summary["kills"], kills as u64, "{summary}");
    assert_eq!(
        summary["failover_ms"].as_array().map(Vec::len),
        Some(kills),
        "{summary}"
    );
}

fn assert_cleaned_up(data: &Path) {
    let left: Vec<_> = std::fs::read_dir(data)
        .expect("read data dir")
        .collect::<Result<_, _>>()
        .expect("list data dir");
    assert!(left.is_empty(), "data left behind: {left:?}");
}

#[test]
fn quick_bench_on_a_local_shoal_cluster() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = shoal(&["--quick"], data.path());
    let json = json_lines(&out);
    assert_eq!(json.len(), 5, "{json:?}");
    assert_run(&json[0], "shoal", "put", 1);
    assert_run(&json[1], "shoal", "put", 4);
    assert_failover(&json[2..], "shoal", 2);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| target | mode | clients |"), "{stdout}");
    assert_cleaned_up(data.path());
}

#[test]
fn quick_compare_with_etcd_when_available() {
    if !cfg!(feature = "etcd") || !Path::new("/usr/bin/etcd").exists() {
        eprintln!("skipped: needs the etcd feature and /usr/bin/etcd");
        return;
    }
    let data = tempfile::tempdir().expect("tempdir");
    let plot = data.path().join("plot.svg");
    let out = shoal(
        &[
            "--quick",
            "--compare",
            "--failover-kills",
            "2",
            "--plot",
            plot.to_str().expect("utf-8 path"),
        ],
        data.path(),
    );
    let json = json_lines(&out);
    assert_eq!(json.len(), 6 + 2 * 3, "{json:?}");
    // Failover, then runs interleaved (shoal, etcd, shoal, etcd…): puts, then gets.
    assert_failover(&json[0..3], "shoal", 2);
    assert_failover(&json[3..6], "etcd", 2);
    assert_run(&json[6], "shoal", "put", 1);
    assert_run(&json[7], "etcd", "put", 1);
    assert_run(&json[8], "shoal", "put", 4);
    assert_run(&json[9], "etcd", "put", 4);
    assert_run(&json[10], "shoal", "get", 4);
    assert_run(&json[11], "etcd", "get", 4);
    for get in &json[10..12] {
        assert_eq!(
            get["misses"], 0,
            "gets after the prefill find their keys: {get}"
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ops/s ratio"), "no ratio table:\n{stdout}");
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    assert!(svg.starts_with("<svg") && svg.contains("etcd get"), "{svg}");
    std::fs::remove_file(&plot).expect("remove plot");
    assert_cleaned_up(data.path());
}

/// A refused invocation: non-zero exit, a one-line error containing `expect`, no panic.
fn assert_refused(args: &[&str], expect: &str) {
    let data = tempfile::tempdir().expect("tempdir");
    let out = shoal(args, data.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        error.len(),
        1,
        "{args:?}: one error line expected:\n{stderr}"
    );
    assert!(error[0].contains(expect), "{args:?}: {stderr}");
    assert_cleaned_up(data.path());
}

#[test]
fn bad_input_is_refused_with_one_line() {
    assert_refused(&["--clients", "0"], "--clients 0");
    assert_refused(&["--target", "redis"], "redis");
    assert_refused(&["--key-size", "3"], "--key-size");
    assert_refused(
        &["--endpoints", "127.0.0.1:1", "--failover-kills", "0"],
        "no answer from the Shoal cluster at 127.0.0.1:1",
    );
    assert_refused(
        &["--quick", "--value-size", "2000000"],
        "limit is 1048576 bytes",
    );
    if !cfg!(feature = "etcd") {
        assert_refused(&["--target", "etcd"], "--features etcd");
        assert_refused(&["--compare"], "--features etcd");
    }
}
