//! `shoal bench snapshot`: how fast a new member of a KV cluster is brought up to date over
//! the snapshot stream (issue 15), and what it costs in memory, next to this machine's raw
//! speeds measured in the same run.
//!
//! Real processes: three `shoal kv server`s (this executable) on 127.0.0.1, each with its
//! own data directory (real TCP, real files, fsync on, the server's default snapshot
//! threshold unless `--snapshot-mb`). `--mb` MiB are written through the client (values of
//! `--value-kb` KiB, pseudo-random bytes, `FILL_CLIENTS` writers), so the leader holds a
//! snapshot of most of it and a log of the rest. A closed-loop client then puts 128-byte
//! values throughout. After `--baseline-secs` of the client alone, a fourth server starts
//! empty with `--join`, and is added with `member add --learner` (as an operator does); it is
//! timed from the add until it applied everything committed at that moment: the leader
//! streams its snapshot file, then the log after it. Reported: that time and MB/s (of the
//! state), the disk's sequential write speed (1 MiB writes, one fsync) and loopback TCP's raw
//! speed over the same number of bytes, the client's p50/p99 without and during the
//! transfer, and each side's resident memory (`VmRSS` of `/proc/PID/status`, sampled every
//! `RSS_SAMPLE`) before and at its peak during the transfer, with the peak ever (`VmHWM`).
//!
//! Timings are figures, never pass/fail criteria. Needs about 3 × `--mb` (three data
//! directories; four once the learner has it) plus `--mb` for the disk measurement, free in
//! `--dir`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use shoal_cluster::{free_local_addrs, peers_arg, Procs, Spec};
use shoal_runtime::kv::{Client, ClientConfig};
use shoal_wire::kv::{Expected, KvOp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::bench_util::{ms, now, percentile};

/// Liveness bound of every wait (a leader, the fill, the catch-up): exceeding it fails the
/// run. Not a figure.
const LIVENESS: Duration = Duration::from_secs(1200);
/// Poll interval while waiting.
const POLL: Duration = Duration::from_millis(50);
/// Writers of the fill, each with one put in flight.
const FILL_CLIENTS: usize = 4;
/// Bytes of each of the client's small values.
const PROBE_BYTES: usize = 128;
/// How often each server's resident memory is read.
const RSS_SAMPLE: Duration = Duration::from_millis(100);
/// Bound of one status probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Servers of the cluster before the learner.
const MEMBERS: usize = 3;

/// Arguments of `shoal bench snapshot`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// MiB of values the cluster holds before the new member is added.
    #[arg(long, default_value_t = 256)]
    mb: usize,
    /// KiB per written value (at most the servers' largest value, 1024).
    #[arg(long, default_value_t = 256)]
    value_kb: usize,
    /// The servers' snapshot threshold in MiB (`kv server --snapshot-bytes`; default: the
    /// server's own default, 64 MiB).
    #[arg(long)]
    snapshot_mb: Option<u64>,
    /// Seconds to let the servers settle after the fill (their snapshots finish).
    #[arg(long, default_value_t = 5.0)]
    settle_secs: f64,
    /// Seconds of client load alone, before the new member is added.
    #[arg(long, default_value_t = 5.0)]
    baseline_secs: f64,
    /// Where the servers' data directories go (default: a temporary directory in the
    /// system's, removed after). Needs about 4 × --mb free (see above).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Runs the benchmark.
pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    if args.mb == 0 || args.value_kb == 0 {
        bail!("--mb and --value-kb must be positive");
    }
    if args.value_kb > 1024 {
        bail!("--value-kb must be at most 1024 (the servers' largest value is 1 MiB)");
    }
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix("shoal-bench-snapshot-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a directory in {}", parent.display()))?;
    if std::env::var_os("SHOAL_BENCH_KEEP_DATA").is_some() {
        tmp.disable_cleanup(true);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(run(args, tmp.path()));
    drop(rt);
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Resident memory of one process over the transfer.
#[derive(Debug, Default, Clone, Copy)]
struct RssTrack {
    before: u64,
    peak: u64,
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

    let exe = std::env::current_exe().context("locating the shoal executable")?;
    let addrs = free_local_addrs(MEMBERS + 1)?;
    let mut procs = Procs::with_slots(MEMBERS + 1);
    let server = |i: usize, join: bool| {
        let id = (i + 1).to_string();
        let mut spec = Spec::new(
            format!("kv server {}", i + 1),
            &exe,
            dir.join(format!("m{}.log", i + 1)),
        )
        .args(["kv", "server", "--id", &id])
        .args(["--listen", &addrs[i].to_string()])
        .arg("--data")
        .arg(dir.join(format!("m{}", i + 1)))
        .env(
            "SHOAL_LOG",
            std::env::var("SHOAL_SERVER_LOG").unwrap_or_else(|_| "info".into()),
        );
        spec = if join {
            let join: Vec<String> = addrs[..MEMBERS].iter().map(|a| a.to_string()).collect();
            spec.args(["--join", &join.join(",")])
        } else {
            spec.args(["--peers", &peers_arg(&addrs[..MEMBERS])])
        };
        if let Some(mb) = args.snapshot_mb {
            spec = spec.args(["--snapshot-bytes", &(mb << 20).to_string()]);
        }
        spec
    };
    for i in 0..MEMBERS {
        procs.spawn_at(i, server(i, false))?;
    }
    let members = addrs[..MEMBERS].to_vec();
    let leader = wait_leader(&mut procs, &members).await?;
    eprintln!("leader: server {}", leader + 1);

    // The fill: `FILL_CLIENTS` writers, each with one put in flight.
    let value_bytes = args.value_kb * 1024;
    let puts = (bytes as usize).div_ceil(value_bytes);
    eprintln!(
        "writing {} MiB in {puts} values of {} KiB through the client…",
        args.mb, args.value_kb
    );
    let fill_start = now();
    let mut writers = Vec::new();
    for w in 0..FILL_CLIENTS {
        let members = members.clone();
        writers.push(tokio::spawn(async move {
            let mut client = Client::new(ClientConfig::new(members))?;
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ w as u64;
            let mut value = vec![0u8; value_bytes];
            for i in (w..puts).step_by(FILL_CLIENTS) {
                for chunk in value.chunks_mut(8) {
                    rng = splitmix(rng);
                    let b = rng.to_le_bytes();
                    chunk.copy_from_slice(&b[..chunk.len()]);
                }
                let key = format!("fill-{i:08}");
                client
                    .put(key.as_bytes(), &value, Expected::Any)
                    .await
                    .with_context(|| format!("writing {key}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await.context("a writer panicked")??;
    }
    let fill_secs = fill_start.elapsed().as_secs_f64();
    eprintln!(
        "written in {fill_secs:.1} s ({:.1} MiB/s); settling {} s…",
        args.mb as f64 / fill_secs,
        args.settle_secs
    );
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let leader = wait_leader(&mut procs, &members).await?;

    // The fourth server, started empty with --join: its memory before it holds anything.
    procs.spawn_at(MEMBERS, server(MEMBERS, true))?;
    let learner_addr = addrs[MEMBERS];
    wait_answers(&mut procs, learner_addr).await?;
    let pid = |procs: &Procs, i: usize| procs.get(i).and_then(|p| p.pid());
    let (leader_pid, learner_pid) = (
        pid(&procs, leader).context("the leader's pid")?,
        pid(&procs, MEMBERS).context("the new server's pid")?,
    );

    // The client, throughout; each sample is (start, latency).
    let samples = Arc::new(Mutex::new(Vec::<(Instant, Duration)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (samples, stop, members) = (Arc::clone(&samples), Arc::clone(&stop), members.clone());
        tokio::spawn(async move {
            let Ok(mut client) = Client::new(ClientConfig::new(members)) else {
                return;
            };
            let value = vec![7u8; PROBE_BYTES];
            while !stop.load(Ordering::Relaxed) {
                let t = now();
                if client.put(b"probe", &value, Expected::Any).await.is_ok() {
                    lock(&samples).push((t, t.elapsed()));
                } else {
                    tokio::time::sleep(POLL).await;
                }
            }
        })
    };
    // Resident memory of the leader and the new server, sampled throughout.
    let rss = Arc::new(Mutex::new([RssTrack::default(); 2]));
    let sampler = {
        let (rss, stop) = (Arc::clone(&rss), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (k, pid) in [leader_pid, learner_pid].into_iter().enumerate() {
                    let now = proc_status_bytes(pid, "VmRSS:").unwrap_or(0);
                    let mut t = lock(&rss);
                    t[k].peak = t[k].peak.max(now);
                }
                tokio::time::sleep(RSS_SAMPLE).await;
            }
        })
    };
    let baseline_start = now();
    tokio::time::sleep(Duration::from_secs_f64(args.baseline_secs)).await;
    {
        let mut t = lock(&rss);
        for (k, pid) in [leader_pid, learner_pid].into_iter().enumerate() {
            let now = proc_status_bytes(pid, "VmRSS:").unwrap_or(0);
            t[k] = RssTrack {
                before: now,
                peak: now,
            };
        }
    }
    let leader_snapshot_bytes = std::fs::metadata(
        dir.join(format!("m{}", leader + 1))
            .join(shoal_storage::SNAPSHOT_FILE),
    )
    .map(|m| m.len())
    .unwrap_or(0);

    eprintln!(
        "adding server {} as a learner (leader's snapshot file: {} MiB)…",
        MEMBERS + 1,
        leader_snapshot_bytes >> 20
    );
    let catchup_start = now();
    let mut admin = Client::new(ClientConfig::new(members.clone()))?;
    let added = admin
        .member_change(KvOp::MemberAdd {
            id: (MEMBERS + 1) as u64,
            addr: learner_addr.to_string(),
            learner: true,
        })
        .await
        .context("member add")?;
    if let Err(reason) = added {
        bail!("the leader refused to add the learner: {reason}");
    }
    let goal = admin
        .find_leader(PROBE_TIMEOUT)
        .await
        .context("no leader after the add")?
        .commit;
    let mut at_learner = Client::new(ClientConfig::new(vec![learner_addr]))?;
    let mut last_report = now();
    loop {
        procs.check_running()?;
        if let Ok(st) = at_learner.status(0, PROBE_TIMEOUT).await {
            if st.applied >= goal {
                break;
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = now();
                eprintln!("  learner applied {} of {goal}", st.applied);
            }
        }
        if catchup_start.elapsed() > LIVENESS {
            bail!("the learner did not catch up within {LIVENESS:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    let catchup = catchup_start.elapsed();
    let catchup_end = now();
    stop.store(true, Ordering::Relaxed);
    let _ = probe.await;
    let _ = sampler.await;
    let [leader_rss, learner_rss] = *lock(&rss);
    let hwm = |pid: u32| proc_status_bytes(pid, "VmHWM:").unwrap_or(0);
    let (leader_hwm, learner_hwm) = (hwm(leader_pid), hwm(learner_pid));
    let learner_end = proc_status_bytes(learner_pid, "VmRSS:").unwrap_or(0);
    for i in 0..=MEMBERS {
        if let Some(p) = procs.get_mut(i) {
            p.stop(Duration::from_secs(5));
        }
    }

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
    let mib = |b: u64| b as f64 / 1_048_576.0;
    let mbps = mib(bytes) / catchup.as_secs_f64();
    let growth = |t: RssTrack| mib(t.peak.saturating_sub(t.before));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let line = json!({
        "bench": "snapshot",
        "state_mib": args.mb,
        "value_kib": args.value_kb,
        "leader_snapshot_file_mib": mib(leader_snapshot_bytes),
        "fill_s": fill_secs,
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
        "leader_rss_mib_before": mib(leader_rss.before),
        "leader_rss_mib_peak": mib(leader_rss.peak),
        "leader_rss_mib_growth": growth(leader_rss),
        "leader_hwm_mib": mib(leader_hwm),
        "learner_rss_mib_before": mib(learner_rss.before),
        "learner_rss_mib_peak": mib(learner_rss.peak),
        "learner_rss_mib_growth": growth(learner_rss),
        "learner_rss_mib_growth_beyond_state": growth(learner_rss) - mib(bytes),
        "learner_rss_mib_end": mib(learner_end),
        "learner_hwm_mib": mib(learner_hwm),
        "loadavg": load.trim(),
    });
    println!("{line}");
    println!();
    println!(
        "learner up to date on {} MiB (leader's snapshot file {:.0} MiB, + log); load {}",
        args.mb,
        mib(leader_snapshot_bytes),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
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
        "  leader RSS          {:.0} MiB before, {:.0} MiB peak during (+{:.0} MiB); VmHWM {:.0} MiB",
        mib(leader_rss.before),
        mib(leader_rss.peak),
        growth(leader_rss),
        mib(leader_hwm)
    );
    println!(
        "  learner RSS         {:.0} MiB before, {:.0} MiB peak during (+{:.0} MiB: {:+.0} MiB beyond the {} MiB of state); VmHWM {:.0} MiB",
        mib(learner_rss.before),
        mib(learner_rss.peak),
        growth(learner_rss),
        growth(learner_rss) - mib(bytes),
        args.mb,
        mib(learner_hwm)
    );
    Ok(())
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Waits until a server leads; returns its index.
async fn wait_leader(procs: &mut Procs, members: &[SocketAddr]) -> Result<usize> {
    let start = now();
    let mut config = ClientConfig::new(members.to_vec());
    config.op_timeout = PROBE_TIMEOUT;
    let client = Client::new(config)?;
    while start.elapsed() < LIVENESS {
        procs.check_running()?;
        if let Some(s) = client.find_leader(PROBE_TIMEOUT).await {
            if let Some(i) = usize::try_from(s.id).ok().and_then(|i| i.checked_sub(1)) {
                if i < members.len() {
                    return Ok(i);
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("no leader within {LIVENESS:?}")
}

/// Waits until the server at `addr` accepts connections (a server still joining answers no
/// client request until it is a member), then a moment for it to settle.
async fn wait_answers(procs: &mut Procs, addr: SocketAddr) -> Result<()> {
    let start = now();
    while start.elapsed() < LIVENESS {
        procs.check_running()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("the new server did not listen within {LIVENESS:?}")
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in bytes (Linux).
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
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
