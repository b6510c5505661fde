//! `shoal shard …`: the sharded key/value database. For now one command: `shard server`, one
//! server of a replica group (issue 14's first step; `up`, `join`, `leave`, `move`, `query`
//! and `status` come with the controller's driver).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shoal_runtime::shard::{run_shard_server, ShardServerConfig};

/// Where `shoal shard up` keeps its cluster, and where the client commands look for it.
pub(crate) const DEFAULT_DIR: &str = "shoal-shard";
/// The file in the cluster directory listing the controller store's addresses, one per line.
pub(crate) const CONTROLLER_FILE: &str = "controller";

/// `shoal shard`: the sharded key/value database.
#[derive(Debug, clap::Args)]
pub struct ShardCommand {
    #[command(subcommand)]
    command: ShardSub,
}

#[derive(Debug, clap::Subcommand)]
enum ShardSub {
    /// Run one server of a replica group (a group of one: --peers names only itself).
    ///
    /// A sharded cluster is several replica groups (gids 1, 2, …), each a Raft group of
    /// servers, and a controller that assigns every shard to one group. A group's servers
    /// serve the shards the controller's latest configuration gives the group; the
    /// controller moves shards between groups (freeze at the old owner, copy, install at the
    /// new one, delete at the old one), and each server logs those steps.
    #[command(
        after_help = "Example, group 1 of three servers on one machine (one per terminal):\n  \
        P=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103\n  \
        shoal shard server --gid 1 --id 1 --listen 127.0.0.1:7101 --peers $P --data g1n1\n  \
        shoal shard server --gid 1 --id 2 --listen 127.0.0.1:7102 --peers $P --data g1n2\n  \
        shoal shard server --gid 1 --id 3 --listen 127.0.0.1:7103 --peers $P --data g1n3\n\
        Server ids are positions in --peers (1 is the first address). One address serves the \
        group's peers, clients and the controller. Restarting with the same --data resumes; a \
        data directory of another group (another --gid or --shards), server or cluster is \
        refused. Writes and migration steps are acknowledged only once fsynced on a majority \
        of the group. Every group and the controller must agree on --shards and --cluster."
    )]
    Server(ServerArgs),
}

/// Arguments of `shoal shard server`.
#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// The group's id (1, 2, …; 0 is reserved).
    #[arg(long)]
    gid: u64,
    /// This server's id in the group: its position in --peers, from 1.
    #[arg(long)]
    id: u64,
    /// Address serving the group's peers, clients and the controller (HOST:PORT).
    #[arg(long, value_parser = crate::cli::parse_addr)]
    listen: SocketAddr,
    /// Every server of the group, this one included, in server-id order: ADDR,ADDR,ADDR.
    #[arg(long, value_parser = crate::cli::parse_addr, value_delimiter = ',', required = true)]
    peers: Vec<SocketAddr>,
    /// Data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// The cluster's number of shards: the same for every group, for good.
    #[arg(long, default_value_t = shoal_shard::DEFAULT_SHARDS)]
    shards: u32,
    /// The controller store's addresses (ADDR,ADDR,ADDR). Recorded for the group's own
    /// follower of the controller; today the controller drives this server over its
    /// client connections, so it may be omitted.
    #[arg(long, value_parser = crate::cli::parse_addr, value_delimiter = ',')]
    controller: Vec<SocketAddr>,
    /// Cluster id: every group and the controller's clients must use the same.
    #[arg(long, default_value_t = 1)]
    cluster: u64,
    /// Snapshot (and drop the log) when the log and hard state exceed this many bytes
    /// (0: never).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    snapshot_bytes: u64,
    /// Milliseconds per Raft tick. The leader sends a heartbeat every tick; a follower that
    /// hears nothing for 10 to 20 ticks (drawn at random) starts an election.
    #[arg(long, default_value_t = 25)]
    tick_ms: u64,
    /// Largest key in bytes (the same on every server of every group: shards migrate).
    #[arg(long, default_value_t = shoal_kv::store::DEFAULT_MAX_KEY_BYTES)]
    max_key_bytes: usize,
    /// Largest value in bytes (the same on every server of every group).
    #[arg(long, default_value_t = shoal_kv::store::DEFAULT_MAX_VALUE_BYTES)]
    max_value_bytes: usize,
}

/// Runs `shoal shard …`.
pub fn run(cmd: ShardCommand) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        match cmd.command {
            ShardSub::Server(args) => server(args).await,
        }
    })
}

async fn server(args: ServerArgs) -> Result<ExitCode> {
    if args.gid == shoal_shard::NO_GROUP {
        bail!("--gid 0 is reserved (it means \"no owner\"): groups are numbered from 1");
    }
    let shards = shoal_shard::validate_shards(u64::from(args.shards))
        .map_err(|e| anyhow::anyhow!("--shards: {e}"))?;
    let peers: BTreeMap<u64, SocketAddr> = (1u64..).zip(args.peers.iter().copied()).collect();
    let Some(&own) = peers.get(&args.id) else {
        bail!(
            "--id {} is not a position in --peers (1 to {}): server ids are positions in --peers",
            args.id,
            peers.len()
        );
    };
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = args.peers.iter().find(|a| !seen.insert(**a)) {
        bail!("--peers names {dup} twice: each server needs its own address");
    }
    // The others reach this server at its --peers entry: listening anywhere else would leave
    // it unreachable (a port on all interfaces, 0.0.0.0 or [::], serves that entry too).
    if own.port() != args.listen.port()
        || !(args.listen.ip().is_unspecified() || own.ip() == args.listen.ip())
    {
        bail!(
            "--listen {} differs from this server's own --peers entry (position {}: {own}): the \
             other servers would look for it at {own}",
            args.listen,
            args.id
        );
    }
    let mut config = ShardServerConfig::new(
        args.gid,
        args.id,
        args.cluster,
        peers,
        args.data.clone(),
        shards,
    );
    config.controller = args.controller.clone();
    config.tick_interval = Duration::from_millis(args.tick_ms.max(1));
    config.snapshot_bytes = (args.snapshot_bytes > 0).then_some(args.snapshot_bytes);
    config.limits.max_key_bytes = args.max_key_bytes;
    config.limits.max_value_bytes = args.max_value_bytes;
    let who = format!("shard server {} of group {}", args.id, args.gid);
    // The same command run twice would fail on the port before the directory: say what
    // matters. (Only a probe: the server's storage takes the lock for good below.)
    if args.data.join(shoal_storage::LOCK_FILE).exists() {
        use shoal_storage::Disk as _;
        let mut disk = shoal_storage::StdDisk::new(&args.data)
            .with_context(|| format!("opening {}", args.data.display()))?;
        if let Err(e @ shoal_storage::DiskError::Locked { .. }) = disk.lock() {
            return Err(e).with_context(|| who.clone());
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    let controller: Vec<String> = args.controller.iter().map(|a| a.to_string()).collect();
    tracing::info!(gid = args.gid, node = args.id, listen = %args.listen, shards,
        controller = %controller.join(","), "shard group server starting");
    run_shard_server(config, listener, shutdown)
        .await
        .with_context(|| who)?;
    Ok(ExitCode::SUCCESS)
}
