//! `shoal shard …`: the sharded key/value database: `shard server` (one server of a replica
//! group), `shard up` (a local cluster, in `shard_up`), and the controller's commands `join`,
//! `leave`, `move` (a `ShardController` run in this process for one change), `query` and
//! `status` (read-only).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shoal_runtime::shard::{run_shard_server, ShardServerConfig};
use shoal_runtime::tls::Security;
use shoal_shard::{Config, ControllerStatus, Gid, Op, ShardId};

use crate::kv_cmd::read_endpoints;
use shoal_runtime::shard::{
    group_server_shards_secure, group_server_status_secure, read_config_secure, read_latest_secure,
    ControllerDriverConfig, GroupServerStatus, ShardController,
};

/// Where `shoal shard up` keeps its cluster, and where the controller commands look for it.
pub(crate) const DEFAULT_DIR: &str = "shoal-shard";
/// The file in the cluster directory listing the controller store's addresses, one per line.
pub(crate) const CONTROLLER_FILE: &str = "controller";
/// How long a read of the controller store or of a group server's status may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting change prints what it waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// `shoal shard`: the sharded key/value database.
#[derive(Debug, clap::Args)]
#[command(after_help = "A tour (`up` in one terminal, the rest in another):\n  \
    shoal shard up                   # controller store + 3 groups of 3 servers in ./shoal-shard\n  \
    shoal shard query                # configuration: groups, shard -> group\n  \
    shoal shard move 7 2             # shard 7 to group 2; prints: config N\n  \
    shoal shard leave 3              # group 3's shards move to 1 and 2\n  \
    shoal shard status               # config, migrations, each group's leader\n\
The controller commands find the controller store in this order: --controller, then \
$SHOAL_CONTROLLER, then DIR/controller of --dir DIR (written by `shoal shard up --dir DIR`), \
then ./shoal-shard/controller.")]
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
    /// A local sharded cluster: the controller store and N replica groups, supervised.
    ///
    /// Starts on 127.0.0.1 a controller store (three `shoal kv server` processes holding the
    /// configurations) and N replica groups (gids 1..N) of R `shoal shard server` processes
    /// each, joins every group through the controller, prints the configuration and stays in
    /// the foreground. A server that dies is restarted from its data directory; one that keeps
    /// failing is retried less and less often, with what is wrong printed once. Ctrl-C (or
    /// SIGTERM) stops every server; they also die with `shard up` if it is killed.
    #[command(after_help = "Examples:\n  \
        shoal shard up                              # 3 groups of 3 servers, 128 shards, ./shoal-shard\n  \
        shoal shard up --groups 2 --dir /tmp/sh     # 2 groups\n\
        The directory holds DIR/controller (the controller store's addresses, one per line), \
        DIR/groups (one line per group: GID ADDR,ADDR,ADDR), the servers' data directories and \
        their logs (DIR/controller1.log, DIR/group1-server1.log, …). Run it again on the same \
        directory to resume the same cluster: same addresses, same data, no new join (a group that \
        left stays out). A second \
        `shard up` on a directory in use is refused.")]
    Up(crate::shard_up::UpArgs),
    /// Add replica groups to the cluster and move shards to them; prints the new configuration
    /// number once every moved shard is installed at its new owner and deleted at its old one.
    ///
    /// Each group is GID=ADDR,ADDR,ADDR: its gid (1, 2, …) and its servers' addresses in
    /// server-id order, as given to their `shoal shard server --peers`. The servers must be
    /// running for the shards to move: while a group cannot be reached the command waits and
    /// says what it waits for. Ctrl-C then leaves the change recorded but incomplete; the next
    /// join, leave or move (or `shard up`) completes it.
    #[command(after_help = "Examples:\n  \
        shoal shard join 4=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403\n  \
        shoal shard join 4=10.0.0.4:7000,10.0.0.5:7000,10.0.0.6:7000 5=10.0.0.7:7000 --controller 10.0.0.1:7001\n\
        A gid that is already a member is refused (exit 1) and nothing changes. A group that \
        left may join again with the same servers. Refused the same way: a group whose servers \
        were started with another --shards than the cluster's, and a --shards that is not the \
        cluster's.")]
    Join(JoinArgs),
    /// Remove replica groups: their shards move to the remaining groups; prints the new
    /// configuration number once the moves are complete.
    #[command(after_help = "Examples:\n  \
        shoal shard leave 3\n  \
        shoal shard leave 2 3\n\
        Leaving an unknown gid, or the last group, is refused (exit 1) and nothing changes. The \
        group's servers keep running (and may join again); stop them yourself if they are done.")]
    Leave(LeaveArgs),
    /// Give one shard to one group; prints the new configuration number once the shard is
    /// installed at the group and deleted at its old owner.
    #[command(after_help = "Examples:\n  \
        shoal shard move 7 2             # shard 7 to group 2\n\
        Shards are numbered 0..S-1 (`shoal shard query` shows which group owns which). An unknown \
        shard, or a gid that is not a member, is refused (exit 1) and nothing changes. A later \
        join or leave rebalances and may move the shard again.")]
    Move(MoveArgs),
    /// Print a configuration: its number, each group and its servers, shard -> group.
    #[command(after_help = "Examples:\n  \
        shoal shard query                # the latest configuration\n  \
        shoal shard query 1              # configuration 1\n\
        Read from the controller store (linearizably), without taking the controller's lock: \
        it works while a change runs.")]
    Query(QueryArgs),
    /// Print the cluster's state: configuration, shard -> group, migrations in progress and
    /// each group's leader.
    #[command(after_help = "Examples:\n  \
        shoal shard status\n  \
        shoal shard status --dir /tmp/sh\n\
        Each group server is asked for its role and the configuration it has adopted; a server \
        that does not answer is shown as unreachable, with why.")]
    Status(StatusArgs),
}

