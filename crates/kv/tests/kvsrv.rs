//! Single-server KV (the classic kvsrv, SCENARIOS Lab 2) and the lock, in the simulator.
//! `SHOAL_SEEDS=N` runs more seeds, `SHOAL_SEED=S` replays one.

mod common;

use std::time::Duration;

use common::*;
use shoal_kv::{Limits, Outcome, SingleServer};
use shoal_sim::{check_seeds, Failure, NetConfig, Sim, SimConfig, SimTime};
use shoal_wire::kv::{Expected, KvOp, KvRequest, KvResult};

fn sim(seed: u64, net: NetConfig) -> Sim<M> {
    Sim::new(
        seed,
        SimConfig {
            net,
            ..SimConfig::default()
        },
    )
}

fn put(key: &str, value: &str, expected: Expected) -> KvOp {
    KvOp::Put {
        key: key.into(),
        value: value.into(),
        expected,
    }
}

fn get(key: &str) -> KvOp {
    KvOp::Get { key: key.into() }
}

/// Adds the server (node 0, server id 1) and returns nothing.
fn add_server(sim: &mut Sim<M>, limits: Limits) {
    sim.add_node(move |_| SingleNode {
        server: SingleServer::new(limits),
    });
}

fn add_clients(sim: &mut Sim<M>, n: usize, work: impl Fn(usize) -> Work) -> Vec<SimId> {
    (0..n)
        .map(|i| {
            let w = work(i);
            sim.add_node(move |id| Client::new(u64::from(id.0), vec![1], w.clone()))
        })
        .collect()
}

fn final_version(sim: &Sim<M>, key: &str) -> u64 {
    sim.node::<SingleNode>(server_sim(1))
        .and_then(|s| s.server.store().get(key.as_bytes()).map(|(_, v)| v))
        .unwrap_or(0)
}

/// TestReliablePut: create, get, mismatch, no-key; plus limits and scan.
#[test]
fn reliable_put() {
    check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut sim = sim(seed, NetConfig::reliable());
        let limits = Limits {
            max_key_bytes: 16,
            max_value_bytes: 64,
            ..Limits::default()
        };
        add_server(&mut sim, limits);
        let script = vec![
            put("k", "6.5840", Expected::Version(0)),
            get("k"),
            put("k", "x", Expected::Version(0)),
            put("y", "x", Expected::Version(1)),
            get("y"),
            put("a-key-that-is-far-too-long", "x", Expected::Any),
            put("k", &"v".repeat(65), Expected::Any),
            KvOp::Scan {
                start: Vec::new(),
                end: None,
                limit: 10,
            },
        ];
        let c = add_clients(&mut sim, 1, |_| Work::Script(script.clone()));
        sim.run_until_true(Duration::from_secs(5), |s| all_finished(s, &c));
        let client = sim.node::<Client>(c[0]).ok_or("client")?;
        let got: Vec<_> = client.results.iter().map(|(_, o)| o.clone()).collect();
        let expect_head = [
            Outcome::Done(KvResult::Written { version: 1 }),
            Outcome::Done(KvResult::Found {
                value: b"6.5840".to_vec(),
                version: 1,
            }),
            Outcome::Done(KvResult::VersionMismatch),
            Outcome::Done(KvResult::NoKey),
            Outcome::Done(KvResult::NoKey),
        ];
        if got.len() != 8 || got[..5] != expect_head[..] {
            return Err(sim.failure(format!("results {got:?}")));
        }
        for o in &got[5..7] {
            if !matches!(o, Outcome::Done(KvResult::TooLarge { .. })) {
                return Err(sim.failure(format!("oversized write answered {o:?}")));
            }
        }
        match &got[7] {
            Outcome::Done(KvResult::Scanned { items })
                if items.len() == 1 && items[0].value == b"6.5840" => {}
            other => return Err(sim.failure(format!("scan answered {other:?}"))),
        }
        check_history(&sim)?;
        Ok(())
    });
}

/// TestPutConcurrentReliable: 10 clerks race on one key for 1 s; the final version equals the
/// number of ok puts; linearizable.
#[test]
fn put_concurrent_reliable() {
    check_seeds!(10, |seed| -> Result<(), Failure> {
        let mut sim = sim(seed, NetConfig::reliable());
        add_server(&mut sim, Limits::default());
        let until = SimTime::from_nanos(1_000_000_000);
        let c = add_clients(&mut sim, 10, |_| Work::PutLoop {
            keys: vec!["k".into()],
            until,
        });
        sim.run_until_true(Duration::from_secs(10), |s| all_finished(s, &c));
        client_violation(&sim, &c)?;
        let (ok, _) = put_counts(&sim, &c);
        let v = final_version(&sim, "k");
        if v != ok || ok == 0 {
            return Err(sim.failure(format!("final version {v}, ok puts {ok}")));
        }
        check_history(&sim)?;
        Ok(())
    });
}

/// TestUnreliableNet: 100 rounds of put-at-version-r, retried while maybe; retries end in
/// mismatch; at least one maybe; linearizable. Run without dedup (the classic kvsrv) — and
/// with dedup, where no maybe is needed.
#[test]
fn unreliable_net() {
    check_seeds!(10, |seed| -> Result<(), Failure> {
        for dedup in [false, true] {
            let mut sim = sim(seed, NetConfig::unreliable());
            let limits = Limits {
                max_sessions: if dedup { 100 } else { 0 },
                ..Limits::default()
            };
            add_server(&mut sim, limits);
            let c = add_clients(&mut sim, 1, |_| Work::Rounds {
                key: "k".into(),
                rounds: 100,
            });
            if !sim.run_until_true(Duration::from_secs(120), |s| all_finished(s, &c)) {
                return Err(sim.failure("rounds did not finish"));
            }
            client_violation(&sim, &c)?;
            let (_, maybes) = put_counts(&sim, &c);
            if !dedup && maybes == 0 {
                return Err(sim.failure("no maybe seen in 100 rounds"));
            }
            check_history(&sim)?;
        }
        Ok(())
    });
}

