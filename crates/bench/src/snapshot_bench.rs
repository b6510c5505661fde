//! `shoal bench snapshot`: how fast a new member is brought up to date over the snapshot
//! stream (issue 15), next to this machine's raw speeds measured in the same run.
//!
//! Three Raft nodes of the runtime run in this process on 127.0.0.1 (real TCP, real files,
//! fsync on), each hosting a state machine whose state is every command applied, so its
//! snapshot is as large as what was written. Nodes 1 and 2 start; `--mb` MiB are written in
//! commands of `--entry-kb` KiB (the log is compacted every `--snapshot-every` entries, so the
//! group holds a snapshot and a log after it); a closed-loop client proposes small commands
//! throughout. After `--baseline-secs` of the client alone, node 3 starts with an empty data
//! directory and is timed until it applied everything committed when it started: the leader
//! streams its snapshot file, then the log after it. Reported: that time and MB/s, the disk's
//! sequential write speed (1 MiB writes, one fsync) and loopback TCP's raw speed over the same
//! number of bytes, the client's p50/p99 with and without the transfer, and this process's
//! resident memory (all three nodes) before and at its peak during the transfer.
//!
//! Timings are figures, never pass/fail criteria.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::json;
use shoal_raft::{LogIndex, NodeId, Role};
use shoal_runtime::{Node, NodeConfig, StateMachine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::bench_util::{ms, now, percentile};

/// Cluster id of the nodes (any value; ours only).
const CLUSTER_ID: u64 = 15;
/// Liveness bound of every wait (a leader, the load, the catch-up): exceeding it fails the
/// run. Not a figure.
const LIVENESS: Duration = Duration::from_secs(600);
/// Poll interval while waiting.
const POLL: Duration = Duration::from_millis(20);
/// Proposals of the load in flight at once.
const LOAD_IN_FLIGHT: usize = 8;
/// Bytes of each of the client's small commands.
const PROBE_BYTES: usize = 128;

/// Arguments of `shoal bench snapshot`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// MiB of state the group holds (snapshot + log) before the new member starts.
    #[arg(long, default_value_t = 256)]
    mb: usize,
    /// KiB per written command.
    #[arg(long, default_value_t = 1024)]
    entry_kb: usize,
    /// Compact the log every this many applied entries (default: half the written entries, so
    /// about half the state is in the snapshot and half in the log).
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Seconds of client load alone, before the new member starts.
    #[arg(long, default_value_t = 5.0)]
    baseline_secs: f64,
    /// Where the nodes' data directories go (default: a temporary directory, removed after).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

/// A state machine whose state is every command applied, concatenated.
#[derive(Clone, Default)]
struct Blob(Arc<Mutex<Vec<u8>>>);

impl Blob {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl StateMachine for Blob {
    fn apply(&mut self, _index: LogIndex, command: &[u8]) {
        self.lock().extend_from_slice(command);
    }
    fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn restore(&mut self, _index: LogIndex, data: &[u8]) -> Result<(), String> {
        let mut s = self.lock();
        s.clear();
        s.extend_from_slice(data);
        Ok(())
    }
}

/// Runs the benchmark.
pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    if args.mb == 0 || args.entry_kb == 0 {
        bail!("--mb and --entry-kb must be positive");
    }
    if args.entry_kb > 4096 {
        bail!("--entry-kb must be at most 4096 (a command travels in one append)");
    }
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(args, &dir))?;
    Ok(ExitCode::SUCCESS)
}

