//! One Raft node with the trivial replicated-log state machine of `shoal_runtime::demo`, for
//! real-process tests:
//!
//! ```text
//! shoal-raft-node --id 1 --listen 127.0.0.1:7001 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data /var/lib/shoal/1 \
//!     [--cluster 1] [--tick-ms 50] [--election-tick 10] [--heartbeat-tick 1] \
//!     [--snapshot-every 10000]
//! ```
//!
//! The election timeout is randomized in `[election-tick, 2 * election-tick)` ticks of
//! `tick-ms`; the leader sends heartbeats every `heartbeat-tick` ticks.
//!
//! The listen address serves peers and clients (`DemoRequest`/`DemoResponse` frames after a
//! `Client` hello). Stops cleanly on SIGINT or SIGTERM; exits non-zero with the reason on a
//! fatal error, e.g. a data directory of another node or cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use shoal_raft::{NodeId, Role};
use shoal_runtime::demo::{DemoRequest, DemoResponse, DemoStateMachine, DemoStatus};
use shoal_runtime::{ClientConnection, Node, NodeConfig, NodeHandle, ProposeError};
use tracing::{info, warn};

/// How long a client's proposal may wait to be applied before it is answered with an error.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

struct Args {
    id: u64,
    listen: SocketAddr,
    peers: BTreeMap<u64, SocketAddr>,
    data: PathBuf,
    cluster: u64,
    tick_ms: u64,
    election_tick: u32,
    heartbeat_tick: u32,
    snapshot_every: Option<u64>,
}

fn parse_args() -> Result<Args> {
    let mut flags = BTreeMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(name) = flag.strip_prefix("--") else {
            bail!("unexpected argument {flag:?}");
        };
        let value = it.next().ok_or_else(|| anyhow!("--{name} needs a value"))?;
        flags.insert(name.to_string(), value);
    }
    let mut take = |name: &str| flags.remove(name);
    let id = take("id")
        .context("--id is required")?
        .parse()
        .context("--id")?;
    let listen = take("listen")
        .context("--listen is required")?
        .parse()
        .context("--listen")?;
    let mut peers = BTreeMap::new();
    for part in take("peers").context("--peers is required")?.split(',') {
        let (pid, addr) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("--peers entry {part:?} is not ID=ADDR"))?;
        peers.insert(
            pid.parse().with_context(|| format!("peer id {pid:?}"))?,
            addr.parse()
                .with_context(|| format!("peer address {addr:?}"))?,
        );
    }
    let data = take("data").context("--data is required")?.into();
    let cluster = take("cluster")
        .map_or(Ok(1), |v| v.parse())
        .context("--cluster")?;
    let tick_ms = take("tick-ms")
        .map_or(Ok(50), |v| v.parse())
        .context("--tick-ms")?;
    let election_tick = take("election-tick")
        .map_or(Ok(shoal_raft::DEFAULT_ELECTION_TICK), |v| v.parse())
        .context("--election-tick")?;
    let heartbeat_tick = take("heartbeat-tick")
        .map_or(Ok(shoal_raft::DEFAULT_HEARTBEAT_TICK), |v| v.parse())
        .context("--heartbeat-tick")?;
    if heartbeat_tick == 0 || election_tick <= heartbeat_tick {
        bail!(
            "need 0 < --heartbeat-tick < --election-tick, got {heartbeat_tick} and {election_tick}"
        );
    }
    let snapshot_every = match take("snapshot-every") {
        None => Some(shoal_runtime::node::DEFAULT_SNAPSHOT_EVERY),
        Some(v) if v == "0" => None,
        Some(v) => Some(v.parse().context("--snapshot-every")?),
    };
    if let Some(unknown) = flags.keys().next() {
        bail!("unknown flag --{unknown}");
    }
    Ok(Args {
        id,
        listen,
        peers,
        data,
        cluster,
        tick_ms,
        election_tick,
        heartbeat_tick,
        snapshot_every,
    })
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

async fn run() -> Result<()> {
    let args = parse_args()?;
    let id = NodeId(args.id);
    let mut config = NodeConfig::new(id, args.cluster, args.peers, args.data);
    config.tick_interval = Duration::from_millis(args.tick_ms.max(1));
    config.election_tick = args.election_tick;
    config.heartbeat_tick = args.heartbeat_tick;
    config.snapshot_every = args.snapshot_every;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let sm = DemoStateMachine::default();
    let mut node = Node::start(config, listener, sm.clone())
        .await
        .context("starting the node")?;
    info!(node = args.id, listen = %args.listen, "serving");
    let handle = node.handle.clone();
    let mut clients = node
        .take_clients()
        .ok_or_else(|| anyhow!("client acceptor already taken"))?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            conn = clients.recv() => match conn {
                Some(conn) => {
                    tokio::spawn(serve_client(conn, handle.clone(), sm.clone(), args.id));
                }
                None => break,
            },
            r = node.wait() => {
                r.context("node stopped")?;
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("shutting down");
    handle.shutdown().await;
    node.wait().await.context("node stopped")?;
    Ok(())
}

async fn serve_client(conn: ClientConnection, handle: NodeHandle, sm: DemoStateMachine, id: u64) {
    let remote = conn.peer_addr;
    let mut framed = conn.framed::<DemoRequest, DemoResponse>();
    while let Some(request) = framed.next().await {
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                warn!(%remote, error = %e, "closing client connection: bad frame");
                return;
            }
        };
        let response = match request {
            DemoRequest::Propose { data } => {
                match tokio::time::timeout(PROPOSE_TIMEOUT, handle.propose_and_wait(data)).await {
                    Ok(Ok(p)) => DemoResponse::Applied {
                        index: p.index.0,
                        term: p.term.0,
                    },
                    Ok(Err(ProposeError::NotLeader { leader })) => DemoResponse::NotLeader {
                        leader: leader.map(|l| l.0),
                    },
                    Ok(Err(e)) => DemoResponse::Error(e.to_string()),
                    Err(_) => DemoResponse::Error("timed out waiting for the commit".into()),
                }
            }
            DemoRequest::Status => match handle.status().await {
                Ok(st) => DemoResponse::Status(DemoStatus {
                    id,
                    is_leader: st.role == Role::Leader,
                    leader: st.leader.map(|l| l.0),
                    term: st.term.0,
                    commit: st.commit.0,
                    applied: sm.get(),
                }),
                Err(e) => DemoResponse::Error(e.to_string()),
            },
        };
        if let Err(e) = framed.send(response).await {
            warn!(%remote, error = %e, "client connection failed");
            return;
        }
    }
}