/// Where the controller store is, for the controller commands.
#[derive(Debug, clap::Args)]
struct ControllerOpts {
    /// The controller store's addresses: ADDR,ADDR,ADDR (the lines of DIR/controller).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = crate::cli::parse_addr,
        env = "SHOAL_CONTROLLER",
        hide_env_values = true
    )]
    controller: Vec<SocketAddr>,
    /// Directory of a cluster started with `shoal shard up --dir DIR`: read DIR/controller
    /// (unless --controller or $SHOAL_CONTROLLER is given).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Cluster id the controller store and the groups were started with.
    #[arg(long, default_value_t = 1)]
    cluster: u64,
    /// TLS of the connections to the controller store and the groups.
    #[command(flatten)]
    tls: crate::tls_cmd::ClientTlsArgs,
}

impl ControllerOpts {
    /// The TLS settings of the command: --ca/--cert/--key, else those of the cluster found
    /// through its directory (`shard up --tls`).
    fn security(&self) -> Result<Security> {
        let dir = self.controller.is_empty().then(|| {
            self.dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
        });
        self.tls.security(dir.as_deref())
    }

    /// --controller (or $SHOAL_CONTROLLER), else DIR/controller, else
    /// ./shoal-shard/controller.
    fn store(&self) -> Result<Vec<SocketAddr>> {
        if !self.controller.is_empty() {
            return Ok(self.controller.clone());
        }
        if let Some(dir) = &self.dir {
            return read_endpoints(&dir.join(CONTROLLER_FILE)).with_context(|| {
                format!(
                    "--dir {}: no sharded cluster there (start one with `shoal shard up --dir {}`)",
                    dir.display(),
                    dir.display()
                )
            });
        }
        let default = Path::new(DEFAULT_DIR).join(CONTROLLER_FILE);
        if !default.exists() {
            bail!(
                "no controller to talk to: give --controller A,B,C, or set SHOAL_CONTROLLER=A,B,C, \
                 or --dir DIR of a cluster started with `shoal shard up --dir DIR` (there is no \
                 ./{DEFAULT_DIR}/{CONTROLLER_FILE} here)"
            );
        }
        read_endpoints(&default)
    }
}

/// Arguments of `shoal shard join`.
#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// Groups to add: GID=ADDR,ADDR,ADDR (gid from 1; the servers in server-id order).
    #[arg(required = true, value_name = "GID=ADDRS", value_parser = parse_group)]
    groups: Vec<(Gid, Vec<SocketAddr>)>,
    /// Number of shards [default: 128], used only when the controller store holds no
    /// configuration yet (a cluster started by hand): it must be the groups' --shards. Given
    /// for an existing cluster, it must be the cluster's.
    #[arg(long)]
    shards: Option<u32>,
    #[command(flatten)]
    ctl: ControllerOpts,
}

/// Arguments of `shoal shard leave`.
#[derive(Debug, clap::Args)]
struct LeaveArgs {
    /// Gids of the groups leaving.
    #[arg(required = true, value_name = "GID", value_parser = parse_gid)]
    gids: Vec<Gid>,
    #[command(flatten)]
    ctl: ControllerOpts,
}

/// Arguments of `shoal shard move`.
#[derive(Debug, clap::Args)]
struct MoveArgs {
    /// The shard (0..S-1).
    shard: ShardId,
    /// Its new owner's gid.
    #[arg(value_parser = parse_gid)]
    gid: Gid,
    #[command(flatten)]
    ctl: ControllerOpts,
}