async fn run(args: BenchArgs, dir: &Path) -> Result<()> {
    let bytes = args.mb as u64 * 1024 * 1024;
    let raw_bytes = bytes.min(1 << 30);
    eprintln!(
        "measuring the disk's sequential write speed ({} MiB)…",
        raw_bytes >> 20
    );
    let disk_mbps = disk_write_mbps(dir, raw_bytes).await?;
    eprintln!("measuring loopback TCP ({} MiB)…", raw_bytes >> 20);
    let tcp_mbps = loopback_mbps(raw_bytes).await?;

    let entry_bytes = args.entry_kb * 1024;
    let entries = (bytes as usize).div_ceil(entry_bytes);
    let snapshot_every = args.snapshot_every.unwrap_or((entries as u64 / 2).max(1));
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        peers.insert(id, l.local_addr()?);
        listeners.push(l);
    }
    let config = |id: u64| {
        let mut c = NodeConfig::new(
            NodeId(id),
            CLUSTER_ID,
            peers.clone(),
            dir.join(format!("n{id}")),
        );
        c.snapshot_every = Some(snapshot_every);
        c
    };
    let late = listeners.pop().context("three listeners")?;
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        nodes.push(Node::start(config(i as u64 + 1), l, Blob::default()).await?);
    }
    let leader = wait_for_leader(&nodes).await?;
    let handle = nodes[leader].handle.clone();

    eprintln!(
        "writing {} MiB in {entries} commands of {} KiB (log compacted every {snapshot_every})…",
        args.mb, args.entry_kb
    );
    let load_start = now();
    let mut load = futures::stream::iter(0..entries)
        .map(|i| {
            let h = handle.clone();
            async move { h.propose_and_wait(vec![(i % 251) as u8; entry_bytes]).await }
        })
        .buffer_unordered(LOAD_IN_FLIGHT);
    while let Some(r) = load.next().await {
        r.map_err(|e| anyhow::anyhow!("writing the state: {e}"))?;
    }
    drop(load);
    let load_secs = load_start.elapsed().as_secs_f64();
    eprintln!("written in {load_secs:.1} s");

    // The client, throughout; each sample is (start, latency).
    let samples = Arc::new(Mutex::new(Vec::<(Instant, Duration)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        // It follows the leader: on a refusal it tries the next node.
        let handles: Vec<_> = nodes.iter().map(|n| n.handle.clone()).collect();
        let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
        let mut at = leader;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t = now();
                match handles[at].propose_and_wait(vec![7u8; PROBE_BYTES]).await {
                    Ok(_) => lock(&samples).push((t, t.elapsed())),
                    Err(_) => {
                        at = (at + 1) % handles.len();
                        tokio::time::sleep(POLL).await;
                    }
                }
            }
        })
    };
    let rss = Arc::new(Mutex::new(0u64));
    let sampler = {
        let (rss, stop) = (Arc::clone(&rss), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let now = rss_bytes().unwrap_or(0);
                {
                    let mut max = lock(&rss);
                    *max = (*max).max(now);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let baseline_start = now();
    tokio::time::sleep(Duration::from_secs_f64(args.baseline_secs)).await;
    let rss_before = rss_bytes().unwrap_or(0);
    *lock(&rss) = rss_before;

    // Everything committed when node 3 starts (the highest commit index any node knows).
    let mut target = LogIndex(0);
    for n in &nodes {
        target = target.max(n.handle.status().await?.commit);
    }
    let snapshot_file_bytes = || {
        (1..=2)
            .filter_map(|id| {
                std::fs::metadata(
                    dir.join(format!("n{id}"))
                        .join(shoal_storage::SNAPSHOT_FILE),
                )
                .ok()
            })
            .map(|m| m.len())
            .max()
            .unwrap_or(0)
    };
    eprintln!("starting node 3 (empty); catching up to index {target}…");
    let catchup_start = now();
    let node3 = Node::start(config(3), late, Blob::default()).await?;
    let mut last_report = now();
    loop {
        let st = node3.handle.status().await?;
        if st.applied >= target {
            break;
        }
        if catchup_start.elapsed() > LIVENESS {
            bail!(
                "node 3 did not catch up within {LIVENESS:?} (applied {})",
                st.applied
            );
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = now();
            for s in nodes.iter().flat_map(|n| n.handle.snapshot_sends()) {
                eprintln!(
                    "  snapshot to {}: {} of {} MiB",
                    s.to,
                    s.sent_bytes >> 20,
                    s.total_bytes >> 20
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
    let catchup = catchup_start.elapsed();
    let catchup_end = now();
    let snapshot_file_bytes = snapshot_file_bytes();
    let rss_peak = *lock(&rss);
    stop.store(true, Ordering::Relaxed);
    let _ = client.await;
    let _ = sampler.await;

    let window = |from: Instant, to: Instant| {
        let mut v: Vec<Duration> = lock(&samples)
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, d)| *d)
            .collect();
        v.sort();
        v
    };
    let base = window(baseline_start, catchup_start);
    let during = window(catchup_start, catchup_end);
    let p = |v: &[Duration], q: f64| percentile(v, q).map(ms).unwrap_or(f64::NAN);
    let mbps = bytes as f64 / 1_048_576.0 / catchup.as_secs_f64();
    let line = json!({
        "bench": "snapshot",
        "state_mib": args.mb,
        "entry_kib": args.entry_kb,
        "snapshot_file_mib_after": snapshot_file_bytes as f64 / 1_048_576.0,
        "catchup_s": catchup.as_secs_f64(),
        "catchup_mib_per_s": mbps,
        "disk_write_mib_per_s": disk_mbps,
        "loopback_tcp_mib_per_s": tcp_mbps,
        "client_p50_ms_without": p(&base, 0.50),
        "client_p99_ms_without": p(&base, 0.99),
        "client_samples_without": base.len(),
        "client_p50_ms_during": p(&during, 0.50),
        "client_p99_ms_during": p(&during, 0.99),
        "client_samples_during": during.len(),
        "rss_mib_before": rss_before as f64 / 1_048_576.0,
        "rss_mib_peak_during": rss_peak as f64 / 1_048_576.0,
        "load_s": load_secs,
    });
    println!("{line}");
    println!();
    println!(
        "new member up to date on {} MiB (snapshot file {:.0} MiB after, + log)",
        args.mb,
        snapshot_file_bytes as f64 / 1_048_576.0
    );
    println!(
        "  catch-up            {:>8.2} s   {mbps:>8.1} MiB/s",
        catchup.as_secs_f64()
    );
    println!("  disk seq. write     {:>8} {disk_mbps:>10.1} MiB/s", "");
    println!("  loopback TCP        {:>8} {tcp_mbps:>10.1} MiB/s", "");
    println!(
        "  client p50/p99      {:.2}/{:.2} ms without ({} samples), {:.2}/{:.2} ms during ({} samples)",
        p(&base, 0.5),
        p(&base, 0.99),
        base.len(),
        p(&during, 0.5),
        p(&during, 0.99),
        during.len()
    );
    println!(
        "  process RSS (3 nodes) {:.0} MiB before, {:.0} MiB peak during (+{:.0} MiB)",
        rss_before as f64 / 1_048_576.0,
        rss_peak as f64 / 1_048_576.0,
        rss_peak.saturating_sub(rss_before) as f64 / 1_048_576.0
    );
    // Stop the nodes before the runtime, so no task of theirs runs into its shutdown.
    for mut n in nodes.into_iter().chain([node3]) {
        n.handle.shutdown().await;
        let _ = n.wait().await;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn wait_for_leader(nodes: &[Node]) -> Result<usize> {
    let start = now();
    while start.elapsed() < LIVENESS {
        for (i, n) in nodes.iter().enumerate() {
            if n.handle.status().await?.role == Role::Leader {
                return Ok(i);
            }
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("no leader within {LIVENESS:?}")
}

/// This process's resident memory, from `/proc/self/status` (Linux).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sequential write speed of the disk under `dir`: `bytes` in 1 MiB writes, one fsync.
async fn disk_write_mbps(dir: &Path, bytes: u64) -> Result<f64> {
    let path = dir.join("disk-speed.tmp");
    let p = path.clone();
    let secs = tokio::task::spawn_blocking(move || -> Result<f64> {
        use std::io::Write;
        let buf = vec![0x5au8; 1 << 20];
        let start = now();
        let mut f = std::fs::File::create(&p)?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        Ok(start.elapsed().as_secs_f64())
    })
    .await??;
    let _ = std::fs::remove_file(&path);
    Ok(bytes as f64 / 1_048_576.0 / secs)
}

/// Raw loopback TCP speed: `bytes` in 1 MiB writes to a reader that discards them.
async fn loopback_mbps(bytes: u64) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok::<u64, std::io::Error>(got)
    });
    let start = now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let buf = vec![0xa5u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    let got = reader.await??;
    let secs = start.elapsed().as_secs_f64();
    if got != bytes {
        bail!("loopback: {got} of {bytes} bytes arrived");
    }
    Ok(bytes as f64 / 1_048_576.0 / secs)
}
