//! TLS on real `shoal kv server` processes (issue 17), with certificates made by `shoal cert`:
//! certified clients are served; a client without a certificate, with one from another CA or
//! an expired one, a client trusting another CA, a plain-TCP client and a peer from another CA
//! are each refused with a clear error on both sides (the client's message, a warn line in the
//! server's log), and nothing they sent is applied. `kv up --tls` serves a 3-node TLS cluster
//! that client commands reach through --dir alone, and `shard up --tls` a sharded one.

// A real-process test: bounded waits on the wall clock.
#![allow(clippy::disallowed_methods)]

mod kv_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kv_support::{free_ports, SHOAL, WAIT};
use shoal_cluster::{Procs, Spec};

fn shoal(args: &[&str]) -> Output {
    Command::new(SHOAL)
        .env_remove("SHOAL_ENDPOINTS")
        .args(args)
        .output()
        .expect("run shoal")
}

fn ok(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `path` contains every one of `parts` on one line.
fn wait_log(path: &Path, parts: &[&str]) {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{parts:?} not in {}:\n{log}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Certs(PathBuf);

impl Certs {
    fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
}

#[test]
fn tls_servers_refuse_every_caller_without_a_valid_certificate_and_apply_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let s = |p: &Path| p.display().to_string();
    // CA a signs nodes 1 and 2 and the clients "good" and "old" (expired); CA b, another
    // cluster's, signs node 3 and the client "foreign".
    for ca in [&a, &b] {
        ok(&["cert", "init", "--dir", &s(ca)]);
    }
    for (ca, name) in [(&a, "n1"), (&a, "n2"), (&b, "n3")] {
        ok(&[
            "cert",
            "node",
            "--dir",
            &s(ca),
            "--name",
            name,
            "--ip",
            "127.0.0.1",
        ]);
    }
    ok(&["cert", "client", "--dir", &s(&a), "--name", "good"]);
    ok(&["cert", "client", "--dir", &s(&b), "--name", "foreign"]);
    ok(&[
        "cert",
        "client",
        "--dir",
        &s(&a),
        "--name",
        "old",
        "--expired",
    ]);
    let (ca_a, ca_b) = (Certs(a.clone()), Certs(b.clone()));

    let ports = free_ports(3);
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let log = |id: usize| dir.path().join(format!("node{id}.log"));
    let mut servers = Procs::with_slots(3);
    for id in 1..=3usize {
        let certs = if id == 3 { &ca_b } else { &ca_a };
        let spec = Spec::new(format!("server {id}"), SHOAL, log(id))
            .args(["kv", "server", "--id", &id.to_string(), "--peers", &peers])
            .args(["--listen", &format!("127.0.0.1:{}", ports[id - 1])])
            .arg("--data")
            .arg(dir.path().join(format!("node{id}")))
            .args(["--cert", &certs.path(&format!("n{id}.pem"))])
            .args(["--key", &certs.path(&format!("n{id}-key.pem"))])
            .args(["--ca", &certs.path("ca.pem")])
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout_null();
        servers.spawn_at(id - 1, spec).expect("start a server");
    }
    // Clients talk to servers 1 and 2 (server 3 is the foreign peer).
    let endpoints = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let client = |tls: &[String], args: &[&str]| -> Output {
        let mut all: Vec<&str> = vec!["kv", "--endpoints", &endpoints, "--timeout", "20"];
        all.extend(tls.iter().map(String::as_str));
        all.extend(args);
        shoal(&all)
    };
    let tls = |certs: &Certs, ca: &Certs, name: Option<&str>| -> Vec<String> {
        let mut v = vec!["--ca".to_string(), ca.path("ca.pem")];
        if let Some(n) = name {
            v.extend([
                "--cert".into(),
                certs.path(&format!("{n}.pem")),
                "--key".into(),
                certs.path(&format!("{n}-key.pem")),
            ]);
        }
        v
    };
    let good = tls(&ca_a, &ca_a, Some("good"));

    // The happy path: servers 1 and 2 are a majority over mutual TLS.
    let out = client(&good, &["put", "k", "v"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&client(&good, &["get", "k"]).stdout),
        "v\n"
    );

    // Each refused caller: (its TLS flags, the client's error, the server's log line).
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        (
            "no-cert",
            tls(&ca_a, &ca_a, None),
            "this server requires a client certificate signed by the cluster's CA",
            "TLS without a client certificate",
        ),
        (
            "other-ca",
            tls(&ca_b, &ca_a, Some("foreign")),
            "the server refused this process's certificate: it is not signed by the server's CA",
            "the caller's certificate is not signed by this server's --ca",
        ),
        (
            "expired",
            tls(&ca_a, &ca_a, Some("old")),
            "the server refused this process's certificate: it has expired",
            "the caller's certificate has expired",
        ),
        (
            "trusts-other-ca",
            tls(&ca_a, &ca_b, Some("good")),
            "the server's certificate is not signed by the CA given with --ca",
            "the caller refused this server's certificate",
        ),
        (
            "plain",
            Vec::new(),
            "this server requires TLS: give the client --ca",
            "plain TCP on this TLS port",
        ),
    ];
    for (key, flags, client_says, server_logs) in &cases {
        let out = client(flags, &["put", key, "x"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: put succeeded: {out:?}");
        assert!(
            err.contains(client_says),
            "{key}: {client_says:?} not in: {err}"
        );
        assert!(
            !err.contains("may or may not have applied"),
            "{key}: a refused connection cannot have applied: {err}"
        );
        wait_log(&log(1), &["WARN", "rejecting connection", server_logs]);
        let out = client(&good, &["get", key]);
        assert_eq!(out.status.code(), Some(1), "{key} was applied: {out:?}");
    }

    // The peer from another CA: refused both ways, in both logs.
    wait_log(&log(1), &["WARN", "peer=3", "UnknownIssuer"]);
    wait_log(
        &log(3),
        &["WARN", "cannot connect to peer", "UnknownIssuer"],
    );
    wait_log(&log(3), &["WARN", "rejecting connection", "UnknownCA"]);
    // And it learnt nothing: its own state (a serializable read, with its own CA) lacks "k".
    let out = shoal(&[
        "kv",
        "--endpoints",
        &format!("127.0.0.1:{}", ports[2]),
        "--timeout",
        "5",
        "--serializable",
        "--ca",
        &ca_b.path("ca.pem"),
        "--cert",
        &ca_b.path("foreign.pem"),
        "--key",
        &ca_b.path("foreign-key.pem"),
        "get",
        "k",
    ]);
    assert_eq!(out.status.code(), Some(1), "server 3 has k: {out:?}");
}

#[test]
fn a_server_refuses_to_listen_beyond_loopback_without_tls_unless_insecure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_ports(1)[0];
    let out = shoal(&[
        "kv",
        "server",
        "--id",
        "1",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--peers",
        &format!("1=127.0.0.1:{port}"),
        "--data",
        &dir.path().join("n1").display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    for part in ["without TLS", "--cert, --key and --ca", "--insecure"] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
}

#[test]
fn kv_up_tls_serves_a_three_node_tls_cluster_reached_through_its_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = dir.path().join("c");
    let mut up = Procs::with_slots(1);
    up.spawn_at(
        0,
        Spec::new("kv up", SHOAL, dir.path().join("up.log"))
            .args(["kv", "up", "--tls", "--dir"])
            .arg(&cluster)
            .env_remove("SHOAL_ENDPOINTS"),
    )
    .expect("start kv up");
    let d = cluster.display().to_string();
    let start = Instant::now();
    loop {
        let out = shoal(&["kv", "--dir", &d, "--timeout", "10", "put", "k", "v"]);
        if out.status.success() {
            break;
        }
        assert!(start.elapsed() < WAIT, "no put within {WAIT:?}: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ok(&["kv", "--dir", &d, "get", "k"]), "v\n");
    for id in 1..=3 {
        let log = std::fs::read_to_string(cluster.join(format!("node{id}.log"))).unwrap();
        assert!(!log.contains("WARN"), "node{id}.log has warnings:\n{log}");
    }
    // The servers are TLS: a plain client is refused.
    let endpoints = std::fs::read_to_string(cluster.join("endpoints")).unwrap();
    let endpoints = endpoints.lines().collect::<Vec<_>>().join(",");
    let out = shoal(&["kv", "--endpoints", &endpoints, "get", "k"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this server requires TLS"),
        "{out:?}"
    );
}

#[test]
fn shard_up_tls_serves_a_sharded_cluster_over_tls_end_to_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = dir.path().join("s");
    let mut up = Procs::with_slots(1);
    up.spawn_at(
        0,
        Spec::new("shard up", SHOAL, dir.path().join("up.log"))
            .args(["shard", "up", "--tls", "--groups", "1", "--replicas", "1"])
            .args(["--shards", "8", "--dir"])
            .arg(&cluster)
            .env_remove("SHOAL_CONTROLLER"),
    )
    .expect("start shard up");
    let d = cluster.display().to_string();
    // The controller store, the group and the routing client all speak TLS; the client
    // finds the certificates through --dir.
    let start = Instant::now();
    loop {
        let out = shoal(&["kv", "--dir", &d, "--timeout", "10", "put", "k", "v"]);
        if out.status.success() {
            break;
        }
        assert!(start.elapsed() < WAIT, "no put within {WAIT:?}: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ok(&["kv", "--dir", &d, "get", "k"]), "v\n");
    let query = ok(&["shard", "query", "--dir", &d]);
    assert!(query.contains("0-7 -> 1"), "{query}");
    // A plain client of the controller store is refused in words.
    let store = std::fs::read_to_string(cluster.join("controller")).unwrap();
    let store = store.lines().collect::<Vec<_>>().join(",");
    let out = shoal(&["shard", "query", "--controller", &store]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this server requires TLS"),
        "{out:?}"
    );
}
