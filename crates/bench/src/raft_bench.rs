//! `shoal bench raft`: Raft figures from three real `shoal-raft-node` processes on 127.0.0.1,
//! fsync on.
//!
//! - **Commits**: for each proposer count, a fresh 3-node group; that many closed-loop proposers,
//!   each on its own client connection to the leader, keep one proposal of `--payload-bytes` in
//!   flight. After a warmup, every proposal answered `Applied` within the measured window counts
//!   as a commit and gives a latency sample (send to `Applied`, which the node sends once it
//!   applied the entry, so after the leader's fsync and a follower's acknowledgement).
//! - **Elections** (Raft paper Figure 16): SIGKILL the leader `--kills` times, each at a random
//!   point of its heartbeat cycle, and time from the kill until a surviving node answers a
//!   proposal `Applied` in a newer term; the killed node is restarted from its disk and caught
//!   up before the next kill.
//!
//! Progress goes to stderr; stdout gets one JSON line per run (and per kill) and a table at the
//! end. Timings are figures, never pass/fail criteria.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::bench_util::{load_avg_1m, ms, now, percentile, SplitMix64};
use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use shoal_cluster::{peers_arg, Procs, Spec};
use shoal_runtime::demo::{DemoRequest, DemoResponse, DemoStatus};
use shoal_wire::codec::FrameCodec;
use tokio_util::codec::Framed;

/// Nodes in the group.
const NODES: usize = 3;
/// Cluster id in the nodes' handshakes (any value; ours only).
const CLUSTER_ID: u64 = 4;
/// Largest client frame we accept (a status or an acknowledgement is tiny).
const MAX_CLIENT_FRAME_BYTES: usize = 1 << 20;
/// Timeout of a client connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one client request. The node answers a proposal within 5 s itself.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Liveness bound for a leader to appear or a restarted node to catch up. A bound on waiting,
/// not a figure: exceeding it fails the run.
const LIVENESS: Duration = Duration::from_secs(60);
/// Poll interval while waiting for a leader or a catch-up.
const POLL: Duration = Duration::from_millis(20);
/// The node's transport closes inbound connections beyond 1024; keep room for peers.
const MAX_PROPOSERS: usize = 1000;
/// Largest payload (the client frame limit is 1 MiB).
const MAX_PAYLOAD_BYTES: usize = 512 << 10;
/// Time between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Quiet time before each kill, so the restarted node's reconnections have settled.
const SETTLE_BEFORE_KILL: Duration = Duration::from_millis(300);

/// Arguments of `shoal bench raft`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Proposer counts, one run each (comma-separated). Each proposer keeps one proposal in
    /// flight on its own connection to the leader.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    proposers: Vec<usize>,
    /// Bytes per proposed command.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Seconds of load before measuring, per run.
    #[arg(long, default_value_t = 3.0)]
    warmup_secs: f64,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Skip the commit runs (election figures only).
    #[arg(long)]
    elections_only: bool,
    /// Leader crashes (SIGKILL) to time; 0 skips the election figures.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// The nodes' tick, in milliseconds.
    #[arg(long, default_value_t = 15)]
    tick_ms: u64,
    /// Election timeout in ticks: drawn uniformly from [election-tick, 2 * election-tick).
    /// The default with --tick-ms 15 is 150-300 ms, as in the Raft paper's Figure 16.
    #[arg(long, default_value_t = 10)]
    election_tick: u32,
    /// Ticks between the leader's heartbeats.
    #[arg(long, default_value_t = 1)]
    heartbeat_tick: u32,
    /// A binary taking `shoal raft node`'s flags directly (e.g. the `shoal-raft-node` test
    /// binary). Default: this executable's own `shoal raft node`.
    #[arg(long, env = "SHOAL_RAFT_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// Directory for the nodes' data (a fresh subdirectory per group, removed afterwards).
    /// It should be on the disk being measured: a tmpfs makes fsync free.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of the kill times within the heartbeat cycle.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tiny parameters for a smoke test: 1 and 4 proposers, 0.2 s warmup, 1 s runs, 2 kills.
    #[arg(long)]
    quick: bool,
}

/// The settings every node of a group is started with.
#[derive(Debug, Clone)]
struct NodeSettings {
    bin: PathBuf,
    /// Arguments before the node's flags (`raft node` when `bin` is `shoal` itself).
    bin_prefix: Vec<&'static str>,
    tick_ms: u64,
    election_tick: u32,
    heartbeat_tick: u32,
}

