//! The replicated KV (KvRsm over Raft over durable storage on simulated disks) in the
//! simulator: ports of the classic kvraft lab scenarios (SCENARIOS Lab 4) and a randomized
//! nemesis. Every history is checked with the versioned-KV model. `SHOAL_SEEDS=N` runs more
//! seeds, `SHOAL_SEED=S` replays one.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use shoal_kv::{Limits, Outcome, RsmConfig};
use shoal_lab::invariants::{Invariants, Journal};
use shoal_raft::Role;
use shoal_replica::sim::SnapshotStage;
use shoal_sim::rand::{Rng, SeedableRng};
use shoal_sim::{
    check_seeds, ChaCha8Rng, CrashPolicy, Failure, NemesisConfig, NetConfig, Sim, SimConfig,
    SimTime,
};
use shoal_wire::kv::{Expected, KvOp, KvResult};

/// Small log segments, so compaction frees disk space soon after a snapshot.
const SEGMENT_BYTES: u64 = 1024;

struct Cluster {
    sim: Sim<M>,
    servers: Vec<SimId>,
    n: u64,
    clients: Vec<SimId>,
    /// The Figure-3 checker the servers report to (only when built by `with_invariants`).
    inv: Option<Invariants>,
}

impl Cluster {
    fn new(seed: u64, n: u64, net: NetConfig, snapshot_bytes: Option<u64>) -> Cluster {
        Cluster::with_limits(seed, n, net, snapshot_bytes, Limits::default())
    }

    /// A cluster whose servers report to Raft's Figure-3 checker ([`Cluster::run_checked`]).
    fn with_invariants(seed: u64, n: u64, net: NetConfig, snapshot_bytes: Option<u64>) -> Cluster {
        let journal = Journal::default();
        let mut c = Cluster::build(
            seed,
            n,
            net,
            snapshot_bytes,
            Limits::default(),
            Some(journal.clone()),
        );
        c.inv = Some(Invariants::new(journal));
        c
    }

    fn with_limits(
        seed: u64,
        n: u64,
        net: NetConfig,
        snapshot_bytes: Option<u64>,
        limits: Limits,
    ) -> Cluster {
        Cluster::build(seed, n, net, snapshot_bytes, limits, None)
    }

    fn build(
        seed: u64,
        n: u64,
        net: NetConfig,
        snapshot_bytes: Option<u64>,
        limits: Limits,
        journal: Option<Journal>,
    ) -> Cluster {
        let mut sim = Sim::new(
            seed,
            SimConfig {
                net,
                ..SimConfig::default()
            },
        );
        let config = RsmConfig {
            snapshot_bytes,
            limits,
            tick_ms: TICK.as_millis() as u64,
            ..RsmConfig::default()
        };
        let servers = (0..n)
            .map(|_| {
                let journal = journal.clone();
                sim.add_node(move |_| {
                    let node = RaftNode::new(n, config, SEGMENT_BYTES);
                    match &journal {
                        Some(j) => node.with_journal(j.clone()),
                        None => node,
                    }
                })
            })
            .collect();
        Cluster {
            sim,
            servers,
            n,
            clients: Vec::new(),
            inv: None,
        }
    }

    /// Runs until `until`, checking Raft's five Figure-3 properties after every event (a
    /// cluster built by `with_invariants`; otherwise just runs).
    fn run_checked_until(&mut self, until: SimTime) -> Result<(), Failure> {
        let Some(inv) = &mut self.inv else {
            self.sim.run_until(until);
            return Ok(());
        };
        let left = Duration::from_nanos(until.as_nanos().saturating_sub(self.sim.now().as_nanos()));
        let servers = &self.servers;
        self.sim
            .run_checked(left, |sim| inv.check::<M, RaftNode>(sim, servers))
    }

    fn server_ids(&self) -> Vec<u64> {
        (1..=self.n).collect()
    }

