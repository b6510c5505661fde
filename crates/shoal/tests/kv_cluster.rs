//! `shoal kv` on real processes: a three-server cluster driven through the CLI and the shell,
//! a SIGKILLed leader, a restart from disk, a foreign data directory, `shoal kv up`.

mod kv_support;
mod proc_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use kv_support::{signal, Cluster, SHOAL, WAIT};
use proc_support::children_of;

#[test]
fn cli_put_get_del_scan_and_shell_on_three_servers() {
    let c = Cluster::start(3);
    assert_eq!(c.ok(&["put", "a", "apple"]), "ok 1\n");
    assert_eq!(c.ok(&["put", "b", "banana"]), "ok 1\n");
    assert_eq!(c.ok(&["put", "a", "avocado", "--expect", "1"]), "ok 2\n");
    assert_eq!(c.ok(&["get", "a"]), "avocado\n");
    assert_eq!(c.ok(&["get", "a", "--version"]), "2 avocado\n");
    // A serializable read from any server: possibly stale, never a value that was not written.
    // (A lagging server may not have applied the first put yet: then "no such key".)
    let local = c.cli(&["get", "a", "--serializable"]);
    let value = String::from_utf8_lossy(&local.stdout);
    assert!(
        (local.status.success() && (value == "avocado\n" || value == "apple\n"))
            || (local.status.code() == Some(1)
                && String::from_utf8_lossy(&local.stderr).contains("no such key")),
        "serializable read: {local:?}"
    );
    let mismatch = c.cli(&["put", "a", "x", "--expect", "1"]);
    assert_eq!(mismatch.status.code(), Some(1));
    // A put that was redirected (sent twice) and then mismatched is reported as maybe.
    let err = String::from_utf8_lossy(&mismatch.stderr);
    assert!(
        err.contains("mismatch") || err.starts_with("maybe"),
        "{err}"
    );
    assert_eq!(c.ok(&["get", "a", "--version"]), "2 avocado\n");
    assert_eq!(c.ok(&["scan"]), "a 2 avocado\nb 1 banana\n");
    assert_eq!(c.ok(&["scan", "b"]), "b 1 banana\n");
    let get: serde_json::Value =
        serde_json::from_str(&c.ok(&["get", "a", "-o", "json"])).expect("get: one JSON document");
    assert_eq!(
        (
            get["found"].as_bool(),
            get["version"].as_u64(),
            get["value"].as_str()
        ),
        (Some(true), Some(2), Some("avocado"))
    );
    let missing = c.cli(&["get", "nothing", "--output", "json"]);
    assert_eq!(missing.status.code(), Some(1));
    let missing: serde_json::Value = serde_json::from_slice(&missing.stdout).expect("json");
    assert_eq!(missing["found"].as_bool(), Some(false));
    let scan: serde_json::Value =
        serde_json::from_str(&c.ok(&["scan", "-o", "json"])).expect("scan: one JSON document");
    assert_eq!(scan["count"].as_u64(), Some(2));
    assert_eq!(
        (
            scan["items"][1]["key"].as_str(),
            scan["items"][1]["version"].as_u64()
        ),
        (Some("b"), Some(1))
    );
    assert_eq!(c.ok(&["del", "b"]), "deleted\n");
    assert_eq!(c.cli(&["get", "b"]).status.code(), Some(1));

    let mut sh = c.shell("10");
    assert_eq!(sh.ask("put k 0 hello world"), "ok 1");
    assert_eq!(sh.ask("get k"), "value 1 hello world");
    let again = sh.ask("put k 0 again");
    assert!(again == "mismatch" || again == "maybe", "{again}");
    assert_eq!(sh.ask("put missing 3 x"), "nokey");
    assert_eq!(sh.ask("get nothing-here"), "nokey");
    assert!(sh.ask("frobnicate k").starts_with("error "));
    assert!(sh.ask("put k notanumber v").starts_with("error "));
    assert!(sh.ask("get").starts_with("error "));
    assert_eq!(sh.ask("put k 1 second"), "ok 2");
    assert_eq!(sh.ask("get k"), "value 2 second");
    let big = "v".repeat(shoal_kv_value_limit() + 1);
    assert!(sh
        .ask(&format!("put big 0 {big}"))
        .starts_with("error value"));
    assert_eq!(sh.ask("get big"), "nokey");
}

fn shoal_kv_value_limit() -> usize {
    1024 * 1024
}

