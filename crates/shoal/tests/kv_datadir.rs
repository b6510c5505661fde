//! One process per data directory: a second `kv server` on a directory in use is refused at
//! once and the first keeps serving; a directory of unrelated files is named as such; a
//! `--listen` that is not the server's own `--peers` entry is refused. `raft node` likewise.

mod kv_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use kv_support::{free_ports, Cluster, SHOAL, WAIT};

/// Runs `cmd` to its end, or fails the test if it is still running after [`WAIT`] (a server
/// that should have refused to start).
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn exits_by_itself(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shoal");
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            let out = child.wait_with_output().expect("collect the output");
            return (
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {WAIT:?}: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child SIGKILLed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_server_on_a_data_directory_in_use_is_refused_and_the_first_keeps_serving() {
    let c = Cluster::start(1);
    assert_eq!(c.ok(&["put", "before", "1"]), "ok 1\n");
    let first = c.pid(1).expect("server 1 runs");
    // The same server id on another port, on the same directory: what two terminals with the
    // same --data do.
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let (status, err) = exits_by_itself(
        Command::new(SHOAL)
            .args(["kv", "server", "--id", "1", "--listen", &addr])
            .args(["--peers", &format!("1={addr}"), "--data"])
            .arg(c.data_dir(1)),
    );
    assert!(!status.success(), "the second server exited with {status}");
    let expected = format!(
        "data directory {} is in use by pid {first}",
        c.data_dir(1).display()
    );
    assert!(err.contains(&expected), "expected {expected:?} in: {err}");
    // The very same command again: the directory is named, not only the busy port.
    let (status, err) = exits_by_itself(&mut c.server_command(1, &c.data_dir(1)));
    assert!(!status.success());
    assert!(err.contains(&expected), "expected {expected:?} in: {err}");
    // The first still serves, reads and writes.
    assert_eq!(c.ok(&["put", "after", "2"]), "ok 1\n");
    assert_eq!(c.ok(&["get", "before"]), "1\n");
    assert_eq!(c.ok(&["get", "after"]), "2\n");
}

#[test]
fn a_directory_of_other_files_is_not_taken_for_a_data_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("holiday.jpg"), b"not shoal").expect("write a file");
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let (status, err) = exits_by_itself(
        Command::new(SHOAL)
            .args(["kv", "server", "--id", "1", "--listen", &addr])
            .args(["--peers", &format!("1={addr}"), "--data"])
            .arg(dir.path()),
    );
    assert!(!status.success());
    let expected = format!(
        "{} is not a Shoal data directory (it holds other files: holiday.jpg)",
        dir.path().display()
    );
    assert!(err.contains(&expected), "expected {expected:?} in: {err}");
    assert!(!err.contains("corrupt"), "{err}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read the directory")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, ["holiday.jpg"], "the directory is left as it was");
}

#[test]
fn a_listen_address_other_than_the_servers_own_peers_entry_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = free_ports(2);
    let (status, err) = exits_by_itself(
        Command::new(SHOAL)
            .args(["kv", "server", "--id", "1"])
            .args(["--listen", &format!("127.0.0.1:{}", ports[0])])
            .args(["--peers", &format!("1=127.0.0.1:{}", ports[1]), "--data"])
            .arg(dir.path().join("n1")),
    );
    assert!(!status.success());
    assert!(
        err.contains("differs from this server's own --peers entry"),
        "{err}"
    );
    assert!(
        !dir.path().join("n1").exists(),
        "nothing created before refusing"
    );
}

/// `raft node` owns its data directory the same way (the lock is taken by the storage's open,
/// which every owner goes through).
#[test]
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn a_second_raft_node_on_a_data_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n1");
    let ports = free_ports(2);
    let node = |port: u16| {
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(SHOAL);
        cmd.args(["raft", "node", "--id", "1", "--listen", &addr])
            .args(["--peers", &format!("1={addr}"), "--data"])
            .arg(&data);
        cmd
    };
    let mut first = KillOnDrop(
        node(ports[0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a raft node"),
    );
    // It holds the lock once it has written its pid into DIR/LOCK.
    let pid = first.0.id().to_string();
    let start = std::time::Instant::now();
    while std::fs::read_to_string(data.join("LOCK")).map_or(true, |t| t.trim() != pid) {
        assert!(
            start.elapsed() < WAIT,
            "the first node never locked {}",
            data.display()
        );
        assert!(
            first.0.try_wait().expect("wait").is_none(),
            "the first node exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, err) = exits_by_itself(&mut node(ports[1]));
    assert!(!status.success());
    let expected = format!("data directory {} is in use by pid {pid}", data.display());
    assert!(err.contains(&expected), "expected {expected:?} in: {err}");
    assert!(
        first.0.try_wait().expect("wait").is_none(),
        "the first node still runs"
    );
}