    fn add_clients(&mut self, k: usize, work: impl Fn(usize) -> Work) -> Vec<SimId> {
        let servers = self.server_ids();
        let ids: Vec<SimId> = (0..k)
            .map(|i| {
                let w = work(i);
                let servers = servers.clone();
                self.sim
                    .add_node(move |id| Client::new(u64::from(id.0), servers.clone(), w.clone()))
            })
            .collect();
        self.clients.extend(ids.iter().copied());
        ids
    }

    fn node(&self, id: SimId) -> Option<&RaftNode> {
        self.sim.node::<RaftNode>(id).filter(|n| n.rsm.is_some())
    }

    fn leader(&self) -> Option<SimId> {
        self.servers
            .iter()
            .copied()
            .filter(|&id| {
                self.node(id)
                    .and_then(|n| n.rsm.as_ref())
                    .is_some_and(|r| r.raw().status().role == Role::Leader)
            })
            .max_by_key(|&id| {
                self.node(id)
                    .and_then(|n| n.rsm.as_ref())
                    .map(|r| r.raw().status().term)
            })
    }

    /// Waits (30 s of simulated time at most) until every server is up and holds the same keys
    /// and values: they converged `after` something.
    fn wait_converged(&mut self, after: &str) -> Result<(), Failure> {
        let servers = self.servers.clone();
        let converged = self.sim.run_until_true(Duration::from_secs(30), |sim| {
            let states: Vec<_> = servers
                .iter()
                .filter_map(|&id| sim.node::<RaftNode>(id).and_then(|n| n.rsm.as_ref()))
                .map(|r| r.store().read(&all_keys()).ok())
                .collect();
            states.len() == servers.len() && states.windows(2).all(|w| w[0] == w[1])
        });
        if !converged {
            return Err(self
                .sim
                .failure(format!("servers did not converge after {after}")));
        }
        Ok(())
    }

    /// Snapshot jobs handed out by the servers alive now, summed.
    fn snapshots_taken(&self) -> u64 {
        self.servers
            .iter()
            .filter_map(|&id| self.node(id).and_then(|n| n.rsm.as_ref()))
            .map(|r| r.snapshots_taken())
            .sum()
    }

    fn wait_leader(&mut self) -> Result<SimId, Failure> {
        for _ in 0..50 {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            self.sim.run_for(Duration::from_millis(100));
        }
        Err(self.sim.failure("no leader"))
    }

    fn wait_clients(&mut self, ids: &[SimId], max: Duration) -> Result<(), Failure> {
        let ids = ids.to_vec();
        if !self.sim.run_until_true(max, |s| all_finished(s, &ids)) {
            return Err(self.sim.failure("clients did not finish after healing"));
        }
        client_violation(&self.sim, &ids)
    }

    fn crash_all_and_restart(&mut self) {
        for &id in &self.servers {
            self.sim.crash(id);
        }
        self.sim.run_for(Duration::from_secs(1));
        for &id in &self.servers {
            self.sim.restart(id);
        }
    }

    fn max_raft_state_bytes(&self) -> u64 {
        self.servers
            .iter()
            .filter_map(|&id| self.sim.disk(id))
            .map(raft_state_bytes)
            .max()
            .unwrap_or(0)
    }

