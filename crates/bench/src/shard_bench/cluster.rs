//! A local sharded cluster for one run: a controller store (three `shoal kv server`s) and N
//! replica groups of `shoal shard server`s, on free 127.0.0.1 ports, each process with its own
//! data directory inside one temporary directory, each shard server in its own CPU cgroup
//! when quotas are on. The controller (a [`ShardController`] task in this process) joins
//! every group in one Join.
//!
//! Dropping it kills the processes, then removes the cgroups, then the data.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use shoal_cluster::{peers_arg, Procs, Ready, Spec};
use shoal_runtime::shard::{
    ControllerDriverConfig, ShardClientConfig, ShardClientPool, ShardController,
};
use shoal_shard::{Gid, Op};

use super::cgroup::{CpuCgroups, Hierarchy, Quota};

/// Servers of the controller store.
pub const STORE_SERVERS: usize = 3;
/// Bound on a server starting to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the one Join (every shard installed at its first owner).
const JOIN_TIMEOUT: Duration = Duration::from_secs(180);

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub groups: usize,
    pub replicas: usize,
    pub shards: u32,
    /// Largest value the shard servers accept (the migration's big values).
    pub max_value_bytes: usize,
    /// CPU quota of every shard server, with the hierarchy to put it in.
    pub quota: Option<(Hierarchy, Quota)>,
    /// A short name for the cgroups' directory and the data directory.
    pub label: String,
}

pub struct ShardCluster {
    pub store: Vec<SocketAddr>,
    pub groups: BTreeMap<Gid, Vec<SocketAddr>>,
    pub shards: u32,
    controller: Option<ShardController>,
    // Dropped in this order: processes, then their cgroups, then the data.
    procs: Procs,
    pub cgroups: Option<CpuCgroups>,
    dir: tempfile::TempDir,
    /// Slots of `procs` holding shard servers (the others are the store's).
    server_slots: Vec<usize>,
}

