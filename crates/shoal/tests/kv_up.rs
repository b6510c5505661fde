//! `shoal kv up` as a supervisor, with real processes: a damaged server does not take the
//! healthy majority down and re-syncs once its directory is moved aside; its servers die with
//! it even on SIGKILL; a second `kv up` on a running cluster refuses; each server logs to its
//! own file, in plain text.

mod kv_support;
mod proc_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kv_support::{signal, SHOAL, WAIT};
use proc_support::{children_of, running};

/// A running `shoal kv up --dir DIR`, SIGKILLed on drop (its servers follow it).
struct Up {
    child: Child,
    endpoints: String,
    err_path: PathBuf,
}

impl Up {
    fn start(dir: &Path, err_path: &Path) -> Up {
        Up::start_with(dir, err_path, &[])
    }

    fn start_with(dir: &Path, err_path: &Path, args: &[&str]) -> Up {
        let mut child = Command::new(SHOAL)
            .args(["kv", "up", "--dir"])
            .arg(dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(err_path).expect("create the stderr file"))
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
        Up {
            child,
            endpoints,
            err_path: err_path.to_path_buf(),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err_path).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait for kv up").is_none()
    }

    /// Runs a client command against endpoint list `endpoints`, returning (success, stdout).
    fn client(endpoints: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(SHOAL)
            .args(["kv", "--endpoints", endpoints, "--timeout", "10"])
            .args(args)
            .output()
            .expect("run shoal kv");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = Up::client(&self.endpoints, args);
        assert!(
            ok,
            "shoal kv {args:?} failed; kv up said:\n{}",
            self.stderr()
        );
        out
    }

    /// Stops it as a supervisor would (SIGTERM) and waits for a clean exit.
    #[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
    fn stop(mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for kv up") {
                assert!(status.success(), "kv up exited with {status}");
                return;
            }
            assert!(start.elapsed() < WAIT, "kv up did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `cond` holds, failing with `what` (and kv up's messages) after [`WAIT`].
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn wait_until(up: &mut Up, what: &str, mut cond: impl FnMut(&mut Up) -> bool) {
    let start = Instant::now();
    while !cond(up) {
        assert!(
            start.elapsed() < WAIT,
            "{what} within {WAIT:?}; kv up said:\n{}",
            up.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_damaged_server_leaves_the_majority_serving_and_resyncs_once_moved_aside() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let up = Up::start(&dir, &tmp.path().join("up1.err"));
    for i in 0..20 {
        up.ok(&["put", &format!("k{i}"), &format!("v{i}")]);
    }
    up.stop();
    // Flip a byte in the middle of server 2's log segment.
    let node2 = dir.join("node2");
    let segment = std::fs::read_dir(&node2)
        .expect("read node2")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seg-"))
        })
        .max()
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read the segment");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&segment, bytes).expect("write the segment");

    let mut up = Up::start(&dir, &tmp.path().join("up2.err"));
    // The other two serve reads and writes.
    assert_eq!(up.ok(&["get", "k7"]), "v7\n");
    assert_eq!(up.ok(&["put", "during", "yes"]), "ok 1\n");
    // kv up names server 2 and the fix once, and is still up after the third failure in a row
    // (where it used to stop the whole cluster).
    let mv = format!("mv {} {}.bad", node2.display(), node2.display());
    wait_until(&mut up, "no diagnosis of server 2", |up| {
        up.stderr().contains(&mv) && up.stderr().contains("3 times in a row")
    });
    assert!(up.running(), "kv up stopped:\n{}", up.stderr());
    let said = up.stderr();
    assert!(said.contains("server 2 failed to start"), "{said}");
    // Where the flipped byte lands depends on the log's layout: in a payload it fails the
    // checksum, in a length field the record runs past the end. Either is named as corrupt data.
    assert!(said.contains("corrupt data in seg-"), "{said}");
    assert_eq!(
        said.matches(&mv).count(),
        1,
        "the fix is printed once:\n{said}"
    );
    assert_eq!(up.ok(&["get", "during"]), "yes\n");

    // Moved aside, it is started at once, empty, and catches up from the others: a local
    // (serializable) read on server 2 alone sees the latest write.
    std::fs::rename(&node2, dir.join("node2.bad")).expect("move node2 aside");
    assert_eq!(up.ok(&["put", "after", "moved"]), "ok 1\n");
    let server2 = up
        .endpoints
        .split(',')
        .nth(1)
        .expect("3 endpoints")
        .to_string();
    wait_until(&mut up, "server 2 did not catch up", |_| {
        Up::client(&server2, &["--serializable", "get", "after"]) == (true, "moved\n".into())
    });
    assert_eq!(
        Up::client(&server2, &["--serializable", "get", "k19"]),
        (true, "v19\n".into())
    );
    assert!(up.running());
    up.stop();
    // Each server logged to its own file, in plain text (not a terminal: no colour codes).
    for id in 1..=3 {
        let log = std::fs::read_to_string(dir.join(format!("node{id}.log"))).expect("a log");
        assert!(log.contains("kv server starting"), "node{id}.log: {log}");
        assert!(!log.contains('\u{1b}'), "colour codes in node{id}.log");
        assert!(log.contains("role changed"), "node{id}.log: {log}");
        assert!(
            !log.contains("Some("),
            "Rust debug syntax in node{id}.log: {log}"
        );
    }
}

#[test]
fn kv_up_servers_die_with_it_and_a_second_kv_up_refuses_a_running_cluster() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let mut up = Up::start(&dir, &tmp.path().join("up.err"));
    up.ok(&["put", "k", "v"]);
    let servers = children_of(up.child.id());
    assert_eq!(servers.len(), 3, "three servers: {servers:?}");

    // A second kv up on the same directory starts nothing and says why.
    let out = Command::new(SHOAL)
        .args(["kv", "up", "--dir"])
        .arg(&dir)
        .output()
        .expect("run a second kv up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second kv up: {}", out.status);
    assert!(
        err.contains("a cluster already answers on these endpoints"),
        "{err}"
    );
    for pid in &servers {
        assert!(err.contains(&pid.to_string()), "pid {pid} not named: {err}");
    }
    assert!(err.contains(&up.endpoints), "{err}");
    assert!(err.contains(&format!("kv up {}", up.child.id())), "{err}");
    assert!(
        !err.contains("Address already in use"),
        "nothing was started: {err}"
    );
    assert_eq!(up.ok(&["get", "k"]), "v\n");

    // SIGKILL (no cleanup can run): the kernel takes the servers down with it.
    signal(up.child.id(), libc::SIGKILL);
    let _ = up.child.wait();
    wait_until(&mut up, "servers outlived kv up", |_| {
        !servers.iter().any(|&p| running(p))
    });
}

#[test]
fn kv_up_refuses_zero_nodes_before_creating_anything_and_warns_about_two() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("none");
    let out = Command::new(SHOAL)
        .args(["kv", "up", "--nodes", "0", "--dir"])
        .arg(&dir)
        .output()
        .expect("run kv up");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nodes must be at least 1"));
    assert!(!dir.exists(), "kv up --nodes 0 created {}", dir.display());

