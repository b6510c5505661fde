//! `shoal sim` from the shell: the same seed prints the same trace and hash.

use std::process::Command;

fn shoal_sim(seed: u64) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "sim",
            "--seed",
            &seed.to_string(),
            "--duration",
            "5s",
            "--tail",
            "20",
        ])
        .output()
        .expect("runs the shoal binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn hash_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("trace hash "))
        .expect("prints the trace hash")
}

#[test]
fn same_seed_same_output_other_seed_other_hash() {
    let a = shoal_sim(11);
    assert_eq!(a, shoal_sim(11));
    assert_ne!(hash_line(&a), hash_line(&shoal_sim(12)));
    assert_eq!(a.lines().filter(|l| l.starts_with('[')).count(), 20, "{a}");
}

#[test]
fn bench_prints_the_figure_against_the_target() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "bench",
            "sim",
            "--sim-seconds",
            "5",
            "--scenario-seeds",
            "2",
        ])
        .output()
        .expect("runs the shoal binary");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("simulated seconds per wall second"), "{text}");
    assert!(text.contains("target >= 1000"), "{text}");
}

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .expect("runs the shoal binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The count on the summary line of `kind` (`  crash           3  1.755114s n2, ...`).
fn summary_count(out: &str, kind: &str) -> usize {
    out.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("  ")?.strip_prefix(kind)?;
            let first = rest.split_whitespace().next()?;
            first.parse().ok()
        })
        .unwrap_or(0)
}

#[test]
fn sim_summarises_every_fault_even_when_the_tail_shows_none() {
    let args = ["sim", "--seed", "3", "--duration", "20s"];
    let short = run(&[&args[..], &["--tail", "5"]].concat());
    let full = run(&[&args[..], &["--full"]].concat());
    // The tail is heartbeats only; the summary still counts the whole run's faults.
    let tail: Vec<&str> = short.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(tail.len(), 5);
    assert!(tail.iter().all(|l| !l.contains("CRASH")), "{short}");
    assert!(
        short.contains("faults and repairs over the whole run: "),
        "{short}"
    );
    // The counts agree with the full trace.
    let crashes = full.lines().filter(|l| l.contains(" CRASH")).count();
    let restarts = full
        .lines()
        .filter(|l| l.contains(" start (incarnation ") && !l.contains("(incarnation 0)"))
        .count();
    let partitions = full
        .lines()
        .filter(|l| l.contains("nemesis/control: partition "))
        .count();
    let pauses = full
        .lines()
        .filter(|l| l.contains("nemesis/control: pause "))
        .count();
    assert!(crashes > 0 && partitions > 0, "seed 3 has faults:\n{short}");
    assert_eq!(summary_count(&short, "crash"), crashes, "{short}");
    assert_eq!(summary_count(&short, "restart"), restarts, "{short}");
    assert_eq!(summary_count(&short, "partition"), partitions, "{short}");
    assert_eq!(summary_count(&short, "pause"), pauses, "{short}");
    // The first crash is shown with its time and node, as in the trace.
    let first_crash = full
        .lines()
        .find(|l| l.contains(" CRASH"))
        .expect("a crash");
    let at = first_crash
        .trim_start_matches('[')
        .split(']')
        .next()
        .expect("a time")
        .trim();
    let crash_line = short
        .lines()
        .find(|l| l.starts_with("  crash"))
        .expect("a crash line");
    assert!(crash_line.contains(at), "{crash_line} / {first_crash}");

    // Same seed, same summary; no nemesis, no faults.
    assert_eq!(short, run(&[&args[..], &["--tail", "5"]].concat()));
    let calm = run(&["sim", "--no-nemesis", "--duration", "2s", "--tail", "1"]);
    assert!(calm.contains("faults and repairs: none"), "{calm}");
}

/// `shoal sim --workload raft|kv|shard`: one line per seed, a summary, the replay command, and the
/// same output byte for byte on a second run; one seed alone replays its line of a range.
#[test]
fn workloads_pass_and_replay_byte_for_byte() {
    for w in ["raft", "kv", "shard"] {
        let range = [
            "sim",
            "--workload",
            w,
            "--seed",
            "5",
            "--seeds",
            "3",
            "--duration",
            "3s",
        ];
        let a = run(&range);
        assert_eq!(a, run(&range), "{w}: same seeds, same output");
        let prefix = format!("{w} seed ");
        let lines: Vec<&str> = a.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(lines.len(), 3, "{a}");
        assert!(lines.iter().all(|l| l.ends_with("| ok")), "{a}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains(" | events ") && l.contains("faults: ")),
            "{a}"
        );
        assert!(
            a.contains(&format!(
                "{w}: 3 seeds (5..=7), --duration 3s: 3 passed, 0 failed"
            )),
            "{a}"
        );
        // raft changes the membership as a fault: a count per seed and a total.
        let changes = a
            .lines()
            .filter(|l| l.starts_with("  membership changes: ") && l.ends_with(" committed"))
            .count();
        assert_eq!(changes, if w == "raft" { 3 } else { 0 }, "{a}");
        assert_eq!(a.contains("committed over all seeds"), w == "raft", "{a}");
        let one = run(&["sim", "--workload", w, "--seed", "6", "--duration", "3s"]);
        assert_eq!(one.lines().next(), Some(lines[1]), "{one}");
        assert!(
            one.contains(&format!(
                "replay: shoal sim --workload {w} --seed 6 --duration 3s"
            )),
            "{one}"
        );
        let other = run(&["sim", "--workload", w, "--seed", "9", "--duration", "3s"]);
        assert_ne!(one.lines().next(), other.lines().next());
    }
}

#[test]
fn workload_flags_are_checked() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["sim", "--seeds", "3"])
        .output()
        .expect("runs the shoal binary");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--seeds is for --workload raft, kv, shard and mr"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["sim", "--workload", "kv", "--full"])
        .output()
        .expect("runs the shoal binary");
    assert!(!out.status.success());
}