impl ShardCluster {
    /// Starts the store and the groups' servers and waits until each listens.
    pub fn start(spec: &ClusterSpec) -> Result<ShardCluster> {
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("shoal-bench-shard-{}-", spec.label))
            .tempdir_in(&spec.data_dir)
            .with_context(|| format!("creating a data directory in {}", spec.data_dir.display()))?;
        if std::env::var_os("SHOAL_BENCH_KEEP_DATA").is_some() {
            dir.disable_cleanup(true);
        }
        let n = STORE_SERVERS + spec.groups * spec.replicas;
        let addrs = shoal_cluster::free_local_addrs(n)?;
        let store = addrs[..STORE_SERVERS].to_vec();
        let mut groups = BTreeMap::new();
        for g in 0..spec.groups {
            let at = STORE_SERVERS + g * spec.replicas;
            groups.insert(g as Gid + 1, addrs[at..at + spec.replicas].to_vec());
        }
        let cgroups = match &spec.quota {
            Some((h, q)) => Some(CpuCgroups::new(h, &spec.label, *q)?),
            None => None,
        };
        let mut cluster = ShardCluster {
            store,
            groups,
            shards: spec.shards,
            controller: None,
            procs: Procs::new(),
            cgroups,
            dir,
            server_slots: Vec::new(),
        };
        let log_filter = std::env::var("SHOAL_SERVER_LOG").unwrap_or_else(|_| "warn".into());
        let mut waits = Vec::new();
        let store_peers = peers_arg(&cluster.store);
        // `shard server` takes plain addresses (ids are positions), `kv server` `ID=ADDR`.
        let plain = |addrs: &[SocketAddr]| {
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let controller = plain(&cluster.store);
        for i in 0..STORE_SERVERS {
            let addr = cluster.store[i];
            let name = format!("s{}", i + 1);
            let spec = Spec::new(
                format!("controller store server {}", i + 1),
                &spec.bin,
                cluster.dir.path().join(format!("{name}.log")),
            )
            .args(["kv", "server", "--id", &(i + 1).to_string()])
            .args(["--listen", &addr.to_string()])
            .args(["--peers", &store_peers])
            .arg("--data")
            .arg(cluster.dir.path().join(&name))
            .env("SHOAL_LOG", &log_filter);
            waits.push((cluster.procs.spawn(spec)?, addr));
        }
        let groups = cluster.groups.clone();
        for (&gid, servers) in &groups {
            let peers = plain(servers);
            for (i, &addr) in servers.iter().enumerate() {
                let name = format!("g{gid}s{}", i + 1);
                let pspec = Spec::new(
                    format!("group {gid} server {}", i + 1),
                    &spec.bin,
                    cluster.dir.path().join(format!("{name}.log")),
                )
                .args(["shard", "server", "--gid", &gid.to_string()])
                .args(["--id", &(i + 1).to_string()])
                .args(["--listen", &addr.to_string()])
                .args(["--peers", &peers])
                .args(["--shards", &spec.shards.to_string()])
                .args(["--controller", &controller])
                .args(["--max-value-bytes", &spec.max_value_bytes.to_string()])
                .arg("--data")
                .arg(cluster.dir.path().join(&name))
                .env("SHOAL_LOG", &log_filter);
                let at = cluster.procs.spawn(pspec)?;
                // Into its cgroup right after the spawn, before it does any real work.
                if let Some(cg) = &mut cluster.cgroups {
                    let pid = cluster
                        .procs
                        .get(at)
                        .and_then(|p| p.pid())
                        .ok_or_else(|| anyhow!("{name} exited at once"))?;
                    cg.add(&name, pid)
                        .with_context(|| format!("putting {name} (pid {pid}) in its cgroup"))?;
                }
                cluster.server_slots.push(at);
                waits.push((at, addr));
            }
        }
        for (at, addr) in waits {
            let p = cluster.procs.get_mut(at).expect("spawned");
            p.wait_ready(&Ready::Listening(addr), START_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// Starts the controller and joins every group in one Join; returns the configuration
    /// number once every shard is installed at its owner.
    pub async fn join_all(&mut self) -> Result<u64> {
        let controller =
            ShardController::start(ControllerDriverConfig::new(self.store.clone(), self.shards))
                .context("starting the shard controller")?;
        let join: BTreeMap<Gid, Vec<String>> = self
            .groups
            .iter()
            .map(|(&g, s)| (g, s.iter().map(|a| a.to_string()).collect()))
            .collect();
        let submitted = tokio::time::timeout(JOIN_TIMEOUT, controller.submit(Op::Join(join))).await;
        let status = controller.status();
        self.controller = Some(controller);
        match submitted {
            Ok(Ok(num)) => Ok(num),
            Ok(Err(reason)) => Err(anyhow!("the Join was refused: {reason}")),
            Err(_) => {
                self.procs.check_running()?;
                Err(anyhow!(
                    "the Join did not complete within {JOIN_TIMEOUT:?}; controller status: {status:?}"
                ))
            }
        }
    }

    /// Runs one controller operation to completion (bounded by `timeout`).
    pub async fn submit(&self, op: Op, timeout: Duration) -> Result<u64> {
        let controller = self
            .controller
            .as_ref()
            .ok_or_else(|| anyhow!("no controller: join_all first"))?;
        match tokio::time::timeout(timeout, controller.submit(op.clone())).await {
            Ok(Ok(num)) => Ok(num),
            Ok(Err(reason)) => Err(anyhow!("{op:?} refused: {reason}")),
            Err(_) => Err(anyhow!(
                "{op:?} did not complete within {timeout:?}; controller status: {:?}",
                controller.status()
            )),
        }
    }

    /// A pool of client connections to this cluster (linearizable gets).
    pub fn pool(&self) -> ShardClientPool {
        ShardClientPool::new(ShardClientConfig::new(self.store.clone()))
    }

    /// The shard servers' process ids.
    pub fn server_pids(&self) -> Vec<Option<u32>> {
        self.server_slots
            .iter()
            .filter_map(|&i| self.procs.get(i).and_then(|p| p.pid()))
            .map(Some)
            .collect()
    }

    /// Fails if a server exited on its own, quoting its log.
    pub fn check_alive(&mut self) -> Result<()> {
        self.procs.check_running()
    }

    /// Stops the controller (revoking its lease), then everything else on drop.
    pub async fn stop(mut self) {
        if let Some(c) = self.controller.take() {
            c.stop().await;
        }
    }
}
