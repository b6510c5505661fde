//! A whole sharded cluster on tokio, over real sockets (127.0.0.1) and files, in one process:
//! a controller store (three KV servers), two groups of three shard servers, the controller's
//! driver ([`ShardController`]) and routing clients ([`ShardClient`], some sharing a
//! [`ShardClientPool`]). Joins, a move, a leave and a join again, with the data checked after
//! each; a second controller finishing a change the first left incomplete; the read-only
//! helpers (`read_latest`, `read_config`, `group_server_status`); bad operations refused with
//! nothing changed.

mod shard_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shard_support::Running;
use shoal_runtime::kv::{DeleteOutcome, PutOutcome};
use shoal_runtime::shard::{
    group_server_status, read_config, read_latest, ControllerDriverConfig, ShardClient,
    ShardClientConfig, ShardClientPool, ShardController,
};
use shoal_shard::{shard_of, Op};
use shoal_wire::kv::Expected;

const CLUSTER: u64 = 12;
const SHARDS: u32 = 8;
/// Bound on every wait; generous for a loaded machine (never a pass/fail timing).
const WAIT: Duration = Duration::from_secs(60);

/// The controller store: three KV servers.
async fn store(dir: &Path, running: &mut Running) -> Vec<SocketAddr> {
    shard_support::store(dir, CLUSTER, running).await
}

/// Group `gid`: three shard servers (10 ms ticks).
async fn group(gid: u64, dir: &Path, running: &mut Running) -> Vec<String> {
    shard_support::group(gid, dir, CLUSTER, SHARDS, running, |c| {
        c.tick_interval = Duration::from_millis(10)
    })
    .await
}

fn controller(store: &[SocketAddr], name: &str) -> ShardController {
    let mut c = ControllerDriverConfig::new(store.to_vec(), SHARDS);
    c.cluster_id = CLUSTER;
    c.name = name.to_string();
    ShardController::start(c).expect("controller starts")
}

fn client_config(store: &[SocketAddr]) -> ShardClientConfig {
    let mut c = ShardClientConfig::new(store.to_vec());
    c.cluster_id = CLUSTER;
    c.op_timeout = WAIT;
    c
}

async fn submit(ctl: &ShardController, op: Op) -> Result<u64, String> {
    tokio::time::timeout(WAIT, ctl.submit(op))
        .await
        .expect("the change completes within the bound")
}

/// Every key reads back its value, through a fresh client (which fetches the latest
/// configuration).
async fn check_all(store: &[SocketAddr], expected: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let mut c = ShardClient::new(client_config(store)).expect("client");
    for (k, v) in expected {
        let got = c.get(k).await.expect("get").map(|(v, _)| v);
        assert_eq!(
            got.as_ref(),
            Some(v),
            "key {:?}",
            String::from_utf8_lossy(k)
        );
    }
    let items = c.scan(b"", None, 10_000).await.expect("scan");
    let scanned: BTreeMap<Vec<u8>, Vec<u8>> = items.into_iter().map(|i| (i.key, i.value)).collect();
    assert_eq!(
        &scanned, expected,
        "a scan across every shard reads every key once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_cluster_serves_moves_leaves_and_rejoins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut running = Running::default();
    let store = store(dir.path(), &mut running).await;
    let g1 = group(1, dir.path(), &mut running).await;
    let g2 = group(2, dir.path(), &mut running).await;

    assert_eq!(
        read_latest(&store, CLUSTER, WAIT).await.expect("read"),
        None,
        "an empty store holds no record"
    );
    let ctl = controller(&store, "test-a");
    let c1 = submit(&ctl, Op::Join(BTreeMap::from([(1, g1.clone())])))
        .await
        .expect("join 1");
    let c2 = submit(&ctl, Op::Join(BTreeMap::from([(2, g2.clone())])))
        .await
        .expect("join 2");
    assert!(c2 > c1, "numbers grow: {c1} then {c2}");
    // Refusals change nothing.
    let refused = submit(&ctl, Op::Join(BTreeMap::from([(2, g2.clone())]))).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("already a member")),
        "{refused:?}"
    );
    let refused = submit(&ctl, Op::Move { shard: 99, gid: 1 }).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("unknown shard")),
        "{refused:?}"
    );
    let latest = read_latest(&store, CLUSTER, WAIT)
        .await
        .expect("read")
        .expect("a record");
    assert_eq!(latest.config.num, c2, "refusals wrote nothing");
    assert!(latest.complete);
    let owners: Vec<u64> = latest.config.shards.clone();
    assert!(owners.contains(&1) && owners.contains(&2), "{owners:?}");

    // Many clients sharing one pool, each writing its own keys.
    let pool = ShardClientPool::new(client_config(&store));
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = ShardClient::with_pool(&pool).expect("client");
            let mut mine = BTreeMap::new();
            for i in 0..25u32 {
                let k = format!("key-{t}-{i}").into_bytes();
                let v = format!("value-{t}-{i}").into_bytes();
                let out = c.put(&k, &v, Expected::Any).await.expect("put");
                assert!(matches!(out, PutOutcome::Written(_)), "{out:?}");
                mine.insert(k, v);
            }
            mine
        }));
    }
    let mut expected = BTreeMap::new();
    for t in tasks {
        expected.extend(t.await.expect("writer"));
    }
    check_all(&store, &expected).await;
    let keys_on = |shard: u32| {
        expected
            .keys()
            .filter(|k| shard_of(k, SHARDS) == shard)
            .count()
    };

    // Move a shard that holds keys to the other group.
    let shard = (0..SHARDS)
        .find(|s| keys_on(*s) > 0)
        .expect("a shard with keys");
    let to = if owners[shard as usize] == 1 { 2 } else { 1 };
    let c3 = submit(&ctl, Op::Move { shard, gid: to })
        .await
        .expect("move");
    assert!(c3 > c2);
    let after = read_config(&store, CLUSTER, c3, WAIT)
        .await
        .expect("read")
        .expect("configuration");
    assert_eq!(after.shards[shard as usize], to);
    check_all(&store, &expected).await;

    // A client that routed by an older configuration follows the data.
    let mut old = ShardClient::new(client_config(&store)).expect("client");
    let k = expected.keys().next().expect("a key").clone();
    assert!(old.get(&k).await.expect("get").is_some());
    // Group 1 leaves: everything on group 2; then it joins again with the same servers.
    let c4 = submit(&ctl, Op::Leave(vec![1])).await.expect("leave");
    let cfg4 = read_config(&store, CLUSTER, c4, WAIT)
        .await
        .expect("read")
        .expect("configuration");
    assert!(cfg4.shards.iter().all(|&g| g == 2), "{:?}", cfg4.shards);
    let refused = submit(&ctl, Op::Leave(vec![2])).await;
    assert!(refused.is_err(), "leaving the last group is refused");
    check_all(&store, &expected).await;
    let c5 = submit(&ctl, Op::Join(BTreeMap::from([(1, g1.clone())])))
        .await
        .expect("join again");
    assert!(c5 > c4);
    check_all(&store, &expected).await;

    // Writes through a client created before the moves, deletes, conditional writes.
    let out = old.put(&k, b"new", Expected::Any).await.expect("put");
    let PutOutcome::Written(v) = out else {
        panic!("{out:?}")
    };
    assert_eq!(
        old.put(&k, b"stale", Expected::Version(v - 1))
            .await
            .expect("put"),
        PutOutcome::Mismatch
    );
    assert_eq!(
        old.delete(&k, Expected::Version(v)).await.expect("delete"),
        DeleteOutcome::Deleted
    );
    assert_eq!(old.get(&k).await.expect("get"), None);

    // Every group server answers status; one leader per group, at the latest configuration.
    for (gid, servers) in [(1u64, &g1), (2u64, &g2)] {
        let mut leaders = 0;
        for s in servers {
            let st = group_server_status(s.parse().expect("addr"), gid, CLUSTER, WAIT)
                .await
                .expect("status");
            if st.leader {
                leaders += 1;
                assert_eq!(st.adopted, c5, "group {gid} adopted the latest");
            }
        }
        assert_eq!(leaders, 1, "group {gid}");
    }
    let wrong = group_server_status(g1[0].parse().expect("addr"), 2, CLUSTER, WAIT).await;
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("group 1")),
        "{wrong:?}"
    );
    ctl.stop().await;

    // A second controller takes the lock at once (the first revoked its lease) and runs.
    let ctl2 = controller(&store, "test-b");
    let c6 = submit(&ctl2, Op::Move { shard, gid: 1 })
        .await
        .expect("move");
    assert!(c6 > c5);
    ctl2.stop().await;
    running.stop();
}

