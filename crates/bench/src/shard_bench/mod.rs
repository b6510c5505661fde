//! `shoal bench shard`: how the sharded key/value database scales with the number of replica
//! groups (issue 14's scaling benchmark), and what a shard migration costs.
//!
//! - **Matrix**: for each group count N, a fresh local cluster (a controller store of three
//!   `shoal kv server`s, N groups of `--replicas` `shoal shard server`s), one Join, K·N keys
//!   preloaded, then puts and linearizable gets by C·N closed-loop clients sharing one
//!   [`shoal_runtime::shard::ShardClientPool`] for `--seconds` each.
//! - **Scale model**: this machine has few cores, so every shard server runs in its own cgroup
//!   with a fixed CPU quota ([`cgroup`]); the same matrix also runs without quotas (the real
//!   ceiling of the machine). The host's CPU use and the cgroups' throttling are printed next
//!   to each result.
//! - **Migration**: two groups under quota (and without); one shard filled, then moved while
//!   the other shards take puts and one client polls the moving shard ([`migration`]).
//!
//! Progress goes to stderr; stdout gets one JSON line per run, then Markdown tables. An SVG of
//! the speed-ups goes to `--out`. Timings are figures, never pass/fail criteria.

pub mod cgroup;
mod cluster;
mod load;
pub mod migration;
pub mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::bench_util::{cpu_model, now};
use cgroup::{Hierarchy, HostCpu, Quota};
use cluster::{ClusterSpec, ShardCluster};
use load::LoadSpec;
use report::{Row, Setting, Workload};

/// Arguments of `shoal bench shard`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  shoal bench shard                                  # the full matrix + a migration (~10 min)
  shoal bench shard --groups 1,2 --seconds 3 --migration-mb 0
  shoal bench shard --quota-only --groups 1,4,8 --quota-ms 2.5 --period-ms 100
  shoal bench shard --groups 2 --seconds 5 --migration-mb 8   # a migration alone, roughly