/// TestMemPutManyClients, as a bound on the session table rather than the heap: 20,000 clients
/// each register and first put at version 1 (no-key), then client i registers again (its
/// first session expired long ago: a write in it is refused) and puts a 1000-byte value at
/// version i.
#[test]
fn memory_bounded_many_clients() {
    const CLIENTS: u64 = 20_000;
    const MAX_SESSIONS: usize = 1000;
    let mut server = SingleServer::new(Limits {
        max_sessions: MAX_SESSIONS,
        ..Limits::default()
    });
    let value = "x".repeat(1000);
    let register = |server: &mut SingleServer, c: u64| -> u64 {
        let r = server.handle(&KvRequest {
            client: c,
            request: 0,
            op: KvOp::Register,
            serializable: false,
        });
        match r {
            shoal_wire::kv::KvReply::Done {
                result: KvResult::Registered { session },
                ..
            } => session,
            other => panic!("{other:?}"),
        }
    };
    let mut first = Vec::new();
    for c in 0..CLIENTS {
        let session = register(&mut server, c);
        first.push(session);
        let r = server.handle(&KvRequest {
            client: session,
            request: 1,
            op: put("k", "", Expected::Version(1)),
            serializable: false,
        });
        let shoal_wire::kv::KvReply::Done { result, .. } = r else {
            panic!("{r:?}")
        };
        if c == 0 {
            assert_eq!(result, KvResult::NoKey);
        }
    }
    for c in 0..CLIENTS {
        let refused = server.handle(&KvRequest {
            client: first[c as usize],
            request: 2,
            op: put("k", &value, Expected::Any),
            serializable: false,
        });
        assert!(
            matches!(
                refused,
                shoal_wire::kv::KvReply::Done {
                    result: KvResult::SessionExpired,
                    ..
                }
            ),
            "{refused:?}"
        );
        let session = register(&mut server, c);
        let r = server.handle(&KvRequest {
            client: session,
            request: 2,
            op: put("k", &value, Expected::Version(c)),
            serializable: false,
        });
        assert!(
            matches!(
                r,
                shoal_wire::kv::KvReply::Done {
                    result: KvResult::Written { .. },
                    ..
                }
            ),
            "{r:?}"
        );
        assert!(server.store().session_count() <= MAX_SESSIONS);
    }
    let bytes = server.store().session_bytes();
    // Each remembered answer is a small "written" (no value): a fixed cost per client.
    assert!(bytes <= MAX_SESSIONS * 64, "session table {bytes} bytes");
    assert_eq!(server.store().get(b"k").map(|(_, v)| v), Some(CLIENTS));
    let snap = server.store().snapshot();
    assert!(
        snap.len() < 1000 + MAX_SESSIONS * 32,
        "snapshot {} bytes",
        snap.len()
    );
}

/// Many concurrent clients through the simulator with a small session table: bounded.
#[test]
fn memory_bounded_many_clients_sim() {
    check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut sim = sim(seed, NetConfig::unreliable());
        add_server(
            &mut sim,
            Limits {
                max_sessions: 50,
                ..Limits::default()
            },
        );
        let c = add_clients(&mut sim, 300, |i| {
            Work::Script(vec![put(&format!("k{}", i % 7), "v", Expected::Any)])
        });
        sim.run_until_true(Duration::from_secs(30), |s| all_finished(s, &c));
        let store = sim
            .node::<SingleNode>(server_sim(1))
            .ok_or("server")?
            .server
            .store()
            .clone();
        if store.session_count() > 50 {
            return Err(sim.failure(format!("{} sessions", store.session_count())));
        }
        Ok(())
    });
}

fn lock_test(seed: u64, clients: usize, net: NetConfig) -> Result<(), Failure> {
    let mut sim = sim(seed, net);
    add_server(&mut sim, Limits::default());
    let until = SimTime::from_nanos(2_000_000_000);
    let c = add_clients(&mut sim, clients, |_| Work::LockLoop {
        lock: "l".into(),
        shared: "l0".into(),
        until,
    });
    if !sim.run_until_true(Duration::from_secs(60), |s| all_finished(s, &c)) {
        return Err(sim.failure("lock clients did not finish"));
    }
    client_violation(&sim, &c)?;
    let held = check_lock_intervals(&sim, &c)?;
    if held == 0 {
        return Err(sim.failure("nobody acquired the lock"));
    }
    check_history(&sim)?;
    Ok(())
}

#[test]
fn lock_one_client_reliable() {
    check_seeds!(5, |seed| lock_test(seed, 1, NetConfig::reliable()));
}

#[test]
fn lock_one_client_unreliable() {
    check_seeds!(5, |seed| lock_test(seed, 1, NetConfig::unreliable()));
}

#[test]
fn lock_many_clients_reliable() {
    check_seeds!(5, |seed| lock_test(seed, 10, NetConfig::reliable()));
}

#[test]
fn lock_many_clients_unreliable() {
    check_seeds!(5, |seed| lock_test(seed, 10, NetConfig::unreliable()));
}
