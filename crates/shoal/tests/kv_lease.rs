//! Leases and `shoal kv lock` with real processes: a holder that dies (SIGKILL) frees the lock
//! within its TTL, a SIGINT to `kv lock` reaches the command and releases the lock at once,
//! `--wait-timeout` bounds the wait and names the holder, and keys put with a lease go with
//! it.

mod kv_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kv_support::{signal, Cluster, SHOAL, WAIT};

/// A `shoal kv …` child of the test, stopped (SIGKILL) on drop if still running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // Never signal a pid that was already reaped: it may belong to someone else by now.
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `shoal kv ARGS…` on the cluster, stderr to `stderr`.
fn spawn(c: &Cluster, args: &[&str], stderr: &Path) -> Proc {
    let err = std::fs::File::create(stderr).expect("create a stderr file");
    let child = Command::new(SHOAL)
        .args(["kv", "--endpoints", &c.endpoints(), "--timeout", "10"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start shoal kv");
    Proc(child)
}

/// Waits (bounded by [`WAIT`]) until `cond` holds.
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `shoal kv get KEY` finds the key.
fn exists(c: &Cluster, key: &str) -> bool {
    c.cli(&["get", key]).status.success()
}

fn process_alive(pid: u32) -> bool {
    // A zombie has exited; `/proc/PID/stat` shows it as state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The holder `kv lock` is SIGKILLed while its command runs: its command dies with it (it must
/// not run unlocked), and the next `kv lock` gets the lock once the 1 s lease expired — well
/// within its `--wait-timeout` (it used to wait forever for the dead owner). The waiter also
/// sees a larger fencing version than the dead holder had.
#[test]
fn kv_lock_holder_sigkilled_frees_the_lock_within_its_ttl() {
    let c = Cluster::start(1);
    c.wait_leader();
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("pid");
    let script = format!(
        "echo $$ > {0}.tmp; echo $SHOAL_LOCK_VERSION >> {0}.tmp; mv {0}.tmp {0}; exec sleep 60",
        pid_file.display()
    );
    let mut holder = spawn(
        &c,
        &["lock", "crash", "--ttl", "1", "--", "sh", "-c", &script],
        &dir.path().join("holder.err"),
    );
    wait_for("the holder's command starts", || pid_file.exists());
    let text = read(&pid_file);
    let mut lines = text.lines();
    let command_pid: u32 = lines.next().and_then(|l| l.parse().ok()).expect("pid");
    let first_version: u64 = lines.next().and_then(|l| l.parse().ok()).expect("version");
    assert!(exists(&c, "lock/crash"));

    holder.0.kill().expect("SIGKILL the holder");
    holder.0.wait().expect("reap the holder");
    wait_for("the holder's command dies with it", || {
        !process_alive(command_pid)
    });

    let version_file = dir.path().join("version");
    let out = c.cli(&[
        "lock",
        "crash",
        "--ttl",
        "1",
        "--wait-timeout",
        "8",
        "--",
        "sh",
        "-c",
        &format!("echo $SHOAL_LOCK_VERSION > {}", version_file.display()),
    ]);
    assert!(
        out.status.success(),
        "the next kv lock did not get the lock: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let second_version: u64 = read(&version_file).trim().parse().expect("a version");
    assert!(
        second_version > first_version,
        "fencing token went from {first_version} to {second_version}"
    );
    // Released on exit: the key is gone at once.
    assert!(!exists(&c, "lock/crash"));
}

/// SIGINT to the `kv lock` process alone: the command gets it (it used to be orphaned), the
/// lock is released at once (no waiting for the 10 s TTL), and the command's exit status is
/// `kv lock`'s.
#[test]
fn kv_lock_sigint_reaches_the_command_and_releases_at_once() {
    let c = Cluster::start(1);
    c.wait_leader();
    let dir = tempfile::tempdir().expect("temp dir");
    let ready = dir.path().join("ready");
    let got = dir.path().join("got");
    let script = format!(
        "trap 'echo INT > {got}; exit 42' INT; echo $SHOAL_LOCK_KEY > {ready}; \
         while :; do sleep 0.05; done",
        got = got.display(),
        ready = ready.display()
    );
    let mut holder = spawn(
        &c,
        &["lock", "int", "--ttl", "10", "--", "sh", "-c", &script],
        &dir.path().join("holder.err"),
    );
    wait_for("the command starts", || read(&ready) == "lock/int\n");
    signal(holder.0.id(), libc::SIGINT);
    let status = holder.0.wait().expect("wait for kv lock");
    assert_eq!(
        status.code(),
        Some(42),
        "kv lock's status is the command's; stderr:\n{}",
        read(&dir.path().join("holder.err"))
    );
    assert_eq!(read(&got), "INT\n", "the command did not get the SIGINT");
    // Released at once, not after the TTL.
    assert!(!exists(&c, "lock/int"), "the lock is still held");
    let out = c.cli(&["lock", "int", "--wait-timeout", "1", "--", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A waiter names the holder once on stderr, and `--wait-timeout` ends the wait with a clear
/// message and exit status 75 (it used to wait silently forever).
#[test]
fn kv_lock_wait_timeout_bounds_the_wait_and_names_the_holder() {
    let c = Cluster::start(1);
    c.wait_leader();
    let dir = tempfile::tempdir().expect("temp dir");
    let ready = dir.path().join("ready");
    let holder = spawn(
        &c,
        &[
            "lock",
            "busy",
            "--ttl",
            "5",
            "--",
            "sh",
            "-c",
            &format!("touch {}; exec sleep 60", ready.display()),
        ],
        &dir.path().join("holder.err"),
    );
    wait_for("the holder's command starts", || ready.exists());
    let out = c.cli(&["lock", "busy", "--wait-timeout", "1", "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "stderr:\n{stderr}");
    let holder_desc = format!("held by pid {} on host ", holder.0.id());
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.starts_with("waiting for lock/busy"))
            .count(),
        1,
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains(&holder_desc), "stderr:\n{stderr}");
    assert!(
        stderr.contains("expires within 5 s if its holder dies"),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("gave up waiting"), "stderr:\n{stderr}");
    // Its lease was revoked on the way out; so is that of a waiter stopped by SIGINT.
    let waiter_err = dir.path().join("waiter.err");
    let mut waiter = spawn(&c, &["lock", "busy", "--", "true"], &waiter_err);
    wait_for("the waiter names the holder", || {
        read(&waiter_err).contains("waiting for lock/busy")
    });
    signal(waiter.0.id(), libc::SIGINT);
    let status = waiter.0.wait().expect("wait for the waiter");
    assert_eq!(status.code(), Some(130));
    let list = c.ok(&["lease", "list"]);
    assert_eq!(list.lines().count(), 2, "only the holder's lease: {list}");
    drop(holder);
}

/// `kv lease`: a key put with a lease is listed with it and deleted when the lease expires
/// (no keep-alive) or is revoked; keep-alive of a gone lease says so.
#[test]
fn lease_keys_go_with_their_lease() {
    let c = Cluster::start(1);
    c.wait_leader();
    let id = c.ok(&["lease", "grant", "1"]).trim().to_string();
    let out = c.ok(&["put", "session/a", "up", "--lease", &id]);
    assert!(out.starts_with("ok "), "{out}");
    c.ok(&["put", "plain", "stays"]);
    let list = c.ok(&["lease", "list"]);
    let row: Vec<&str> = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id.as_str()))
        .unwrap_or_else(|| panic!("lease {id} not listed:\n{list}"))
        .split_whitespace()
        .collect();
    assert_eq!((row[1], row[3]), ("1.0", "1"), "{list}");
    wait_for("the leased key expires", || !exists(&c, "session/a"));
    assert!(exists(&c, "plain"));
    let gone = c.cli(&["lease", "keep-alive", "--once", &id]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));
    let refused = c.cli(&["put", "k", "v", "--lease", &id]);
    assert_eq!(refused.status.code(), Some(1));

    // A kept-alive lease keeps its key; revoke deletes it at once.
    let id = c.ok(&["lease", "grant", "30"]).trim().to_string();
    c.ok(&["put", "session/b", "up", "--lease", &id]);
    assert_eq!(c.ok(&["lease", "keep-alive", "--once", &id]), "30.0\n");
    let json: serde_json::Value = serde_json::from_str(&c.ok(&["lease", "list", "-o", "json"]))
        .expect("lease list: one JSON document");
    let lease = &json["leases"][0];
    assert_eq!(
        (
            lease["id"].to_string(),
            lease["ttl_ms"].as_u64(),
            lease["keys"].as_u64()
        ),
        (id.clone(), Some(30_000), Some(1)),
        "{json}"
    );
    assert_eq!(
        c.ok(&["lease", "revoke", &id]),
        "revoked (1 keys deleted)\n"
    );
    assert!(!exists(&c, "session/b"));
    let list = c.ok(&["lease", "list"]);
    assert_eq!(list.lines().count(), 1, "only the header: {list}");
}