#[test]
fn leader_sigkill_service_continues_and_restarted_leader_catches_up() {
    let mut c = Cluster::start(3);
    for i in 0..5 {
        assert_eq!(c.ok(&["put", &format!("k{i}"), &format!("v{i}")]), "ok 1\n");
    }
    let leader = c.wait_leader();
    c.kill(leader);
    // Service continues on the remaining two.
    for i in 5..10 {
        assert_eq!(c.ok(&["put", &format!("k{i}"), &format!("v{i}")]), "ok 1\n");
    }
    assert_eq!(c.ok(&["get", "k0"]), "v0\n");
    // The old leader restarts from its disk; then another server dies, so every later write
    // needs the restarted one in its majority: it must have caught up.
    c.restart(leader);
    let other = (1..=3).find(|&id| id != leader).expect("another server");
    c.kill(other);
    assert_eq!(c.ok(&["put", "after", "restart"]), "ok 1\n");
    let scan = c.ok(&["scan"]);
    for i in 0..10 {
        assert!(
            scan.contains(&format!("k{i} 1 v{i}\n")),
            "k{i} lost: {scan}"
        );
    }
    assert!(scan.contains("after 1 restart\n"));
}

#[test]
fn status_names_one_leader_and_reports_an_unreachable_server() {
    let mut c = Cluster::start(3);
    assert_eq!(c.ok(&["put", "k", "v"]), "ok 1\n");
    let leader = c.wait_leader();
    let table = c.ok(&["status"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("ID"), "{table}");
    assert_eq!(
        lines.iter().filter(|l| l.contains(" leader ")).count(),
        1,
        "{table}"
    );
    assert!(lines[leader as usize].contains(" leader "), "{table}");
    // Every server knows the leader and has applied the put.
    // `--json` is the same as `-o json`: one document.
    let json = c.ok(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json).expect("one JSON document");
    assert_eq!(doc["leader"].as_u64(), Some(leader), "{json}");
    let servers = doc["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 3, "{json}");
    for v in servers {
        assert_eq!(v["leader"].as_u64(), Some(leader), "{json}");
        assert!(v["commit"].as_u64().unwrap() >= 2, "{json}");
    }
    // A dead server is reported, not hidden; the others still answer.
    let other = (1..=3).find(|&id| id != leader).expect("another server");
    c.kill(other);
    let out = c.cli_within("1", &["status"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let dead = table
        .lines()
        .nth(other as usize)
        .expect("a line per server");
    assert!(dead.contains("cannot reach"), "{table}");
    // With the leader gone too, nobody leads: exit status 1.
    c.kill(leader);
    let out = c.cli_within("1", &["status"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn a_snapshot_larger_than_a_frame_reaches_a_restarted_server() {
    // 20 values of ~1 MiB written while server `lagging` is down: the snapshot the others
    // send it (~20 MiB) exceeds the 16 MiB frame limit and must travel in parts.
    let mut c = Cluster::start(3);
    assert_eq!(c.ok(&["put", "k0", "v0"]), "ok 1\n");
    let leader = c.wait_leader();
    let lagging = (1..=3).find(|&id| id != leader).expect("a follower");
    c.kill(lagging);
    let mut sh = c.shell("20");
    let value = "x".repeat((1 << 20) - 64);
    for i in 0..20 {
        assert_eq!(sh.ask(&format!("put big{i} any {value}")), "ok 1");
    }
    drop(sh);
    // Both survivors snapshot the big values and drop their logs.
    let survivors: Vec<u64> = (1..=3).filter(|&id| id != lagging).collect();
    let deadline = std::time::Instant::now() + WAIT;
    for &id in &survivors {
        // `shoal_storage::SNAPSHOT_FILE` (this crate does not depend on shoal-storage).
        let snapshot = c.data_dir(id).join("snapshot-v2");
        while std::fs::metadata(&snapshot).map_or(0, |m| m.len()) < 16 << 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "server {id} never took a snapshot of the big values"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Restart them, so that no append queued for the lagging server while it was down
    // survives in a transport queue: only the snapshot can catch it up now.
    for &id in &survivors {
        c.restart(id);
    }
    c.restart(lagging);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = c.cli_within("2", &["status", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let applied: Vec<u64> = doc["servers"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v["applied"].as_u64()).collect())
            .unwrap_or_default();
        if applied.len() == 3 && applied[0] >= 22 && applied.iter().all(|&a| a == applied[0]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted server never caught up: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(c.log_path(lagging)).unwrap_or_default();
    assert!(
        log.contains("restored snapshot"),
        "the restarted server caught up without a snapshot: {log}"
    );
    // With another server gone, every write needs the restarted one.
    c.kill(survivors[0]);
    assert_eq!(c.ok(&["put", "after", "catch-up"]), "ok 1\n");
    let got = c.ok(&["--serializable", "get", "big19"]);
    assert_eq!(got.trim_end().len(), value.len());
}

#[test]
fn data_dir_of_another_server_is_refused() {
    let mut c = Cluster::start(3);
    assert_eq!(c.ok(&["put", "x", "1"]), "ok 1\n");
    c.kill(2);
    // Server 2 pointed at server 1's directory.
    let out = c
        .server_command(2, &c.data_dir(1))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run a server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node1"),
        "the error names the directory: {err}"
    );
    // The cluster still serves (two of three).
    assert_eq!(c.ok(&["get", "x"]), "1\n");
}

#[test]
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn kv_up_starts_a_cluster_and_a_second_run_resumes_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The defaults: `kv up` keeps its cluster in ./shoal-data, and the client commands find
    // the endpoints there.
    let cluster_dir = dir.path().join("shoal-data");
    let run_up = || {
        let mut child = Command::new(SHOAL)
            .args(["kv", "up", "--nodes", "3"])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.path().join("up.log"))
                    .expect("open the up log"),
            )
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1")
            .spawn()
            .expect("start shoal kv up");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("read the endpoints");
        let endpoints = first
            .trim()
            .strip_prefix("endpoints ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        (KillOnDrop(child), endpoints)
    };
    let client = |args: &[&str]| {
        let out = Command::new(SHOAL)
            .args(["kv", "--timeout", "20"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run shoal kv");
        assert!(
            out.status.success(),
            "shoal kv {args:?}: {}\nservers' log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (mut up, endpoints) = run_up();
    let written = std::fs::read_to_string(cluster_dir.join("endpoints")).expect("endpoints file");
    assert_eq!(written.lines().collect::<Vec<_>>().join(","), endpoints);
    assert_eq!(client(&["put", "durable", "yes"]), "ok 1\n");
    // Stop it as Ctrl-C would, and wait for a clean exit.
    signal(up.0.id(), libc::SIGINT);
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = up.0.try_wait().expect("wait for kv up") {
            assert!(status.success(), "kv up exited with {status}");
            break;
        }
        assert!(start.elapsed() < WAIT, "kv up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut up, again) = run_up();
    assert_eq!(again, endpoints, "same ports on resume");
    assert_eq!(client(&["get", "durable", "--version"]), "1 yes\n");

    // The README's tour: SIGKILL a server of `kv up`; the service goes on, and `kv up`
    // restarts the server from its data directory instead of stopping the cluster.
    let servers = children_of(up.0.id());
    assert_eq!(servers.len(), 3, "kv up runs three servers: {servers:?}");
    signal(servers[0], libc::SIGKILL);
    assert_eq!(
        client(&["put", "durable", "still", "--expect", "1"]),
        "ok 2\n"
    );
    assert_eq!(client(&["get", "durable"]), "still\n");
    let start = std::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
        if log.contains("restarted") && children_of(up.0.id()).len() == 3 {
            break;
        }
        assert!(
            up.0.try_wait().expect("wait for kv up").is_none(),
            "kv up stopped when one server died:\n{log}"
        );
        assert!(
            start.elapsed() < WAIT,
            "kv up did not restart the server:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kv_lock_runs_commands_one_at_a_time() {
    let c = Cluster::start(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let journal = dir.path().join("journal");
    let script = format!(
        "echo start >> {0}; sleep 0.3; echo end >> {0}",
        journal.display()
    );
    let holders: Vec<_> = (0..3)
        .map(|_| {
            Command::new(SHOAL)
                .args(["kv", "--endpoints", &c.endpoints(), "--timeout", "20"])
                .args(["lock", "journal", "--", "sh", "-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start shoal kv lock")
        })
        .map(KillOnDrop)
        .collect();
    for mut h in holders {
        let status = h.0.wait().expect("wait for shoal kv lock");
        assert!(status.success(), "shoal kv lock failed: {status}");
    }
    let text = std::fs::read_to_string(&journal).expect("journal");
    assert_eq!(
        text,
        "start\nend\n".repeat(3),
        "critical sections overlapped"
    );
    // The exit status of the command is passed on.
    let out = c.cli(&["lock", "journal", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    #[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
    fn drop(&mut self) {
        // Never signal a pid that was already reaped: it may belong to someone else by now.
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        signal(self.0.id(), libc::SIGINT);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