/// Three node processes and their data, removed on drop (processes first).
struct Group {
    settings: NodeSettings,
    addrs: Vec<SocketAddr>,
    procs: Procs,
    // Declared last: dropped after the processes are gone.
    dir: tempfile::TempDir,
}

impl Group {
    fn start(settings: &NodeSettings, data_dir: &Path) -> Result<Group> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-bench-raft-")
            .tempdir_in(data_dir)
            .with_context(|| format!("creating a data directory in {}", data_dir.display()))?;
        let addrs = shoal_cluster::free_local_addrs(NODES)?;
        let mut group = Group {
            settings: settings.clone(),
            addrs,
            procs: Procs::with_slots(NODES),
            dir,
        };
        for i in 0..NODES {
            group.spawn(i)?;
        }
        Ok(group)
    }

    /// Starts (or restarts from its data directory) node `i`, its stderr appended to
    /// `n{i+1}.log`.
    fn spawn(&mut self, i: usize) -> Result<()> {
        let peers = peers_arg(&self.addrs);
        let log_path = self.dir.path().join(format!("n{}.log", i + 1));
        let s = &self.settings;
        // The supervisor gives the node the parent-death signal: the nodes die with the
        // benchmark even when it is SIGKILLed (no Drop runs then). Spawned from the future
        // `block_on` runs on the main thread, which the signal follows.
        let spec = Spec::new(format!("node {}", i + 1), &s.bin, log_path)
            .append_log()
            .stdout_null()
            .args(&s.bin_prefix)
            .args(["--id", &(i + 1).to_string()])
            .args(["--listen", &self.addrs[i].to_string()])
            .args(["--peers", &peers])
            .arg("--data")
            .arg(self.dir.path().join(format!("n{}", i + 1)))
            .args(["--cluster", &CLUSTER_ID.to_string()])
            .args(["--tick-ms", &s.tick_ms.to_string()])
            .args(["--election-tick", &s.election_tick.to_string()])
            .args(["--heartbeat-tick", &s.heartbeat_tick.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            );
        self.procs.spawn_at(i, spec)
    }

    /// SIGKILL node `i` and reap it.
    fn kill(&mut self, i: usize) {
        self.procs.kill(i);
    }

    /// Fails if a node exited on its own (e.g. refused its arguments), quoting its log.
    fn check_alive(&mut self) -> Result<()> {
        self.procs.check_running()
    }

    /// Nodes started and not killed.
    fn live(&self) -> Vec<usize> {
        (0..NODES)
            .filter(|&i| self.procs.get(i).is_some_and(|p| !p.exit_expected()))
            .collect()
    }
}

type Client = Framed<shoal_runtime::tls::Stream, FrameCodec<DemoResponse, DemoRequest>>;

async fn connect(addr: SocketAddr) -> Result<Client> {
    shoal_runtime::connect_client::<DemoResponse, DemoRequest>(
        addr,
        CLUSTER_ID,
        MAX_CLIENT_FRAME_BYTES,
        CONNECT_TIMEOUT,
    )
    .await
    .with_context(|| format!("connecting to {addr}"))
}

async fn call(client: &mut Client, request: DemoRequest) -> Result<DemoResponse> {
    let exchange = async {
        client.send(request).await.context("sending a request")?;
        client
            .next()
            .await
            .ok_or_else(|| anyhow!("the node closed the connection"))?
            .context("reading a response")
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("no response within {REQUEST_TIMEOUT:?}"))?
}

async fn status(addr: SocketAddr) -> Option<DemoStatus> {
    let mut c = connect(addr).await.ok()?;
    match call(&mut c, DemoRequest::Status).await.ok()? {
        DemoResponse::Status(s) => Some(s),
        _ => None,
    }
}

