//! `shoal bench raft --quick` runs against three real `shoal raft node` processes (the same
//! binary) and prints its JSON lines and table. Asserts only that it ran and what it printed
//! parses; never a timing.

use std::process::Command;

#[test]
fn quick_bench_runs_and_prints_json() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["bench", "raft", "--quick", "--kills", "1"])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .expect("run shoal bench raft");
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
    let kinds: Vec<&str> = json.iter().filter_map(|v| v["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["commits", "commits", "election", "elections"],
        "stdout:\n{stdout}"
    );
    assert_eq!(json[0]["proposers"], 1);
    assert_eq!(json[1]["proposers"], 4);
    assert!(stdout.contains("| proposers |"), "no table:\n{stdout}");
    // Every node process was killed with the bench: its data directory is gone.
    let left: Vec<_> = std::fs::read_dir(data.path())
        .expect("read data dir")
        .collect();
    assert!(left.is_empty(), "data left behind: {left:?}");
}