/// Arguments of `shoal shard query`.
#[derive(Debug, clap::Args)]
struct QueryArgs {
    /// Configuration number (default: the latest).
    num: Option<u64>,
    #[command(flatten)]
    ctl: ControllerOpts,
    /// `text` (default) or `json`: one JSON document (see docs/operations.md).
    #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
    output: crate::output::Format,
}

/// Arguments of `shoal shard status`.
#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    ctl: ControllerOpts,
    /// `text` (default) or `json`: one JSON document (see docs/operations.md).
    #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
    output: crate::output::Format,
}

/// A gid argument: 1, 2, … (0 means "no group").
fn parse_gid(s: &str) -> Result<Gid> {
    let gid: Gid = s
        .parse()
        .with_context(|| format!("{s:?} is not a gid (a group number: 1, 2, …)"))?;
    if gid == shoal_shard::NO_GROUP {
        bail!("gid 0 is reserved (it means \"no owner\"): groups are numbered from 1");
    }
    Ok(gid)
}

/// A `GID=ADDR,ADDR,ADDR` argument of `shard join`.
fn parse_group(s: &str) -> Result<(Gid, Vec<SocketAddr>)> {
    let Some((gid, addrs)) = s.split_once('=') else {
        bail!(
            "{s:?}: write GID=ADDR,ADDR,ADDR, e.g. 4=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403"
        );
    };
    let gid = parse_gid(gid.trim())?;
    let addrs: Vec<&str> = addrs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if addrs.is_empty() {
        bail!("group {gid} has no servers: write {gid}=ADDR,ADDR,ADDR");
    }
    let addrs = addrs
        .into_iter()
        .map(crate::cli::parse_addr)
        .collect::<Result<Vec<_>>>()
        .map_err(|e| anyhow::anyhow!("group {gid}: {e:#}"))?;
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = addrs.iter().find(|a| !seen.insert(**a)) {
        bail!("group {gid} names {dup} twice: each server has its own address");
    }
    Ok((gid, addrs))
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
    /// The controller store's addresses (ADDR,ADDR,ADDR). At start the server reads the
    /// cluster's latest configuration there and refuses to start if its --shards differs
    /// (or warns if the configuration lists this group without this server); if the store
    /// does not answer within a few seconds it starts anyway and says so. The controller
    /// drives migrations over the server's client connections, so it may be omitted.
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
    #[command(flatten)]
    obs: crate::obs::ServerObsArgs,
    /// TLS: --cert, --key and --ca as for `shoal kv server` (its --help says the rules).
    #[command(flatten)]
    tls: crate::tls_cmd::ServerTlsArgs,
}

/// The TLS settings of this process's connections: one per process, set once by the command
/// before it connects anywhere (plain TCP when never set).
static SECURITY: std::sync::OnceLock<Security> = std::sync::OnceLock::new();

/// This process's TLS settings ([`SECURITY`]).
pub(crate) fn security() -> Security {
    SECURITY.get().cloned().unwrap_or_default()
}

/// Sets this process's TLS settings (the first call wins: one command per process).
pub(crate) fn set_security(security: Security) {
    let _ = SECURITY.set(security);
}