    fn max_snapshot_bytes(&self) -> u64 {
        self.servers
            .iter()
            .filter_map(|&id| self.sim.disk(id))
            .map(snapshot_file_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Every acknowledged put is in the final state: a final client reads every key written
    /// (linearizable reads, so after everything acknowledged), and no key's version is below
    /// the highest version a client was told it wrote (no deletes in these workloads, so
    /// versions only grow); the total of versions is at most ok + maybe puts.
    fn check_versions(&mut self, exact: bool) -> Result<(), Failure> {
        let mut acked: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for &c in &self.clients {
            let Some(cl) = self.sim.node::<Client>(c) else {
                continue;
            };
            for (op, o) in &cl.results {
                if let KvOp::Put { key, .. } = op {
                    let e = acked.entry(key.clone()).or_default();
                    if let Outcome::Done(KvResult::Written { version }) = o {
                        *e = (*e).max(*version);
                    }
                }
            }
        }
        let gets: Vec<KvOp> = acked.keys().map(|k| KvOp::Get { key: k.clone() }).collect();
        let reader = self.add_clients(1, |_| Work::Script(gets.clone()));
        self.clients.retain(|c| !reader.contains(c));
        self.wait_clients(&reader, Duration::from_secs(60))?;
        let mut finals: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        if let Some(cl) = self.sim.node::<Client>(reader[0]) {
            for (op, o) in &cl.results {
                if let (KvOp::Get { key }, Outcome::Done(r)) = (op, o) {
                    let v = match r {
                        KvResult::Found { version, .. } => *version,
                        _ => 0,
                    };
                    finals.insert(key.clone(), v);
                }
            }
        }
        let mut total = 0;
        for (key, v) in &acked {
            let have = finals.get(key).copied().unwrap_or(0);
            total += have;
            if have < *v {
                return Err(self.sim.failure(format!(
                    "acknowledged put lost: {} acked at version {v}, final read {have}",
                    String::from_utf8_lossy(key)
                )));
            }
        }
        let (ok, maybe) = put_counts(&self.sim, &self.clients);
        if ok == 0 {
            return Err(self.sim.failure("no put succeeded"));
        }
        if std::env::var_os("SHOAL_KV_STATS").is_some() {
            eprintln!(
                "seed {}: ok puts {ok}, maybe {maybe}, history {} ops, raft state ≤ {} B, snapshot ≤ {} B, snapshots taken {}",
                self.sim.seed(),
                self.sim.history_len(),
                self.max_raft_state_bytes(),
                self.max_snapshot_bytes(),
                self.servers
                    .iter()
                    .filter_map(|&id| self.node(id).and_then(|n| n.rsm.as_ref()))
                    .map(|r| r.snapshots_taken())
                    .sum::<u64>()
            );
        }
        if (exact && total != ok) || total > ok + maybe || total < ok {
            return Err(self.sim.failure(format!(
                "final versions total {total}, ok puts {ok}, maybe {maybe}"
            )));
        }
        Ok(())
    }
}

/// GenericTest's parameters.
#[derive(Clone, Copy)]
struct Generic {
    clients: usize,
    servers: u64,
    unreliable: bool,
    crash: bool,
    partitions: bool,
    random_keys: bool,
    snapshot_bytes: Option<u64>,
}

const G: Generic = Generic {
    clients: 1,
    servers: 5,
    unreliable: false,
    crash: false,
    partitions: false,
    random_keys: false,
    snapshot_bytes: None,
};

/// GenericTest: 3 iterations of 1 s of clients (with partitions re-split every 1–1.2 s), a
/// linearizability check, the version check, crash/restart of all, the Raft state bound.
fn generic(seed: u64, g: Generic) -> Result<(), Failure> {
    let net = if g.unreliable {
        NetConfig::unreliable()
    } else {
        NetConfig::reliable()
    };
    let mut c = Cluster::new(seed, g.servers, net, g.snapshot_bytes);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6b76);
    let keys: Vec<String> = if g.random_keys {
        (0..100).map(|i| format!("k{i}")).collect()
    } else {
        vec!["k".into()]
    };
    for _iteration in 0..3 {
        let until = SimTime::from_nanos(c.sim.now().as_nanos() + 1_000_000_000);
        let ids = c.add_clients(g.clients, |_| Work::PutLoop {
            keys: keys.clone(),
            until,
        });
        if g.partitions {
            while c.sim.now() < until {
                let mut a = Vec::new();
                let mut b = Vec::new();
                for &s in &c.servers {
                    if rng.gen_bool(0.5) {
                        a.push(s)
                    } else {
                        b.push(s)
                    }
                }
                c.sim.partition(&[&a, &b]);
                c.sim
                    .run_for(Duration::from_millis(rng.gen_range(1000..1200)));
            }
            c.sim.heal();
        }
        c.wait_clients(&ids, Duration::from_secs(60))?;
        if g.crash {
            c.crash_all_and_restart();
        }
        if let Some(limit) = g.snapshot_bytes {
            let bytes = c.max_raft_state_bytes();
            if bytes > 8 * limit {
                return Err(c
                    .sim
                    .failure(format!("raft state {bytes} bytes > 8 × {limit}")));
            }
        } else if c.max_snapshot_bytes() > 0 {
            return Err(c.sim.failure("a snapshot without snapshot_bytes"));
        }
    }
    c.sim.run_for(Duration::from_secs(1));
    let exact = !g.unreliable && !g.crash && !g.partitions;
    c.check_versions(exact)?;
    check_history(&c.sim)?;
    Ok(())
}

macro_rules! generic_test {
    ($name:ident, $seeds:expr, $g:expr) => {
        #[test]
        fn $name() {
            check_seeds!($seeds, |seed| generic(seed, $g));
        }
    };
}

// 4B
generic_test!(basic, 5, G);
generic_test!(concurrent, 5, Generic { clients: 5, ..G });
generic_test!(
    unreliable,
    5,
    Generic {
        clients: 5,
        unreliable: true,
        ..G
    }
);
generic_test!(
    many_partitions_one_client,
    5,
    Generic {
        partitions: true,
        ..G
    }
);
generic_test!(
    many_partitions_many_clients,
    5,
    Generic {
        clients: 5,
        partitions: true,
        ..G
    }
);
generic_test!(persist_one_client, 5, Generic { crash: true, ..G });
generic_test!(
    persist_concurrent,
    5,
    Generic {
        clients: 5,
        crash: true,
        ..G
    }
);
generic_test!(
    persist_concurrent_unreliable,
    5,
    Generic {
        clients: 5,
        crash: true,
        unreliable: true,
        ..G
    }
);
generic_test!(
    persist_partition,
    5,
    Generic {
        clients: 5,
        crash: true,
        partitions: true,
        ..G
    }
);
generic_test!(
    persist_partition_unreliable,
    5,
    Generic {
        clients: 5,
        crash: true,
        partitions: true,
        unreliable: true,
        ..G
    }
);
generic_test!(
    persist_partition_unreliable_linearizable,
    3,
    Generic {
        clients: 15,
        servers: 7,
        crash: true,
        partitions: true,
        unreliable: true,
        random_keys: true,
        ..G
    }
);

// 4C
const S: Option<u64> = Some(1000);
generic_test!(
    snapshot_recover,
    5,
    Generic {
        crash: true,
        snapshot_bytes: S,
        ..G
    }
);
generic_test!(
    snapshot_recover_many_clients,
    3,
    Generic {
        clients: 20,
        crash: true,
        snapshot_bytes: S,
        ..G
    }
);
generic_test!(
    snapshot_unreliable,
    5,
    Generic {
        clients: 5,
        unreliable: true,
        snapshot_bytes: S,
        ..G
    }
);
generic_test!(
    snapshot_unreliable_recover,
    5,
    Generic {
        clients: 5,
        unreliable: true,
        crash: true,
        snapshot_bytes: S,
        ..G
    }
);
generic_test!(
    snapshot_unreliable_recover_concurrent_partition,
    5,
    Generic {
        clients: 5,
        unreliable: true,
        crash: true,
        partitions: true,
        snapshot_bytes: S,
        ..G
    }
);
generic_test!(
    snapshot_unreliable_recover_concurrent_partition_linearizable,
    3,
    Generic {
        clients: 15,
        servers: 7,
        unreliable: true,
        crash: true,
        partitions: true,
        random_keys: true,
        snapshot_bytes: S,
    }
);

fn put(key: &str, value: &str, expected: Expected) -> KvOp {
    KvOp::Put {
        key: key.into(),
        value: value.into(),
        expected,
    }
}

/// TestOnePartition: the leader in a 2-server minority with a client; the majority accepts a
/// put; the minority client's put and get do not finish within 1 s; after healing they do
/// within 3 s, and the final value is "15".
#[test]
fn one_partition() {
    check_seeds!(10, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::unreliable(), None);
        let first = c.add_clients(1, |_| {
            Work::Script(vec![put("1", "13", Expected::Version(0))])
        });
        c.wait_clients(&first, Duration::from_secs(10))?;
        let leader = c.wait_leader()?;
        let others: Vec<SimId> = c.servers.iter().copied().filter(|&s| s != leader).collect();
        let majority_client = c.add_clients(1, |_| {
            Work::Script(vec![put("1", "14", Expected::Version(1))])
        });
        let minority_client = c.add_clients(1, |_| {
            Work::Script(vec![
                put("1", "15", Expected::Version(2)),
                KvOp::Get { key: "1".into() },
            ])
        });
        let mut minority = vec![leader, others[0], minority_client[0], first[0]];
        let mut majority = others[1..].to_vec();
        majority.push(majority_client[0]);
        minority.sort();
        c.sim.partition(&[&minority, &majority]);
        c.wait_clients(&majority_client, Duration::from_secs(10))?;
        c.sim.run_for(Duration::from_secs(1));
        if all_finished(&c.sim, &minority_client) {
            return Err(c
                .sim
                .failure("the minority's client finished during the partition"));
        }
        c.sim.heal();
        c.wait_clients(&minority_client, Duration::from_secs(3))?;
        let cl = c.sim.node::<Client>(minority_client[0]).ok_or("client")?;
        match cl.results.last() {
            Some((_, Outcome::Done(KvResult::Found { value, .. }))) if value == b"15" => {}
            other => return Err(c.sim.failure(format!("final get: {other:?}"))),
        }
        check_history(&c.sim)?;
        Ok(())
    });
}

