//! `shoal kv …`: the key/value database — servers, a local cluster, and the client commands.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use shoal_kv::{Lock, Outcome};
use shoal_runtime::kv::{
    run_server, Client, ClientConfig, DeleteOutcome, KvServerConfig, PutOutcome,
};
use shoal_wire::kv::{Expected, KvOp, KvResult, ServerRole};
use std::io::BufRead as _;

/// Where `shoal kv up` keeps its cluster, and where the client commands look for endpoints.
pub(crate) const DEFAULT_DIR: &str = "shoal-data";
/// The file in the cluster directory listing the endpoints, one per line, in server-id order.
pub(crate) const ENDPOINTS_FILE: &str = "endpoints";
/// Longest line `shoal kv shell` accepts (a key and value far over the default limits).
const MAX_SHELL_LINE_BYTES: usize = 4 * 1024 * 1024;

/// `shoal kv`: the key/value database.
#[derive(Debug, clap::Args)]
#[command(after_help = "A tour (`up` in one terminal, the rest in another):\n  \
    shoal kv up                      # a local 3-server cluster in ./shoal-data\n  \
    shoal kv put greeting hello      # prints: ok 1\n  \
    shoal kv get greeting --version  # prints: 1 hello\n  \
    shoal kv put greeting bye --expect 1\n  \
    shoal kv scan\n\
