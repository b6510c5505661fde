//! `shoal bench shard` end to end on tiny settings: one group under quota (where cgroups are
//! available) and without, and a 1 MB migration between two groups (under quota and without); then its refusals of bad
//! input. Asserts on the JSON lines, the tables, the plot, and that the data directories and
//! the cgroups are gone afterwards; never on a timing. About 30 s on 2 cores.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn shoal(args: &[&str], data: &Path) -> (Output, u32) {
    let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["bench", "shard"])
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shoal bench shard");
    let pid = child.id();
    (child.wait_with_output().expect("wait"), pid)
}

fn assert_cleaned_up(data: &Path, pid: u32) {
    let left: Vec<_> = std::fs::read_dir(data)
        .expect("read data dir")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n != "out")
        .collect();
    assert!(left.is_empty(), "data left behind: {left:?}");
    for root in [
        "/sys/fs/cgroup/cpu/shoal-bench",
        "/sys/fs/cgroup/shoal-bench",
    ] {
        if let Ok(dir) = std::fs::read_dir(root) {
            let ours: Vec<_> = dir
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{pid}-")))
                .collect();
            assert!(ours.is_empty(), "cgroups left behind in {root}: {ours:?}");
        }
    }
}

#[test]
fn tiny_matrix_and_migration_end_to_end() {
    let data = tempfile::tempdir().expect("tempdir");
    let out_dir = data.path().join("out");
    let (out, pid) = shoal(
        &[
            "--groups",
            "1",
            "--seconds",
            "1",
            "--warmup-seconds",
            "0.5",
            "--clients-per-group",
            "2",
            "--keys-per-group",
            "50",
            "--migration-mb",
            "1",
            // A roomy quota: the test checks the command end to end, not the scale model (a
            // migration at the default 2.5 ms would take long on a loaded machine).
            "--quota-ms",
            "20",
            "--out",
            out_dir.to_str().expect("utf-8 path"),
        ],
        data.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let json: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line parses"))
        .collect();
    let quota = !stderr.contains("cgroups unavailable");
    let settings: &[&str] = if quota {
        &["quota", "no quota"]
    } else {
        &["no quota"]
    };
    assert_eq!(json.len(), settings.len() * 3, "{json:?}");
    for (i, setting) in settings.iter().enumerate() {
        for (j, workload) in ["puts", "gets"].iter().enumerate() {
            let v = &json[i * 2 + j];
            assert_eq!(v["kind"], "run", "{v}");
            assert_eq!(v["setting"], *setting, "{v}");
            assert_eq!(v["workload"], *workload, "{v}");
            assert_eq!(v["groups"], 1, "{v}");
            assert_eq!(v["clients"], 2, "{v}");
            assert!(v["ops"].as_u64() > Some(0), "nothing answered: {v}");
            assert!(v["p50_ms"].as_f64() <= v["p99_ms"].as_f64(), "{v}");
            assert_eq!(v["throttled_periods"].is_u64(), *setting == "quota", "{v}");
        }
    }
    for (k, setting) in settings.iter().enumerate() {
        let m = &json[settings.len() * 2 + k];
        assert_eq!(m["kind"], "migration", "{m}");
        assert_eq!(m["setting"], *setting, "{m}");
        assert_eq!((m["from"].as_u64(), m["to"].as_u64()), (Some(1), Some(2)));
        assert!(m["moved_bytes"].as_u64() >= Some(1_000_000), "{m}");
        assert!(m["move_ms"].as_f64() > Some(0.0), "{m}");
    }
    for heading in [
        "#### puts, no quota",
        "#### gets, no quota",
        "#### Migration, 2 groups, no quota",
    ] {
        assert!(stdout.contains(heading), "no {heading}:\n{stdout}");
    }
    let svg = std::fs::read_to_string(out_dir.join("shard-scaling.svg")).expect("the plot");
    assert!(
        svg.starts_with("<svg") && svg.contains("puts, no quota"),
        "{svg}"
    );
    let md = std::fs::read_to_string(out_dir.join("results.md")).expect("the tables");
    assert!(md.contains("| groups | clients | ops/s |"), "{md}");
    assert_cleaned_up(data.path(), pid);
}

/// A refused invocation: non-zero exit, one error line containing `expect`, no panic.
fn assert_refused(args: &[&str], expect: &str) {
    let data = tempfile::tempdir().expect("tempdir");
    let (out, pid) = shoal(args, data.path());
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
    assert_cleaned_up(data.path(), pid);
}

#[test]
fn bad_input_is_refused_with_one_line() {
    assert_refused(&["--groups", "0"], "--groups");
    assert_refused(&["--seconds", "0"], "--seconds");
    assert_refused(&["--quota-ms", "0.5"], "--quota-ms");
    assert_refused(&["--clients-per-group", "0"], "--clients-per-group");
    assert_refused(&["--shards", "0"], "--shards");
    assert_refused(&["--migration-value-kib", "2048"], "--migration-value-kib");
    assert_refused(&["--no-quota", "--quota-only"], "--quota-only");
}