/// Runs `shoal shard …`.
pub fn run(cmd: ShardCommand) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let security = match &cmd.command {
        ShardSub::Server(args) => Some(args.tls.security(args.listen)?),
        ShardSub::Up(_) => None,
        ShardSub::Join(JoinArgs { ctl, .. })
        | ShardSub::Leave(LeaveArgs { ctl, .. })
        | ShardSub::Move(MoveArgs { ctl, .. })
        | ShardSub::Query(QueryArgs { ctl, .. })
        | ShardSub::Status(StatusArgs { ctl, .. }) => Some(ctl.security()?),
    };
    if let Some(security) = security {
        set_security(security);
    }
    runtime.block_on(async move {
        match cmd.command {
            ShardSub::Server(args) => server(args).await,
            ShardSub::Up(args) => crate::shard_up::up(args).await,
            ShardSub::Join(args) => join(args).await,
            ShardSub::Leave(args) => {
                let store = args.ctl.store()?;
                change(&store, &args.ctl, Op::Leave(args.gids), None).await
            }
            ShardSub::Move(args) => {
                let store = args.ctl.store()?;
                let op = Op::Move {
                    shard: args.shard,
                    gid: args.gid,
                };
                change(&store, &args.ctl, op, None).await
            }
            ShardSub::Query(args) => query(args).await,
            ShardSub::Status(args) => status(args).await,
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
    config.transport.security = security();
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
    if !args.controller.is_empty() {
        check_against_cluster(&args, shards, own).await?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    crate::obs::start_server_metrics(args.obs.metrics, shoal_runtime::metrics::ServerKind::Shard)
        .await?;
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

/// How long a starting group server waits for the controller store before starting unchecked.
const START_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// A group server given --controller checks itself against the cluster's latest
/// configuration before serving: another shard count is refused (its shard numbers would
/// name other keys than the cluster's, and the controller's moves would be refused forever);
/// a configuration listing this gid without this server is worth a warning (the controller
/// and clients will not reach it). An unreachable store is not a reason to stay down.
async fn check_against_cluster(args: &ServerArgs, shards: u32, own: SocketAddr) -> Result<()> {
    let store: Vec<String> = args.controller.iter().map(ToString::to_string).collect();
    let store = store.join(",");
    let security = security();
    let read = read_latest_secure(
        &security,
        &args.controller,
        args.cluster,
        START_CHECK_TIMEOUT,
    );
    let record = match tokio::time::timeout(START_CHECK_TIMEOUT, read).await {
        Ok(Ok(Some(record))) => record,
        Ok(Ok(None)) => {
            tracing::info!(%store, "the controller store holds no configuration yet");
            return Ok(());
        }
        Ok(Err(e)) => {
            tracing::warn!(%store, error = %e, "could not read the controller store: starting \
                without checking --shards against the cluster's configuration");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!(%store, "the controller store did not answer within {}s: starting \
                without checking --shards against the cluster's configuration",
                START_CHECK_TIMEOUT.as_secs());
            return Ok(());
        }
    };
    let config = &record.config;
    if config.shards.len() != shards as usize {
        bail!(
            "--shards {shards} differs from the cluster's: configuration {} in the controller \
             store ({store}) has {} shards. Every group of a cluster uses the same count; start \
             this server with --shards {} (or give the --controller of its own cluster)",
            config.num,
            config.shards.len(),
            config.shards.len()
        );
    }
    if let Some(servers) = config.groups.get(&args.gid) {
        let me = own.to_string();
        if !servers.contains(&me) {
            tracing::warn!(gid = args.gid, configuration = config.num, listed = %servers.join(","),
                own = %me, "the cluster's configuration lists this group without this server: \
                the controller and clients will not reach it until a join names it");
        }
    }
    Ok(())
}

/// `shoal shard join`.
async fn join(args: JoinArgs) -> Result<ExitCode> {
    let store = args.ctl.store()?;
    let mut groups = BTreeMap::new();
    for (gid, addrs) in args.groups {
        let names = addrs.iter().map(ToString::to_string).collect();
        if groups.insert(gid, names).is_some() {
            bail!("group {gid} is given twice: give each group once, with all its servers");
        }
    }
    // The cluster's shard count: the latest configuration's, else --shards (a first join).
    let list = join_addrs(&store);
    let latest = read_latest_secure(&security(), &store, args.ctl.cluster, READ_TIMEOUT)
        .await
        .with_context(|| format!("reading the controller store at {list}"))?;
    let shards = match (&latest, args.shards) {
        (Some(r), Some(given)) if r.config.num_shards() != given => {
            eprintln!(
                "error: --shards {given} is not the cluster's: configuration {} has {} shards \
                 (the count is fixed when the first group joins); leave --shards out \
                 (nothing changed)",
                r.config.num,
                r.config.num_shards()
            );
            return Ok(ExitCode::from(1));
        }
        (Some(r), _) => r.config.num_shards(),
        (None, given) => given.unwrap_or(shoal_shard::DEFAULT_SHARDS),
    };
    shoal_shard::validate_shards(u64::from(shards))
        .map_err(|e| anyhow::anyhow!("--shards: {e}"))?;
    if !wait_for_leaders(&groups, args.ctl.cluster).await? {
        eprintln!("interrupted before the change was recorded: nothing changed");
        return Ok(ExitCode::from(130));
    }
    if let Some(refusal) = other_shard_counts(&groups, shards, args.ctl.cluster).await {
        eprintln!("error: {refusal} (nothing changed)");
        return Ok(ExitCode::from(1));
    }
    change(&store, &args.ctl, Op::Join(groups), Some(shards)).await
}

/// A joining group whose servers were started with another shard count than `shards` would
/// refuse every configuration (`shard counts differ`) and the join would wait for ever: says
/// which, and what to do. Asks each group's servers until one answers; a group none of whose
/// servers answers the question (older servers) is not checked.
async fn other_shard_counts(
    groups: &BTreeMap<Gid, Vec<String>>,
    shards: u32,
    cluster: u64,
) -> Option<String> {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
    for (&gid, servers) in groups {
        for name in servers {
            let Ok(addr) = crate::cli::parse_addr(name) else {
                continue;
            };
            match group_server_shards_secure(&security(), addr, gid, cluster, PROBE_TIMEOUT).await {
                Ok(theirs) if theirs != shards => {
                    return Some(format!(
                        "group {gid}'s servers have {theirs} shards ({name} was started with \
                         --shards {theirs}), the cluster {shards}: start the group's servers \
                         with --shards {shards} on empty data directories, or, for the first \
                         join of a new cluster, give --shards {theirs}"
                    ));
                }
                Ok(_) => break,
                Err(why) => {
                    tracing::debug!(gid, server = %name, %why, "no shard count from this server");
                }
            }
        }
    }
    None
}

/// Before a join is recorded, waits until every joining group has a leader answering: a
/// configuration naming a group that cannot serve would leave its shards unserved until it
/// came up. Says every few seconds which servers do not answer and why. Returns false when
/// interrupted (Ctrl-C, SIGTERM): nothing was recorded.
async fn wait_for_leaders(groups: &BTreeMap<Gid, Vec<String>>, cluster: u64) -> Result<bool> {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
    let mut signals = shoal_cluster::StopSignals::install()?;
    let started = tokio::time::Instant::now();
    let mut said = started;
    loop {
        let answers = ask_groups(groups, cluster, PROBE_TIMEOUT).await;
        let waiting: Vec<String> = answers
            .iter()
            .filter(|(_, a)| !a.iter().any(|(_, a)| a.as_ref().is_ok_and(|s| s.leader)))
            .map(|(gid, a)| {
                let why: Vec<String> = a
                    .iter()
                    .map(|(name, a)| match a {
                        Ok(_) => format!("{name}: no leader known yet"),
                        Err(why) => format!("{name}: {why}"),
                    })
                    .collect();
                format!("group {gid} ({})", why.join("; "))
            })
            .collect();
        if waiting.is_empty() {
            return Ok(true);
        }
        if said.elapsed() >= PROGRESS_EVERY || said == started {
            said = tokio::time::Instant::now();
            if started.elapsed() >= PROGRESS_EVERY {
                eprintln!(
                    "waiting for a leader in {}: are the servers running (`shoal shard server`)? \
                     Nothing is recorded yet; Ctrl-C stops.",
                    waiting.join(", ")
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = signals.recv() => return Ok(false),
        }
    }
}

/// Runs one change (join, leave, move) through a controller in this process and prints the
/// new configuration number once it is complete. A refusal is printed with exit status 1;
/// Ctrl-C interrupts the wait (exit status 130).
async fn change(
    store: &[SocketAddr],
    ctl: &ControllerOpts,
    op: Op,
    shards: Option<u32>,
) -> Result<ExitCode> {
    let list = join_addrs(store);
    let before = read_latest_secure(&security(), store, ctl.cluster, READ_TIMEOUT)
        .await
        .with_context(|| format!("reading the controller store at {list}"))?;
    let shards = match (&before, shards) {
        (Some(record), _) => record.config.num_shards(),
        (None, Some(shards)) => shards,
        (None, None) => bail!(
            "the controller store at {list} holds no configuration yet: join groups first \
             (shoal shard join 1=ADDR,ADDR,ADDR)"
        ),
    };
    let before = before.map(|r| r.config.num);
    let mut config = ControllerDriverConfig::new(store.to_vec(), shards);
    config.cluster_id = ctl.cluster;
    config.security = security();
    let controller = ShardController::start(config)?;
    let mut signals = shoal_cluster::StopSignals::install()?;
    let outcome = {
        let submit = controller.submit(op);
        tokio::pin!(submit);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.tick().await;
        loop {
            tokio::select! {
                result = &mut submit => break Some(result),
                _ = progress.tick() => {
                    print_waiting(&controller.status(), store, ctl.cluster).await;
                }
                _ = signals.recv() => break None,
            }
        }
    };
    let status = controller.status();
    controller.stop().await;
    match outcome {
        Some(Ok(num)) => {
            println!("config {num}");
            Ok(ExitCode::SUCCESS)
        }
        Some(Err(reason)) => {
            eprintln!("error: {reason} (nothing changed)");
            Ok(ExitCode::from(1))
        }
        None => {
            match status.latest {
                Some(num) if before.is_none_or(|b| num > b) => eprintln!(
                    "interrupted: the change is recorded as configuration {num} but not complete \
                     ({} moves pending); the next `shoal shard join`, `leave` or `move` (or \
                     `shoal shard up`) completes it first",
                    status.moves_pending
                ),
                Some(num) if !status.complete => eprintln!(
                    "interrupted while completing an earlier change (configuration {num}, still \
                     incomplete): this change was not recorded; the next `shoal shard join`, \
                     `leave` or `move` completes configuration {num} first"
                ),
                _ => eprintln!("interrupted before the change was recorded: nothing changed"),
            }
            Ok(ExitCode::from(130))
        }
    }
}

/// Asks every server of `groups` at once whether it leads its group.
async fn ask_groups(
    groups: &BTreeMap<Gid, Vec<String>>,
    cluster: u64,
    timeout: Duration,
) -> BTreeMap<Gid, Vec<(String, ServerAnswer)>> {
    let mut asks = Vec::new();
    for (&gid, servers) in groups {
        for name in servers {
            let name = name.clone();
            asks.push((
                gid,
                name.clone(),
                tokio::spawn(async move {
                    let addr = crate::cli::parse_addr(&name).map_err(|e| format!("{e:#}"))?;
                    group_server_status_secure(&security(), addr, gid, cluster, timeout).await
                }),
            ));
        }
    }
    let mut answers: BTreeMap<Gid, Vec<(String, ServerAnswer)>> = BTreeMap::new();
    for (gid, name, ask) in asks {
        let answer = ask.await.unwrap_or_else(|e| Err(e.to_string()));
        answers.entry(gid).or_default().push((name, answer));
    }
    answers
}

/// Prints (stderr) what a change waits for: the controller's state, and the groups of the
/// change in progress that have no leader answering, with why each server does not answer.
pub(crate) async fn print_waiting(status: &ControllerStatus, store: &[SocketAddr], cluster: u64) {
    print_status_line(status);
    const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
    let Ok(Some(record)) = read_latest_secure(&security(), store, cluster, PROBE_TIMEOUT).await
    else {
        return;
    };
    if record.complete {
        return;
    }
    let involved: std::collections::BTreeSet<Gid> = record
        .moves
        .iter()
        .flat_map(|m| [m.from, m.to])
        .filter(|&g| g != shoal_shard::NO_GROUP)
        .collect();
    // A group leaving is no longer in the latest configuration: its servers are in the one
    // before.
    let mut groups: BTreeMap<Gid, Vec<String>> = BTreeMap::new();
    let previous = match record.config.num.checked_sub(1) {
        Some(num) => read_config_secure(&security(), store, cluster, num, PROBE_TIMEOUT)
            .await
            .ok()
            .flatten(),
        None => None,
    };
    for gid in involved {
        let servers = record
            .config
            .groups
            .get(&gid)
            .or_else(|| previous.as_ref()?.groups.get(&gid));
        if let Some(servers) = servers {
            groups.insert(gid, servers.clone());
        }
    }
    for (gid, answers) in ask_groups(&groups, cluster, PROBE_TIMEOUT).await {
        if answers
            .iter()
            .any(|(_, a)| a.as_ref().is_ok_and(|s| s.leader))
        {
            continue;
        }
        let why: Vec<String> = answers
            .iter()
            .map(|(name, a)| match a {
                Ok(_) => format!("{name}: no leader known"),
                Err(why) => format!("{name}: {why}"),
            })
            .collect();
        eprintln!(
            "  group {gid} has no leader answering ({}): are its servers running?",
            why.join("; ")
        );
    }
}

/// Prints (stderr) the controller's state while a change waits.
fn print_status_line(status: &ControllerStatus) {
    let config = status
        .latest
        .map_or("no configuration yet".to_string(), |n| {
            format!("configuration {n}")
        });
    let problem = status
        .last_problem
        .as_deref()
        .map_or(String::new(), |p| format!("; last problem: {p}"));
    if status.phase == shoal_shard::CtlPhase::Locking && !status.holds_lock {
        eprintln!(
            "waiting for the controller's lock: another controller (a `shoal shard join`, \
             `leave` or `move`, or `shard up` joining its groups) holds it until its change is \
             complete, or its lease runs out if it died{problem}"
        );
        return;
    }
    eprintln!(
        "waiting ({:?}, {config}, {} moves pending, {} done){problem}",
        status.phase, status.moves_pending, status.moves_done
    );
}

/// Addresses as `A,B,C` (the form `--controller` and a group's `G=` take).
pub(crate) fn join_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The store has no configuration: what to do.
fn no_configuration(store: &[SocketAddr]) -> anyhow::Error {
    anyhow::anyhow!(
        "the controller store at {} holds no configuration yet: start a cluster with `shoal \
         shard up`, or join groups with `shoal shard join 1=ADDR,ADDR,ADDR`",
        join_addrs(store)
    )
}

/// `shoal shard query [N]`.
async fn query(args: QueryArgs) -> Result<ExitCode> {
    let store = args.ctl.store()?;
    let list = join_addrs(&store);
    let latest = read_latest_secure(&security(), &store, args.ctl.cluster, READ_TIMEOUT)
        .await
        .with_context(|| format!("reading the controller store at {list}"))?
        .ok_or_else(|| no_configuration(&store))?;
    let config = match args.num {
        None => latest.config,
        Some(num) if num == latest.config.num => latest.config,
        Some(num) if num > latest.config.num => bail!(
            "there is no configuration {num} yet: the latest is {}",
            latest.config.num
        ),
        Some(num) => read_config_secure(&security(), &store, args.ctl.cluster, num, READ_TIMEOUT)
            .await
            .with_context(|| format!("reading the controller store at {list}"))?
            .with_context(|| format!("configuration {num} is not in the controller store"))?,
    };
    if args.output == crate::output::Format::Json {
        crate::output::print_json(&ConfigJson::of(&config))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    writeln!(
        out,
        "config {} ({} shards)",
        config.num,
        config.num_shards()
    )?;
    writeln!(out, "groups:")?;
    if config.groups.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for (gid, servers) in &config.groups {
        writeln!(out, "  {gid} {}", servers.join(","))?;
    }
    writeln!(out, "shards:")?;
    for line in shard_ranges(&config) {
        writeln!(out, "  {line}")?;
    }
    emit(&out)
}

/// Prints `text` on stdout: a reader that left early (`| head`) is not an error.
fn emit(text: &str) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        r => r.map(|()| ExitCode::SUCCESS).context("writing to stdout"),
    }
}

/// `shoal shard status`.
async fn status(args: StatusArgs) -> Result<ExitCode> {
    let store = args.ctl.store()?;
    let cluster = args.ctl.cluster;
    let record = read_latest_secure(&security(), &store, cluster, READ_TIMEOUT)
        .await
        .with_context(|| format!("reading the controller store at {}", join_addrs(&store)))?
        .ok_or_else(|| no_configuration(&store))?;
    let config = &record.config;
    let answers = ask_groups(&config.groups, cluster, READ_TIMEOUT).await;
    if args.output == crate::output::Format::Json {
        crate::output::print_json(&StatusJson::of(&record, &answers))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    let state = if record.complete {
        "complete".to_string()
    } else {
        format!("changing: {} shard moves in progress", record.moves.len())
    };
    writeln!(
        out,
        "config {} ({} shards), {state}",
        config.num,
        config.num_shards()
    )?;
    writeln!(out, "shards:")?;
    for line in shard_ranges(config) {
        writeln!(out, "  {line}")?;
    }
    if !record.complete {
        writeln!(
            out,
            "migrations to config {} (in progress; the next join, leave or move completes \
             them):",
            config.num
        )?;
        let mut by_pair: BTreeMap<(Gid, Gid), Vec<ShardId>> = BTreeMap::new();
        for m in &record.moves {
            by_pair.entry((m.from, m.to)).or_default().push(m.shard);
        }
        for ((from, to), shards) in by_pair {
            writeln!(
                out,
                "  {} -> {}: shards {}",
                group_name(from),
                group_name(to),
                compact(&shards)
            )?;
        }
    }
    writeln!(out, "groups:")?;
    for (gid, servers) in &answers {
        let leader = servers
            .iter()
            .find(|(_, a)| a.as_ref().is_ok_and(|s| s.leader))
            .map_or("no leader answering".to_string(), |(name, _)| {
                format!("leader {name}")
            });
        writeln!(out, "  {gid} {leader}")?;
        for (name, answer) in servers {
            match answer {
                Ok(s) if s.leader => {
                    writeln!(out, "    {name} leader, adopted config {}", s.adopted)?
                }
                Ok(s) => match s.leader_hint {
                    Some(id) => writeln!(out, "    {name} follower (of server {id})")?,
                    None => writeln!(out, "    {name} follower (no leader known)")?,
                },
                Err(why) => writeln!(out, "    {name} unreachable: {why}")?,
            }
        }
    }
    emit(&out)
}

/// A group server's answer to `status`.
type ServerAnswer = Result<GroupServerStatus, String>;

/// `shard query -o json`: one configuration.
#[derive(Debug, serde::Serialize)]
struct ConfigJson {
    /// The configuration's number.
    num: u64,
    /// How many shards.
    num_shards: u32,
    /// Each group and its servers' addresses.
    groups: Vec<GroupJson>,
    /// The owner (gid; 0: none) of each shard, by shard id.
    shards: Vec<Gid>,
}

/// A group of a [`ConfigJson`].
#[derive(Debug, serde::Serialize)]
struct GroupJson {
    gid: Gid,
    servers: Vec<String>,
}

impl ConfigJson {
    fn of(config: &Config) -> ConfigJson {
        ConfigJson {
            num: config.num,
            num_shards: config.num_shards(),
            groups: config
                .groups
                .iter()
                .map(|(gid, servers)| GroupJson {
                    gid: *gid,
                    servers: servers.clone(),
                })
                .collect(),
            shards: config.shards.clone(),
        }
    }
}

/// `shard status -o json`.
#[derive(Debug, serde::Serialize)]
struct StatusJson {
    /// The latest configuration.
    config: ConfigJson,
    /// Whether every shard move to it is done.
    complete: bool,
    /// The moves still in progress.
    moves: Vec<MoveJson>,
    /// What each group's servers say.
    groups: Vec<GroupStatusJson>,
}

/// A shard move of a [`StatusJson`] (`from`/`to` 0: no group).
#[derive(Debug, serde::Serialize)]
struct MoveJson {
    shard: ShardId,
    from: Gid,
    to: Gid,
}

/// A group of a [`StatusJson`].
#[derive(Debug, serde::Serialize)]
struct GroupStatusJson {
    gid: Gid,
    /// The server answering as leader, if one does.
    leader: Option<String>,
    servers: Vec<GroupServerJson>,
}

/// One group server's answer.
#[derive(Debug, serde::Serialize)]
struct GroupServerJson {
    /// Its address, as the configuration names it.
    address: String,
    /// `leader`, `follower` or `unreachable`.
    role: &'static str,
    /// The configuration its group adopted (a leader's answer; else null).
    adopted: Option<u64>,
    /// A follower's leader (its position in the group, from 1), if known.
    leader_hint: Option<u64>,
    /// Why it did not answer.
    error: Option<String>,
}

impl StatusJson {
    fn of(
        record: &shoal_shard::layout::Record,
        answers: &BTreeMap<Gid, Vec<(String, ServerAnswer)>>,
    ) -> StatusJson {
        let groups = answers
            .iter()
            .map(|(gid, servers)| GroupStatusJson {
                gid: *gid,
                leader: servers
                    .iter()
                    .find(|(_, a)| a.as_ref().is_ok_and(|s| s.leader))
                    .map(|(name, _)| name.clone()),
                servers: servers
                    .iter()
                    .map(|(name, answer)| match answer {
                        Ok(s) => GroupServerJson {
                            address: name.clone(),
                            role: if s.leader { "leader" } else { "follower" },
                            adopted: s.leader.then_some(s.adopted),
                            leader_hint: s.leader_hint,
                            error: None,
                        },
                        Err(why) => GroupServerJson {
                            address: name.clone(),
                            role: "unreachable",
                            adopted: None,
                            leader_hint: None,
                            error: Some(why.clone()),
                        },
                    })
                    .collect(),
            })
            .collect();
        StatusJson {
            config: ConfigJson::of(&record.config),
            complete: record.complete,
            moves: record
                .moves
                .iter()
                .map(|m| MoveJson {
                    shard: m.shard,
                    from: m.from,
                    to: m.to,
                })
                .collect(),
            groups,
        }
    }
}

fn group_name(gid: Gid) -> String {
    if gid == shoal_shard::NO_GROUP {
        "none".to_string()
    } else {
        format!("group {gid}")
    }
}

/// Shard -> group as ranges, one per line: `0-42 -> 1`, `43 -> 2` (`none`: no owner).
pub(crate) fn shard_ranges(config: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    let mut start = 0usize;
    for i in 1..=config.shards.len() {
        if i == config.shards.len() || config.shards[i] != config.shards[start] {
            let gid = config.shards[start];
            let owner = if gid == shoal_shard::NO_GROUP {
                "none".to_string()
            } else {
                gid.to_string()
            };
            let range = if i - 1 == start {
                format!("{start}")
            } else {
                format!("{start}-{}", i - 1)
            };
            lines.push(format!("{range} -> {owner}"));
            start = i;
        }
    }
    lines
}

/// Sorted shard ids as ranges: `0-3, 7, 9-10`.
fn compact(ids: &[ShardId]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            ids[i].to_string()
        } else {
            format!("{}-{}", ids[i], ids[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ownership_prints_as_ranges() {
        let mut config = Config::empty(8).unwrap();
        assert_eq!(shard_ranges(&config), ["0-7 -> none"]);
        config.shards = vec![1, 1, 1, 2, 2, 1, 3, 3];
        assert_eq!(
            shard_ranges(&config),
            ["0-2 -> 1", "3-4 -> 2", "5 -> 1", "6-7 -> 3"]
        );
        assert_eq!(compact(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(compact(&[]), "");
    }

    #[test]
    fn join_arguments_are_checked_before_anything_runs() {
        let (gid, addrs) = parse_group("4=127.0.0.1:7401,127.0.0.1:7402").unwrap();
        assert_eq!((gid, addrs.len()), (4, 2));
        let err = |s: &str| format!("{:#}", parse_group(s).unwrap_err());
        assert!(err("0=127.0.0.1:1").contains("gid 0 is reserved"));
        assert!(err("4=").contains("group 4 has no servers"));
        assert!(err("4").contains("write GID=ADDR,ADDR,ADDR"));
        assert!(err("4=127.0.0.1").contains("has no port"));
        assert!(err("x=127.0.0.1:1").contains("not a gid"));
        assert!(err("4=127.0.0.1:1,127.0.0.1:1").contains("twice"));
    }
}
