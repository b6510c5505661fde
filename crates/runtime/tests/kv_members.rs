//! Membership as a KV client sees it (issue 15), three KV servers in one process over real
//! sockets and files:
//!
//! - a wrong-leader answer carries the leader's address: a client whose endpoints are in an
//!   order that does not match the ids, or that knows one follower only, reaches the leader
//!   after exactly one redirect (counted, not timed);
//! - `kv member list` shows the snapshot a learner is being sent: a learner behind a proxy
//!   that holds the snapshot connection back is listed with the transfer (bytes acknowledged
//!   of the total) until the proxy lets it through, then caught up with no transfer.
//!
//! Bounds are generous and only timeouts; nothing is timed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_runtime::kv::{run_server, Client, ClientConfig, KvServerConfig};
use shoal_wire::kv::{Expected, KvOp, ServerRole, ServerStatus, SnapshotTransfer};
use shoal_wire::{Hello, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

const CLUSTER: u64 = 15;
/// Bound on every single operation.
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);
/// Liveness bound of every polling loop: 60 s.
const MAX_POLLS: u32 = 3000;

struct Cluster {
    addrs: BTreeMap<u64, SocketAddr>,
    stops: Vec<oneshot::Sender<()>>,
    dir: tempfile::TempDir,
}

fn server_config(
    id: u64,
    peers: BTreeMap<u64, SocketAddr>,
    dir: &std::path::Path,
) -> KvServerConfig {
    let mut c = KvServerConfig::new(id, CLUSTER, peers, dir.join(format!("n{id}")));
    c.tick_interval = Duration::from_millis(20);
    // Compact often: a learner added later can only catch up by snapshot.
    c.rsm.snapshot_bytes = Some(64 * 1024);
    c
}

