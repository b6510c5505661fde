//! Local three-member clusters the benchmark starts itself: this executable's own
//! `shoal kv server`s, or `etcd` members, on free 127.0.0.1 ports, each member with its own
//! data directory inside one temporary directory that is removed (processes first) on drop.
//!
//! Both run with their default durability settings: only names, addresses and data
//! directories are given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::target::TargetKind;
use super::{now, LIVENESS};
use shoal_cluster::{peers_arg, Procs, Spec};

/// Members of a local cluster.
pub const MEMBERS: usize = 3;
/// Poll interval while waiting for a leader or a catch-up.
const POLL: Duration = Duration::from_millis(20);
/// Bound on one probe operation while looking for the leader or a catch-up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The key etcd's catch-up markers are written to (outside the benchmark's `k…` keys).
#[cfg(feature = "etcd")]
const MARKER_KEY: &[u8] = b"_kv_bench_marker";

/// Three member processes and their data.
pub struct LocalCluster {
    pub kind: TargetKind,
    /// Client addresses, in member order (Shoal: server id `i + 1` at index `i`).
    pub addrs: Vec<SocketAddr>,
    /// Peer addresses (Shoal serves peers and clients on one address).
    peer_addrs: Vec<SocketAddr>,
    /// Each member's id as its answers name it (Shoal: `i + 1`; etcd: the member id, known
    /// once the cluster answered).
    pub member_ids: Vec<u64>,
    bin: PathBuf,
    procs: Procs,
    markers: u64,
    // Declared last: dropped after the processes are gone.
    dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts three fresh members with data under `data_dir`.
    pub fn start(kind: TargetKind, bin: PathBuf, data_dir: &Path) -> Result<LocalCluster> {
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("shoal-bench-kv-{}-", kind.name()))
            .tempdir_in(data_dir)
            .with_context(|| format!("creating a data directory in {}", data_dir.display()))?;
        // For a post-mortem: the members' data and logs stay.
        if std::env::var_os("SHOAL_BENCH_KEEP_DATA").is_some() {
            dir.disable_cleanup(true);
        }
        let all = shoal_cluster::free_local_addrs(2 * MEMBERS)?;
        let addrs = all[..MEMBERS].to_vec();
        let peer_addrs = match kind {
            TargetKind::Shoal => addrs.clone(),
            TargetKind::Etcd => all[MEMBERS..].to_vec(),
        };
        let mut cluster = LocalCluster {
            kind,
            addrs,
            peer_addrs,
            member_ids: (1..=MEMBERS as u64).collect(),
            bin,
            procs: Procs::with_slots(MEMBERS),
            markers: 0,
            dir,
        };
        for i in 0..MEMBERS {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// etcd client URLs.
    #[cfg(feature = "etcd")]
    pub fn urls(&self) -> Vec<String> {
        self.addrs.iter().map(|a| format!("http://{a}")).collect()
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{}.log", i + 1))
    }

    /// Starts (or restarts from its data directory) member `i`, its output appended to
    /// `m{i+1}.log`.
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let data = self.dir.path().join(format!("m{}", i + 1));
        let name = format!("{} member {}", self.kind.name(), i + 1);
        let mut spec = Spec::new(name, &self.bin, self.log_path(i)).append_log();
        match self.kind {
            TargetKind::Shoal => {
                let peers = peers_arg(&self.addrs);
                spec = spec
                    .args(["kv", "server", "--id", &(i + 1).to_string()])
                    .args(["--listen", &self.addrs[i].to_string()])
                    .args(["--peers", &peers])
                    .arg("--data")
                    .arg(&data)
                    .env(
                        "SHOAL_LOG",
                        std::env::var("SHOAL_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
                    );
            }
            TargetKind::Etcd => {
                let name = |j: usize| format!("m{}", j + 1);
                let initial = self
                    .peer_addrs
                    .iter()
                    .enumerate()
                    .map(|(j, a)| format!("{}=http://{a}", name(j)))
                    .collect::<Vec<_>>()
                    .join(",");
                let client_url = format!("http://{}", self.addrs[i]);
                let peer_url = format!("http://{}", self.peer_addrs[i]);
                // Only names and URLs: snapshot count, heartbeat, election timeout and
                // fsync behaviour stay etcd's defaults. On a restart etcd reads the
                // membership from its data directory and ignores the --initial-* flags.
                spec = spec
                    .args(["--name", &name(i)])
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["--listen-client-urls", &client_url])
                    .args(["--advertise-client-urls", &client_url])
                    .args(["--listen-peer-urls", &peer_url])
                    .args(["--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &initial])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", "shoal-bench-kv"]);
                // An ETCD_* variable of the caller's environment would act as a flag.
                for (k, _) in std::env::vars_os() {
                    if k.to_string_lossy().starts_with("ETCD_") {
                        spec = spec.env_remove(k);
                    }
                }
            }
        }
        // The supervisor gives each member the parent-death signal: the members die with
        // the benchmark even when it is killed (no Drop runs then).
        self.procs.spawn_at(i, spec)
    }

    /// SIGKILLs member `i` and reaps it: once this returns, it answers nothing more.
    pub fn kill(&mut self, i: usize) {
        self.procs.kill(i);
    }

    /// Fails if a member exited on its own (e.g. refused its arguments), quoting its log.
    pub fn check_alive(&mut self) -> Result<()> {
        self.procs.check_running()
    }

