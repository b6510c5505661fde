//! `shoal bench kv`: Shoal's key/value database against etcd, driven the same way.
//!
//! - **Runs**: N closed-loop requesters, each with one operation in flight; the first
//!   `--warmup` operations are not measured, the next `--ops` are (throughput over the measured
//!   window, latency percentiles of every measured operation).
//! - **Failover**: under a put load, SIGKILL the leader, time until a write is acknowledged by
//!   a survivor, restart the killed member from its data and let it catch up; repeat.
//! - **--compare**: a fresh local 3-member Shoal cluster and a fresh local 3-member etcd
//!   cluster, the matrix of runs interleaved (shoal, etcd, shoal, etcd, …), then the ratios
//!   against Shoal's targets.
//!
//! Progress goes to stderr; stdout gets one JSON line per run (and per kill) and tables at
//! the end. Timings are figures, never pass/fail criteria. `SHOAL_BENCH_KEEP_DATA=1` keeps the
//! local clusters' data directories and logs; `SHOAL_SERVER_LOG` sets the Shoal servers' log
//! filter (default `warn`).

mod cluster;
mod failover;
mod load;
pub(crate) mod plot;
mod target;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::bench_util::{cpu_model, load_avg_1m, ms, now, percentile, SplitMix64};
use cluster::LocalCluster;
use failover::Failover;
use load::{KeyOrder, Keys, LoadSpec, Mode, RunResult};
use target::{KvConn, KvTarget, ShoalTarget, TargetKind};

/// Bound on waiting for a leader, a catch-up or an acknowledgement after a kill. A bound on
/// waiting, not a figure: exceeding it fails the run.
pub const LIVENESS: Duration = Duration::from_secs(60);
/// How long an existing cluster (--endpoints) has to answer a first put.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one operation of the load, retries included (Shoal's client default).
const OP_TIMEOUT: Duration = shoal_runtime::kv::client::DEFAULT_OP_TIMEOUT;
/// Most requesters: each Shoal client opens a connection to the leader, which accepts 1024.
const MAX_CLIENTS: usize = 1000;
/// Longest key Shoal accepts by default (etcd's limit is higher).
const MAX_KEY_BYTES: usize = shoal_kv::store::DEFAULT_MAX_KEY_BYTES;
/// Room for the rest of a request in a frame.
const FRAME_OVERHEAD_BYTES: usize = 4096;
/// Requesters of the prefill (at most; fewer if --clients asks fewer).
const PREFILL_CLIENTS: usize = 64;

/// Arguments of `shoal bench kv`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  # puts at 1, 64, 256 clients + 20 leader kills, on a fresh local Shoal cluster:
  shoal bench kv
  shoal bench kv --mode get --prefill --clients 64 --failover-kills 0
  shoal bench kv --mode mixed --read-ratio 0.9 --prefill --clients 16,64
  # an existing cluster (`shoal kv up`), an existing etcd:
  shoal bench kv --endpoints 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
  shoal bench kv --target etcd --endpoints 127.0.0.1:2379
  shoal bench kv --controller \"$(paste -sd, shoal-shard/controller)\"   # a `shoal shard up`
  cargo run --release --features etcd -- bench kv --compare --plot docs/kv-vs-etcd.svg
  shoal bench kv --quick                           # a smoke test in seconds