/// A controller killed in the middle of a change (its task aborted after the new
/// configuration was recorded, before the moves finished) leaves the change incomplete; the
/// next controller finishes it before anything else, and no key is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_controller_completes_a_change_left_half_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut running = Running::default();
    let store = store(dir.path(), &mut running).await;
    let g1 = group(1, dir.path(), &mut running).await;
    let g2 = group(2, dir.path(), &mut running).await;
    let ctl = controller(&store, "first");
    submit(&ctl, Op::Join(BTreeMap::from([(1, g1.clone())])))
        .await
        .expect("join 1");
    let mut c = ShardClient::new(client_config(&store)).expect("client");
    let mut expected = BTreeMap::new();
    for i in 0..40u32 {
        let (k, v) = (format!("k{i}").into_bytes(), format!("v{i}").into_bytes());
        c.put(&k, &v, Expected::Any).await.expect("put");
        expected.insert(k, v);
    }
    // Start the join of group 2 and abandon the controller as soon as the new configuration
    // is recorded (dropping it aborts its task: no lease revoked, no more steps).
    let submit_task = {
        let g2 = g2.clone();
        async move { ctl.submit(Op::Join(BTreeMap::from([(2, g2)]))).await }
    };
    let ctl_status = {
        // Poll the record rather than the controller (which the submit borrows).
        let store = store.clone();
        async move {
            loop {
                if let Ok(Some(r)) = read_latest(&store, CLUSTER, WAIT).await {
                    if r.config.num >= 2 {
                        return r;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let record = tokio::select! {
        r = ctl_status => Some(r),
        done = submit_task => { let _ = done; None }
    };
    // (The select dropped the submit and with it the controller.)
    if let Some(r) = &record {
        assert_eq!(r.config.num, 2);
    }
    let ctl2 = controller(&store, "second");
    let c3 = submit(&ctl2, Op::Move { shard: 0, gid: 1 })
        .await
        .expect("the next change runs after the recovery");
    assert!(c3 >= 3, "configuration 2 was finished first, then {c3}");
    let r2 = read_config(&store, CLUSTER, 2, WAIT)
        .await
        .expect("read")
        .expect("configuration 2");
    assert!(
        r2.groups.contains_key(&2),
        "configuration 2 is the join of group 2"
    );
    check_all(&store, &expected).await;
    ctl2.stop().await;
    running.stop();
}