    /// Members started and not killed (one that exited on its own fails `check_alive`).
    pub fn live(&self) -> Vec<usize> {
        (0..MEMBERS)
            .filter(|&i| self.procs.get(i).is_some_and(|p| !p.exit_expected()))
            .collect()
    }

    /// Waits until a live member leads (and, for Shoal, has committed a write); returns it.
    pub async fn wait_leader(&mut self) -> Result<usize> {
        let deadline = now() + LIVENESS;
        while now() < deadline {
            self.check_alive()?;
            let found = match self.kind {
                TargetKind::Shoal => self.shoal_leader().await,
                TargetKind::Etcd => self.etcd_leader().await,
            };
            if let Some(i) = found {
                return Ok(i);
            }
            tokio::time::sleep(POLL).await;
        }
        bail!("no {} leader within {LIVENESS:?}", self.kind.name())
    }

    /// A Shoal client of the whole cluster, for status requests.
    fn shoal_client(&self) -> Option<shoal_runtime::kv::Client> {
        let mut config = shoal_runtime::kv::ClientConfig::new(self.addrs.clone());
        config.op_timeout = PROBE_TIMEOUT;
        shoal_runtime::kv::Client::new(config).ok()
    }

    /// Shoal's leader: the live server whose status says it leads (the highest term wins).
    async fn shoal_leader(&self) -> Option<usize> {
        let leader = self.shoal_client()?.find_leader(PROBE_TIMEOUT).await?;
        let i = usize::try_from(leader.id).ok()?.checked_sub(1)?;
        self.live().contains(&i).then_some(i)
    }

    #[cfg(not(feature = "etcd"))]
    async fn etcd_leader(&mut self) -> Option<usize> {
        None
    }

    /// etcd's leader: the member whose own status names itself leader. Also learns the
    /// members' ids.
    #[cfg(feature = "etcd")]
    async fn etcd_leader(&mut self) -> Option<usize> {
        let mut leader = None;
        for i in self.live() {
            let Some(status) = etcd_status(&self.urls()[i]).await else {
                continue;
            };
            let Some(me) = status.header().map(|h| h.member_id()) else {
                continue;
            };
            self.member_ids[i] = me;
            if status.leader() == me {
                leader = Some(i);
            }
        }
        leader
    }

    /// Waits until member `i` has applied everything the cluster had committed when it
    /// came back. Shoal: its status's applied index reaches the leader's commit index of
    /// that moment. etcd: a marker is written through the whole cluster, and member `i`
    /// serves it from its own state (a serializable read sent to it alone).
    pub async fn wait_caught_up(&mut self, i: usize) -> Result<()> {
        self.markers += 1;
        let marker = format!("marker-{}", self.markers).into_bytes();
        let deadline = now() + LIVENESS;
        let mut written = false;
        let mut goal = None;
        while now() < deadline {
            self.check_alive()?;
            let done = match self.kind {
                TargetKind::Shoal => self.shoal_catch_up(i, &mut goal).await,
                TargetKind::Etcd => self.etcd_catch_up(i, &marker, &mut written).await,
            };
            if done {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        bail!(
            "{} member {} did not catch up within {LIVENESS:?}",
            self.kind.name(),
            i + 1
        )
    }

    /// Shoal: the first time, the leader's commit index becomes the goal (in `goal`); then
    /// whether member `i` has applied up to it.
    async fn shoal_catch_up(&self, i: usize, goal: &mut Option<u64>) -> bool {
        let Some(mut client) = self.shoal_client() else {
            return false;
        };
        if goal.is_none() {
            let Some(leader) = client.find_leader(PROBE_TIMEOUT).await else {
                return false;
            };
            *goal = Some(leader.commit);
        }
        match client.status(i, PROBE_TIMEOUT).await {
            Ok(s) => goal.is_some_and(|g| s.applied >= g),
            Err(_) => false,
        }
    }

    #[cfg(not(feature = "etcd"))]
    async fn etcd_catch_up(&self, _i: usize, _marker: &[u8], _written: &mut bool) -> bool {
        false
    }

    #[cfg(feature = "etcd")]
    async fn etcd_catch_up(&self, i: usize, marker: &[u8], written: &mut bool) -> bool {
        let urls = self.urls();
        if !*written {
            let Some(mut all) = etcd_client(&urls).await else {
                return false;
            };
            *written = all.put(MARKER_KEY, marker, None).await.is_ok();
            if !*written {
                return false;
            }
        }
        let Some(mut alone) = etcd_client(&urls[i..=i]).await else {
            return false;
        };
        let serializable = etcd_client::GetOptions::new().with_serializable();
        match alone.get(MARKER_KEY, Some(serializable)).await {
            Ok(r) => r.kvs().first().is_some_and(|kv| kv.value() == marker),
            Err(_) => false,
        }
    }
}

#[cfg(feature = "etcd")]
async fn etcd_client(urls: &[String]) -> Option<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_timeout(PROBE_TIMEOUT)
        .with_connect_timeout(PROBE_TIMEOUT);
    etcd_client::Client::connect(urls, Some(options)).await.ok()
}

/// One member's status (maintenance API), or `None` if it does not answer in time.
#[cfg(feature = "etcd")]
async fn etcd_status(url: &str) -> Option<etcd_client::StatusResponse> {
    let mut c = etcd_client(std::slice::from_ref(&url.to_string())).await?;
    tokio::time::timeout(PROBE_TIMEOUT, c.status())
        .await
        .ok()?
        .ok()
}