    let dir = tmp.path().join("two");
    let mut child = Command::new(SHOAL)
        .args(["kv", "up", "--nodes", "2", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kv up");
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut line)
        .expect("read kv up's stderr");
    assert!(line.contains("tolerates no failure"), "{line}");
    // Its servers are started once it prints the endpoints.
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read kv up's stdout");
    assert!(first.starts_with("endpoints "), "{first}");
    signal(child.id(), libc::SIGTERM);
    assert!(child.wait().expect("wait for kv up").success());
}

/// The members' (id, role) as `kv member list -o json` shows them.
fn member_roles(up: &Up) -> Vec<(u64, String)> {
    let json: serde_json::Value =
        serde_json::from_str(&up.ok(&["member", "list", "-o", "json"])).expect("member list json");
    json["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().expect("id"),
                m["role"].as_str().expect("role").to_string(),
            )
        })
        .collect()
}

#[test]
fn kv_up_resumed_with_another_size_grows_then_shrinks_the_cluster_keeping_the_data() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let endpoints_file = || {
        std::fs::read_to_string(dir.join("endpoints"))
            .expect("read endpoints")
            .lines()
            .count()
    };
    let up = Up::start_with(&dir, &tmp.path().join("up1.err"), &["--nodes", "3"]);
    for i in 0..10 {
        up.ok(&["put", &format!("k{i}"), &format!("v{i}")]);
    }
    up.stop();

    let up = Up::start_with(&dir, &tmp.path().join("up2.err"), &["--nodes", "5"]);
    assert_eq!(up.endpoints.split(',').count(), 5, "{}", up.stderr());
    assert_eq!(endpoints_file(), 5);
    let voters: Vec<(u64, String)> = (1..=5).map(|id| (id, "voter".to_string())).collect();
    assert_eq!(member_roles(&up), voters, "{}", up.stderr());
    let said = up.stderr();
    assert!(said.contains("growing: adding server 4"), "{said}");
    assert!(said.contains("growing: server 5 is a voter"), "{said}");
    assert_eq!(up.ok(&["get", "k3"]), "v3\n");
    up.ok(&["put", "grown", "yes"]);
    up.stop();

    let up = Up::start_with(&dir, &tmp.path().join("up3.err"), &["--nodes", "3"]);
    assert_eq!(up.endpoints.split(',').count(), 3, "{}", up.stderr());
    assert_eq!(endpoints_file(), 3);
    let voters: Vec<(u64, String)> = (1..=3).map(|id| (id, "voter".to_string())).collect();
    assert_eq!(member_roles(&up), voters, "{}", up.stderr());
    assert!(up.stderr().contains("shrinking: removing server 5"));
    assert!(!dir.join("node5").exists() && dir.join("node5.removed").exists());
    assert_eq!(up.ok(&["get", "k9"]), "v9\n");
    assert_eq!(up.ok(&["get", "grown"]), "yes\n");
    up.stop();

    // Resumed without --nodes: the size it has.
    let up = Up::start_with(&dir, &tmp.path().join("up4.err"), &[]);
    assert_eq!(up.endpoints.split(',').count(), 3, "{}", up.stderr());
    assert_eq!(up.ok(&["get", "k0"]), "v0\n");
    up.stop();
}