For each group count N: a fresh local cluster on 127.0.0.1 (a controller store of three \
`shoal kv server`s and N groups of --replicas `shoal shard server`s, data in a temporary \
directory under --data-dir), one Join of all groups, --keys-per-group × N keys preloaded, then \
--seconds of unconditional puts (fsynced on a majority, the servers' default) and --seconds of \
linearizable gets, by --clients-per-group × N closed-loop clients choosing keys uniformly (keys \
hash uniformly over the shards). The first --warmup-seconds of each are not measured.

CPU quotas (the scale model of a machine with one core per server): each shard server runs in \
its own cgroup with --quota-ms of CPU per --period-ms (cgroup v1 cpu.cfs_quota_us or v2 \
cpu.max, under <cpu hierarchy>/shoal-bench/, removed afterwards). The default, 1 ms per 40 ms \
(2.5% of a core), gives 24 servers at 8 groups 0.6 of a core in all: the model holds only while \
the real host is not saturated (at 5% the servers' demand plus the kernel's and the load \
generator's kept the 2 cores 1.95 busy at 8 groups, and the 'machines' competed for real cores), \
and a short period keeps a throttled server's stall short (at 2.5 ms per 100 ms a server stood \
still up to 97.5 ms at a time, as no real machine does, and a read-index round often waited for \
a follower's next period), leaving the rest to \
the load generator, the controller and the controller store (lightly loaded: clients cache the \
configuration; no quota). This needs root and a cpu controller; without either the benchmark \
says so and runs the no-quota matrix only. Each result shows the host's CPU use over the run \
(/proc/stat) and the throttled periods and time summed over the cgroups (cpu.stat).

Migration (--migration-mb > 0): 2 groups under quota (then again without); one shard of group 1 filled with values \
of --migration-value-kib, then moved to group 2 while --clients-per-group × 2 clients put to \
the other shards and one client polls a key of the moving shard: the move's duration, the p99 \
of the other shards' puts during the move against a run without a move (target ≤ 1.5×), and \
the longest time the moving shard did not answer (target < 1 s). The shard is copied in chunks \
while it serves, at the controller's default pace (SHOAL_MIGRATION_CHUNK_KIB, \
SHOAL_MIGRATION_COPY_PAUSE_MS and SHOAL_MIGRATION_COPY_IN_FLIGHT set it for measuring).

Output: progress on stderr; stdout: one JSON line per run, then Markdown tables (puts, gets) \
× (quota, no quota) with speed-up X(N)/X(1), efficiency X(N)/(N·X(1)) and the targets (≥3.4× \
at 4 groups, ≥6× at 8, under quota); --out gets shard-scaling.svg (speed-up against groups) \
and results.md (the tables). SHOAL_BENCH_KEEP_DATA=1 keeps the data and server logs; \
SHOAL_SERVER_LOG sets the servers' log filter (default warn).")]
pub struct BenchArgs {
    /// Group counts, one cluster per count (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    groups: Vec<usize>,
    /// Servers per group.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Measured seconds per run (puts, then gets), after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds of each run before measuring (connections, sessions, caches).
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    /// CPU time each shard server may use per period, in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    quota_ms: f64,
    /// The CFS period, in milliseconds (a quota of at least 1 ms per period).
    #[arg(long, default_value_t = 40.0)]
    period_ms: f64,
    /// Only the matrix without quotas.
    #[arg(long, conflicts_with = "quota_only")]
    no_quota: bool,
    /// Only the matrix under quotas.
    #[arg(long)]
    quota_only: bool,
    /// Closed-loop clients per group (the load grows with the groups).
    #[arg(long, default_value_t = 16)]
    clients_per_group: usize,
    /// Keys per group (the key space grows with the groups), preloaded.
    #[arg(long, default_value_t = 1000)]
    keys_per_group: u64,
    /// Bytes per value of the matrix's puts and preload.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Shards of the cluster.
    #[arg(long, default_value_t = shoal_shard::DEFAULT_SHARDS)]
    shards: u32,
    /// Megabytes (10^6 bytes) to fill the moving shard with; 0 skips the migration.
    #[arg(long, default_value_t = 100)]
    migration_mb: u64,
    /// KiB per value of the moving shard (at most the servers' value limit, 1 MiB).
    #[arg(long, default_value_t = 64)]
    migration_value_kib: usize,
    /// Where the plot and the tables go.
    #[arg(long, default_value = "target/bench-shard")]
    out: PathBuf,
    /// Where the clusters keep their data (fresh subdirectories, removed afterwards). It
    /// should be on the disk being measured: on a tmpfs fsync is free. Default: $TMPDIR,
    /// /var/tmp or the current directory, the first that is not a tmpfs.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn validate(args: &BenchArgs) -> Result<()> {
    if args.groups.is_empty() || args.groups.contains(&0) {
        bail!("--groups needs group counts of at least 1, e.g. --groups 1,2,4,8");
    }
    if args.replicas == 0 || args.replicas > 7 {
        bail!("--replicas must be 1 to 7 (3 is the issue's setting)");
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        bail!("--seconds must be positive, e.g. --seconds 10");
    }
    if !(args.warmup_seconds >= 0.0 && args.warmup_seconds.is_finite()) {
        bail!("--warmup-seconds must be 0 or more");
    }
    if args.clients_per_group == 0
        || args.clients_per_group * args.groups.iter().max().unwrap_or(&1) > 1000
    {
        bail!("--clients-per-group × the largest group count must be 1 to 1000");
    }
    if args.keys_per_group == 0 {
        bail!("--keys-per-group must be at least 1");
    }
    shoal_shard::validate_shards(u64::from(args.shards))
        .map_err(|e| anyhow::anyhow!("--shards: {e}: 1 to {}", shoal_shard::MAX_SHARDS))?;
    let max_value = shoal_kv::store::DEFAULT_MAX_VALUE_BYTES;
    if args.value_size == 0 || args.value_size > max_value {
        bail!("--value-size must be 1 to {max_value} bytes (the servers' value limit)");
    }
    if args.migration_mb > 0
        && (args.migration_value_kib == 0 || args.migration_value_kib * 1024 > max_value)
    {
        bail!(
            "--migration-value-kib must be 1 to {} (the servers' value limit)",
            max_value / 1024
        );
    }
    Ok(())
}

/// Runs `shoal bench shard`.
pub fn bench(mut args: BenchArgs) -> Result<ExitCode> {
    validate(&args)?;
    let data_dir = args
        .data_dir
        .get_or_insert_with(crate::kv_bench::default_data_dir)
        .clone();
    if crate::kv_bench::is_tmpfs(&data_dir) {
        eprintln!(
            "shard bench: warning: {} is a tmpfs: fsync is free there, the puts are flattered",
            data_dir.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let quota = Quota::new(
        Duration::from_secs_f64(args.period_ms / 1e3),
        Duration::from_secs_f64(args.quota_ms / 1e3),
    )?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    eprintln!(
        "shard bench: {}; kernel {kernel}; data under {}",
        crate::bench_util::machine_line(),
        data_dir.display()
    );
    let mut settings = Vec::new();
    let mut hierarchy = None;
    if !args.no_quota {
        match cgroup::probe(quota) {
            Ok(h) => {
                let max_n = *args.groups.iter().max().unwrap_or(&1);
                let servers = max_n * args.replicas;
                eprintln!(
                    "shard bench: CPU quota {:.1} ms per {:.0} ms per shard server ({:.3} cores) in cgroup {:?} {}; \
                     at {max_n} groups {servers} servers: {:.2} cores of {cpus}; the controller store is not under quota",
                    quota.quota_us as f64 / 1e3,
                    quota.period_us as f64 / 1e3,
                    quota.cores(),
                    h.version,
                    h.root.join(cgroup::BENCH_DIR).display(),
                    quota.cores() * servers as f64,
                );
                hierarchy = Some(h);
                settings.push(Setting::Quota);
            }
            Err(why) => {
                eprintln!("shard bench: cgroups unavailable ({why}); running without CPU quotas")
            }
        }
    }
    if !args.quota_only || hierarchy.is_none() {
        settings.push(Setting::NoQuota);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;

    let mut rows = Vec::new();
    let mut migrations = Vec::new();
    let outcome: Result<()> = runtime.block_on(async {
        for &setting in &settings {
            for &n in &args.groups {
                let q = match setting {
                    Setting::Quota => hierarchy.clone().map(|h| (h, quota)),
                    Setting::NoQuota => None,
                };
                run_groups(&args, q, setting, n, cpus, &mut rows).await?;
            }
        }
        if args.migration_mb == 0 {
            return Ok(());
        }
        // Under quota (the figure), then without (where the time goes without the model).
        for &setting in &settings {
            let (q, label) = match setting {
                Setting::Quota => (hierarchy.clone().map(|h| (h, quota)), "move-quota"),
                Setting::NoQuota => (None, "move-free"),
            };
            eprintln!("shard bench: migration, {}", setting.name());
            let spec = cluster_spec(&args, q, 2, label);
            let m = migration::measure(
                &spec,
                args.migration_mb * 1_000_000,
                args.migration_value_kib * 1024,
                2 * args.clients_per_group,
                Arc::new(keys(2 * args.keys_per_group)),
                Arc::new(vec![b'v'; args.value_size]),
                Duration::from_secs_f64(args.seconds),
            )
            .await;
            // A move that does not complete is a result too: the other setting still runs.
            match m {
                Ok(m) => {
                    let mut line = m.json();
                    line["setting"] = json!(setting.name());
                    println!("{line}");
                    migrations.push((setting, Ok(m)));
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!("shard bench: migration, {}: {why}", setting.name());
                    println!(
                        "{}",
                        json!({"kind": "migration", "setting": setting.name(), "error": why})
                    );
                    migrations.push((setting, Err(why)));
                }
            }
        }
        let failed: Vec<&str> = migrations
            .iter()
            .filter(|(_, m)| m.is_err())
            .map(|(s, _)| s.name())
            .collect();
        if !failed.is_empty() {
            bail!("the migration failed ({}): see above", failed.join(", "));
        }
        Ok(())
    });

    // Whatever was measured is printed and drawn, even if a later step failed.
    let setup = format!(
        "{cpus} CPUs ({}), kernel {kernel}; {} servers per group, {} shards, {} clients and {} keys per group, {}-byte values, {} s per run; quota {} per shard server",
        cpu_model(),
        args.replicas,
        args.shards,
        args.clients_per_group,
        args.keys_per_group,
        args.value_size,
        args.seconds,
        if hierarchy.is_some() {
            format!("{:.1} ms / {:.0} ms", args.quota_ms, args.period_ms)
        } else {
            "none (cgroups unavailable)".into()
        }
    );
    let mut md = format!("{setup}\n\n");
    for &setting in &settings {
        for workload in [Workload::Put, Workload::Get] {
            if !rows
                .iter()
                .any(|r| r.setting == setting && r.workload == workload)
            {
                continue;
            }
            let heading = format!("#### {}, {}", workload.name(), setting.name());
            md.push_str(&report::table(&rows, setting, workload, &heading));
            md.push('\n');
        }
    }
    for (setting, m) in &migrations {
        md.push_str(&format!("#### Migration, 2 groups, {}\n\n", setting.name()));
        match m {
            Ok(m) => md.push_str(&m.table()),
            Err(why) => md.push_str(&format!("Did not complete: {why}\n")),
        }
        md.push('\n');
    }
    println!("\n{md}");
    if !rows.is_empty() {
        let svg_path = args.out.join("shard-scaling.svg");
        std::fs::write(&svg_path, report::svg(&rows, &setup))
            .with_context(|| format!("writing {}", svg_path.display()))?;
        let md_path = args.out.join("results.md");
        std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
        eprintln!(
            "shard bench: plot {}, tables {}",
            svg_path.display(),
            md_path.display()
        );
    }
    outcome?;
    Ok(ExitCode::SUCCESS)
}

/// The matrix's keys: `k` + a zero-padded number.
fn keys(n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("k{i:09}").into_bytes()).collect()
}

fn cluster_spec(
    args: &BenchArgs,
    quota: Option<(Hierarchy, Quota)>,
    groups: usize,
    label: &str,
) -> ClusterSpec {
    ClusterSpec {
        bin: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("shoal")),
        data_dir: args.data_dir.clone().unwrap_or_else(|| PathBuf::from(".")),
        groups,
        replicas: args.replicas,
        shards: args.shards,
        max_value_bytes: shoal_kv::store::DEFAULT_MAX_VALUE_BYTES,
        quota,
        label: label.to_string(),
    }
}

/// One group count under one setting: start, join, preload, puts, gets, stop.
async fn run_groups(
    args: &BenchArgs,
    quota: Option<(Hierarchy, Quota)>,
    setting: Setting,
    n: usize,
    cpus: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let label = format!(
        "{}-g{n}",
        if setting == Setting::Quota {
            "quota"
        } else {
            "free"
        }
    );
    let spec = cluster_spec(args, quota, n, &label);
    eprintln!(
        "shard bench: {}: starting {n} group(s) of {} and the controller store",
        setting.name(),
        args.replicas
    );
    let started = now();
    let mut cluster = tokio::task::block_in_place(|| ShardCluster::start(&spec))?;
    let num = cluster.join_all().await?;
    eprintln!(
        "shard bench: {}: {n} group(s) joined (configuration {num}) in {:.1} s",
        setting.name(),
        started.elapsed().as_secs_f64()
    );
    let keys = Arc::new(keys(args.keys_per_group * n as u64));
    let value = Arc::new(vec![b'v'; args.value_size]);
    let pool = cluster.pool();
    load::preload(&pool, keys.clone(), value.clone(), 64).await?;
    let clients = args.clients_per_group * n;
    let warmup = Duration::from_secs_f64(args.warmup_seconds);
    let measure = Duration::from_secs_f64(args.seconds);
    for workload in [Workload::Put, Workload::Get] {
        let spec = LoadSpec {
            workload,
            clients,
            keys: keys.clone(),
            value: value.clone(),
            duration: warmup + measure,
            seed: 14 + n as u64,
        };
        let t0 = now();
        let cpu0 = HostCpu::read();
        let th0 = cluster.cgroups.as_ref().map(|c| c.throttling());
        let pids = cluster.server_pids();
        let (servers0, self0) = (cgroup::cpu_secs(&pids), cgroup::cpu_secs(&[None]));
        let result = load::run(&pool, &spec, Arc::new(AtomicBool::new(false))).await?;
        let cpu1 = HostCpu::read();
        let th1 = cluster.cgroups.as_ref().map(|c| c.throttling());
        let (servers1, self1) = (cgroup::cpu_secs(&pids), cgroup::cpu_secs(&[None]));
        let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
        cluster.check_alive()?;
        let w = result.window(t0 + warmup, t0 + warmup + measure);
        let host_cores = match (cpu0, cpu1) {
            (Some(a), Some(b)) => b.cores_busy_since(a, cpus),
            _ => None,
        };
        let throttled = match (th0, th1) {
            (Some(a), Some(b)) => {
                let d = b.since(a);
                Some((d.throttled, d.throttled_us as f64 / 1e6))
            }
            _ => None,
        };
        let row = Row {
            setting,
            workload,
            groups: n,
            clients,
            ops: w.ok,
            ops_per_sec: w.ops_per_sec,
            p50_ms: w.p50_ms,
            p99_ms: w.p99_ms,
            errors: w.errors,
            host_cores,
            throttled,
            quota_cores: cluster
                .cgroups
                .as_ref()
                .map(|c| c.quota().cores() * c.len() as f64),
            servers_cores: (servers1 - servers0) / elapsed,
            loadgen_cores: (self1 - self0) / elapsed,
        };
        eprintln!(
            "shard bench: {} {} groups={n} clients={clients}: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, CPU: servers {:.2}, load generator {:.2}, host {} cores, throttled {}{}",
            setting.name(),
            workload.name(),
            row.ops_per_sec,
            row.p50_ms,
            row.p99_ms,
            row.servers_cores,
            row.loadgen_cores,
            host_cores.map_or("?".into(), |c| format!("{c:.2}")),
            throttled.map_or("-".into(), |(n, s)| format!("{n} periods, {s:.1} s")),
            result
                .first_error
                .as_deref()
                .map_or(String::new(), |e| format!(" (errors: {}, first: {e})", w.errors)),
        );
        println!(
            "{}",
            json!({
                "kind": "run",
                "setting": setting.name(),
                "workload": workload.name(),
                "groups": n,
                "replicas": args.replicas,
                "clients": clients,
                "ops": row.ops,
                "ops_per_sec": row.ops_per_sec,
                "p50_ms": row.p50_ms,
                "p99_ms": row.p99_ms,
                "errors": row.errors,
                "host_cores_busy": host_cores,
                "servers_cores": row.servers_cores,
                "loadgen_cores": row.loadgen_cores,
                "throttled_periods": throttled.map(|t| t.0),
                "throttled_secs": throttled.map(|t| t.1),
                "quota_cores_per_server": cluster.cgroups.as_ref().map(|c| c.quota().cores()),
                "quota_cores_sum": cluster.cgroups.as_ref().map(|c| c.quota().cores() * c.len() as f64),
            })
        );
        rows.push(row);
    }
    cluster.stop().await;
    Ok(())
}