Without --endpoints the benchmark starts a fresh local 3-member cluster (this executable's \
`shoal kv server`, or /usr/bin/etcd) on free 127.0.0.1 ports, with data in a temporary \
directory under --data-dir, and removes it afterwards. Failover is measured only on such a \
cluster (the benchmark must be able to kill and restart members).

Each run: --clients requesters, each with one operation in flight (closed loop); the first \
--warmup operations are not measured, the next --ops are. Puts are unconditional; gets are \
linearizable (Shoal: read-index through the leader; etcd: its default, serializable=false). \
Keys are `k` + a zero-padded number below --keyspace, --key-size bytes in all; values are \
--value-size bytes.

Output: progress on stderr; on stdout one JSON line per run (kind \"run\"), per kill \
(\"failover_kill\") and per failover phase (\"failover\"), then tables. --compare adds the \
ratios Shoal/etcd against Shoal's targets (the target column). The etcd target needs a build with \
`--features etcd` (and protoc: apt-get install protobuf-compiler).")]
pub struct BenchArgs {
    /// An existing cluster: Shoal servers as A,B,C in server-id order, or etcd client
    /// addresses (host:port or http://host:port). Default: start a local 3-member cluster.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// An existing sharded Shoal cluster: its controller store's addresses A,B,C (the lines of
    /// DIR/controller of `shoal shard up`). Requests are routed to the group owning each key's
    /// shard.
    #[arg(long, value_delimiter = ',', value_parser = parse_socket_addr, conflicts_with_all = ["endpoints", "target", "compare"])]
    controller: Vec<SocketAddr>,
    /// Cluster id of the Shoal servers given with --endpoints or --controller.
    #[arg(long, default_value_t = shoal_runtime::kv::client::DEFAULT_CLUSTER_ID)]
    cluster: u64,
    /// Concurrent requesters, one run per count (comma-separated). Each keeps one operation
    /// in flight (closed loop).
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    clients: Vec<usize>,
    /// Measured operations per run.
    #[arg(long, default_value_t = 50_000)]
    ops: u64,
    /// Operations before measuring, per run (they also open the connections and, for Shoal,
    /// the client sessions: keep it at least --clients).
    #[arg(long, default_value_t = 2_000)]
    warmup: u64,
    /// Bytes per key.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct keys; operations pick one uniformly at random.
    #[arg(long, default_value_t = 100_000)]
    keyspace: u64,
    /// Write every key of the keyspace once before the runs (gets then find their keys).
    #[arg(long)]
    prefill: bool,
    /// What the runs do.
    #[arg(long, value_enum, default_value_t = Mode::Put)]
    mode: Mode,
    /// Fraction of gets in --mode mixed.
    #[arg(long, default_value_t = 0.5)]
    read_ratio: f64,
    /// The system to measure.
    #[arg(long, value_enum, default_value_t = TargetKind::Shoal)]
    target: TargetKind,
    /// Draw throughput and p99 latency against client count into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Fresh local Shoal and etcd clusters side by side: failover, puts at every --clients
    /// count, then gets at every count above 1 (after a prefill); runs interleaved; then the
    /// ratios.
    #[arg(long, conflicts_with_all = ["endpoints", "target", "mode", "prefill"])]
    compare: bool,
    /// Leader SIGKILLs to time (0: no failover phase).
    #[arg(long, default_value_t = 20)]
    failover_kills: u32,
    /// Put requesters running during the failover phase.
    #[arg(long, default_value_t = 16)]
    failover_clients: usize,
    /// Distinct keys the failover load writes (`k…` keys below this number, so within
    /// --keyspace's keys when smaller). Small by default: the phase measures availability,
    /// not state size.
    #[arg(long, default_value_t = 1_000)]
    failover_keyspace: u64,
    /// Tiny parameters for a smoke test: clients 1,4; 200 ops; 20 warmup; keyspace 1000;
    /// 2 kills with 4 requesters.
    #[arg(long)]
    quick: bool,
    /// Where local clusters keep their data (a fresh subdirectory, removed afterwards). It
    /// should be on the disk being measured: on a tmpfs fsync is free. Default: $TMPDIR,
    /// /var/tmp or the current directory, the first that is not a tmpfs.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The etcd server binary for local etcd clusters.
    #[arg(long, env = "SHOAL_ETCD_BIN", default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// Seed of the key choices and kill times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// With --endpoints: the cluster's CA certificate (PEM), to measure a TLS cluster (e.g.
    /// DIR/tls/ca.pem of `shoal kv up --tls --dir DIR`); needs --cert and --key.
    #[arg(long, value_name = "FILE", requires_all = ["cert", "key", "endpoints"])]
    ca: Option<PathBuf>,
    /// With --ca: the client certificate (e.g. DIR/tls/client.pem).
    #[arg(long, value_name = "FILE", requires = "ca")]
    cert: Option<PathBuf>,
    /// With --ca: the client certificate's key (e.g. DIR/tls/client-key.pem).
    #[arg(long, value_name = "FILE", requires = "ca")]
    key: Option<PathBuf>,
}

fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}

