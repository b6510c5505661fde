//! `shoal kv …`: the key/value database — servers, a local cluster, and the client commands.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shoal_kv::Outcome;
use shoal_runtime::kv::{
    run_server, Client, ClientConfig, ClientError, DeleteOutcome, KvServerConfig, LeasePutOutcome,
    PutOutcome,
};
use shoal_runtime::shard::{ShardClient, ShardClientConfig};
use shoal_wire::kv::{Expected, KvOp, KvResult, ServerRole};
use std::io::BufRead as _;

mod text;
use text as kv_text;

/// Where `shoal kv up` keeps its cluster, and where the client commands look for endpoints.
pub(crate) const DEFAULT_DIR: &str = "shoal-data";
/// The file in the cluster directory listing the endpoints, one per line, in server-id order.
pub(crate) const ENDPOINTS_FILE: &str = "endpoints";
/// Longest line `shoal kv shell` accepts (a key and value far over the default limits).
const MAX_SHELL_LINE_BYTES: usize = 4 * 1024 * 1024;
/// Largest value `shoal kv put` reads from stdin or a file: the wire's frame limit bounds any
/// server's `--max-value-bytes`, so more than this could never be stored.
const MAX_CLI_VALUE_BYTES: usize = shoal_wire::DEFAULT_MAX_FRAME_BYTES;

/// `shoal kv`: the key/value database.
#[derive(Debug, clap::Args)]
#[command(after_help = "A tour (`up` in one terminal, the rest in another):\n  \
    shoal kv up                      # a local 3-server cluster in ./shoal-data\n  \
    shoal kv put greeting hello      # prints: ok 1\n  \
    shoal kv get greeting --version  # prints: 1 hello\n  \
    shoal kv put greeting bye --expect 1\n  \
    shoal kv scan\n\
Client commands find the cluster in this order: --endpoints ($SHOAL_ENDPOINTS) or \
--controller ($SHOAL_CONTROLLER) for a sharded cluster, then DIR/endpoints or DIR/controller \
of --dir DIR (written by `shoal kv up` / `shoal shard up`), then ./shoal-data/endpoints, then \
./shoal-shard/controller. Kill any one server of three: the database keeps answering.")]
pub struct KvCommand {
    /// Server addresses (HOST:PORT, a host name or an IP), in any order: A,B,C (a server
    /// that does not lead tells the client where the leader is).
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        value_parser = crate::cli::parse_addr,
        env = "SHOAL_ENDPOINTS",
        hide_env_values = true
    )]
    endpoints: Vec<SocketAddr>,
    /// A sharded cluster instead: its controller store's addresses (the lines of
    /// DIR/controller written by `shoal shard up`). Keys are routed to the group that owns
    /// their shard; get, put, del, scan and shell work as on one group; `lock` holds its key
    /// in the controller store.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        value_parser = crate::cli::parse_addr,
        env = "SHOAL_CONTROLLER",
        hide_env_values = true,
        conflicts_with = "endpoints",
        value_name = "ADDRS"
    )]
    controller: Vec<SocketAddr>,
    /// Directory of a cluster started with `shoal kv up --dir DIR` (or `shoal shard up --dir
    /// DIR`): the client commands read DIR/endpoints (or DIR/controller) unless --endpoints
    /// or --controller is given.
    // The id `dir` is also `kv up`'s own --dir: clap then keeps `up`'s (a global arg is not
    // propagated to a subcommand that has an arg of the same id).
    #[arg(long, global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Cluster id the servers were started with.
    #[arg(long, global = true, default_value_t = 1)]
    cluster: u64,
    /// Seconds a client command may take, retries included; `shell` answers `timeout` after it.
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
    /// Reads (get, scan) answered by whichever server is asked, from its local state: faster,
    /// possibly stale. The default is linearizable reads (read-index through the leader).
    #[arg(long, global = true)]
    serializable: bool,
    /// TLS of the client commands (`kv server` has its own --cert/--key/--ca).
    #[command(flatten)]
    tls: Box<crate::tls_cmd::ClientTlsArgs>,
    #[command(subcommand)]
    command: KvSub,
}