impl Cluster {
    async fn start(n: u64) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut listeners = Vec::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.insert(id, l.local_addr().expect("address"));
            listeners.push((id, l));
        }
        let mut stops = Vec::new();
        for (id, l) in listeners {
            let config = server_config(id, addrs.clone(), dir.path());
            stops.push(spawn_server(config, l));
        }
        Cluster { addrs, stops, dir }
    }

    fn client(&self, endpoints: Vec<SocketAddr>) -> Client {
        let mut config = ClientConfig::new(endpoints);
        config.cluster_id = CLUSTER;
        config.op_timeout = WAIT;
        Client::new(config).expect("client")
    }

    /// Every server's status (in id order), once all of them follow one leader in one
    /// term: `(leader id, term)`.
    async fn settled(&self) -> (u64, u64) {
        let probe = self.client(self.addrs.values().copied().collect());
        for _ in 0..MAX_POLLS {
            let statuses: Vec<ServerStatus> = probe
                .statuses(Duration::from_secs(2))
                .await
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            if let Some(l) = statuses.iter().find(|s| s.role == ServerRole::Leader) {
                let settled = statuses.len() == self.addrs.len()
                    && statuses
                        .iter()
                        .all(|s| s.term == l.term && s.leader == Some(l.id));
                if settled {
                    return (l.id, l.term);
                }
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("no leader that every server follows");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

fn spawn_server(config: KvServerConfig, listener: TcpListener) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(run_server(config, listener, async move {
        let _ = stopped.await;
    }));
    stop
}

/// The endpoint orders of the redirect test: the leader neither first nor at its id's
/// position (where a client that took a hint for a position would look for it).
fn misleading_order(ids: &[u64], leader: u64) -> Vec<u64> {
    let mut order = ids.to_vec();
    // Rotate until both hold; with three servers one of the rotations does.
    for _ in 0..ids.len() {
        let at_position = order.get(leader as usize - 1) == Some(&leader);
        if order[0] != leader && !at_position {
            return order;
        }
        order.rotate_left(1);
    }
    order.swap(0, 1);
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reaches_the_leader_by_its_address_from_any_endpoint_order_or_one_follower() {
    let cluster = Cluster::start(3).await;
    let ids: Vec<u64> = cluster.addrs.keys().copied().collect();
    // An election during a round makes its redirect count meaningless: try again.
    for round in 0..5 {
        let (leader, term) = cluster.settled().await;
        let order = misleading_order(&ids, leader);
        assert_ne!(order[0], leader);
        assert_ne!(order[leader as usize - 1], leader);
        let shuffled = cluster.client(order.iter().map(|id| cluster.addrs[id]).collect());
        let follower = *ids.iter().find(|&&id| id != leader).expect("a follower");
        let lone = cluster.client(vec![cluster.addrs[&follower]]);
        let mut counts = Vec::new();
        for mut client in [shuffled, lone] {
            let key = format!("k{round}-{}", client.client_id());
            client
                .put(key.as_bytes(), b"v", Expected::Any)
                .await
                .expect("a put through the leader");
            // The client now knows the leader: no more redirects.
            assert!(client.get(key.as_bytes()).await.expect("get").is_some());
            client
                .put(key.as_bytes(), b"w", Expected::Any)
                .await
                .expect("a second put");
            counts.push(client.redirects());
        }
        if cluster.settled().await != (leader, term) {
            eprintln!("round {round}: the leader changed; again");
            continue;
        }
        assert_eq!(
            counts,
            vec![1, 1],
            "each client needs exactly one redirect (endpoints {order:?}, then {follower} alone; \
             leader {leader})"
        );
        return;
    }
    panic!("the leader kept changing");
}

/// A TCP proxy to `target` that passes every connection through, except that it holds a
/// snapshot stream's bytes after its handshake until `gate` opens.
async fn gated_proxy(listener: TcpListener, target: SocketAddr, gate: watch::Receiver<bool>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let mut gate = gate.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 8];
            if inbound.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len > 64 {
                return;
            }
            let mut payload = vec![0u8; len];
            if inbound.read_exact(&mut payload).await.is_err() {
                return;
            }
            let Ok(hello) = postcard::from_bytes::<Hello>(&payload) else {
                return;
            };
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            if outbound.write_all(&head).await.is_err()
                || outbound.write_all(&payload).await.is_err()
            {
                return;
            }
            if matches!(hello.role, Role::Snapshot { .. }) {
                let _ = gate.wait_for(|open| *open).await;
            }
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_shows_the_snapshot_a_learner_is_being_sent() {
    let cluster = Cluster::start(3).await;
    let mut client = cluster.client(cluster.addrs.values().copied().collect());
    // About 1.3 MiB of state, compacted every 64 KiB.
    for i in 0..40u32 {
        let value = vec![i as u8; 32 * 1024];
        client
            .put(format!("key{i}").as_bytes(), &value, Expected::Any)
            .await
            .expect("put");
    }

    // The learner listens on its own port; the others reach it through the proxy.
    let learner_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let learner_addr = learner_listener.local_addr().expect("address");
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_addr = proxy_listener.local_addr().expect("address");
    let (open_gate, gate) = watch::channel(false);
    tokio::spawn(gated_proxy(proxy_listener, learner_addr, gate));

    let added = client
        .member_change(KvOp::MemberAdd {
            id: 4,
            addr: proxy_addr.to_string(),
            learner: true,
        })
        .await
        .expect("member add");
    assert!(added.is_ok(), "member add refused: {added:?}");
    let mut peers = cluster.addrs.clone();
    peers.insert(4, proxy_addr);
    let mut config = server_config(4, peers, cluster.dir.path());
    config.joined = true;
    let _learner = spawn_server(config, learner_listener);

    // The leader opens the snapshot and streams it; the proxy holds it back.
    let mut seen: Option<SnapshotTransfer> = None;
    for _ in 0..MAX_POLLS {
        let (_, members, transfers) = client
            .member_list_with_transfers()
            .await
            .expect("member list");
        assert!(members.iter().any(|m| m.id == 4 && !m.voter), "{members:?}");
        if let Some(t) = transfers.into_iter().find(|t| t.to == 4) {
            if t.total_bytes > 0 {
                seen = Some(t);
                break;
            }
        }
        tokio::time::sleep(POLL).await;
    }
    let t = seen.expect("member list never showed a snapshot transfer to the learner");
    assert!(t.attempt >= 1 && t.index > 0, "{t:?}");
    assert!(
        t.sent_bytes < t.total_bytes,
        "the proxy holds the stream, yet {t:?}"
    );
    // The leader's newest snapshot, which may lag the log (its jobs run at low priority): at
    // least one value's worth.
    assert!(t.total_bytes > 32 * 1024, "a snapshot of the state: {t:?}");

    // Let it through: the learner catches up, and the transfer leaves the list.
    open_gate.send(true).expect("open the gate");
    for polls in 0.. {
        assert!(polls < MAX_POLLS, "the learner did not catch up");
        let (_, members, transfers) = client
            .member_list_with_transfers()
            .await
            .expect("member list");
        let learner = members.iter().find(|m| m.id == 4).expect("learner listed");
        if learner.match_index > 0 && learner.behind == 0 && transfers.is_empty() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
}
