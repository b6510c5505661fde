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