/// TestSpeed: 1000 sequential puts from one client take at most 1000 × 33.3 ms of simulated
/// time: at least 3 operations per 100 ms heartbeat interval.
#[test]
fn speed() {
    check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), Some(1000));
        c.wait_leader()?;
        let start = c.sim.now();
        let ids = c.add_clients(1, |_| Work::Puts {
            key: "x".into(),
            count: 1000,
        });
        c.wait_clients(&ids, Duration::from_secs(100))?;
        let took = c.sim.now().as_nanos() - start.as_nanos();
        let heartbeat_ns = u64::from(HEARTBEAT_TICKS) * TICK.as_nanos() as u64;
        let per_heartbeat = 1000.0 * heartbeat_ns as f64 / took as f64;
        if std::env::var_os("SHOAL_KV_STATS").is_some() {
            eprintln!("seed {seed}: {per_heartbeat:.1} ops per heartbeat interval");
        }
        if per_heartbeat < 3.0 {
            return Err(c.sim.failure(format!(
                "{per_heartbeat:.1} ops per heartbeat interval ({took} ns for 1000 puts)"
            )));
        }
        check_history(&c.sim)?;
        Ok(())
    });
}

/// TestSnapshotRPC: 50 puts with server 3 cut off (log bounded), then server 3 must catch up
/// through InstallSnapshot when a partition leaves it with one other server.
#[test]
fn snapshot_rpc() {
    check_seeds!(5, |seed| -> Result<(), Failure> {
        let limit = 1000;
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), Some(limit));
        let s = c.servers.clone();
        let first = c.add_clients(1, |_| Work::Script(vec![put("a", "A", Expected::Any)]));
        c.wait_clients(&first, Duration::from_secs(10))?;
        c.sim.partition(&[&[s[0], s[1], first[0]], &[s[2]]]);
        let ops: Vec<KvOp> = (0..50)
            .map(|i| put(&format!("{i}"), &format!("{i}"), Expected::Any))
            .collect();
        let c1 = c.add_clients(1, |_| Work::Script(ops.clone()));
        c.sim.partition(&[&[s[0], s[1], c1[0]], &[s[2]]]);
        c.wait_clients(&c1, Duration::from_secs(30))?;
        if c.max_raft_state_bytes() > 8 * limit {
            return Err(c
                .sim
                .failure(format!("raft state {} bytes", c.max_raft_state_bytes())));
        }
        // Now server 1 is cut off; 0 and 2 must make progress, so 2 must catch up.
        let c2 = c.add_clients(1, |_| {
            Work::Script(vec![
                put("c", "C", Expected::Any),
                put("d", "D", Expected::Any),
            ])
        });
        c.sim.partition(&[&[s[0], s[2], c2[0]], &[s[1]]]);
        c.wait_clients(&c2, Duration::from_secs(30))?;
        let installed = c
            .node(s[2])
            .and_then(|n| n.rsm.as_ref())
            .map_or(0, |r| r.snapshots_installed());
        if installed == 0 {
            return Err(c.sim.failure("server 3 caught up without InstallSnapshot"));
        }
        c.sim.heal();
        let c3 = c.add_clients(1, |_| Work::Script(vec![KvOp::Get { key: "49".into() }]));
        c.wait_clients(&c3, Duration::from_secs(10))?;
        check_history(&c.sim)?;
        Ok(())
    });
}