#[derive(Debug, clap::Subcommand)]
enum KvSub {
    /// Run one server of a cluster (a cluster of one: --peers names only itself).
    #[command(
        after_help = "Example, three servers on one machine (one per terminal):\n  \
        shoal kv server --id 1 --listen 127.0.0.1:7001 --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data n1\n  \
        shoal kv server --id 2 --listen 127.0.0.1:7002 --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data n2\n  \
        shoal kv server --id 3 --listen 127.0.0.1:7003 --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data n3\n\
        One address serves peers and clients. Restarting with the same --data resumes; a data \
        directory of another server or cluster is refused. Writes are acknowledged only once \
        fsynced on a majority.\n\
        TLS: give --cert, --key and --ca (make them with `shoal cert`). The server then serves \
        TLS only, and every connection must present a certificate signed by --ca: the other \
        servers (mutual TLS) and the clients alike (clients pass --ca, --cert and --key). \
        Without them it serves plain TCP, and refuses to listen on an address other than \
        loopback (127.0.0.1, ::1) unless given --insecure.\n\n\
        A new server for a running cluster (`shoal kv member add 4 127.0.0.1:7004 --learner`, \
        before or after):\n  \
        shoal kv server --id 4 --listen 127.0.0.1:7004 --join 127.0.0.1:7001,127.0.0.1:7002 --data n4\n\
        It waits until it is a member, then gets the membership from the cluster. Restarted, it \
        reads the membership from --data (no --peers or --join needed). A server that was \
        removed refuses to start on its old data directory."
    )]
    Server(ServerArgs),
    /// Start a local cluster of servers on 127.0.0.1 and stay in the foreground (Ctrl-C
    /// stops it). A second run on the same --dir resumes the same cluster.
    #[command(after_help = "Example:\n  shoal kv up --nodes 3 --dir shoal-data\n\
        The endpoints are printed and written to DIR/endpoints, where the client commands \
        find them. Each server logs to DIR/nodeN.log. A server that dies is restarted; one \
        that keeps failing (a damaged directory, a full disk) is retried less and less often \
        while the others serve, and what is wrong and how to fix it is printed once. The \
        servers stop with `kv up`, even when it is killed.\n\n\
        Resized, a stopped cluster of 3 made 5, then 3 again (data kept):\n  \
        shoal kv up --nodes 5 --dir shoal-data   # servers 4, 5 join as learners, then vote\n  \
        shoal kv up --nodes 3 --dir shoal-data   # servers 5, 4 removed and stopped\n\
        Without --nodes a resumed cluster keeps its size.")]
    Up(crate::kv_up::UpArgs),
    /// Print a key's value (exit status 1 if the key is missing).
    ///
    /// The value's bytes (after `VERSION ` with --version), then a newline (none with --raw).
    #[command(
        after_help = "Examples:\n  shoal kv get greeting --version\n  \
        shoal kv get photo --raw > photo.jpg   # the bytes exactly as stored",
        disable_version_flag = true
    )]
    Get {
        /// The key (any bytes the shell can pass).
        key: OsString,
        /// Print `VERSION VALUE` instead of the value.
        #[arg(long)]
        version: bool,
        /// Write the value's bytes alone, without the newline after them.
        #[arg(long)]
        raw: bool,
        /// `text` (default) or `json`: one JSON document `{key, found, version, value}`
        /// (see docs/operations.md).
        #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text, conflicts_with_all = ["raw", "version"])]
        output: crate::output::Format,
    },
    /// Store a value; prints `ok NEW_VERSION`.
    ///
    /// With --expect, only if the key is at that version (0: only if missing). The value is
    /// the argument, or stdin with `-`, or a file with --file; it is stored as bytes, exactly.
    #[command(after_help = "Examples:\n  shoal kv put greeting hello\n  \
        shoal kv put greeting bye --expect 1   # compare-and-set\n  \
        shoal kv put fresh x --expect 0        # create only\n  \
        shoal kv put session/a up --lease 42   # deleted when lease 42 ends\n  \
        shoal kv put photo --file photo.jpg    # a file's bytes (up to the 1 MiB limit)\n  \
        tar c notes | shoal kv put notes.tar - # stdin")]
    Put {
        /// The key (any bytes the shell can pass).
        key: OsString,
        /// The value; `-` reads it from stdin.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<OsString>,
        /// Read the value from this file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Store only if the key is at this version.
        #[arg(long)]
        expect: Option<u64>,
        /// Attach the key to this lease (`shoal kv lease grant`): it is deleted when the lease
        /// expires or is revoked. A key created this way starts at a version equal to the log
        /// index of the put, not 1.
        #[arg(long)]
        lease: Option<u64>,
    },
    /// Delete a key (with --expect, only at that version).
    #[command(after_help = "Example:\n  shoal kv del greeting")]
    Del {
        /// The key.
        key: OsString,
        /// Delete only if the key is at this version.
        #[arg(long)]
        expect: Option<u64>,
    },
    /// Print `KEY VERSION VALUE` for the keys in [START, END) in key order.
    ///
    /// A key or value with spaces, control characters or non-UTF-8 bytes is printed as a
    /// quoted string with C escapes (`"a b\n\xff"`); plain ones as they are.
    #[command(
        after_help = "Examples:\n  shoal kv scan\n  shoal kv scan user/ user0 --limit 10\n\
        A scan longer than the servers' cap per request (1,000 keys) is read in several \
        requests, each linearizable on its own."
    )]
    Scan {
        /// First key (inclusive; default: the first).
        start: Option<OsString>,
        /// Last key (exclusive; default: none).
        end: Option<OsString>,
        /// Most keys printed.
        #[arg(long, default_value_t = shoal_runtime::kv::client::DEFAULT_SCAN_LIMIT)]
        limit: u32,
        /// `text` (default) or `json`: one JSON document `{count, items: [{key, version,
        /// value}]}` (see docs/operations.md).
        #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
        output: crate::output::Format,
    },
    /// Print each server's role, term, leader and log indexes (exit status 1 if no server
    /// answers as leader).
    #[command(after_help = "Example:\n  shoal kv status\n\
        ID  ADDRESS         ROLE      TERM  LEADER  COMMIT  APPLIED\n\
        1   127.0.0.1:7001  leader    3     1       1042    1042\n\
        2   127.0.0.1:7002  follower  3     1       1042    1042\n\
        3   127.0.0.1:7003  -         unreachable")]
    Status {
        /// `text` (default) or `json`: one JSON document `{leader, servers: [...]}` (see
        /// docs/operations.md).
        #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
        output: crate::output::Format,
        /// The same as `-o json`.
        #[arg(long)]
        json: bool,
    },
    /// Read commands from stdin, answer each (flushed, in order); `help` lists them.
    #[command(after_help = SHELL_HELP)]
    Shell,
    /// Run a command while holding a lock (the key `lock/NAME`, under a lease); exits with
    /// its status.
    #[command(after_help = crate::kv_lease_cmd::LOCK_HELP)]
    Lock(crate::kv_lease_cmd::LockArgs),
    /// Leases: grant, keep-alive, revoke, list. Keys put with a lease are deleted when it
    /// ends.
    Lease {
        #[command(subcommand)]
        sub: crate::kv_lease_cmd::LeaseSub,
    },
    /// Membership: list the servers, add one (as a learner), promote a learner, remove a
    /// server. Through the leader; see `kv member add --help` for replacing a server.
    Member {
        #[command(subcommand)]
        sub: crate::kv_member_cmd::MemberSub,
    },
    /// Backups: save a consistent snapshot of a running cluster to a file, check a file,
    /// restore it as the data directories of a new cluster.
    #[command(after_help = SNAPSHOT_HELP)]
    Snapshot {
        #[command(subcommand)]
        sub: SnapshotSub,
    },
}

/// `shoal kv snapshot --help`'s walk-through.
const SNAPSHOT_HELP: &str = "A backup and a restore into a new 3-server cluster:\n  \
    shoal kv snapshot save backup.db                 # from the leader of the running cluster\n  \
    shoal kv snapshot status backup.db               # verify it; print index, term, keys\n  \
    shoal kv snapshot restore backup.db --data n1 --id 1 --peers 1=h1:7001,2=h2:7001,3=h3:7001\n  \
    shoal kv snapshot restore backup.db --data n2 --id 2 --peers 1=h1:7001,2=h2:7001,3=h3:7001\n  \
    shoal kv snapshot restore backup.db --data n3 --id 3 --peers 1=h1:7001,2=h2:7001,3=h3:7001\n  \
    shoal kv server --id 1 --listen h1:7001 --peers 1=h1:7001,2=h2:7001,3=h3:7001 --data n1   # and 2, 3\n\
For `shoal kv up --dir D`, restore into D/node1, D/node2, D/node3 (ids 1, 2, 3) before \
starting it. Every server of the new cluster is restored from the same file.";

