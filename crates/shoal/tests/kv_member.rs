//! Membership changes with real processes, under client load (issue 15): three `shoal kv
//! server`s; server 1 is SIGKILLed and its data directory wiped; a fresh server 4 is started
//! with `--join` (before it is added), added as a learner, promoted, and server 1 removed;
//! then the cluster grows to five (server 5 added before it starts, server 6 after) and
//! shrinks back to three (servers 2 and 3 removed; 3 while it is down, then restarted on its
//! data: it must say that it was removed). Clients keep doing gets and conditional
//! puts throughout; their history must be linearizable and no acknowledged put lost. The
//! membership commands' errors are checked on the way (id in use, unknown id).

mod kv_support;

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_support::{
    client_worker, clock_seed, final_reads_and_check, free_ports, Shell, SHOAL, WAIT,
};
use shoal_cluster::{Procs, Spec};

const CLIENTS: u64 = 3;
const KEYS: u64 = 3;
/// Server ids 1..=6; 1, 2, 3 start the cluster.
const SLOTS: usize = 6;

struct Servers {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    procs: Procs,
}

impl Servers {
    fn addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.ports[id as usize - 1])
    }

    /// Every possible server, in id order (the clients' endpoints: ids are positions).
    fn endpoints(&self) -> String {
        (1..=SLOTS as u64)
            .map(|id| self.addr(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data(&self, id: u64) -> std::path::PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    fn spawn(&mut self, id: u64, how: &[String]) {
        let mut args: Vec<String> = ["kv", "server", "--id", &id.to_string(), "--listen"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(self.addr(id));
        args.extend(how.iter().cloned());
        args.push("--data".into());
        args.push(self.data(id).display().to_string());
        args.extend(["--snapshot-bytes".into(), "20000".into()]);
        let log = self.dir.path().join(format!("node{id}.log"));
        let spec = Spec::new(format!("server {id}"), SHOAL, log)
            .args(args)
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1")
            .append_log()
            .stdout_null();
        self.procs
            .spawn_at(id as usize - 1, spec)
            .expect("start a server");
    }

    fn join(&mut self, id: u64, via: &[u64]) {
        let join = via
            .iter()
            .map(|&v| self.addr(v))
            .collect::<Vec<_>>()
            .join(",");
        self.spawn(id, &["--join".into(), join]);
    }

    fn cli(&self, args: &[&str]) -> Output {
        std::process::Command::new(SHOAL)
            .args(["kv", "--endpoints", &self.endpoints(), "--timeout", "5"])
            .args(args)
            .output()
            .expect("run shoal kv")
    }

    /// Runs `shoal kv member ARGS` until it succeeds (a change in flight, a learner behind,
    /// an election are refused for a while), within [`WAIT`].
    #[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
    fn member(&self, args: &[&str]) -> String {
        let start = Instant::now();
        let mut all = vec!["member"];
        all.extend_from_slice(args);
        loop {
            let out = self.cli(&all);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                start.elapsed() < WAIT,
                "`shoal kv member {args:?}` kept failing: {err}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `shoal kv member ARGS`, expected to fail with a message containing `want`.
    fn member_fails(&self, args: &[&str], want: &str) {
        let mut all = vec!["member"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "`shoal kv member {args:?}`: want a failure saying {want:?}, got {}: {err}",
            out.status
        );
    }

    /// The members as `(id, role, behind)` from `kv member list -o json`.
    fn members(&self) -> Vec<(u64, String, u64)> {
        let doc: serde_json::Value =
            serde_json::from_str(&self.member(&["list", "-o", "json"])).expect("member list JSON");
        doc["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| {
                (
                    m["id"].as_u64().unwrap_or(0),
                    m["role"].as_str().unwrap_or("").to_string(),
                    m["behind"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect()
    }

    fn voters(&self) -> Vec<u64> {
        self.members()
            .into_iter()
            .filter(|m| m.1 == "voter")
            .map(|m| m.0)
            .collect()
    }
}

/// Polls `done` every 100 ms until it holds, at most [`WAIT`]; whether it did.
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn poll_until(mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > WAIT {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Adds server `id` as a learner and promotes it (retrying while it is behind).
fn add_and_promote(s: &Servers, id: u64) {
    let addr = s.addr(id);
    s.member(&["add", &id.to_string(), &addr, "--learner"]);
    s.member(&["promote", &id.to_string()]);
}

#[test]
#[allow(clippy::disallowed_methods)] // the history's times come from this test's clock
fn replace_grow_and_shrink_under_load_history_is_linearizable() {
    let seed = clock_seed();
    eprintln!("kv member seed {seed}");
    let mut s = Servers {
        dir: tempfile::tempdir().expect("temp dir"),
        ports: free_ports(SLOTS),
        procs: Procs::with_slots(SLOTS),
    };
    let peers = (1..=3)
        .map(|id| format!("{id}={}", s.addr(id)))
        .collect::<Vec<_>>()
        .join(",");
    for id in 1..=3 {
        s.spawn(id, &["--peers".into(), peers.clone()]);
    }
    assert_eq!(s.voters(), vec![1, 2, 3], "the bootstrap membership");

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let shell = Shell::start(&[
                "kv",
                "--endpoints",
                &s.endpoints(),
                "--timeout",
                "3",
                "shell",
            ]);
            client_worker(shell, c, seed, KEYS, epoch, Arc::clone(&stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));

    // Server 1's disk dies: SIGKILL, data gone.
    s.procs.kill(0);
    std::fs::remove_dir_all(s.data(1)).expect("wipe server 1's data");
    // A fresh server 4 starts first and waits to be added.
    s.join(4, &[2, 3]);
    std::thread::sleep(Duration::from_millis(300));
    add_and_promote(&s, 4);
    s.member_fails(&["add", "4", &s.addr(5)], "already in use");
    s.member(&["remove", "1"]);
    s.member_fails(&["remove", "99"], "not a member");
    s.member_fails(&["promote", "99"], "not a member");
    assert_eq!(s.voters(), vec![2, 3, 4], "server 1 replaced by server 4");

    // Grow to five: server 5 is added before it starts, server 6 after.
    s.member(&["add", "5", &s.addr(5), "--learner"]);
    s.join(5, &[2, 3, 4]);
    s.member(&["promote", "5"]);
    s.join(6, &[4]);
    std::thread::sleep(Duration::from_millis(300));
    add_and_promote(&s, 6);
    assert_eq!(s.voters(), vec![2, 3, 4, 5, 6], "grown to five");

    // Shrink to three: server 2 removed while it runs; server 3 removed while it is down,
    // then restarted on its data, which still says it is a member: it asks the leader and
    // says that it was removed.
    s.member(&["remove", "2"]);
    s.procs.kill(2);
    s.member(&["remove", "3"]);
    assert_eq!(s.voters(), vec![4, 5, 6], "shrunk to three");
    s.procs.restart(2).expect("restart server 3");
    let log = s.dir.path().join("node3.log");
    let said = poll_until(|| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("server 3 is not a member of the cluster")
    });
    assert!(said, "server 3 removed while down does not say so: {log:?}");
    s.procs.kill(1);
    s.procs.kill(2);
    // The load runs a little longer on the new servers alone.
    std::thread::sleep(Duration::from_millis(700));
    let members = s.members();
    assert!(
        members.iter().all(|m| m.2 < 1000),
        "every member keeps up: {members:?}"
    );

    stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    for w in workers {
        records.extend(w.join().expect("client thread"));
    }
    eprintln!("membership changes done in {:?}", epoch.elapsed());
    let shell = Shell::start(&[
        "kv",
        "--endpoints",
        &s.endpoints(),
        "--timeout",
        "20",
        "shell",
    ]);
    final_reads_and_check(shell, KEYS, epoch, records, seed);
}