/// Whether `path` is on a tmpfs (where fsync costs nothing).
pub(crate) fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `stat` a properly sized out-parameter.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == TMPFS_MAGIC
    }
}

pub(crate) fn default_data_dir() -> PathBuf {
    let candidates = [
        std::env::var_os("TMPDIR").map(PathBuf::from),
        Some(PathBuf::from("/var/tmp")),
        Some(std::env::temp_dir()),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_dir() && !is_tmpfs(p))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Everything the runs share, once validated.
struct Plan {
    keys: Keys,
    failover_keys: Keys,
    value: Arc<Vec<u8>>,
    data_dir: PathBuf,
}

fn validate(args: &mut BenchArgs) -> Result<Plan> {
    if args.quick {
        args.clients = vec![1, 4];
        args.ops = 200;
        args.warmup = 20;
        args.keyspace = 1000;
        args.failover_kills = args.failover_kills.min(2);
        args.failover_clients = 4;
    }
    if let Some(&c) = args.clients.iter().find(|&&c| c == 0 || c > MAX_CLIENTS) {
        bail!("--clients {c}: each count must be within 1..={MAX_CLIENTS}");
    }
    if args.clients.is_empty() {
        bail!("--clients needs at least one count");
    }
    if args.failover_kills > 0 && !(1..=MAX_CLIENTS).contains(&args.failover_clients) {
        bail!("--failover-clients must be within 1..={MAX_CLIENTS}");
    }
    if args.failover_keyspace == 0 {
        bail!("--failover-keyspace must be at least 1");
    }
    if args.ops == 0 {
        bail!("--ops must be at least 1");
    }
    if args.keyspace == 0 {
        bail!("--keyspace must be at least 1");
    }
    let min_key = Keys::min_key_size(args.keyspace);
    if args.key_size < min_key || args.key_size > MAX_KEY_BYTES {
        bail!(
            "--key-size {}: keys of a keyspace of {} need {min_key}..={MAX_KEY_BYTES} bytes",
            args.key_size,
            args.keyspace
        );
    }
    let frame_limit = shoal_wire::DEFAULT_MAX_FRAME_BYTES - FRAME_OVERHEAD_BYTES;
    if args.value_size > frame_limit {
        bail!(
            "--value-size {} exceeds the largest value a request frame carries ({frame_limit} bytes)",
            args.value_size
        );
    }
    if !(0.0..=1.0).contains(&args.read_ratio) {
        bail!("--read-ratio must be within 0..=1");
    }
    let needs_etcd = args.compare || args.target == TargetKind::Etcd;
    if needs_etcd && !cfg!(feature = "etcd") {
        bail!(
            "this shoal was built without etcd support: rebuild with `cargo build --release --features etcd` \
             (it needs protoc: apt-get install protobuf-compiler)"
        );
    }
    let local_etcd = args.compare || (args.target == TargetKind::Etcd && args.endpoints.is_empty());
    if local_etcd && !args.etcd_bin.exists() {
        bail!(
            "{} not found: install etcd (apt-get install etcd-server) or give --etcd-bin",
            args.etcd_bin.display()
        );
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    if args.endpoints.is_empty() && args.controller.is_empty() && is_tmpfs(&data_dir) {
        eprintln!(
            "kv bench: warning: {} is a tmpfs: fsync is free there, the figures flatter both systems",
            data_dir.display()
        );
    }
    Ok(Plan {
        keys: Keys {
            key_size: args.key_size,
            keyspace: args.keyspace,
        },
        failover_keys: Keys {
            key_size: args.key_size,
            keyspace: args.failover_keyspace.min(args.keyspace),
        },
        value: Arc::new(vec![b'v'; args.value_size]),
        data_dir,
    })
}

/// Parses one IP:PORT of --controller.
fn parse_socket_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP:PORT address"))
}

/// Parses --endpoints for Shoal.
fn shoal_endpoints(endpoints: &[String]) -> Result<Vec<SocketAddr>> {
    endpoints
        .iter()
        .map(|e| {
            e.parse()
                .map_err(|_| anyhow!("--endpoints: {e:?} is not an IP:PORT address"))
        })
        .collect()
}

/// Parses --endpoints for etcd (URLs, `http://` added when missing).
#[cfg(feature = "etcd")]
fn etcd_urls(endpoints: &[String]) -> Vec<String> {
    endpoints
        .iter()
        .map(|e| {
            if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            }
        })
        .collect()
}

