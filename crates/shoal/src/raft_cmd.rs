//! `shoal raft …`: run a node of the demo replicated log on the Raft library.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use shoal_runtime::demo_node::{run_demo_node, DemoNodeOptions};

const NODE_HELP: &str = "\
Example, a three-node group on one machine (one command per terminal):
  shoal raft node --id 1 --listen 127.0.0.1:7001 --data n1 \\
      --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003
  shoal raft node --id 2 --listen 127.0.0.1:7002 --data n2 \\
      --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003
  shoal raft node --id 3 --listen 127.0.0.1:7003 --data n3 \\
      --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003
Restarting a node with the same --data resumes it; a data directory of another node or cluster
is refused.

There is no command-line client for this demo log: its client protocol is driven by
`shoal bench raft`, which starts three nodes, proposes, reads their status and SIGKILLs the
leader (`shoal bench raft --quick` takes seconds). To use Raft from the shell, use the key/value
database built on it: `shoal kv --help`.";

/// `shoal raft` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RaftCommand {
    /// Run one node of a Raft group replicating a demo log (a count and a running hash of the
    /// applied commands). Used by `shoal bench raft` and the real-process tests; the KV
    /// database runs the same library with a real state machine.
    #[command(after_help = NODE_HELP)]
    Node(NodeArgs),
}

/// Arguments of `shoal raft node`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// This node's id: one of the ids in --peers.
    #[arg(long)]
    id: u64,
    /// Address serving both peers and clients (HOST:PORT; a host name or an IP).
    #[arg(long, value_parser = crate::cli::parse_addr)]
    listen: SocketAddr,
    /// Every voter of the group, this node included: ID=ADDR,ID=ADDR,…
    #[arg(long, value_parser = crate::cli::parse_peer, value_delimiter = ',', required = true)]
    peers: Vec<(u64, SocketAddr)>,
    /// Data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Cluster id: peers and data directories of another cluster are refused.
    #[arg(long, default_value_t = 1)]
    cluster: u64,
    /// Milliseconds per Raft tick.
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
    /// Election timeout in ticks (randomized in [N, 2N)).
    #[arg(long, default_value_t = shoal_raft::DEFAULT_ELECTION_TICK)]
    election_tick: u32,
    /// Ticks between the leader's heartbeats.
    #[arg(long, default_value_t = shoal_raft::DEFAULT_HEARTBEAT_TICK)]
    heartbeat_tick: u32,
    /// Snapshot every this many applied entries (0: never).
    #[arg(long, default_value_t = shoal_runtime::node::DEFAULT_SNAPSHOT_EVERY)]
    snapshot_every: u64,
}

/// Runs `shoal raft …`.
pub fn run(cmd: RaftCommand) -> Result<ExitCode> {
    let RaftCommand::Node(args) = cmd;
    if args.heartbeat_tick == 0 || args.election_tick <= args.heartbeat_tick {
        bail!(
            "need 0 < --heartbeat-tick < --election-tick, got {} and {}",
            args.heartbeat_tick,
            args.election_tick
        );
    }
    let peers: BTreeMap<u64, SocketAddr> = args.peers.into_iter().collect();
    if !peers.contains_key(&args.id) {
        bail!("--id {} is not one of the --peers", args.id);
    }
    let options = DemoNodeOptions {
        id: args.id,
        listen: args.listen,
        peers,
        data: args.data,
        cluster: args.cluster,
        tick_ms: args.tick_ms,
        election_tick: args.election_tick,
        heartbeat_tick: args.heartbeat_tick,
        snapshot_every: (args.snapshot_every > 0).then_some(args.snapshot_every),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_demo_node(options))?;
    Ok(ExitCode::SUCCESS)
}
