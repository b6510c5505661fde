//! `shoal demo` end to end: it exits 0 after every step, reads back exactly the words it
//! stored through a new leader, and leaves no process and no directory behind.

use std::path::Path;
use std::process::{Command, Output};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Processes (any, not only ours) whose command line mentions `path`.
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) {
                found.push(format!("{}: {cmdline}", name.to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn demo_runs_every_step_reads_back_through_a_new_leader_and_leaves_nothing() {
    // The demo's temporary directory goes under a TMPDIR of our own: afterwards it must be
    // empty, and no process may mention it.
    let root = tempfile::tempdir().expect("a temporary directory");
    let tmp = root.path().join("tmp");
    std::fs::create_dir(&tmp).expect("create TMPDIR");
    let out = Command::new(SHOAL)
        .arg("demo")
        .env("TMPDIR", &tmp)
        .output()
        .expect("run shoal demo");
    let (stdout, stderr) = text(&out);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "shoal demo failed\n{context}");

    for step in 1..=6 {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("[{step}/6] "))),
            "no line for step {step}\n{context}"
        );
    }
    assert!(
        stdout.contains("all 10 words read back match what was stored"),
        "{context}"
    );
    // The table: `#  WORD  COUNT` rows, ranked 1 to 10, counts not increasing.
    let rows: Vec<(u64, String, u64)> = stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [rank, word, count] => {
                    Some((rank.parse().ok()?, word.to_string(), count.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>(),
        "{context}"
    );
    assert!(rows.windows(2).all(|w| w[0].2 >= w[1].2), "{context}");
    assert_eq!(rows[0].1, "the", "{context}");

    let changed = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("leader changed: server "))
        .unwrap_or_else(|| panic!("no leader change reported\n{context}"));
    let ids: Vec<&str> = changed.split_whitespace().collect();
    assert!(
        ids.len() >= 4 && ids[1] == "->" && ids[2] == "server" && ids[0] != ids[3],
        "the leader did not change: {changed}\n{context}"
    );

    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("read TMPDIR")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}\n{context}");
    let procs = processes_mentioning(root.path());
    assert!(procs.is_empty(), "still running: {procs:?}\n{context}");
}

#[test]
fn demo_dir_keep_quiet_and_help() {
    let root = tempfile::tempdir().expect("a temporary directory");
    let dir = root.path().join("demo");
    let out = Command::new(SHOAL)
        .args([
            "demo",
            "--keep",
            "--quiet",
            "--top",
            "3",
            "--workers",
            "1",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .expect("run shoal demo");
    let (stdout, stderr) = text(&out);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "shoal demo failed\n{context}");
    assert_eq!(
        stdout.lines().count(),
        1,
        "--quiet prints one line\n{context}"
    );
    assert!(stdout.starts_with("demo ok: 3 words stored"), "{context}");
    // --keep: the data, the logs and the MapReduce output stay; no process does.
    for kept in [
        "node1",
        "node1.log",
        "node3.log",
        "worker1.log",
        "mr-out/mr-out-0",
    ] {
        assert!(dir.join(kept).exists(), "{kept} not kept\n{context}");
    }
    let procs = processes_mentioning(root.path());
    assert!(procs.is_empty(), "still running: {procs:?}\n{context}");

    // A directory that is not empty is refused, and left alone.
    let again = Command::new(SHOAL)
        .args(["demo", "--dir"])
        .arg(&dir)
        .output()
        .expect("run shoal demo");
    assert!(!again.status.success());
    assert!(text(&again).1.contains("not empty"), "{:?}", text(&again));
    assert!(dir.join("node1.log").exists());

    let help = Command::new(SHOAL)
        .args(["demo", "--help"])
        .output()
        .expect("run shoal demo --help");
    let (help, _) = text(&help);
    for word in [
        "SIGKILL",
        "MapReduce",
        "--keep",
        "--dir",
        "--workers",
        "--top",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }
}

/// SIGTERM (what `timeout`, systemd or CI send) cleans up exactly as Ctrl-C: the demo says it
/// was interrupted, stops every process and removes its directory.
#[test]
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn demo_sigterm_cleans_up_as_ctrl_c() {
    use std::io::Read as _;
    let root = tempfile::tempdir().expect("a temporary directory");
    let tmp = root.path().join("tmp");
    std::fs::create_dir(&tmp).expect("create TMPDIR");
    let mut child = Command::new(SHOAL)
        .arg("demo")
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start shoal demo");
    // Wait until the cluster is up (step 2 begins), reading stdout on a thread.
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("[2/6]") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        panic!("the demo never reached step 2");
    }
    // SAFETY: kill(2) on our child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let out = child.wait_with_output().expect("wait for shoal demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exited by itself (not killed by the signal), reporting the interruption.
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "exit status {}: {stderr}",
        out.status
    );
    assert!(stderr.contains("interrupted during step 2/6"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("read TMPDIR")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}\n{stderr}");
    let procs = processes_mentioning(root.path());
    assert!(procs.is_empty(), "still running: {procs:?}\n{stderr}");
}