/// Waits until `target` acknowledges a small put, within `within`.
async fn wait_ready<T: KvTarget>(target: &Arc<T>, within: Duration, what: &str) -> Result<()> {
    let deadline = now() + within;
    let mut conn = target.connect().await?;
    let mut last_error = anyhow!("no answer");
    while now() < deadline {
        let left = deadline.saturating_duration_since(now());
        match tokio::time::timeout(left, conn.put(b"_kv_bench_probe", b"probe")).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last_error = e,
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no answer from {what} within {within:?} (is it running?): {last_error:#}")
}

/// One put of the benchmark's own key and value sizes: a size the server refuses fails here,
/// with the server's reason, rather than as thousands of errors.
async fn check_sizes<T: KvTarget>(target: &Arc<T>, plan: &Plan) -> Result<()> {
    let mut conn = target.connect().await?;
    let key = plan.keys.key(0);
    match tokio::time::timeout(OP_TIMEOUT, conn.put(&key, &plan.value)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.context(format!(
            "{} refused a put of a {}-byte key and a {}-byte value",
            target.kind().name(),
            key.len(),
            plan.value.len()
        ))),
        Err(_) => bail!(
            "{} did not answer a put of a {}-byte value within {OP_TIMEOUT:?}",
            target.kind().name(),
            plan.value.len()
        ),
    }
}

fn print_run(r: &RunResult, args: &BenchArgs) {
    println!(
        "{}",
        json!({
            "bench": "kv",
            "kind": "run",
            "target": r.target.name(),
            "mode": r.mode.name(),
            "clients": r.clients,
            "ops": r.ops,
            "secs": round3(r.secs),
            "ops_per_sec": r.ops_per_sec().round(),
            "p50_ms": r.pct_ms(0.50),
            "p90_ms": r.pct_ms(0.90),
            "p99_ms": r.pct_ms(0.99),
            "p999_ms": r.pct_ms(0.999),
            "max_ms": r.pct_ms(1.0),
            "errors": r.errors,
            "warmup_errors": r.warmup_errors,
            "misses": r.misses,
            "first_error": r.first_error,
            "read_ratio": (r.mode == Mode::Mixed).then_some(args.read_ratio),
            "warmup": args.warmup,
            "key_size": args.key_size,
            "value_size": args.value_size,
            "keyspace": args.keyspace,
            "load_avg_1m": load_avg_1m(),
        })
    );
}

fn print_failover(name: &str, f: &Failover) {
    let sorted = f.sorted_ms();
    println!(
        "{}",
        json!({
            "bench": "kv",
            "kind": "failover",
            "target": name,
            "kills": sorted.len(),
            "clients": f.clients,
            "min_ms": f.pct_ms(0.0).map(round3),
            "p50_ms": f.pct_ms(0.5).map(round3),
            "p90_ms": f.pct_ms(0.9).map(round3),
            "max_ms": f.pct_ms(1.0).map(round3),
            "failover_ms": f.kills.iter().map(|k| ms(k.failover)).collect::<Vec<_>>(),
            "puts": f.puts,
            "errors": f.errors,
            "probes": f.probes,
            "load_avg_1m": load_avg_1m(),
        })
    );
}

/// One measured run (and its JSON line).
async fn run<T: KvTarget>(
    side: &mut Side<T>,
    args: &BenchArgs,
    plan: &Plan,
    mode: Mode,
    clients: usize,
    runs: &mut Vec<RunResult>,
) -> Result<()> {
    let spec = LoadSpec {
        label: format!("{} x{clients}", mode.name()),
        mode,
        read_ratio: args.read_ratio,
        clients,
        warmup: args.warmup,
        ops: args.ops,
        keys: plan.keys,
        order: KeyOrder::Random,
        value: plan.value.clone(),
        seed: args.seed ^ clients as u64,
    };
    let name = side.target.kind().name();
    let r = side
        .checked(load::run_load(&side.target, &spec).await)?
        .with_context(|| format!("{name} {} with {clients} clients", mode.name()))?;
    print_run(&r, args);
    runs.push(r);
    Ok(())
}

/// Writes every key of the keyspace once.
async fn prefill<T: KvTarget>(side: &mut Side<T>, args: &BenchArgs, plan: &Plan) -> Result<()> {
    let target = &side.target.clone();
    let clients = args
        .clients
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .min(PREFILL_CLIENTS);
    let spec = LoadSpec {
        label: format!("prefill of {} keys", plan.keys.keyspace),
        mode: Mode::Put,
        read_ratio: 0.0,
        clients,
        warmup: 0,
        ops: plan.keys.keyspace,
        keys: plan.keys,
        order: KeyOrder::Sequential,
        value: plan.value.clone(),
        seed: args.seed,
    };
    let r = side
        .checked(load::run_load(target, &spec).await)?
        .with_context(|| format!("{} prefill", target.kind().name()))?;
    if r.errors > 0 {
        bail!(
            "{} prefill: {} of {} puts failed, even after retries (the first: {})",
            target.kind().name(),
            r.errors,
            plan.keys.keyspace,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    eprintln!(
        "kv bench: {} prefilled {} keys in {:.1} s",
        target.kind().name(),
        plan.keys.keyspace,
        r.secs
    );
    Ok(())
}

/// One target's share of the work, so that --compare can interleave two of them.
struct Side<T: KvTarget> {
    target: Arc<T>,
    cluster: Option<LocalCluster>,
}

impl<T: KvTarget> Side<T> {
    /// Fails if a member of a local cluster exited behind the benchmark's back (a run's
    /// error then says why); otherwise hands back `outcome`.
    fn checked<R>(&mut self, outcome: R) -> Result<R> {
        if let Some(cluster) = self.cluster.as_mut() {
            cluster
                .check_alive()
                .context("a member exited without being killed by the benchmark")?;
        }
        Ok(outcome)
    }

    /// The failover phase. Its failure (no write acknowledged, no catch-up) is a finding,
    /// not the end of the benchmark: it is printed and returned as `Err`, and the caller goes
    /// on with the other target.
    async fn failover(&mut self, args: &BenchArgs, plan: &Plan) -> Option<FailoverOutcome> {
        let name = self.target.kind().name();
        let Some(cluster) = self.cluster.as_mut() else {
            eprintln!(
                "kv bench: {name}: no failover phase on a cluster given with --endpoints or --controller"
            );
            return None;
        };
        if args.failover_kills == 0 {
            return None;
        }
        let outcome = failover::failover(
            &self.target,
            cluster,
            args.failover_kills,
            args.failover_clients,
            plan.failover_keys,
            plan.value.clone(),
            args.seed,
        )
        .await
        .with_context(|| format!("{name} failover"));
        match &outcome {
            Ok(f) => print_failover(name, f),
            Err(e) => {
                eprintln!("kv bench: {e:#}");
                println!(
                    "{}",
                    json!({
                        "bench": "kv",
                        "kind": "failover",
                        "target": name,
                        "error": format!("{e:#}"),
                    })
                );
            }
        }
        Some(outcome.map_err(|e| format!("{e:#}")))
    }
}

/// A failover phase's figures, or why it failed.
type FailoverOutcome = std::result::Result<Failover, String>;

async fn start_shoal(args: &BenchArgs, plan: &Plan) -> Result<Side<ShoalTarget>> {
    if !args.controller.is_empty() {
        let target = Arc::new(ShoalTarget::sharded(
            args.controller.clone(),
            args.cluster,
            OP_TIMEOUT,
        ));
        let list = args
            .controller
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        wait_ready(
            &target,
            REACH_TIMEOUT,
            &format!("the sharded Shoal cluster of the controller store at {list}"),
        )
        .await?;
        return Ok(Side {
            target,
            cluster: None,
        });
    }
    if !args.endpoints.is_empty() && !args.compare {
        let endpoints = shoal_endpoints(&args.endpoints)?;
        let security = shoal_runtime::tls::TlsFiles {
            cert: args.cert.clone(),
            key: args.key.clone(),
            ca: args.ca.clone(),
        }
        .client()
        .context("--ca, --cert, --key")?;
        let target = Arc::new(ShoalTarget::with_security(
            endpoints.clone(),
            args.cluster,
            OP_TIMEOUT,
            security,
        ));
        let list = args.endpoints.join(",");
        wait_ready(
            &target,
            REACH_TIMEOUT,
            &format!("the Shoal cluster at {list}"),
        )
        .await?;
        return Ok(Side {
            target,
            cluster: None,
        });
    }
    let exe = std::env::current_exe().context("locating the shoal executable")?;
    let mut cluster = LocalCluster::start(TargetKind::Shoal, exe, &plan.data_dir)?;
    eprintln!(
        "kv bench: shoal: 3 `shoal kv server`s at {} (data in {})",
        cluster
            .addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        cluster.dir().display()
    );
    let target = Arc::new(ShoalTarget::new(
        cluster.addrs.clone(),
        shoal_runtime::kv::client::DEFAULT_CLUSTER_ID,
        OP_TIMEOUT,
    ));
    cluster.wait_leader().await?;
    wait_ready(&target, LIVENESS, "the local Shoal cluster").await?;
    Ok(Side {
        target,
        cluster: Some(cluster),
    })
}

#[cfg(feature = "etcd")]
async fn start_etcd(args: &BenchArgs, plan: &Plan) -> Result<Side<target::EtcdTarget>> {
    if !args.endpoints.is_empty() && !args.compare {
        let urls = etcd_urls(&args.endpoints);
        let target = Arc::new(target::EtcdTarget::connect(&urls, OP_TIMEOUT).await?);
        let list = urls.join(",");
        wait_ready(&target, REACH_TIMEOUT, &format!("etcd at {list}")).await?;
        return Ok(Side {
            target,
            cluster: None,
        });
    }
    let mut cluster = LocalCluster::start(TargetKind::Etcd, args.etcd_bin.clone(), &plan.data_dir)?;
    eprintln!(
        "kv bench: etcd: 3 members at {} (data in {})",
        cluster.urls().join(","),
        cluster.dir().display()
    );
    cluster.wait_leader().await?;
    let target = Arc::new(target::EtcdTarget::connect(&cluster.urls(), OP_TIMEOUT).await?);
    wait_ready(&target, LIVENESS, "the local etcd cluster").await?;
    Ok(Side {
        target,
        cluster: Some(cluster),
    })
}

/// Runs `shoal bench kv`.
pub fn bench(mut args: BenchArgs) -> Result<ExitCode> {
    let plan = validate(&mut args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "kv bench: {}; local clusters' data under {}",
        crate::bench_util::machine_line(),
        plan.data_dir.display()
    );
    let mut runs = Vec::new();
    let outcome = runtime.block_on(async {
        if args.compare {
            compare(&args, &plan, &mut runs).await
        } else {
            single(&args, &plan, &mut runs).await
        }
    });
    // Whatever was measured is drawn, even if a later step failed.
    if let Some(path) = &args.plot {
        if !runs.is_empty() {
            let subtitle = format!(
                "3 members on 127.0.0.1, {}-byte keys, {}-byte values, {} measured ops per point; {cpus} CPUs ({})",
                args.key_size,
                args.value_size,
                args.ops,
                cpu_model()
            );
            std::fs::write(path, plot::svg(&runs, &subtitle))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("kv bench: plot written to {}", path.display());
        }
    }
    let failovers = outcome?;
    print_runs_table(&args, &runs);
    print_failover_table(&failovers);
    if args.compare {
        print_compare_table(&runs, &failovers);
    }
    if let Some((kind, Err(e))) = failovers.iter().find(|(_, f)| f.is_err()) {
        eprintln!("error: {} failover failed: {e}", kind.name());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

type Failovers = Vec<(TargetKind, FailoverOutcome)>;

async fn single(args: &BenchArgs, plan: &Plan, runs: &mut Vec<RunResult>) -> Result<Failovers> {
    match args.target {
        TargetKind::Shoal => {
            let side = start_shoal(args, plan).await?;
            single_side(side, args, plan, runs).await
        }
        #[cfg(feature = "etcd")]
        TargetKind::Etcd => {
            let side = start_etcd(args, plan).await?;
            single_side(side, args, plan, runs).await
        }
        #[cfg(not(feature = "etcd"))]
        TargetKind::Etcd => unreachable!("refused by validate"),
    }
}

async fn single_side<T: KvTarget>(
    mut side: Side<T>,
    args: &BenchArgs,
    plan: &Plan,
    runs: &mut Vec<RunResult>,
) -> Result<Failovers> {
    check_sizes(&side.target, plan).await?;
    if args.prefill {
        prefill(&mut side, args, plan).await?;
    } else if args.mode != Mode::Put {
        eprintln!("kv bench: no --prefill: gets of keys never written count as misses");
    }
    for &clients in &args.clients {
        run(&mut side, args, plan, args.mode, clients, runs).await?;
    }
    let kind = side.target.kind();
    Ok(side
        .failover(args, plan)
        .await
        .map(|f| vec![(kind, f)])
        .unwrap_or_default())
}

#[cfg(not(feature = "etcd"))]
async fn compare(_: &BenchArgs, _: &Plan, _: &mut Vec<RunResult>) -> Result<Failovers> {
    unreachable!("refused by validate")
}

#[cfg(feature = "etcd")]
async fn compare(args: &BenchArgs, plan: &Plan, runs: &mut Vec<RunResult>) -> Result<Failovers> {
    let mut shoal = start_shoal(args, plan).await?;
    let mut etcd = start_etcd(args, plan).await?;
    check_sizes(&shoal.target, plan).await?;
    check_sizes(&etcd.target, plan).await?;
    // Failover first, on fresh clusters with little state, so that it measures leader loss
    // rather than state size (run after the puts, it once failed on Shoal's snapshots larger
    // than a frame: docs/benchmarks.md).
    let mut failovers = Vec::new();
    if let Some(f) = shoal.failover(args, plan).await {
        failovers.push((TargetKind::Shoal, f));
    }
    if let Some(f) = etcd.failover(args, plan).await {
        failovers.push((TargetKind::Etcd, f));
    }
    for &clients in &args.clients {
        run(&mut shoal, args, plan, Mode::Put, clients, runs).await?;
        run(&mut etcd, args, plan, Mode::Put, clients, runs).await?;
    }
    let get_clients: Vec<usize> = args.clients.iter().copied().filter(|&c| c > 1).collect();
    if !get_clients.is_empty() {
        prefill(&mut shoal, args, plan).await?;
        prefill(&mut etcd, args, plan).await?;
        for &clients in &get_clients {
            run(&mut shoal, args, plan, Mode::Get, clients, runs).await?;
            run(&mut etcd, args, plan, Mode::Get, clients, runs).await?;
        }
    }
    Ok(failovers)
}

fn print_runs_table(args: &BenchArgs, runs: &[RunResult]) {
    if runs.is_empty() {
        return;
    }
    println!();
    let cluster = if !args.controller.is_empty() {
        "a sharded cluster (its controller store given with --controller)".to_string()
    } else if !args.endpoints.is_empty() {
        format!("the cluster at {}", args.endpoints.join(","))
    } else {
        "3 members on 127.0.0.1".to_string()
    };
    println!(
        "Key/value, {cluster}, {}-byte keys, {}-byte values, keyspace {}, {} measured ops per run after {} warmup",
        args.key_size, args.value_size, args.keyspace, args.ops, args.warmup
    );
    println!("| target | mode | clients | ops/s | p50 | p90 | p99 | p99.9 | max | errors |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in runs {
        println!(
            "| {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
            r.target.name(),
            r.mode.name(),
            r.clients,
            r.ops_per_sec(),
            r.pct_ms(0.5),
            r.pct_ms(0.9),
            r.pct_ms(0.99),
            r.pct_ms(0.999),
            r.pct_ms(1.0),
            r.errors
        );
    }
}

fn print_failover_table(failovers: &Failovers) {
    if failovers.is_empty() {
        return;
    }
    let fmt = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.0} ms"));
    println!();
    println!("Failover: from the leader's SIGKILL to the first acknowledged put sent after it");
    println!("| target | kills | put clients | min | p50 | p90 | max | put errors |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (kind, f) in failovers {
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                println!("| {} | failed: {e} | | | | | | |", kind.name());
                continue;
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            kind.name(),
            f.kills.len(),
            f.clients,
            fmt(f.pct_ms(0.0)),
            fmt(f.pct_ms(0.5)),
            fmt(f.pct_ms(0.9)),
            fmt(f.pct_ms(1.0)),
            f.errors
        );
    }
}

/// Whether a target is met: `Some(true)` met, `Some(false)` not met, `None` not applicable.
fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "-",
    }
}

fn print_compare_table(runs: &[RunResult], failovers: &Failovers) {
    let find = |t: TargetKind, m: Mode, c: usize| {
        runs.iter()
            .rev()
            .find(|r| r.target == t && r.mode == m && r.clients == c)
    };
    println!();
    println!("Shoal / etcd (ratios; Shoal's targets)");
    println!("| run | shoal ops/s | etcd ops/s | ops/s ratio | shoal p50 | etcd p50 | p50 ratio | shoal p99 | etcd p99 | p99 ratio | target | |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut keys: Vec<(Mode, usize)> = runs.iter().map(|r| (r.mode, r.clients)).collect();
    keys.sort_unstable();
    keys.dedup();
    for (mode, clients) in keys {
        let (Some(s), Some(e)) = (
            find(TargetKind::Shoal, mode, clients),
            find(TargetKind::Etcd, mode, clients),
        ) else {
            continue;
        };
        let ratio = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
        let ops_ratio = ratio(s.ops_per_sec(), e.ops_per_sec());
        let p50_ratio = ratio(s.pct_ms(0.5), e.pct_ms(0.5));
        let p99_ratio = ratio(s.pct_ms(0.99), e.pct_ms(0.99));
        let (goal, met) = match (mode, clients) {
            (Mode::Put, 1) => ("p50 <= etcd", p50_ratio.map(|r| r <= 1.0)),
            (Mode::Put, _) => (
                ">= 4x ops/s, p99 <= etcd",
                ops_ratio.zip(p99_ratio).map(|(o, p)| o >= 4.0 && p <= 1.0),
            ),
            (Mode::Get, c) if c > 1 => (">= 4x ops/s", ops_ratio.map(|o| o >= 4.0)),
            _ => ("-", None),
        };
        let fr = |r: Option<f64>| r.map_or("?".into(), |r| format!("{r:.2}"));
        println!(
            "| {} x{clients} | {:.0} | {:.0} | {} | {:.2} ms | {:.2} ms | {} | {:.2} ms | {:.2} ms | {} | {goal} | {} |",
            mode.name(),
            s.ops_per_sec(),
            e.ops_per_sec(),
            fr(ops_ratio),
            s.pct_ms(0.5),
            e.pct_ms(0.5),
            fr(p50_ratio),
            s.pct_ms(0.99),
            e.pct_ms(0.99),
            fr(p99_ratio),
            verdict(met)
        );
    }
    let get = |t| {
        failovers
            .iter()
            .find(|(k, _)| *k == t)
            .and_then(|(_, f)| f.as_ref().ok())
    };
    if let (Some(s), Some(e)) = (get(TargetKind::Shoal), get(TargetKind::Etcd)) {
        let fmt = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.0} ms"));
        println!();
        println!("| failover | shoal p50 | shoal p90 | shoal max | etcd p50 | etcd p90 | etcd max | target | |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        println!(
            "| {} kills each | {} | {} | {} | {} | {} | {} | every Shoal kill < 1 s | {} |",
            s.kills.len(),
            fmt(s.pct_ms(0.5)),
            fmt(s.pct_ms(0.9)),
            fmt(s.pct_ms(1.0)),
            fmt(e.pct_ms(0.5)),
            fmt(e.pct_ms(0.9)),
            fmt(e.pct_ms(1.0)),
            verdict(s.pct_ms(1.0).map(|m| m < 1000.0))
        );
    } else if let Some((_, Err(e))) = failovers.iter().find(|(k, _)| *k == TargetKind::Shoal) {
        println!();
        println!("| failover | shoal | target | |");
        println!("| --- | --- | --- | --- |");
        println!("| shoal | failed: {e} | every Shoal kill < 1 s | NOT met |");
    }
}