/// Waits until a live node leads and has committed a probe proposal; returns it and its term.
async fn wait_leader(group: &mut Group) -> Result<(usize, u64)> {
    let deadline = now() + LIVENESS;
    while now() < deadline {
        group.check_alive()?;
        for i in group.live() {
            let Some(s) = status(group.addrs[i]).await else {
                continue;
            };
            if !s.is_leader {
                continue;
            }
            let Ok(mut c) = connect(group.addrs[i]).await else {
                continue;
            };
            let probe = DemoRequest::Propose {
                data: b"probe".to_vec(),
            };
            if let Ok(DemoResponse::Applied { term, .. }) = call(&mut c, probe).await {
                return Ok((i, term));
            }
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("no leader committed within {LIVENESS:?}")
}

/// Waits until every live node reports the same commit index, at least `at_least`.
async fn wait_converged(group: &mut Group, at_least: u64) -> Result<()> {
    let deadline = now() + LIVENESS;
    while now() < deadline {
        group.check_alive()?;
        let mut commits = Vec::new();
        for i in group.live() {
            match status(group.addrs[i]).await {
                Some(s) => commits.push(s.commit),
                None => break,
            }
        }
        if commits.len() == group.live().len()
            && commits.iter().all(|&c| c == commits[0] && c >= at_least)
        {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("nodes did not converge within {LIVENESS:?}")
}

/// Figures of one proposer count.
#[derive(Debug, Clone)]
struct CommitFigures {
    proposers: usize,
    commits: u64,
    commits_per_sec: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    refused: u64,
    load_start: Option<f64>,
    load_end: Option<f64>,
}

async fn commit_run(
    args: &BenchArgs,
    settings: &NodeSettings,
    data_dir: &Path,
    proposers: usize,
) -> Result<CommitFigures> {
    let load_start = load_avg_1m();
    let mut group = Group::start(settings, data_dir)?;
    let (leader, _) = wait_leader(&mut group).await?;
    let addr = group.addrs[leader];
    let mut clients = Vec::with_capacity(proposers);
    for _ in 0..proposers {
        clients.push(connect(addr).await?);
    }

    let start = now();
    let measure_from = start + Duration::from_secs_f64(args.warmup_secs);
    let measure_until = measure_from + Duration::from_secs_f64(args.secs);
    let answered = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (p, mut client) in clients.into_iter().enumerate() {
        let answered = answered.clone();
        let refused = refused.clone();
        let payload_bytes = args.payload_bytes;
        tasks.spawn(async move {
            let mut latencies_us: Vec<u32> = Vec::new();
            let mut seq: u64 = 0;
            loop {
                let sent = now();
                if sent >= measure_until {
                    return Ok::<_, anyhow::Error>(latencies_us);
                }
                // Distinct commands: proposer and sequence number, padded to the payload size.
                let mut data = vec![0xa5u8; payload_bytes];
                let tag = ((p as u64) << 40 | seq).to_le_bytes();
                let n = tag.len().min(payload_bytes);
                data[..n].copy_from_slice(&tag[..n]);
                seq += 1;
                let response = call(&mut client, DemoRequest::Propose { data })
                    .await
                    .with_context(|| format!("proposer {p}"))?;
                let done = now();
                match response {
                    DemoResponse::Applied { .. } => {
                        answered.fetch_add(1, Ordering::Relaxed);
                        if done >= measure_from && done < measure_until {
                            let us = (done - sent).as_micros();
                            latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                    }
                    // A leader change or a timeout: counted, and the run says so.
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }

    let finished = Arc::new(AtomicBool::new(false));
    let progress = {
        let answered = answered.clone();
        let finished = finished.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut last_at = now();
            while !finished.load(Ordering::Relaxed) {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let total = answered.load(Ordering::Relaxed);
                let at = now();
                let phase = if at < measure_from {
                    "warmup"
                } else {
                    "measuring"
                };
                eprintln!(
                    "raft bench: {proposers} proposers, {:>5.1} s ({phase}): {:.0} commits/s",
                    (at - start).as_secs_f64(),
                    (total - last) as f64 / (at - last_at).as_secs_f64()
                );
                last = total;
                last_at = at;
            }
        })
    };

    let mut latencies_us = Vec::new();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a proposer task panicked")? {
            Ok(l) => latencies_us.extend(l),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    finished.store(true, Ordering::Relaxed);
    progress.abort();
    group.check_alive()?;
    if let Some(e) = failure {
        return Err(e);
    }
    drop(group);

    latencies_us.sort_unstable();
    let at = |p| Duration::from_micros(u64::from(percentile(&latencies_us, p).unwrap_or(0)));
    Ok(CommitFigures {
        proposers,
        commits: latencies_us.len() as u64,
        commits_per_sec: latencies_us.len() as f64 / args.secs,
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
        refused: refused.load(Ordering::Relaxed),
        load_start,
        load_end: load_avg_1m(),
    })
}

/// One timed leader crash.
#[derive(Debug, Clone)]
struct Election {
    elapsed: Duration,
    old_term: u64,
    new_term: u64,
}

/// SIGKILLs the leader `args.kills` times and times each recovery.
async fn election_runs(
    args: &BenchArgs,
    settings: &NodeSettings,
    data_dir: &Path,
) -> Result<Vec<Election>> {
    let heartbeat = Duration::from_millis(settings.tick_ms * u64::from(settings.heartbeat_tick));
    let mut rng = SplitMix64(args.seed);
    let mut group = Group::start(settings, data_dir)?;
    let mut elections = Vec::new();
    let mut attempts = 0;
    while elections.len() < args.kills as usize {
        let k = elections.len();
        attempts += 1;
        if attempts > 2 * args.kills + 10 {
            bail!("the leader kept changing on its own before the kills (a loaded machine?)");
        }
        let (leader, old_term) = wait_leader(&mut group).await?;
        let commit = status(group.addrs[leader])
            .await
            .ok_or_else(|| anyhow!("no status from the leader"))?
            .commit;
        wait_converged(&mut group, commit).await?;
        // Connections to the survivors are opened before the clock starts.
        let survivors: Vec<usize> = (0..NODES).filter(|&i| i != leader).collect();
        let mut clients = Vec::new();
        for &i in &survivors {
            clients.push((i, connect(group.addrs[i]).await?));
        }
        // Crash at a random point of the heartbeat cycle (Figure 16).
        tokio::time::sleep(
            SETTLE_BEFORE_KILL + Duration::from_micros(rng.below(heartbeat.as_micros() as u64)),
        )
        .await;
        // Is it still the leader? (A spurious election during the settle time.)
        match status(group.addrs[leader]).await {
            Some(s) if s.is_leader && s.term == old_term => {}
            _ => continue,
        }
        let killed_at = now();
        group.kill(leader);
        let deadline = killed_at + LIVENESS;
        let (elapsed, new_term) = 'found: loop {
            for (i, client) in clients.iter_mut() {
                let probe = DemoRequest::Propose {
                    data: format!("election-{k}").into_bytes(),
                };
                let response = call(client, probe)
                    .await
                    .with_context(|| format!("asking node {}", *i + 1))?;
                if let DemoResponse::Applied { term, .. } = response {
                    if term > old_term {
                        break 'found (now() - killed_at, term);
                    }
                }
            }
            if now() > deadline {
                bail!("no new leader committed within {LIVENESS:?} of kill {k}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let e = Election {
            elapsed,
            old_term,
            new_term,
        };
        println!(
            "{}",
            json!({
                "bench": "raft",
                "kind": "election",
                "kill": k,
                "election_ms": ms(e.elapsed),
                "old_term": e.old_term,
                "new_term": e.new_term,
                "tick_ms": settings.tick_ms,
                "election_tick": settings.election_tick,
                "heartbeat_tick": settings.heartbeat_tick,
                "load_avg_1m": load_avg_1m(),
            })
        );
        eprintln!(
            "raft bench: kill {}/{}: new leader committed after {:.1} ms (term {} -> {})",
            k + 1,
            args.kills,
            ms(e.elapsed),
            e.old_term,
            e.new_term
        );
        elections.push(e);
        // Restart the killed node from its disk; it catches up before the next kill.
        group.spawn(leader)?;
    }
    Ok(elections)
}

/// The node program and the arguments before its flags: `--node-bin` if given, else this
/// executable's `shoal raft node`.
fn node_bin(args: &BenchArgs) -> Result<(PathBuf, Vec<&'static str>)> {
    if let Some(bin) = &args.node_bin {
        return Ok((bin.clone(), Vec::new()));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    Ok((exe, vec!["raft", "node"]))
}

/// Runs `shoal bench raft`.
pub fn bench(mut args: BenchArgs) -> Result<ExitCode> {
    if args.quick {
        args.proposers = vec![1, 4];
        args.warmup_secs = 0.2;
        args.secs = 1.0;
        args.kills = args.kills.min(2);
    }
    if let Some(&p) = args
        .proposers
        .iter()
        .find(|&&p| p == 0 || p > MAX_PROPOSERS)
    {
        bail!("--proposers {p}: each count must be within 1..={MAX_PROPOSERS}");
    }
    if args.payload_bytes > MAX_PAYLOAD_BYTES {
        bail!("--payload-bytes must be at most {MAX_PAYLOAD_BYTES}");
    }
    if !(args.secs > 0.0
        && args.secs.is_finite()
        && args.warmup_secs >= 0.0
        && args.warmup_secs.is_finite())
    {
        bail!("--secs must be positive and --warmup-secs non-negative");
    }
    if args.tick_ms == 0 || args.heartbeat_tick == 0 || args.election_tick <= args.heartbeat_tick {
        bail!("need --tick-ms > 0 and 0 < --heartbeat-tick < --election-tick");
    }
    let (bin, bin_prefix) = node_bin(&args)?;
    let settings = NodeSettings {
        bin,
        bin_prefix,
        tick_ms: args.tick_ms,
        election_tick: args.election_tick,
        heartbeat_tick: args.heartbeat_tick,
    };
    let data_dir = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    eprintln!(
        "raft bench: 3 `shoal raft node` processes on 127.0.0.1, fsync on, data in {}; {}",
        data_dir.display(),
        crate::bench_util::machine_line()
    );

    let mut commit_figures = Vec::new();
    let proposer_counts = if args.elections_only {
        Vec::new()
    } else {
        args.proposers.clone()
    };
    for &proposers in &proposer_counts {
        let f = runtime
            .block_on(commit_run(&args, &settings, &data_dir, proposers))
            .with_context(|| format!("run with {proposers} proposers"))?;
        println!(
            "{}",
            json!({
                "bench": "raft",
                "kind": "commits",
                "proposers": f.proposers,
                "payload_bytes": args.payload_bytes,
                "warmup_secs": args.warmup_secs,
                "secs": args.secs,
                "commits": f.commits,
                "commits_per_sec": f.commits_per_sec.round(),
                "p50_ms": ms(f.p50),
                "p99_ms": ms(f.p99),
                "max_ms": ms(f.max),
                "refused": f.refused,
                "load_avg_1m_start": f.load_start,
                "load_avg_1m_end": f.load_end,
            })
        );
        commit_figures.push(f);
    }

    let elections = if args.kills > 0 {
        runtime
            .block_on(election_runs(&args, &settings, &data_dir))
            .context("election runs")?
    } else {
        Vec::new()
    };
    let mut sorted: Vec<Duration> = elections.iter().map(|e| e.elapsed).collect();
    sorted.sort_unstable();
    let q = |p| percentile(&sorted, p).map(ms);
    let timeout_ms = |t: u32| settings.tick_ms * u64::from(t);
    if !sorted.is_empty() {
        println!(
            "{}",
            json!({
                "bench": "raft",
                "kind": "elections",
                "kills": sorted.len(),
                "min_ms": q(0.0),
                "p50_ms": q(0.5),
                "p90_ms": q(0.9),
                "max_ms": q(1.0),
                "election_timeout_ms": [timeout_ms(args.election_tick), timeout_ms(2 * args.election_tick)],
                "heartbeat_ms": timeout_ms(args.heartbeat_tick),
                "load_avg_1m": load_avg_1m(),
            })
        );
    }

    if !commit_figures.is_empty() {
        print_commit_table(&args, &commit_figures);
    }
    if !sorted.is_empty() {
        let fmt = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.0} ms"));
        println!();
        println!(
            "Election after a leader SIGKILL ({} kills), election timeout [{}, {}) ms, heartbeat {} ms, pre-vote and check-quorum on",
            sorted.len(),
            timeout_ms(args.election_tick),
            timeout_ms(2 * args.election_tick),
            timeout_ms(args.heartbeat_tick)
        );
        println!("| min | p50 | p90 | max |");
        println!("| --- | --- | --- | --- |");
        println!(
            "| {} | {} | {} | {} |",
            fmt(q(0.0)),
            fmt(q(0.5)),
            fmt(q(0.9)),
            fmt(q(1.0))
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_commit_table(args: &BenchArgs, commit_figures: &[CommitFigures]) {
    println!();
    println!(
        "Raft, 3 real processes on 127.0.0.1, fsync on, {}-byte commands, {} s measured after {} s warmup",
        args.payload_bytes, args.secs, args.warmup_secs
    );
    println!(
        "| proposers | commits/s | p50 latency | p99 latency | refused | load avg (start/end) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for f in commit_figures {
        println!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {} | {} / {} |",
            f.proposers,
            f.commits_per_sec,
            ms(f.p50),
            ms(f.p99),
            f.refused,
            f.load_start.map_or("?".into(), |l| format!("{l:.2}")),
            f.load_end.map_or("?".into(), |l| format!("{l:.2}")),
        );
    }
}