#[derive(Debug, clap::Subcommand)]
enum SnapshotSub {
    /// Save a consistent snapshot of the running cluster to FILE (from the leader, at an
    /// index it confirmed as committed); prints the index, keys and bytes.
    #[command(after_help = "Example:\n  shoal kv snapshot save backup.db\n  \
        saved backup.db: index 1042, term 3, 5000 keys, 812345 bytes (from server 1)\n\
        The file is written to FILE.tmp, fsynced and renamed: FILE is never half-written. \
        Every write acknowledged before the command started is in it. Reads and writes go on \
        while it is taken (the leader copies its store in O(1) and serializes the copy on \
        another thread).")]
    Save {
        /// The backup file to write (replaced if it exists).
        file: PathBuf,
        /// Seconds the transfer from the leader may take (--timeout bounds finding the
        /// leader).
        #[arg(long, default_value_t = 300.0)]
        transfer_timeout: f64,
    },
    /// Verify a backup file (magic, version, checksums, the state decodes) and print what it
    /// holds; exit status 1 if it is damaged.
    #[command(after_help = "Example:\n  shoal kv snapshot status backup.db\n  \
        shoal kv snapshot status backup.db -o json")]
    Status {
        /// The backup file.
        file: PathBuf,
        /// `text` (default) or `json`: one JSON document (see docs/operations.md).
        #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
        output: crate::output::Format,
    },
    /// Make the data directory of one server of a NEW cluster from a backup file (run it for
    /// every server, then start them). Refuses a damaged file and a non-empty --data.
    #[command(after_help = "Example (server 1 of 3):\n  \
        shoal kv snapshot restore backup.db --data n1 --id 1 --peers 1=h1:7001,2=h2:7001,3=h3:7001\n\
        --peers is the new cluster's membership, as `kv server --peers` takes it (plain \
        ADDR,ADDR,ADDR means ids 1, 2, 3); only the ids are recorded. The new cluster's id is \
        --cluster (default 1): start the servers with the same. Keys keep their versions; \
        client sessions and leases are restored too.")]
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The data directory to create (must be missing or empty).
        #[arg(long)]
        data: PathBuf,
        /// This server's id in the new cluster.
        #[arg(long)]
        id: u64,
        /// The new cluster's servers: ID=ADDR,ID=ADDR,… (or ADDR,ADDR,… for ids 1, 2, …).
        #[arg(long)]
        peers: String,
    },
}

/// The shell's commands and answers (`shoal kv shell --help`, and its `help` command).
const SHELL_HELP: &str = r#"Commands and answers (one line each unless said otherwise):
  get KEY                        -> value VERSION VALUE | nokey
  put KEY EXPECTED_VERSION VALUE -> ok NEW_VERSION | mismatch | nokey | maybe
  del KEY EXPECTED_VERSION       -> deleted | mismatch | nokey | maybe
  scan [START [END]] [LIMIT]     -> scanned N, then N lines KEY VERSION VALUE
  status                         -> servers N, then N lines
                                    ID ADDRESS ROLE TERM LEADER COMMIT APPLIED
                                    (or ID ADDRESS unreachable REASON)
  help                           -> help N, then N lines of this text
VALUE is the rest of the line; EXPECTED_VERSION may be `any`; words are separated by spaces.
A key or value with spaces, newlines or other bytes is written as a C-style quoted string,
e.g. "my key" or "line1\nline2\xff" (escapes \n \r \t \0 \\ \" \xHH); bare words are taken
as they are. Answers quote a key or value the same way when it is not plain text. In scan,
a last bare number is the LIMIT (quote a numeric key: scan "10").
No answer within --timeout -> timeout (the outcome is unknown). A malformed line -> error
MESSAGE; the shell never exits on a bad line.
Example:
  printf 'put k 0 hello\nget k\n' | shoal kv shell"#;

/// Arguments of `shoal kv server`.
#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// Hidden shadows of the client options (see [`NotForServers`]).
    #[command(flatten)]
    _client_only: NotForServers,
    #[arg(long = "dir", id = "dir", hide = true)]
    _client_dir: Option<PathBuf>,
    /// This server's id: one of the ids in --peers.
    #[arg(long)]
    id: u64,
    /// Address serving both peers and clients (HOST:PORT; a host name or an IP).
    #[arg(long, value_parser = crate::cli::parse_addr)]
    listen: SocketAddr,
    /// Every server of a new cluster, this one included: ID=ADDR,ID=ADDR,… (the first start
    /// of its servers; later starts read the membership from --data).
    #[arg(long, value_parser = crate::cli::parse_peer, value_delimiter = ',', conflicts_with = "join")]
    peers: Vec<(u64, SocketAddr)>,
    /// Join a running cluster through any of its servers: ADDR,ADDR,… Add this server with
    /// `shoal kv member add ID ADDR --learner` (before or after starting it).
    #[arg(long, value_parser = crate::cli::parse_addr, value_delimiter = ',')]
    join: Vec<SocketAddr>,
    /// Data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Snapshot (and drop the log) when the log and hard state exceed this many bytes
    /// (0: never).
    ///
    /// The default, 64 MiB, is about etcd's default of 100,000 entries at 256-byte values. A
    /// snapshot is serialized and written by a thread of its own from an O(1) copy of the store,
    /// so the server keeps answering; a smaller threshold costs disk I/O, not pauses.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    snapshot_bytes: u64,
    /// Milliseconds per Raft tick. The leader sends a heartbeat every tick; a follower that
    /// hears nothing for 10 to 20 ticks (drawn at random) starts an election, so the default
    /// replaces a crashed leader in about 250-500 ms.
    #[arg(long, default_value_t = 25)]
    tick_ms: u64,
    /// Largest key in bytes.
    #[arg(long, default_value_t = shoal_kv::store::DEFAULT_MAX_KEY_BYTES)]
    max_key_bytes: usize,
    /// Largest value in bytes.
    #[arg(long, default_value_t = shoal_kv::store::DEFAULT_MAX_VALUE_BYTES)]
    max_value_bytes: usize,
    #[command(flatten)]
    obs: crate::obs::ServerObsArgs,
    /// TLS (see below).
    #[command(flatten)]
    tls: crate::tls_cmd::ServerTlsArgs,
}

/// Runs `shoal kv …`.
pub fn run(cmd: KvCommand) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(cmd))
}

