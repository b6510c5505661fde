//! Three `shoal-raft-node` processes on 127.0.0.1: elect, commit, SIGKILL the leader, commit
//! under a new leader, restart the killed node from its disk and watch it catch up, pause a
//! follower (SIGSTOP) while the majority commits and watch it catch up once resumed; and a
//! node refusing a data directory of another node or cluster.
//!
//! Waits are bounded by generous liveness limits; nothing asserts on timing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use shoal_runtime::demo::{DemoRequest, DemoResponse, DemoStatus};

const CLUSTER: u64 = 7;
/// Liveness bound for an election or a catch-up (elections take about a second here).
const LIVENESS: Duration = Duration::from_secs(30);
/// Blocking polls (std threads, no clock read): `MAX_POLLS * POLL` is the liveness bound.
const POLL: Duration = Duration::from_millis(50);
const MAX_POLLS: u32 = 600;
const BIN: &str = env!("CARGO_BIN_EXE_shoal-raft-node");

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves no
/// stray nodes behind.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    addrs: Vec<SocketAddr>,
    dirs: Vec<PathBuf>,
    procs: Vec<Option<Proc>>,
    _tmp: tempfile::TempDir,
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn peers_arg(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

fn node_command(id: u64, listen: SocketAddr, peers: &str, data: &Path, cluster: u64) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--id", &id.to_string()])
        .args(["--listen", &listen.to_string()])
        .args(["--peers", peers])
        .arg("--data")
        .arg(data)
        .args(["--cluster", &cluster.to_string()])
        .args(["--tick-ms", "20"])
        // Small, so the test also exercises snapshots and log compaction.
        .args(["--snapshot-every", "16"])
        // SHOAL_NODE_LOG=info (or debug) shows the nodes' logs when a run needs explaining.
        .env(
            "RUST_LOG",
            std::env::var("SHOAL_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let addrs: Vec<_> = (0..n).map(|_| free_addr()).collect();
        let dirs: Vec<_> = (0..n)
            .map(|i| tmp.path().join(format!("n{}", i + 1)))
            .collect();
        let mut c = Cluster {
            addrs,
            dirs,
            procs: (0..n).map(|_| None).collect(),
            _tmp: tmp,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let child = node_command(
            i as u64 + 1,
            self.addrs[i],
            &peers_arg(&self.addrs),
            &self.dirs[i],
            CLUSTER,
        )
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn shoal-raft-node");
        self.procs[i] = Some(Proc { child });
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let proc = self.procs[i].as_ref().expect("node running");
        // SAFETY: kill(2) on the pid of our own unreaped child; no memory is involved.
        let rc = unsafe { libc::kill(proc.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    fn kill(&mut self, i: usize) {
        // Dropping the guard sends SIGKILL and reaps the process.
        self.procs[i] = None;
    }
}

async fn request(addr: SocketAddr, req: DemoRequest) -> Option<DemoResponse> {
    let exchange = async {
        let mut c = shoal_runtime::connect_client::<DemoResponse, DemoRequest>(
            addr,
            CLUSTER,
            1 << 20,
            Duration::from_secs(1),
        )
        .await
        .ok()?;
        c.send(req).await.ok()?;
        c.next().await?.ok()
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}

async fn status(addr: SocketAddr) -> Option<DemoStatus> {
    match request(addr, DemoRequest::Status).await? {
        DemoResponse::Status(s) => Some(s),
        _ => None,
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after the liveness bound.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {LIVENESS:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The index (0-based) of the node all live nodes agree is leader, other than `not`.
async fn leader(c: &Cluster, live: &[usize], not: Option<usize>) -> usize {
    let addrs = c.addrs.clone();
    let live = live.to_vec();
    eventually("a leader is elected", || {
        let addrs = addrs.clone();
        let live = live.clone();
        async move {
            for &i in &live {
                if Some(i) == not {
                    continue;
                }
                if let Some(s) = status(addrs[i]).await {
                    if s.is_leader {
                        return Some(i);
                    }
                }
            }
            None
        }
    })
    .await
}

/// Proposes `count` commands through whichever live node leads, retrying on refusals.
async fn propose_all(c: &Cluster, live: &[usize], tag: &str, count: usize) {
    let mut at = leader(c, live, None).await;
    for k in 0..count {
        let data = format!("{tag}-{k}").into_bytes();
        let deadline = tokio::time::Instant::now() + LIVENESS;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "proposal {tag}-{k} never committed"
            );
            match request(c.addrs[at], DemoRequest::Propose { data: data.clone() }).await {
                Some(DemoResponse::Applied { .. }) => break,
                Some(DemoResponse::NotLeader { leader: Some(l) })
                    if live.contains(&(l as usize - 1)) =>
                {
                    at = l as usize - 1
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    at = leader(c, live, None).await;
                }
            }
        }
    }
}

/// Waits until every node in `nodes` applied `count` commands with one and the same hash.
async fn converged(c: &Cluster, nodes: &[usize], count: u64) -> u64 {
    let addrs = c.addrs.clone();
    let nodes = nodes.to_vec();
    eventually("nodes converge on the same applied log", || {
        let addrs = addrs.clone();
        let nodes = nodes.clone();
        async move {
            let mut hash = None;
            for &i in &nodes {
                let s = status(addrs[i]).await?;
                if s.applied.count != count {
                    return None;
                }
                match hash {
                    None => hash = Some(s.applied.hash),
                    Some(h) => assert_eq!(h, s.applied.hash, "applied logs diverge"),
                }
            }
            hash
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_new_leader_commits_and_restarted_node_catches_up() {
    let mut c = Cluster::start(3);
    let all = [0, 1, 2];
    propose_all(&c, &all, "a", 20).await;
    let h1 = converged(&c, &all, 20).await;

    let old = leader(&c, &all, None).await;
    c.kill(old);
    let live: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    let new = leader(&c, &live, Some(old)).await;
    assert_ne!(new, old);
    propose_all(&c, &live, "b", 20).await;
    let h2 = converged(&c, &live, 40).await;
    assert_ne!(h1, h2);

    // The killed node restarts from its own disk and catches up to the same state.
    c.spawn(old);
    let h3 = converged(&c, &all, 40).await;
    assert_eq!(h2, h3);
    // And the whole cluster still commits.
    propose_all(&c, &all, "c", 5).await;
    converged(&c, &all, 45).await;

    // A paused follower (SIGSTOP) does not stop the majority; resumed, it catches up.
    let l = leader(&c, &all, None).await;
    let follower = (l + 1) % 3;
    c.signal(follower, libc::SIGSTOP);
    let majority: Vec<usize> = all.iter().copied().filter(|&i| i != follower).collect();
    propose_all(&c, &majority, "d", 20).await;
    converged(&c, &majority, 65).await;
    c.signal(follower, libc::SIGCONT);
    converged(&c, &all, 65).await;
}

/// Runs a node that must refuse to start; returns its stderr.
fn refused(id: u64, data: &Path, cluster: u64) -> String {
    let addr = free_addr();
    let peers = (1..=3u64)
        .map(|i| format!("{i}={}", if i == id { addr } else { free_addr() }))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = node_command(id, addr, &peers, data, cluster);
    let child = cmd.stderr(Stdio::piped()).spawn().expect("spawn");
    let mut guard = Proc { child };
    let mut polls = 0;
    let status = loop {
        if let Some(s) = guard.child.try_wait().expect("wait") {
            break s;
        }
        polls += 1;
        assert!(polls < MAX_POLLS, "node did not refuse to start");
        std::thread::sleep(POLL);
    };
    assert!(
        !status.success(),
        "node started on a foreign data directory"
    );
    let mut err = String::new();
    if let Some(mut e) = guard.child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    err
}

#[test]
fn refuses_a_data_directory_of_another_node_or_cluster() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("n2");
    // Create node 2's directory by running node 2 once, then stopping it.
    {
        let addr = free_addr();
        let peers = format!("1={},2={addr},3={}", free_addr(), free_addr());
        let child = node_command(2, addr, &peers, &dir, CLUSTER)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let _guard = Proc { child };
        let mut polls = 0;
        while !dir.join("identity").exists() {
            polls += 1;
            assert!(polls < MAX_POLLS, "node 2 never initialised its directory");
            std::thread::sleep(POLL);
        }
    }
    let err = refused(1, &dir, CLUSTER);
    assert!(
        err.contains("belongs to cluster 7 node 2") && err.contains("not cluster 7 node 1"),
        "unclear error for another node's directory: {err}"
    );
    let err = refused(2, &dir, CLUSTER + 1);
    assert!(
        err.contains("belongs to cluster 7 node 2") && err.contains("not cluster 8 node 2"),
        "unclear error for another cluster's directory: {err}"
    );
}
