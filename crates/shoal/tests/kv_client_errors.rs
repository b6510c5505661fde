//! A KV client that cannot get an answer says why, and at once when waiting cannot help:
//! nothing listening, a server of another cluster, a port of another service, no leader.
//! Each command runs with `--timeout 30`; the ones that must answer at once have to be back
//! well before it (10 s: not a timing test, the old client took the whole 30 s).

// A real-process test: how long a command took is measured on the wall clock.
#![allow(clippy::disallowed_methods)]

mod kv_support;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kv_support::{free_ports, Cluster, SHOAL};

/// Far below the `--timeout 30` of the commands: an answer "at once" comes back before this.
const AT_ONCE: Duration = Duration::from_secs(10);

/// `shoal kv --endpoints EPS --timeout 30 ARGS`, and how long it took.
fn kv(endpoints: &str, args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(SHOAL)
        .env_remove("SHOAL_ENDPOINTS")
        .args(["kv", "--endpoints", endpoints, "--timeout", "30"])
        .args(args)
        .output()
        .expect("run shoal kv");
    (out, start.elapsed())
}

/// Asserts the command failed at once with a message containing every one of `parts`, and
/// (for a read) without the write's "may or may not have applied".
fn assert_fails_at_once(endpoints: &str, args: &[&str], parts: &[&str]) {
    let (out, took) = kv(endpoints, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {out:?}");
    for part in parts {
        assert!(err.contains(part), "{args:?}: {part:?} not in: {err}");
    }
    assert!(
        !err.contains("may or may not have applied"),
        "{args:?}: nothing was sent, yet: {err}"
    );
    assert!(took < AT_ONCE, "{args:?} took {took:?}: {err}");
}

#[test]
fn connection_refused_everywhere_is_said_at_once() {
    let ports = free_ports(3);
    let endpoints = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let expected = format!(
        "cannot reach any server (connection refused on {}): is the cluster running?",
        endpoints.replace(',', ", ")
    );
    assert_fails_at_once(&endpoints, &["get", "k"], &[&expected]);
    assert_fails_at_once(&endpoints, &["put", "k", "v"], &[&expected]);
    assert_fails_at_once(&endpoints, &["scan"], &[&expected]);
}

#[test]
fn a_server_of_another_cluster_is_named() {
    let c = Cluster::start(1);
    c.wait_leader();
    let endpoint = c.endpoints();
    let expected = format!("server {endpoint} is cluster 1, not 2");
    assert_fails_at_once(&endpoint, &["--cluster", "2", "get", "k"], &[&expected]);
    assert_fails_at_once(
        &endpoint,
        &["--cluster", "2", "put", "k", "v"],
        &[&expected],
    );
    // The right cluster id still works on the same server.
    assert_eq!(c.ok(&["put", "k", "v"]), "ok 1\n");
}

/// Kills the child on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_port_of_another_service_is_not_a_kv_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = free_ports(3);
    let raft = format!("127.0.0.1:{}", ports[0]);
    let mr = format!("127.0.0.1:{}", ports[1]);
    let mr_http = format!("127.0.0.1:{}", ports[2]);
    let _raft = Killed(
        Command::new(SHOAL)
            .args(["raft", "node", "--id", "1", "--listen", &raft])
            .args(["--peers", &format!("1={raft}"), "--data"])
            .arg(dir.path().join("raft"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a raft node"),
    );
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a b\n").expect("input");
    let _mr = Killed(
        Command::new(SHOAL)
            .args([
                "mr",
                "coordinator",
                "--listen",
                &mr,
                "--http",
                &mr_http,
                "--out",
            ])
            .arg(dir.path().join("out"))
            .arg(&input)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a coordinator"),
    );
    // A plain HTTP server of another program: it answers garbage with a 400, as servers do.
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let http_addr = http.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        for conn in http.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    for addr in [&raft, &mr, &mr_http] {
        kv_support::wait_listening(addr);
    }
    assert_fails_at_once(
        &http_addr,
        &["get", "k"],
        &[&format!(
            "{http_addr} is not a Shoal KV server (it speaks HTTP)"
        )],
    );
    assert_fails_at_once(
        &mr_http,
        &["put", "k", "v"],
        &[&format!(
            "{mr_http} is not a Shoal KV server (it speaks HTTP)"
        )],
    );
    assert_fails_at_once(
        &mr,
        &["get", "k"],
        &[&format!(
            "{mr} is not a Shoal KV server (it speaks the MapReduce coordinator protocol)"
        )],
    );
    assert_fails_at_once(
        &raft,
        &["get", "k"],
        &[&format!(
            "{raft} is not a Shoal KV server (it is a Raft demo node"
        )],
    );
}

#[test]
fn no_leader_says_how_many_servers_answer_and_only_writes_may_have_applied() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader();
    // Leave one follower: it answers (it is not the leader), the others refuse.
    let survivor = (1..=3).find(|&id| id != leader).expect("a follower");
    for id in (1..=3).filter(|&id| id != survivor) {
        c.kill(id);
    }
    let read = c.cli_within("3", &["get", "k"]);
    let err = String::from_utf8_lossy(&read.stderr);
    assert!(
        err.contains("no answer within 3s: no leader: 1 of 3 servers answering"),
        "{err}"
    );
    assert!(err.contains("connection refused"), "{err}");
    assert!(!err.contains("may or may not have applied"), "{err}");
    let write = c.cli_within("3", &["put", "k", "v"]);
    let err = String::from_utf8_lossy(&write.stderr);
    assert!(err.contains("no leader: 1 of 3 servers answering"), "{err}");
    assert!(
        err.contains("(a write may or may not have applied)"),
        "{err}"
    );
}