/// TestSnapshotSize: 400 put/get on one key: log and snapshot stay small (the snapshot is
/// bounded by the data, not the history).
#[test]
fn snapshot_size() {
    check_seeds!(5, |seed| -> Result<(), Failure> {
        let limit = 1000;
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), Some(limit));
        let mut ops = Vec::new();
        for i in 0..200u64 {
            ops.push(put("x", &format!("{i}"), Expected::Version(i)));
            ops.push(KvOp::Get { key: "x".into() });
        }
        let ids = c.add_clients(1, |_| Work::Script(ops.clone()));
        c.wait_clients(&ids, Duration::from_secs(60))?;
        let log = c.max_raft_state_bytes();
        let snap = c.max_snapshot_bytes();
        if snap == 0 {
            return Err(c.sim.failure("no snapshot was taken"));
        }
        if log > 8 * limit || snap > 500 {
            return Err(c
                .sim
                .failure(format!("raft state {log} bytes, snapshot {snap} bytes")));
        }
        check_history(&c.sim)?;
        Ok(())
    });
}

/// Serializable reads are answered by followers from local state.
#[test]
fn serializable_reads_from_followers() {
    check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        let w = c.add_clients(1, |_| Work::Script(vec![put("k", "v", Expected::Any)]));
        c.wait_clients(&w, Duration::from_secs(10))?;
        c.sim.run_for(Duration::from_millis(500));
        let leader = c.wait_leader()?;
        let follower = *c.servers.iter().find(|&&s| s != leader).ok_or("follower")?;
        let r = c
            .sim
            .call::<RaftNode, _>(follower, |n, _ctx| {
                let rsm = n.rsm.as_mut().expect("started");
                rsm.handle_request(
                    99,
                    shoal_wire::kv::KvRequest {
                        client: 99,
                        request: 1,
                        op: KvOp::Get { key: "k".into() },
                        serializable: true,
                    },
                );
                rsm.take_replies()
            })
            .map_err(|e| c.sim.failure(e.to_string()))?;
        match r.as_slice() {
            [(
                99,
                shoal_wire::kv::KvReply::Done {
                    result: KvResult::Found { value, .. },
                    ..
                },
            )] if value == b"v" => Ok(()),
            other => Err(c.sim.failure(format!("serializable read: {other:?}"))),
        }
    });
}