Client commands find the cluster in ./shoal-data/endpoints (written by `shoal kv up`) unless \
--endpoints is given. Kill any one server of three: the database keeps answering.")]
pub struct KvCommand {
    /// Server addresses, in server-id order: A,B,C (default: the lines of
    /// ./shoal-data/endpoints).
    #[arg(long, global = true, value_delimiter = ',')]
    endpoints: Vec<SocketAddr>,
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
        fsynced on a majority."
    )]
    Server(ServerArgs),
    /// Start a local cluster of servers on 127.0.0.1 and stay in the foreground (Ctrl-C
    /// stops it). A second run on the same --dir resumes the same cluster.
    #[command(after_help = "Example:\n  shoal kv up --nodes 3 --dir shoal-data\n\
        The endpoints are printed and written to DIR/endpoints, where the client commands \
        find them. Each server logs to DIR/nodeN.log. A server that dies is restarted; one \
        that keeps failing (a damaged directory, a full disk) is retried less and less often \
        while the others serve, and what is wrong and how to fix it is printed once. The \
        servers stop with `kv up`, even when it is killed.")]
    Up(crate::kv_up::UpArgs),
    /// Print a key's value (and version with --version). Exit status 1 if the key is missing.
    #[command(
        after_help = "Example:\n  shoal kv get greeting --version",
        disable_version_flag = true
    )]
    Get {
        /// The key.
        key: String,
        /// Print `VERSION VALUE` instead of the value.
        #[arg(long)]
        version: bool,
    },
    /// Store a value; prints `ok NEW_VERSION`. With --expect, only if the key is at that
    /// version (0: only if missing).
    #[command(after_help = "Examples:\n  shoal kv put greeting hello\n  \
        shoal kv put greeting bye --expect 1   # compare-and-set\n  \
        shoal kv put fresh x --expect 0        # create only")]
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Store only if the key is at this version.
        #[arg(long)]
        expect: Option<u64>,
    },
    /// Delete a key (with --expect, only at that version).
    #[command(after_help = "Example:\n  shoal kv del greeting")]
    Del {
        /// The key.
        key: String,
        /// Delete only if the key is at this version.
        #[arg(long)]
        expect: Option<u64>,
    },
    /// Print `KEY VERSION VALUE` for the keys in [START, END) in key order.
    #[command(after_help = "Examples:\n  shoal kv scan\n  shoal kv scan user/ user0 --limit 10")]
    Scan {
        /// First key (inclusive; default: the first).
        start: Option<String>,
        /// Last key (exclusive; default: none).
        end: Option<String>,
        /// Most keys printed.
        #[arg(long, default_value_t = shoal_runtime::kv::client::DEFAULT_SCAN_LIMIT)]
        limit: u32,
    },
    /// Print each server's role, term, leader and log indexes (exit status 1 if no server
    /// answers as leader).
    #[command(after_help = "Example:\n  shoal kv status\n\
        ID  ADDRESS         ROLE      TERM  LEADER  COMMIT  APPLIED\n\
        1   127.0.0.1:7001  leader    3     1       1042    1042\n\
        2   127.0.0.1:7002  follower  3     1       1042    1042\n\
        3   127.0.0.1:7003  -         unreachable")]
    Status {
        /// Print one JSON object per server instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Read commands from stdin, answer each with exactly one line (flushed, in order).
    #[command(after_help = "Commands and answers:\n  \
        get KEY                        -> value VERSION VALUE | nokey\n  \
        put KEY EXPECTED_VERSION VALUE -> ok NEW_VERSION | mismatch | nokey | maybe\n  \
        del KEY EXPECTED_VERSION       -> deleted | mismatch | nokey | maybe\n\
        VALUE is the rest of the line; EXPECTED_VERSION may be `any`. No answer within \
        --timeout -> timeout (the outcome is unknown). A malformed line -> error MESSAGE; the \
        shell never exits on a bad line.\nExample:\n  \
        printf 'put k 0 hello\\nget k\\n' | shoal kv shell")]
    Shell,
    /// Run a command while holding a lock (a key `lock/NAME`); exits with its status.
    #[command(after_help = "Example:\n  shoal kv lock backup -- tar czf backup.tgz data/")]
    Lock {
        /// The lock's name.
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// Arguments of `shoal kv server`.
#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// This server's id: one of the ids in --peers.
    #[arg(long)]
    id: u64,
    /// Address serving both peers and clients.
    #[arg(long)]
    listen: SocketAddr,
    /// Every server of the cluster, this one included: ID=ADDR,ID=ADDR,…
    #[arg(long, value_parser = crate::cli::parse_peer, value_delimiter = ',', required = true)]
    peers: Vec<(u64, SocketAddr)>,
    /// Data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Snapshot (and drop the log) when the log and hard state exceed this many bytes
    /// (0: never).
    ///
    /// The default, 64 MiB, is about etcd's default of 100,000 entries at 256-byte values. A
    /// snapshot serializes the whole store in the server's loop: on a store of tens of MB that
    /// is a pause of ~100 ms, so a smaller threshold shows up in the tail latency.
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
    let client = |endpoints: Vec<SocketAddr>| -> Result<Client> {
        let endpoints = if endpoints.is_empty() {
            read_endpoints(&Path::new(DEFAULT_DIR).join(ENDPOINTS_FILE)).context(
                "no --endpoints given and no cluster in ./shoal-data (start one with `shoal kv up`)",
            )?
        } else {
            endpoints
        };
        let mut config = ClientConfig::new(endpoints);
        config.cluster_id = cmd.cluster;
        config.op_timeout = timeout;
        config.serializable_reads = cmd.serializable;
        Ok(Client::new(config)?)
    };
    match cmd.command {
        KvSub::Server(args) => server(args, cmd.cluster).await,
        KvSub::Up(args) => crate::kv_up::up(args).await,
        KvSub::Get { key, version } => {
            let mut c = client(cmd.endpoints)?;
            match c.get(key.as_bytes()).await? {
                Some((value, v)) => {
                    let mut out = std::io::stdout().lock();
                    if version {
                        write!(out, "{v} ")?;
                    }
                    out.write_all(&value)?;
                    writeln!(out)?;
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("no such key: {key}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        KvSub::Put { key, value, expect } => {
            let mut c = client(cmd.endpoints)?;
            let expected = expect.map_or(Expected::Any, Expected::Version);
            match c.put(key.as_bytes(), value.as_bytes(), expected).await? {
                PutOutcome::Written(v) => {
                    println!("ok {v}");
                    Ok(ExitCode::SUCCESS)
                }
                PutOutcome::Mismatch => fail("version mismatch: nothing stored"),
                PutOutcome::NoKey => fail("no such key: nothing stored"),
                PutOutcome::Maybe => fail("maybe: a retried put may or may not have applied"),
            }
        }
        KvSub::Del { key, expect } => {
            let mut c = client(cmd.endpoints)?;
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
        KvSub::Scan { start, end, limit } => {
            let mut c = client(cmd.endpoints)?;
            let start = start.unwrap_or_default();
            let items = c
                .scan(start.as_bytes(), end.as_deref().map(str::as_bytes), limit)
                .await?;
            let mut out = std::io::stdout().lock();
            for item in items {
                out.write_all(&item.key)?;
                write!(out, " {} ", item.version)?;
                out.write_all(&item.value)?;
                writeln!(out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        KvSub::Status { json } => {
            let c = client(cmd.endpoints)?;
            status(&c, timeout, json).await
        }
        KvSub::Shell => {
            let c = client(cmd.endpoints)?;
            shell(c, timeout).await
        }
        KvSub::Lock { name, command } => {
            let c = client(cmd.endpoints)?;
            lock(c, name, command).await
        }
    }
}

/// `shoal kv status`: one line (or JSON object) per endpoint.
async fn status(client: &Client, timeout: Duration, json: bool) -> Result<ExitCode> {
    let statuses = client.statuses(timeout).await;
    let mut out = std::io::stdout().lock();
    if !json {
        let header = format!(
            "{:<4}{:<22}{:<15}{:<8}{:<8}{:<10}{}",
            "ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"
        );
        writeln!(out, "{header}")?;
    }
    let mut leader = false;
    for (i, (s, addr)) in statuses.iter().zip(client.endpoints()).enumerate() {
        match s {
            Ok(s) => {
                leader |= s.role == ServerRole::Leader;
                let lead = s.leader.map_or("-".to_string(), |l| l.to_string());
                if json {
                    let line = serde_json::json!({
                        "id": s.id, "address": addr.to_string(), "role": s.role.to_string(),
                        "term": s.term, "leader": s.leader, "commit": s.commit,
                        "applied": s.applied, "last_index": s.last_index,
                    });
                    writeln!(out, "{line}")?;
                } else {
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
            }
            Err(e) => {
                if json {
                    let line = serde_json::json!({
                        "id": i + 1, "address": addr.to_string(), "error": e.to_string(),
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{:<4}{:<22}{:<15}{e}", i + 1, addr.to_string(), "-")?;
                }
            }
        }
    }
    Ok(if leader {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
            l.parse()
                .with_context(|| format!("{}: bad address {l:?}", path.display()))
        })
        .collect::<Result<Vec<SocketAddr>>>()?;
    if endpoints.is_empty() {
        bail!("{} lists no endpoints", path.display());
    }
    Ok(endpoints)
}

async fn server(args: ServerArgs, cluster: u64) -> Result<ExitCode> {
    let peers: BTreeMap<u64, SocketAddr> = args.peers.into_iter().collect();
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
    tracing::info!(node = args.id, listen = %args.listen, "kv server starting");
    run_server(config, listener, shutdown)
        .await
        .with_context(|| format!("kv server {}", args.id))?;
    Ok(ExitCode::SUCCESS)
}

/// `shoal kv shell`: one line in, one line out.
async fn shell(mut client: Client, timeout: Duration) -> Result<ExitCode> {
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
            Ok(Some(op)) => match client.execute_within(op.clone(), timeout).await {
                Ok(outcome) => shell_answer(&op, outcome),
                Err(shoal_runtime::kv::ClientError::Timeout(_)) => "timeout".to_string(),
                Err(e) => format!("error {e}"),
            },
            Err(message) => format!("error {message}"),
        };
        answer(&reply)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn answer(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("writing to stdout")?;
    out.flush().context("writing to stdout")
}

/// Parses one shell line; `Ok(None)` for a blank line.
fn parse_shell_line(line: &str) -> std::result::Result<Option<KvOp>, String> {
    if line.len() > MAX_SHELL_LINE_BYTES {
        return Err(format!("line longer than {MAX_SHELL_LINE_BYTES} bytes"));
    }
    let line = line.trim_start();
    if line.trim().is_empty() {
        return Ok(None);
    }
    let (cmd, rest) = split_word(line);
    let version = |v: &str| -> std::result::Result<Expected, String> {
        if v == "any" {
            return Ok(Expected::Any);
        }
        v.parse()
            .map(Expected::Version)
            .map_err(|_| format!("expected version {v:?} is not a number or `any`"))
    };
    match cmd {
        "get" => {
            let (key, rest) = split_word(rest);
            if key.is_empty() || !rest.trim().is_empty() {
                return Err("usage: get KEY".into());
            }
            Ok(Some(KvOp::Get {
                key: key.as_bytes().to_vec(),
            }))
        }
        "put" => {
            let (key, rest) = split_word(rest);
            let (v, value) = split_word(rest);
            if key.is_empty() || v.is_empty() {
                return Err("usage: put KEY EXPECTED_VERSION VALUE".into());
            }
            Ok(Some(KvOp::Put {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                expected: version(v)?,
            }))
        }
        "del" => {
            let (key, rest) = split_word(rest);
            let (v, rest) = split_word(rest);
            if key.is_empty() || v.is_empty() || !rest.trim().is_empty() {
                return Err("usage: del KEY EXPECTED_VERSION".into());
            }
            Ok(Some(KvOp::Delete {
                key: key.as_bytes().to_vec(),
                expected: version(v)?,
            }))
        }
        other => Err(format!("unknown command {other:?} (get, put, del)")),
    }
}

/// The first space-separated word and the rest after exactly one space.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(' ') {
        Some((w, rest)) => (w, rest),
        None => (s, ""),
    }
}

fn shell_answer(op: &KvOp, outcome: Outcome) -> String {
    match outcome {
        Outcome::Maybe => "maybe".into(),
        Outcome::Done(result) => match result {
            KvResult::Found { value, version } => {
                format!("value {version} {}", String::from_utf8_lossy(&value))
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

/// `shoal kv lock NAME -- COMMAND…`.
async fn lock(mut client: Client, name: String, command: Vec<String>) -> Result<ExitCode> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("no command given after --"))?;
    let owner = format!("pid{}-client{:x}", std::process::id(), client.client_id());
    let mut lock = Lock::new(format!("lock/{name}").into_bytes(), owner.into_bytes());
    client
        .acquire(&mut lock)
        .await
        .with_context(|| format!("acquiring lock {name:?}"))?;
    tracing::info!(lock = %name, "lock acquired");
    let status = tokio::process::Command::new(program)
        .args(args)
        .status()
        .await
        .with_context(|| format!("running {program:?}"));
    client
        .release(&mut lock)
        .await
        .with_context(|| format!("releasing lock {name:?}"))?;
    let status = status?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}
