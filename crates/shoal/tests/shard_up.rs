//! `shoal shard up` and the controller commands as real processes: `shard up --groups 2`
//! writes DIR/controller and DIR/groups and joins both groups; `join` of a member is refused
//! and changes nothing; `leave` and `join` again and `move` give increasing configuration
//! numbers; `status` shows each group's leader; a SIGKILLed server is restarted; a second
//! `shard up` on the running directory is refused; stopped and started again, `shard up`
//! resumes the same configuration without a new join (a group that left stays out); a join of an unreachable group waits,
//! says why, and Ctrl-C leaves it recorded but incomplete; a join of a group of another shard
//! count, or with a --shards other than the cluster's, is refused with nothing recorded.
//! About 15 s on 2 cores.

mod kv_support;
mod proc_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_support::{signal, SHOAL, WAIT};
use proc_support::{children_of, running};

/// Shards of the test's cluster: few, so that every change moves few of them.
const SHARDS: &str = "16";
/// Servers `shard up --groups 2` runs: the controller store's 3 and 2 groups of 3.
const SERVERS: usize = 9;

/// A running `shoal shard up`, SIGKILLed on drop (its servers follow it).
struct Up {
    child: Child,
    out: Arc<Mutex<String>>,
    err_path: PathBuf,
}

impl Up {
    fn start(dir: &Path, err_path: &Path, extra: &[&str]) -> Up {
        let mut child = Command::new(SHOAL)
            .args(["shard", "up", "--dir"])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(err_path).expect("create the stderr file"))
            .spawn()
            .expect("start shoal shard up");
        let out = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        Up {
            child,
            out,
            err_path: err_path.to_path_buf(),
        }
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err_path).unwrap_or_default()
    }

    /// Waits for the summary (`config N: groups …`) and returns N.
    fn wait_summary(&mut self) -> u64 {
        let mut num = None;
        wait_until(self, "no summary from shard up", |up| {
            num = up
                .stdout()
                .lines()
                .find_map(|l| l.strip_prefix("config ")?.split(':').next()?.parse().ok());
            num.is_some()
        });
        num.unwrap()
    }

    /// Stops it as a supervisor would (SIGTERM) and waits for a clean exit.
    #[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
    fn stop(mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for shard up") {
                assert!(status.success(), "shard up exited with {status}");
                return;
            }
            assert!(start.elapsed() < WAIT, "shard up did not stop on SIGTERM");
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