/// Randomized nemesis: partitions, crashes (with disk damage), pauses and network changes on
/// 5 servers for 8 s while 5 clients work on 10 keys, Raft's five Figure-3 properties checked
/// after every event; then heal: every client finishes, the history is linearizable, no
/// acknowledged put is lost, and all servers converge.
#[test]
fn nemesis() {
    check_seeds!(8, |seed| -> Result<(), Failure> {
        // A small threshold on even seeds: snapshot jobs are prepared and installed all the
        // time (hundreds per run), under crashes and partitions.
        let snapshot_bytes = if seed % 2 == 0 { Some(300) } else { None };
        let mut c = Cluster::with_invariants(seed, 5, NetConfig::reliable(), snapshot_bytes);
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let until = SimTime::from_nanos(8_000_000_000);
        let ids = c.add_clients(5, |_| Work::PutLoop {
            keys: keys.clone(),
            until,
        });
        c.sim.start_nemesis(NemesisConfig::new(c.servers.clone()));
        c.run_checked_until(until)?;
        c.sim.heal_all();
        c.wait_clients(&ids, Duration::from_secs(60))?;
        c.wait_converged("healing")?;
        c.check_versions(false)?;
        check_history(&c.sim)?;
        if snapshot_bytes.is_some() && c.snapshots_taken() < 20 {
            return Err(c.sim.failure(format!(
                "only {} snapshots with a 300-byte threshold",
                c.snapshots_taken()
            )));
        }
        Ok(())
    });
}

