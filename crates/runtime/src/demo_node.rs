//! Serving one Raft node of the demo replicated log (`shoal raft node`, and the
//! `shoal-raft-node` test binary): the node, its client protocol, clean shutdown on signals.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use futures::{SinkExt, StreamExt};
use shoal_raft::{NodeId, Role};
use tracing::{info, warn};

use crate::demo::{DemoRequest, DemoResponse, DemoStateMachine, DemoStatus};
use crate::{ClientConnection, Node, NodeConfig, NodeHandle, ProposeError};

/// How long a client's proposal may wait to be applied before it is answered with an error.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything one demo node is started with.
#[derive(Debug, Clone)]
pub struct DemoNodeOptions {
    /// This node's id (a key of `peers`).
    pub id: u64,
    /// Address serving peers and clients.
    pub listen: SocketAddr,
    /// Every voter of the group, this node included.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Data directory (log, hard state, snapshots, identity).
    pub data: PathBuf,
    /// Cluster id: a peer or data directory of another cluster is refused.
    pub cluster: u64,
    /// Milliseconds per Raft tick.
    pub tick_ms: u64,
    /// Election timeout, randomized in `[election_tick, 2 * election_tick)` ticks.
    pub election_tick: u32,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_tick: u32,
    /// Take a snapshot every this many applied entries (`None`: never).
    pub snapshot_every: Option<u64>,
}

/// Runs one demo node until SIGINT/SIGTERM or a fatal error (for example a data directory of
/// another node or cluster).
pub async fn run_demo_node(args: DemoNodeOptions) -> Result<()> {
    let id = NodeId(args.id);
    let mut config = NodeConfig::new(id, args.cluster, args.peers, args.data);
    config.tick_interval = Duration::from_millis(args.tick_ms.max(1));
    config.transport.service = DEMO_SERVICE.to_string();
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

/// What a Raft demo node calls itself when it refuses a client of another protocol.
pub const DEMO_SERVICE: &str = "Raft demo node (`shoal raft node`)";

async fn serve_client(conn: ClientConnection, handle: NodeHandle, sm: DemoStateMachine, id: u64) {
    let remote = conn.peer_addr;
    let cluster_id = conn.hello.cluster_id;
    let mut framed = conn.framed::<DemoRequest, DemoResponse>();
    let mut first = true;
    while let Some(request) = framed.next().await {
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                warn!(%remote, error = %e, "closing client connection: bad frame");
                if first {
                    // Most likely a client of another service (a KV client): say what this is.
                    let refusal = shoal_wire::Refusal::new(
                        cluster_id,
                        DEMO_SERVICE,
                        "it speaks the Raft demo protocol only",
                    );
                    crate::transport::refuse(framed.into_inner(), refusal).await;
                }
                return;
            }
        };
        first = false;
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