async fn run_async(cmd: KvCommand) -> Result<ExitCode> {
    if !(cmd.timeout.is_finite() && cmd.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    let timeout = Duration::from_secs_f64(cmd.timeout);
    let (cluster, serializable) = (cmd.cluster, cmd.serializable);
    let (endpoints, controller, dir) = (cmd.endpoints, cmd.controller, cmd.dir);
    // Not for `kv server` and `kv up`, which have their own TLS settings.
    // A cluster found through its directory (`kv up --tls`) brings its certificates.
    let tls_dir = (endpoints.is_empty() && controller.is_empty())
        .then(|| dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DIR)));
    let security = || cmd.tls.security(tls_dir.as_deref());
    // One group's client, for what only one group can do (status, leases).
    let one = |endpoints: Vec<SocketAddr>| -> Result<Client> {
        let mut config = ClientConfig::new(endpoints);
        config.cluster_id = cluster;
        config.op_timeout = timeout;
        config.serializable_reads = serializable;
        config.security = security()?;
        Ok(Client::new(config)?)
    };
    let target = || client_target(endpoints.clone(), controller.clone(), dir.as_deref());
    let client = || -> Result<AnyClient> {
        Ok(match target()? {
            Target::Group(e) => AnyClient::Group(Box::new(one(e)?)),
            Target::Sharded(store) => {
                let mut config = ShardClientConfig::new(store);
                config.cluster_id = cluster;
                config.op_timeout = timeout;
                config.serializable_reads = serializable;
                config.security = security()?;
                AnyClient::Sharded(Box::new(ShardClient::new(config)?))
            }
        })
    };
    match cmd.command {
        KvSub::Server(args) => server(args, cmd.cluster).await,
        KvSub::Up(args) => crate::kv_up::up(args).await,
        // --raw and --version conflict with -o json.
        KvSub::Get {
            key,
            output: crate::output::Format::Json,
            ..
        } => {
            let found = client()?.get(key.as_bytes()).await?;
            let code = if found.is_some() { 0 } else { 1 };
            crate::output::print_json(&GetJson::new(key.as_bytes(), found))?;
            Ok(ExitCode::from(code))
        }
        KvSub::Get {
            key, version, raw, ..
        } => {
            let mut c = client()?;
            match c.get(key.as_bytes()).await? {
                Some((value, v)) => {
                    let mut out = std::io::stdout().lock();
                    if version {
                        write!(out, "{v} ")?;
                    }
                    out.write_all(&value)?;
                    if !raw {
                        writeln!(out)?;
                    }
                    out.flush()?;
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("no such key: {}", kv_text::key(key.as_bytes()));
                    Ok(ExitCode::from(1))
                }
            }
        }
        KvSub::Put {
            key,
            value,
            file,
            expect,
            lease,
        } => {
            let value = put_value(value, file.as_deref())?;
            let mut c = client()?;
            let expected = expect.map_or(Expected::Any, Expected::Version);
            // A plain put answers as a leased one would, so one match prints both.
            let outcome = match (lease, &mut c) {
                (Some(lease), AnyClient::Group(c)) => {
                    c.put_with_lease(key.as_bytes(), &value, expected, lease)
                        .await?
                }
                (Some(_), AnyClient::Sharded(_)) => bail!(
                    "--lease: a sharded cluster has no leases (a key's lease would have to \
                     move with its shard); nothing stored"
                ),
                (None, c) => c.put(key.as_bytes(), &value, expected).await?.into(),
            };
            match outcome {
                LeasePutOutcome::Written(v) => {
                    println!("ok {v}");
                    Ok(ExitCode::SUCCESS)
                }
                LeasePutOutcome::Mismatch => fail("version mismatch: nothing stored"),
                LeasePutOutcome::NoKey => fail("no such key: nothing stored"),
                LeasePutOutcome::LeaseNotFound => fail(&format!(
                    "lease {} not found (expired or revoked): nothing stored",
                    lease.unwrap_or_default()
                )),
                LeasePutOutcome::Maybe => fail("maybe: a retried put may or may not have applied"),
            }
        }
        KvSub::Del { key, expect } => {
            let mut c = client()?;
            let expected = expect.map_or(Expected::Any, Expected::Version);
            match c.delete(key.as_bytes(), expected).await? {
                DeleteOutcome::Deleted => {
                    println!("deleted");
                    Ok(ExitCode::SUCCESS)
                }
                DeleteOutcome::Mismatch => fail("version mismatch: nothing deleted"),
                DeleteOutcome::NoKey => fail("no such key"),
                DeleteOutcome::Maybe => fail("maybe: a retried delete may or may not have applied"),
            }
        }
        KvSub::Scan {
            start,
            end,
            limit,
            output,
        } => {
            let mut c = client()?;
            let start = start.unwrap_or_default();
            let items = c
                .scan(start.as_bytes(), end.as_ref().map(|e| e.as_bytes()), limit)
                .await?;
            if output == crate::output::Format::Json {
                let items: Vec<ItemJson> = items.iter().map(ItemJson::new).collect();
                crate::output::print_json(&ScanJson {
                    count: items.len(),
                    items,
                })?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut out = std::io::stdout().lock();
            for item in items {
                writeln!(
                    out,
                    "{} {} {}",
                    kv_text::key(&item.key),
                    item.version,
                    kv_text::value(&item.value)
                )?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        KvSub::Status { output, json } => match target()? {
            Target::Group(e) => {
                let json = json || output == crate::output::Format::Json;
                status(&one(e)?, timeout, json).await
            }
            Target::Sharded(_) => bail!(
                "`kv status` shows one group's servers; for a sharded cluster run `shoal \
                 shard status` (groups, leaders, migrations), or `kv status --endpoints` with \
                 one group's servers"
            ),
        },
        KvSub::Shell => shell(client()?, timeout).await,
        // A sharded cluster's locks live in its controller store (a Shoal KV cluster with
        // leases), not in a group: a lock's lease cannot move with a shard.
        KvSub::Lock(args) => {
            let store = target()?.addrs();
            crate::kv_lease_cmd::lock(|| one(store.clone()), args).await
        }
        KvSub::Snapshot { sub } => match sub {
            SnapshotSub::Save {
                file,
                transfer_timeout,
            } => {
                if !(transfer_timeout.is_finite() && transfer_timeout > 0.0) {
                    bail!("--transfer-timeout must be a positive number of seconds");
                }
                let Target::Group(e) = target()? else {
                    bail!(
                        "`kv snapshot save` backs up one group (--endpoints); a sharded \
                         cluster has no backup command yet"
                    );
                };
                snapshot_save(
                    one(e)?,
                    &file,
                    cluster,
                    Duration::from_secs_f64(transfer_timeout),
                )
                .await
            }
            SnapshotSub::Status { file, output } => snapshot_status(&file, output),
            SnapshotSub::Restore {
                file,
                data,
                id,
                peers,
            } => {
                let voters = crate::kv_backup::peer_ids(&peers)?;
                let r = crate::kv_backup::restore(&file, &data, id, &voters, Some(cluster))?;
                println!(
                    "restored {} into {}: server {id} of {voters:?} in cluster {cluster}, \
                     index {}, term {}, {} keys",
                    file.display(),
                    data.display(),
                    r.header.index,
                    r.header.term,
                    r.keys
                );
                Ok(ExitCode::SUCCESS)
            }
        },
        KvSub::Member { sub } => match target()? {
            Target::Group(e) => crate::kv_member_cmd::member(one(e)?, sub).await,
            Target::Sharded(_) => bail!(
                "`kv member` changes one KV cluster's servers; a sharded cluster's groups are \
                 not changed this way"
            ),
        },
        KvSub::Lease { sub } => match target()? {
            Target::Group(e) => crate::kv_lease_cmd::lease(one(e)?, sub).await,
            Target::Sharded(_) => bail!(
                "a sharded cluster has no leases for keys (`kv lock` works: its lock lives in \
                 the controller store)"
            ),
        },
    }
}

/// `kv snapshot save`: a backup from the leader, written to `file` (via `file.tmp`).
async fn snapshot_save(
    client: Client,
    file: &Path,
    cluster: u64,
    transfer_timeout: Duration,
) -> Result<ExitCode> {
    let backup = client
        .backup(
            shoal_runtime::kv::DEFAULT_MAX_BACKUP_BYTES,
            transfer_timeout,
        )
        .await?;
    // Proves the state decodes before we call it a backup, and counts its keys.
    let keys = crate::kv_backup::decode_state(&backup.data)
        .context("the leader's snapshot")?
        .len();
    #[allow(clippy::disallowed_methods)] // the CLI: a wall-clock date for the file's header
    let saved_unix_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = crate::kv_backup::BackupHeader {
        cluster_id: cluster,
        server: backup.server,
        index: backup.index,
        term: backup.term,
        voters: backup.voters,
        data_len: 0,
        saved_unix_secs,
        shoal_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let (index, term, server) = (header.index, header.term, header.server);
    let bytes = crate::kv_backup::write_file(file, header, &backup.data)?;
    println!(
        "saved {}: index {index}, term {term}, {keys} keys, {bytes} bytes (from server {server})",
        file.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// What `kv snapshot status -o json` prints.
#[derive(Debug, serde::Serialize)]
struct SnapshotStatusJson {
    file: String,
    format_version: u32,
    cluster_id: u64,
    server: u64,
    index: u64,
    term: u64,
    voters: Vec<u64>,
    keys: usize,
    data_bytes: u64,
    sessions: usize,
    leases: usize,
    saved_unix_secs: u64,
    shoal_version: String,
}

/// `kv snapshot status`: verifies a backup file and prints its header and contents' size.
fn snapshot_status(file: &Path, output: crate::output::Format) -> Result<ExitCode> {
    let (header, data) = match crate::kv_backup::read_file(file) {
        Ok(x) => x,
        Err(e) => return fail(&format!("{e:#}")),
    };
    let store = match crate::kv_backup::decode_state(&data) {
        Ok(s) => s,
        Err(e) => return fail(&format!("{}: {e}", file.display())),
    };
    let status = SnapshotStatusJson {
        file: file.display().to_string(),
        format_version: crate::kv_backup::FORMAT_VERSION,
        cluster_id: header.cluster_id,
        server: header.server,
        index: header.index,
        term: header.term,
        voters: header.voters,
        keys: store.len(),
        data_bytes: header.data_len,
        sessions: store.session_count(),
        leases: store.leases().len(),
        saved_unix_secs: header.saved_unix_secs,
        shoal_version: header.shoal_version,
    };
    match output {
        crate::output::Format::Json => crate::output::print_json(&status)?,
        crate::output::Format::Text => {
            println!("ok: checksums match, the state decodes");
            println!(
                "cluster {}, saved from server {}",
                status.cluster_id, status.server
            );
            println!(
                "index {}, term {}, voters {:?}",
                status.index, status.term, status.voters
            );
            println!(
                "{} keys, {} sessions, {} leases, {} bytes of state",
                status.keys, status.sessions, status.leases, status.data_bytes
            );
            println!(
                "saved at {} (Unix seconds) by shoal {}",
                status.saved_unix_secs, status.shoal_version
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The cluster a client command talks to.
enum Target {
    /// One group (one Raft cluster): its servers.
    Group(Vec<SocketAddr>),
    /// A sharded cluster: its controller store's servers.
    Sharded(Vec<SocketAddr>),
}

impl Target {
    fn addrs(self) -> Vec<SocketAddr> {
        match self {
            Target::Group(a) | Target::Sharded(a) => a,
        }
    }
}

/// The cluster a client command talks to: --endpoints (or $SHOAL_ENDPOINTS, which clap reads
/// into the same list) or --controller ($SHOAL_CONTROLLER), else DIR/endpoints or
/// DIR/controller of --dir, else ./shoal-data/endpoints, else ./shoal-shard/controller.
fn client_target(
    endpoints: Vec<SocketAddr>,
    controller: Vec<SocketAddr>,
    dir: Option<&Path>,
) -> Result<Target> {
    if !endpoints.is_empty() {
        return Ok(Target::Group(endpoints));
    }
    if !controller.is_empty() {
        return Ok(Target::Sharded(controller));
    }
    let controller_file = crate::shard_cmd::CONTROLLER_FILE;
    if let Some(dir) = dir {
        let sharded = dir.join(controller_file);
        if !dir.join(ENDPOINTS_FILE).exists() && sharded.exists() {
            return Ok(Target::Sharded(read_endpoints(&sharded)?));
        }
        return read_endpoints(&dir.join(ENDPOINTS_FILE))
            .map(Target::Group)
            .with_context(|| {
                format!(
                    "--dir {}: no cluster there (start one with `shoal kv up --dir {}` or \
                     `shoal shard up --dir {}`)",
                    dir.display(),
                    dir.display(),
                    dir.display()
                )
            });
    }
    let default = Path::new(DEFAULT_DIR).join(ENDPOINTS_FILE);
    if default.exists() {
        return read_endpoints(&default).map(Target::Group);
    }
    let sharded = Path::new(crate::shard_cmd::DEFAULT_DIR).join(controller_file);
    if sharded.exists() {
        return read_endpoints(&sharded).map(Target::Sharded);
    }
    bail!(
        "no cluster to talk to: give --endpoints A,B,C (or SHOAL_ENDPOINTS=A,B,C), or \
         --controller A,B,C for a sharded cluster (or SHOAL_CONTROLLER), or --dir DIR of a \
         cluster started with `shoal kv up --dir DIR` or `shoal shard up --dir DIR` (there is \
         no ./{DEFAULT_DIR}/{ENDPOINTS_FILE} here, nor ./{}/{controller_file})",
        crate::shard_cmd::DEFAULT_DIR
    )
}

/// A client of one group or of a sharded cluster: the same operations and outcomes.
enum AnyClient {
    Group(Box<Client>),
    Sharded(Box<ShardClient>),
}

impl AnyClient {
    async fn get(&mut self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        match self {
            AnyClient::Group(c) => c.get(key).await,
            AnyClient::Sharded(c) => c.get(key).await,
        }
    }

    async fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        expected: Expected,
    ) -> Result<PutOutcome, ClientError> {
        match self {
            AnyClient::Group(c) => c.put(key, value, expected).await,
            AnyClient::Sharded(c) => c.put(key, value, expected).await,
        }
    }

    async fn delete(
        &mut self,
        key: &[u8],
        expected: Expected,
    ) -> Result<DeleteOutcome, ClientError> {
        match self {
            AnyClient::Group(c) => c.delete(key, expected).await,
            AnyClient::Sharded(c) => c.delete(key, expected).await,
        }
    }

    async fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<shoal_wire::kv::ScanItem>, ClientError> {
        match self {
            AnyClient::Group(c) => c.scan(start, end, limit).await,
            AnyClient::Sharded(c) => c.scan(start, end, limit).await,
        }
    }

    async fn execute_within(
        &mut self,
        op: KvOp,
        timeout: Duration,
    ) -> Result<Outcome, ClientError> {
        match self {
            AnyClient::Group(c) => c.execute_within(op, timeout).await,
            AnyClient::Sharded(c) => c.execute_within(op, timeout).await,
        }
    }
}

/// The value of `kv put`: the argument, stdin for `-`, or the file's bytes; at most
/// [`MAX_CLI_VALUE_BYTES`] read (the servers enforce their own limit, usually lower).
fn put_value(value: Option<OsString>, file: Option<&Path>) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let (mut reader, what): (Box<dyn std::io::Read>, String) = match (value, file) {
        (_, Some(path)) => (
            Box::new(
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
            ),
            path.display().to_string(),
        ),
        (Some(v), None) if v == "-" => (Box::new(std::io::stdin().lock()), "stdin".into()),
        (Some(v), None) => return Ok(v.into_vec()),
        (None, None) => bail!("no value: give VALUE, `-` for stdin, or --file FILE"),
    };
    let mut bytes = Vec::new();
    // One byte more than the limit tells "at the limit" from "over it" without reading all.
    (&mut reader)
        .take(MAX_CLI_VALUE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the value from {what}"))?;
    if bytes.len() > MAX_CLI_VALUE_BYTES {
        bail!(
            "the value from {what} is larger than {} bytes, the most a value may be \
             (servers' --max-value-bytes defaults to {})",
            MAX_CLI_VALUE_BYTES,
            shoal_kv::store::DEFAULT_MAX_VALUE_BYTES
        );
    }
    Ok(bytes)
}

/// `shoal kv status`: one line (or JSON object) per endpoint.
async fn status(client: &Client, timeout: Duration, json: bool) -> Result<ExitCode> {
    let statuses = client.statuses(timeout).await;
    let leader = statuses
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .filter(|s| s.role == ServerRole::Leader)
        .max_by_key(|s| s.term)
        .map(|s| s.id);
    let code = if leader.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    if json {
        let servers = statuses
            .iter()
            .zip(client.endpoints())
            .enumerate()
            .map(|(i, (s, addr))| match s {
                Ok(s) => ServerJson {
                    id: s.id,
                    address: addr.to_string(),
                    role: Some(s.role.to_string()),
                    term: Some(s.term),
                    leader: s.leader,
                    commit: Some(s.commit),
                    applied: Some(s.applied),
                    last_index: Some(s.last_index),
                    error: None,
                },
                Err(e) => ServerJson {
                    id: i as u64 + 1,
                    address: addr.to_string(),
                    role: None,
                    term: None,
                    leader: None,
                    commit: None,
                    applied: None,
                    last_index: None,
                    error: Some(e.to_string()),
                },
            })
            .collect();
        crate::output::print_json(&StatusJson { leader, servers })?;
        return Ok(code);
    }
    let mut out = std::io::stdout().lock();
    let header = format!(
        "{:<4}{:<22}{:<15}{:<8}{:<8}{:<10}{}",
        "ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"
    );
    writeln!(out, "{header}")?;
    for (i, (s, addr)) in statuses.iter().zip(client.endpoints()).enumerate() {
        match s {
            Ok(s) => {
                let lead = s.leader.map_or("-".to_string(), |l| l.to_string());
                writeln!(
                    out,
                    "{:<4}{:<22}{:<15}{:<8}{:<8}{:<10}{}",
                    s.id,
                    addr.to_string(),
                    s.role.to_string(),
                    s.term,
                    lead,
                    s.commit,
                    s.applied
                )?;
            }
            Err(e) => writeln!(out, "{:<4}{:<22}{:<15}{e}", i + 1, addr.to_string(), "-")?,
        }
    }
    Ok(code)
}

/// `kv status -o json`.
#[derive(Debug, serde::Serialize)]
struct StatusJson {
    /// The server answering as leader (the highest term's), if any.
    leader: Option<u64>,
    /// Every endpoint, in the order given.
    servers: Vec<ServerJson>,
}

/// One server of [`StatusJson`]: its status, or `error` (the other fields null).
#[derive(Debug, serde::Serialize)]
struct ServerJson {
    id: u64,
    address: String,
    /// `leader`, `follower`, `pre-candidate` or `candidate`.
    role: Option<String>,
    term: Option<u64>,
    /// The leader it knows of.
    leader: Option<u64>,
    commit: Option<u64>,
    applied: Option<u64>,
    last_index: Option<u64>,
    /// Why it did not answer.
    error: Option<String>,
}

/// `kv get -o json`: `value` is the UTF-8 text (else null, and `value_hex`); likewise `key`.
#[derive(Debug, serde::Serialize)]
struct GetJson {
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_hex: Option<String>,
    found: bool,
    version: Option<u64>,
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
}

impl GetJson {
    fn new(key: &[u8], found: Option<(Vec<u8>, u64)>) -> GetJson {
        let (key, key_hex) = crate::output::text_or_hex(key);
        let (value, value_hex, version) = match &found {
            Some((v, version)) => {
                let (t, h) = crate::output::text_or_hex(v);
                (t, h, Some(*version))
            }
            None => (None, None, None),
        };
        GetJson {
            key,
            key_hex,
            found: found.is_some(),
            version,
            value,
            value_hex,
        }
    }
}

/// `kv scan -o json`.
#[derive(Debug, serde::Serialize)]
struct ScanJson {
    count: usize,
    items: Vec<ItemJson>,
}

/// One pair of [`ScanJson`] (text or hex as in [`GetJson`]).
#[derive(Debug, serde::Serialize)]
struct ItemJson {
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_hex: Option<String>,
    version: u64,
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
}

impl ItemJson {
    fn new(item: &shoal_wire::kv::ScanItem) -> ItemJson {
        let (key, key_hex) = crate::output::text_or_hex(&item.key);
        let (value, value_hex) = crate::output::text_or_hex(&item.value);
        ItemJson {
            key,
            key_hex,
            version: item.version,
            value,
            value_hex,
        }
    }
}

fn fail(message: &str) -> Result<ExitCode> {
    eprintln!("{message}");
    Ok(ExitCode::from(1))
}

pub(crate) fn read_endpoints(path: &Path) -> Result<Vec<SocketAddr>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let endpoints = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            crate::cli::parse_addr(l)
                .with_context(|| format!("{}: bad address {l:?}", path.display()))
        })
        .collect::<Result<Vec<SocketAddr>>>()?;
    if endpoints.is_empty() {
        bail!("{} lists no endpoints", path.display());
    }
    Ok(endpoints)
}

/// The client-only options of `shoal kv`, shadowed in `kv server` and `kv up` so that their
/// `--help` lists only what applies to them (clap does not propagate a global option to a
/// subcommand that has an argument of the same id). Their values are not used there. They are
/// not refused either: clap also hands a global's environment value (`$SHOAL_ENDPOINTS`) and
/// the parent's values down to these shadows, so "given here" cannot be told from "exported
/// for the clients", and a server must start in a shell set up for clients.
#[derive(Debug, clap::Args)]
pub(crate) struct NotForServers {
    // Same value types as the client options: clap hands values of a global id between the
    // parent and the subcommand, each side reading them as its own type.
    #[arg(long = "endpoints", id = "endpoints", hide = true, value_delimiter = ',',
          value_parser = crate::cli::parse_addr)]
    endpoints: Vec<SocketAddr>,
    #[arg(long = "controller", id = "controller", hide = true, value_delimiter = ',',
          value_parser = crate::cli::parse_addr)]
    controller: Vec<SocketAddr>,
    #[arg(long = "timeout", id = "timeout", hide = true)]
    timeout: Option<f64>,
    #[arg(long = "serializable", id = "serializable", hide = true)]
    serializable: bool,
}

async fn server(args: ServerArgs, cluster: u64) -> Result<ExitCode> {
    let security = args.tls.security(args.listen)?;
    let recorded = shoal_runtime::kv::server::read_joined(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    // The storage's identity file: the directory holds a server's data.
    let has_data = args.data.join("identity").exists();
    let (peers, joined, listener) = match (recorded, args.peers.is_empty()) {
        (Some(_), false) => bail!(
            "{} belongs to a server that joined a running cluster (--join): start it \
             without --peers; its membership is in the data directory",
            args.data.display()
        ),
        (Some(mut recorded), true) => {
            recorded.insert(args.id, args.listen);
            (recorded, true, None)
        }
        (None, true) if has_data => bail!(
            "{} was started with --peers: start it with the same --peers again",
            args.data.display()
        ),
        (None, true) if args.join.is_empty() => bail!(
            "give --peers ID=ADDR,… to start a new cluster's server, or --join ADDR,… to add \
             this server to a running cluster"
        ),
        (None, true) => {
            // Listen first: the leader may already try to reach us.
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            let peers = crate::kv_member_cmd::wait_until_added(
                args.id,
                args.listen,
                &args.join,
                cluster,
                security.clone(),
            )
            .await?;
            (peers, true, Some(listener))
        }
        (None, false) => (args.peers.into_iter().collect(), false, None),
    };
    server_with(
        args.id,
        args.listen,
        args.data.clone(),
        peers,
        joined,
        listener,
        cluster,
        (args.obs.metrics, security),
        (
            args.tick_ms,
            args.snapshot_bytes,
            args.max_key_bytes,
            args.max_value_bytes,
        ),
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn server_with(
    id: u64,
    listen: SocketAddr,
    data: PathBuf,
    peers: BTreeMap<u64, SocketAddr>,
    joined: bool,
    listener: Option<tokio::net::TcpListener>,
    cluster: u64,
    (metrics, security): (Option<SocketAddr>, shoal_runtime::tls::Security),
    (tick_ms, snapshot_bytes, max_key_bytes, max_value_bytes): (u64, u64, usize, usize),
) -> Result<ExitCode> {
    let args = ServerArgsLite {
        metrics,
        security,
        id,
        listen,
        data,
        tick_ms,
        snapshot_bytes,
        max_key_bytes,
        max_value_bytes,
    };
    let Some(&own) = peers.get(&args.id) else {
        bail!("--id {} is not one of the --peers", args.id);
    };
    // The others reach this server at its --peers entry: listening anywhere else would leave
    // it unreachable (a port on all interfaces, 0.0.0.0 or [::], serves that entry too).
    if own.port() != args.listen.port()
        || !(args.listen.ip().is_unspecified() || own.ip() == args.listen.ip())
    {
        bail!(
            "--listen {} differs from this server's own --peers entry {}={own}: the other \
             servers would look for it at {own}",
            args.listen,
            args.id
        );
    }
    let mut config = KvServerConfig::new(args.id, cluster, peers, args.data.clone());
    config.joined = joined;
    config.transport.security = args.security;
    config.tick_interval = Duration::from_millis(args.tick_ms.max(1));
    config.rsm.snapshot_bytes = (args.snapshot_bytes > 0).then_some(args.snapshot_bytes);
    config.rsm.limits.max_key_bytes = args.max_key_bytes;
    config.rsm.limits.max_value_bytes = args.max_value_bytes;
    // The same command run twice would fail on the port before the directory: say what
    // matters. (Only a probe: the server's storage takes the lock for good below.)
    if args.data.join(shoal_storage::LOCK_FILE).exists() {
        use shoal_storage::Disk as _;
        let mut disk = shoal_storage::StdDisk::new(&args.data)
            .with_context(|| format!("opening {}", args.data.display()))?;
        if let Err(e @ shoal_storage::DiskError::Locked { .. }) = disk.lock() {
            return Err(e).with_context(|| format!("kv server {}", args.id));
        }
    }
    let listener = match listener {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?,
    };
    crate::obs::start_server_metrics(args.metrics, shoal_runtime::metrics::ServerKind::Kv).await?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    tracing::info!(node = args.id, listen = %args.listen, "kv server starting");
    run_server(config, listener, shutdown)
        .await
        .with_context(|| format!("kv server {}", args.id))?;
    Ok(ExitCode::SUCCESS)
}

/// What [`server_with`] needs of [`ServerArgs`].
struct ServerArgsLite {
    metrics: Option<SocketAddr>,
    security: shoal_runtime::tls::Security,
    id: u64,
    listen: SocketAddr,
    data: PathBuf,
    tick_ms: u64,
    snapshot_bytes: u64,
    max_key_bytes: usize,
    max_value_bytes: usize,
}

/// `shoal kv shell`: one line in, one line out.
async fn shell(mut client: AnyClient, timeout: Duration) -> Result<ExitCode> {
    // Stdin is read on a thread of its own (blocking reads), one line at a time.
    let (tx, mut lines) = tokio::sync::mpsc::channel::<std::io::Result<String>>(1);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        loop {
            let mut buf = Vec::new();
            let line = match input.read_until(b'\n', &mut buf) {
                Ok(0) => return,
                Ok(_) => {
                    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        buf.pop();
                    }
                    String::from_utf8(buf).map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8")
                    })
                }
                Err(e) => Err(e),
            };
            let fatal = matches!(&line, Err(e) if e.kind() != std::io::ErrorKind::InvalidData);
            if tx.blocking_send(line).is_err() || fatal {
                return;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                answer(&format!("error unreadable line: {e}"))?;
                continue;
            }
        };
        let reply = match parse_shell_line(&line) {
            Ok(None) => continue,
            Ok(Some(ShellCmd::Op(op))) => match client.execute_within(op.clone(), timeout).await {
                Ok(outcome) => shell_answer(&op, outcome),
                Err(shoal_runtime::kv::ClientError::Timeout { .. }) => "timeout".to_string(),
                Err(e) => format!("error {}", one_line(&e.to_string())),
            },
            Ok(Some(ShellCmd::Scan { start, end, limit })) => {
                match client.scan(&start, end.as_deref(), limit).await {
                    Ok(items) => {
                        let mut reply = format!("scanned {}", items.len());
                        for item in items {
                            reply.push_str(&format!(
                                "\n{} {} {}",
                                kv_text::key(&item.key),
                                item.version,
                                kv_text::value(&item.value)
                            ));
                        }
                        reply
                    }
                    Err(shoal_runtime::kv::ClientError::Timeout { .. }) => "timeout".to_string(),
                    Err(e) => format!("error {}", one_line(&e.to_string())),
                }
            }
            Ok(Some(ShellCmd::Status)) => {
                let AnyClient::Group(client) = &client else {
                    answer(
                        "error status shows one group's servers: for a sharded cluster run \
                         `shoal shard status`",
                    )?;
                    continue;
                };
                let statuses = client.statuses(timeout).await;
                let mut reply = format!("servers {}", statuses.len());
                for (i, (s, addr)) in statuses.iter().zip(client.endpoints()).enumerate() {
                    reply.push('\n');
                    match s {
                        Ok(s) => reply.push_str(&format!(
                            "{} {addr} {} {} {} {} {}",
                            s.id,
                            s.role,
                            s.term,
                            s.leader.map_or("-".to_string(), |l| l.to_string()),
                            s.commit,
                            s.applied
                        )),
                        Err(e) => reply.push_str(&format!(
                            "{} {addr} unreachable {}",
                            i + 1,
                            one_line(&e.to_string())
                        )),
                    }
                }
                reply
            }
            Ok(Some(ShellCmd::Help)) => {
                let lines: Vec<&str> = SHELL_HELP.lines().collect();
                format!("help {}\n{}", lines.len(), lines.join("\n"))
            }
            Err(message) => format!("error {}", one_line(&message)),
        };
        answer(&reply)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A message on one line (an answer of the shell is never split by an error's text).
fn one_line(message: &str) -> String {
    message.replace(['\n', '\r'], " ")
}

fn answer(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("writing to stdout")?;
    out.flush().context("writing to stdout")
}

/// One command of the shell.
#[derive(Debug, Clone, PartialEq)]
enum ShellCmd {
    /// get, put or del.
    Op(KvOp),
    /// scan [START [END]] [LIMIT].
    Scan {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: u32,
    },
    /// status.
    Status,
    /// help.
    Help,
}

/// Parses one shell line; `Ok(None)` for a blank line.
fn parse_shell_line(line: &str) -> std::result::Result<Option<ShellCmd>, String> {
    if line.len() > MAX_SHELL_LINE_BYTES {
        return Err(format!("line longer than {MAX_SHELL_LINE_BYTES} bytes"));
    }
    let Some((cmd, rest)) = kv_text::next_word(line)? else {
        return Ok(None);
    };
    let version = |w: &kv_text::Word| -> std::result::Result<Expected, String> {
        let v = w.text().unwrap_or_default();
        if v == "any" {
            return Ok(Expected::Any);
        }
        v.parse().map(Expected::Version).map_err(|_| {
            format!(
                "expected version {} is not a number or `any`",
                kv_text::key(&w.bytes)
            )
        })
    };
    // The remaining words of the line (a value is never read through this).
    let words = |mut rest: &str| -> std::result::Result<Vec<kv_text::Word>, String> {
        let mut words = Vec::new();
        while let Some((w, r)) = kv_text::next_word(rest)? {
            words.push(w);
            rest = r;
        }
        Ok(words)
    };
    match cmd.text().filter(|_| !cmd.quoted).unwrap_or_default() {
        "get" => match words(rest)?.as_slice() {
            [key] => Ok(Some(ShellCmd::Op(KvOp::Get {
                key: key.bytes.clone(),
            }))),
            _ => Err("usage: get KEY".into()),
        },
        "put" => {
            let usage = || "usage: put KEY EXPECTED_VERSION VALUE".to_string();
            let (key, rest) = kv_text::next_word(rest)?.ok_or_else(usage)?;
            let (v, rest) = kv_text::next_word(rest)?.ok_or_else(usage)?;
            Ok(Some(ShellCmd::Op(KvOp::Put {
                key: key.bytes,
                value: kv_text::rest_value(rest)?,
                expected: version(&v)?,
            })))
        }
        "del" => match words(rest)?.as_slice() {
            [key, v] => Ok(Some(ShellCmd::Op(KvOp::Delete {
                key: key.bytes.clone(),
                expected: version(v)?,
            }))),
            _ => Err("usage: del KEY EXPECTED_VERSION".into()),
        },
        "scan" => {
            let mut words = words(rest)?;
            let mut limit = shoal_runtime::kv::client::DEFAULT_SCAN_LIMIT;
            // A last bare number is the limit; a numeric key is written quoted.
            if let Some(n) = words
                .last()
                .filter(|w| !w.quoted)
                .and_then(|w| w.text()?.parse::<u32>().ok())
            {
                limit = n;
                words.pop();
            }
            let mut words = words.into_iter();
            let start = words.next().map(|w| w.bytes).unwrap_or_default();
            let end = words.next().map(|w| w.bytes);
            if words.next().is_some() {
                return Err("usage: scan [START [END]] [LIMIT]".into());
            }
            Ok(Some(ShellCmd::Scan { start, end, limit }))
        }
        "status" | "help" if !words(rest)?.is_empty() => {
            Err(format!("usage: {}", cmd.text().unwrap_or_default()))
        }
        "status" => Ok(Some(ShellCmd::Status)),
        "help" => Ok(Some(ShellCmd::Help)),
        _ => Err(format!(
            "unknown command {} (get, put, del, scan, status, help)",
            kv_text::key(&cmd.bytes)
        )),
    }
}

fn shell_answer(op: &KvOp, outcome: Outcome) -> String {
    match outcome {
        Outcome::Maybe => "maybe".into(),
        Outcome::Done(result) => match result {
            KvResult::Found { value, version } => {
                format!("value {version} {}", kv_text::value(&value))
            }
            KvResult::NoKey => "nokey".into(),
            KvResult::Written { version } => format!("ok {version}"),
            KvResult::Deleted => "deleted".into(),
            KvResult::VersionMismatch => "mismatch".into(),
            KvResult::TooLarge { what, bytes, limit } => {
                format!("error {what} of {bytes} bytes exceeds the limit of {limit}")
            }
            other => format!("error unexpected answer to {op:?}: {other:?}"),
        },
    }
}