/// The production snapshot pipeline under a crash at each of its steps: a server is crashed
/// (losing or tearing what was not fsynced) while a snapshot job is handed out but not written,
/// while it is written under its temporary name but not installed, and just after it was
/// installed (log dropped). Each time the server restarts from its disk, the cluster goes on,
/// every client finishes, the history is linearizable and all servers converge.
#[test]
fn crash_at_every_step_of_the_snapshot_pipeline() {
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Handed,
        Written,
        Installed,
    }
    let steps = [Step::Handed, Step::Written, Step::Installed];
    let policies = [
        CrashPolicy::LoseUnsynced,
        CrashPolicy::KeepRandomPrefix {
            torn_write_probability: 1.0,
        },
        CrashPolicy::KeepAll,
    ];
    check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), Some(300));
        let keys: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
        let until = SimTime::from_nanos(20_000_000_000);
        let ids = c.add_clients(3, |_| Work::PutLoop {
            keys: keys.clone(),
            until,
        });
        let mut crashes = 0;
        for (i, step) in steps.iter().enumerate() {
            for (j, policy) in policies.iter().enumerate() {
                // A different server each time, leader and followers alike.
                let victim = c.servers[(i * policies.len() + j + seed as usize) % 3];
                let first_index = |sim: &Sim<M>| {
                    sim.node::<RaftNode>(victim)
                        .and_then(|n| n.rsm.as_ref())
                        .map_or(0, |r| r.raw().status().first_index.0)
                };
                let before = first_index(&c.sim);
                let reached = c.sim.run_until_true(Duration::from_secs(5), |sim| {
                    let Some(n) = sim.node::<RaftNode>(victim) else {
                        return false;
                    };
                    match step {
                        Step::Handed => n.pipeline.snapshot_stage() == SnapshotStage::Preparing,
                        Step::Written => n.pipeline.snapshot_stage() == SnapshotStage::Prepared,
                        Step::Installed => first_index(sim) > before,
                    }
                });
                if !reached {
                    return Err(c
                        .sim
                        .failure(format!("{victim} never reached {step:?} ({policy:?})")));
                }
                c.sim.crash_with(victim, *policy);
                crashes += 1;
                c.sim.run_for(Duration::from_millis(300));
                c.sim.restart(victim);
                c.sim.run_for(Duration::from_millis(500));
            }
        }
        assert_eq!(crashes, 9);
        c.wait_clients(&ids, Duration::from_secs(60))?;
        c.wait_converged("the crashes")?;
        c.check_versions(false)?;
        check_history(&c.sim)?;
        Ok(())
    });
}