/// Waits until `cond` holds, failing with `what` (and shard up's messages) after [`WAIT`].
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn wait_until(up: &mut Up, what: &str, mut cond: impl FnMut(&mut Up) -> bool) {
    let start = Instant::now();
    while !cond(up) {
        assert!(
            start.elapsed() < WAIT,
            "{what} within {WAIT:?}; shard up said:\n{}{}",
            up.stdout(),
            up.stderr()
        );
        assert!(
            up.child.try_wait().expect("wait for shard up").is_none(),
            "shard up exited; it said:\n{}{}",
            up.stdout(),
            up.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `shoal shard ARGS --dir DIR`, killed after [`WAIT`].
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn shard(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(SHOAL)
        .arg("shard")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shoal shard");
    let start = Instant::now();
    while child.try_wait().expect("wait for shoal shard").is_none() {
        if start.elapsed() > WAIT {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("shoal shard output")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `shard ARGS` succeeds; its stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let out = shard(dir, args);
    assert!(out.status.success(), "shard {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `join`/`leave`/`move` succeeds and prints `config N`: N.
fn change(dir: &Path, args: &[&str]) -> u64 {
    let out = ok(dir, args);
    out.trim()
        .strip_prefix("config ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("shard {args:?} printed {out:?}, not `config N`"))
}

/// `shard ARGS` is refused with exit status 1.
fn refused(dir: &Path, args: &[&str]) -> String {
    let out = shard(dir, args);
    assert_eq!(out.status.code(), Some(1), "shard {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `query`: (configuration number, gids, shard → gid).
fn query(dir: &Path) -> (u64, Vec<u64>, Vec<u64>) {
    let out = ok(dir, &["query"]);
    let num = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("config ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("query printed {out:?}"));
    let section = |name: &str| -> Vec<String> {
        out.lines()
            .skip_while(|l| *l != name)
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .map(|l| l.trim().to_string())
            .collect()
    };
    let gids = section("groups:")
        .iter()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let mut owners = Vec::new();
    for line in section("shards:") {
        let (range, gid) = line.split_once(" -> ").expect("RANGE -> GID");
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        assert_eq!(a, owners.len(), "ranges in order: {out}");
        let gid = gid.parse().unwrap_or(0);
        owners.extend(std::iter::repeat_n(gid, b - a + 1));
    }
    (num, gids, owners)
}

#[test]
fn shard_up_joins_its_groups_serves_the_controller_commands_and_resumes() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let mut up = Up::start(
        &dir,
        &tmp.path().join("up.err"),
        &["--groups", "2", "--shards", SHARDS],
    );
    let first = up.wait_summary();

    // The two files.
    let controller = std::fs::read_to_string(dir.join("controller")).unwrap();
    assert_eq!(controller.lines().count(), 3, "{controller}");
    let groups = std::fs::read_to_string(dir.join("groups")).unwrap();
    let lines: Vec<&str> = groups.lines().collect();
    assert_eq!(lines.len(), 2, "{groups}");
    let group2 = lines[1].strip_prefix("2 ").expect("GID ADDRS").to_string();
    let group1 = lines[0].strip_prefix("1 ").expect("GID ADDRS").to_string();
    assert_eq!(group1.split(',').count(), 3, "{groups}");

    // Both groups joined, owning every shard.
    let (num, gids, owners) = query(&dir);
    assert_eq!(num, first);
    assert_eq!(gids, [1, 2]);
    assert_eq!(owners.len(), 16);
    assert!(owners.iter().all(|&g| g == 1 || g == 2), "{owners:?}");
    assert!(owners.contains(&1) && owners.contains(&2), "{owners:?}");

    // Refusals: exit 1, nothing changed.
    for (args, said) in [
        (
            vec!["join".to_string(), format!("1={group1}")],
            "group 1 is already a member",
        ),
        (vec!["leave".into(), "7".into()], "group 7 is not a member"),
        (
            vec!["move".into(), "0".into(), "9".into()],
            "group 9 is not a member",
        ),
        (
            vec!["move".into(), "16".into(), "1".into()],
            "unknown shard 16",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let why = refused(&dir, &args);
        assert!(
            why.contains(said) && why.contains("nothing changed"),
            "{args:?}: {why}"
        );
    }
    assert_eq!(query(&dir), (num, gids.clone(), owners.clone()));
    // Malformed arguments never reach the controller.
    let out = shard(&dir, &["join", "0=127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // Leave, join again, move: increasing numbers.
    let left = change(&dir, &["leave", "2"]);
    assert!(left > num, "{left} after {num}");
    let (_, gids, owners) = query(&dir);
    assert_eq!(gids, [1]);
    assert!(owners.iter().all(|&g| g == 1), "{owners:?}");
    let why = refused(&dir, &["leave", "1"]);
    assert!(why.contains("last group"), "{why}");
    let rejoined = change(&dir, &["join", &format!("2={group2}")]);
    assert!(rejoined > left, "{rejoined} after {left}");
    let target = if query(&dir).2[0] == 2 { 1 } else { 2 };
    let moved = change(&dir, &["move", "0", &target.to_string()]);
    assert!(moved > rejoined, "{moved} after {rejoined}");
    let (num, _, owners) = query(&dir);
    assert_eq!((num, owners[0]), (moved, target));

    // Status: the configuration and each group's leader.
    let mut status = String::new();
    wait_until(&mut up, "no leader of both groups in status", |_| {
        status = ok(&dir, &["status"]);
        status.contains("\n  1 leader 127.0.0.1:") && status.contains("\n  2 leader 127.0.0.1:")
    });
    assert!(
        status.starts_with(&format!("config {moved} (16 shards), complete")),
        "{status}"
    );

    // A SIGKILLed server is restarted.
    let servers = children_of(up.child.id());
    assert_eq!(servers.len(), SERVERS, "{servers:?}");
    signal(servers[4], libc::SIGKILL);
    wait_until(&mut up, "the killed server was not restarted", |up| {
        up.stderr().contains("restarted") && children_of(up.child.id()).len() == SERVERS
    });

    // A second `shard up` on the running directory starts nothing and says why.
    let out = Command::new(SHOAL)
        .args(["shard", "up", "--dir"])
        .arg(&dir)
        .output()
        .expect("run a second shard up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second shard up: {}", text(&out));
    assert!(err.contains("already runs"), "{err}");
    assert!(
        err.contains(&format!("shard up {}", up.child.id())),
        "{err}"
    );
    // Options that disagree with the directory are refused too.
    let out = Command::new(SHOAL)
        .args(["shard", "up", "--groups", "3", "--dir"])
        .arg(&dir)
        .output()
        .expect("run shard up --groups 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--groups 3 (it has 2)"), "{err}");

    // Stopped, the servers go with it; started again, it resumes without a new join (group 2,
    // which left, stays out).
    let left = change(&dir, &["leave", "2"]);
    let servers = children_of(up.child.id());
    up.stop();
    assert!(
        !servers.iter().any(|&p| running(p)),
        "servers outlived shard up"
    );
    let mut up = Up::start(&dir, &tmp.path().join("up2.err"), &[]);
    assert_eq!(up.wait_summary(), left);
    assert!(!up.stderr().contains("joining"), "{}", up.stderr());
    wait_until(&mut up, "no word of group 2 being out", |up| {
        up.stdout().contains("group 2 runs but is not a member")
    });
    assert_eq!(
        std::fs::read_to_string(dir.join("groups")).unwrap(),
        groups,
        "same addresses"
    );
    assert_eq!(query(&dir).0, left);
    let moved = left;

    // A join whose servers cannot be reached waits before recording anything, says why, and
    // Ctrl-C interrupts it with nothing changed: no shard is pointed at a group that cannot
    // hold it.
    let err_path = tmp.path().join("join.err");
    let mut join = Command::new(SHOAL)
        .args(["shard", "join", "3=127.0.0.1:1", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("create the stderr file"))
        .spawn()
        .expect("run shard join");
    let said = || std::fs::read_to_string(&err_path).unwrap_or_default();
    wait_until(&mut up, "the waiting join never said why", |_| {
        said().contains("waiting for a leader in group 3 (127.0.0.1:1: connection refused)")
    });
    signal(join.id(), libc::SIGINT);
    let status = join.wait().expect("wait for shard join");
    assert_eq!(status.code(), Some(130), "{}", said());
    assert!(said().contains("nothing changed"), "{}", said());
    assert_eq!(query(&dir).0, moved, "nothing was recorded");
    let status = ok(&dir, &["status"]);
    assert!(!status.contains("changing"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["status", "-o", "json"])).expect("one JSON document");
    assert_eq!(
        (json["complete"].as_bool(), json["config"]["num"].as_u64()),
        (Some(true), Some(moved)),
        "{json}"
    );
    let (_, gids, shards) = query(&dir);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["query", "-o", "json"])).expect("one JSON document");
    let owners: Vec<u64> = json["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter_map(|g| g.as_u64())
        .collect();
    let groups: Vec<u64> = json["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["gid"].as_u64())
        .collect();
    assert_eq!((owners, groups), (shards, gids), "{json}");

    // A group server given the cluster's --controller and another --shards refuses to start,
    // before creating its data directory.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let data = tmp.path().join("stray-server");
    let store = controller.lines().collect::<Vec<_>>().join(",");
    let out = Command::new(SHOAL)
        .args([
            "shard", "server", "--gid", "3", "--id", "1", "--listen", &addr,
        ])
        .args([
            "--peers",
            &addr,
            "--shards",
            "64",
            "--controller",
            &store,
            "--data",
        ])
        .arg(&data)
        .output()
        .expect("run a stray shard server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        err.contains("--shards 64 differs from the cluster's") && err.contains("has 16 shards"),
        "{err}"
    );
    assert!(!data.exists(), "nothing created");

    // The same server started without --controller runs, as group 3 of 64 shards: a join of
    // it is refused before anything is recorded (it would refuse every configuration), and
    // so is a --shards that is not the cluster's.
    let stray = Command::new(SHOAL)
        .args([
            "shard", "server", "--gid", "3", "--id", "1", "--listen", &addr,
        ])
        .args(["--peers", &addr, "--shards", "64", "--data"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run a stray shard server");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _stray = Kill(stray);
    let err = refused(&dir, &["join", &format!("3={addr}")]);
    assert!(
        err.contains("group 3's servers have 64 shards")
            && err.contains("the cluster 16")
            && err.contains("nothing changed"),
        "{err}"
    );
    let err = refused(&dir, &["join", &format!("3={addr}"), "--shards", "64"]);
    assert!(
        err.contains("--shards 64 is not the cluster's") && err.contains("has 16 shards"),
        "{err}"
    );
    assert_eq!(query(&dir).0, moved, "nothing was recorded");
    up.stop();
}

#[test]
fn shard_up_refuses_bad_shapes_before_creating_anything() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    for (args, said) in [
        (["--groups", "0"], "--groups must be at least 1"),
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--shards", "0"], "--shards"),
        (
            ["--groups", "30"],
            "90 group servers on this machine, more than 64",
        ),
    ] {
        let out = Command::new(SHOAL)
            .args(["shard", "up", "--dir"])
            .arg(&dir)
            .args(args)
            .output()
            .expect("run shard up");
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(said),
            "{}",
            text(&out)
        );
        assert!(!dir.exists(), "shard up {args:?} created {}", dir.display());
    }
    // The controller commands without a cluster say where they looked.
    let out = Command::new(SHOAL)
        .args(["shard", "query"])
        .current_dir(tmp.path())
        .env_remove("SHOAL_CONTROLLER")
        .output()
        .expect("run shard query");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no controller to talk to"),
        "{}",
        text(&out)
    );
}