fn all_keys() -> KvOp {
    KvOp::Scan {
        start: Vec::new(),
        end: None,
        limit: u32::MAX,
    }
}

/// The lock on the replicated KV, unreliable network, with partitions of a minority: never
/// two holders.
#[test]
fn lock_many_clients_replicated_unreliable() {
    check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::unreliable(), Some(2000));
        let until = SimTime::from_nanos(3_000_000_000);
        let ids = c.add_clients(5, |_| Work::LockLoop {
            lock: "l".into(),
            shared: "l0".into(),
            until,
        });
        c.sim.run_for(Duration::from_secs(1));
        if let Some(l) = c.leader() {
            c.sim.isolate(l);
            c.sim.run_for(Duration::from_secs(1));
            c.sim.heal();
        }
        c.wait_clients(&ids, Duration::from_secs(60))?;
        let held = check_lock_intervals(&c.sim, &ids)?;
        if std::env::var_os("SHOAL_KV_STATS").is_some() {
            eprintln!(
                "seed {seed}: lock held {held} times, {} ops",
                c.sim.history_len()
            );
        }
        if held == 0 {
            return Err(c.sim.failure("nobody acquired the lock"));
        }
        check_history(&c.sim)?;
        Ok(())
    });
}

/// Server memory does not grow with the number of clients, and at-most-once holds after a
/// client's session expired: 300 clients, 3 on each key, each do an unconditional put, an
/// unconditional delete and an unconditional put through a 3-server cluster on an unreliable
/// network whose session table holds 20. Late retries and network duplicates of writes whose
/// session expired are refused (`SessionExpired`, reported maybe), never applied twice — the
/// versioned-KV model checks it. Every replica's table stays bounded, and replicas that applied
/// the same log hold identical state (snapshots, session table included).
///
/// (Before client sessions, seed 0 of this test applied an unconditional put twice.)
#[test]
fn sessions_bounded_replicated() {
    check_seeds!(3, |seed| -> Result<(), Failure> {
        let limits = Limits {
            max_sessions: 20,
            ..Limits::default()
        };
        let mut c = Cluster::with_limits(seed, 3, NetConfig::unreliable(), Some(2000), limits);
        let ids = c.add_clients(300, |i| {
            let key = format!("k{}", i / 3);
            Work::Script(vec![
                put(&key, &format!("a{i}"), Expected::Any),
                KvOp::Delete {
                    key: key.clone().into(),
                    expected: Expected::Any,
                },
                put(&key, &format!("b{i}"), Expected::Any),
            ])
        });
        c.wait_clients(&ids, Duration::from_secs(120))?;
        c.sim.run_for(Duration::from_secs(2));
        let mut states = Vec::new();
        for &s in &c.servers {
            let rsm = c.node(s).and_then(|n| n.rsm.as_ref()).ok_or("server")?;
            let store = rsm.store();
            if store.session_count() > 20 || store.session_bytes() > 20 * 64 {
                return Err(c.sim.failure(format!(
                    "{s}: {} sessions, {} bytes",
                    store.session_count(),
                    store.session_bytes()
                )));
            }
            states.push((rsm.applied(), store.snapshot()));
        }
        states.sort();
        for w in states.windows(2) {
            if w[0].0 == w[1].0 && w[0].1 != w[1].1 {
                return Err(c.sim.failure("replicas at the same index differ"));
            }
        }
        let (ok, maybes) = put_counts(&c.sim, &ids);
        if std::env::var_os("SHOAL_KV_STATS").is_some() {
            eprintln!("seed {seed}: {ok} puts acknowledged, {maybes} maybe");
        }
        check_history(&c.sim)?;
        Ok(())
    });
}
