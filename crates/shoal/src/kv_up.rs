//! `shoal kv up`: a local cluster of `shoal kv server` children, supervised.
//!
//! Each server writes its log to `DIR/nodeN.log`, next to its data directory `DIR/nodeN`;
//! `kv up` itself prints a few lines at start and one line per restart or failure. The
//! supervision (restarts, backoff of a server that keeps failing, the diagnosis of its log,
//! giving up only when a majority cannot run) is `crate::supervise`'s, shared with
//! `shoal shard up`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use shoal_cluster::{Spec, StopSignals};

use shoal_runtime::kv::{Client, ClientConfig};
use shoal_wire::kv::{KvOp, MemberInfo};

use crate::kv_cmd::{read_endpoints, DEFAULT_DIR, ENDPOINTS_FILE};
use crate::supervise::{lock_dir, running_servers, Member, Running, Supervised};

/// Arguments of `shoal kv up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Number of servers (default 3). 3 tolerate one failure, 5 two; 2 tolerate none. When
    /// DIR already holds a cluster of another size, it grows or shrinks it the way an operator
    /// would (`shoal kv member`): a new server joins as a learner and is promoted once caught
    /// up; shrinking removes the highest ids one at a time and stops them. Without --nodes a
    /// resumed cluster keeps its size.
    #[arg(long)]
    nodes: Option<u64>,
    /// Directory of the cluster: DIR/endpoints, one data directory DIR/nodeN per server and
    /// its log DIR/nodeN.log.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Hidden shadows of the client options (see `NotForServers`).
    #[command(flatten)]
    _client_only: crate::kv_cmd::NotForServers,
    /// Serve TLS: make a CA and certificates in DIR/tls (`shoal cert`) and start every server
    /// with them. Client commands given --dir DIR (or run where ./shoal-data is) use
    /// DIR/tls/ca.pem and DIR/tls/client.pem by themselves. A cluster made with --tls stays TLS
    /// when resumed.
    #[arg(long)]
    tls: bool,
    /// Hidden shadows of the clients' TLS options (`kv up` makes its own with --tls).
    #[arg(long = "ca", id = "tls_ca", hide = true)]
    _ca: Option<PathBuf>,
    #[arg(long = "cert", id = "tls_cert", hide = true)]
    _cert: Option<PathBuf>,
    #[arg(long = "key", id = "tls_key", hide = true)]
    _key: Option<PathBuf>,
}

/// `shoal kv up`: one `shoal kv server` child per node; ports recorded in DIR/endpoints.
///
/// Runs inside `Runtime::block_on`, that is on the main thread, which spawns every child: their
/// parent-death signal follows the spawning thread, and the main thread lives as long as the
/// process.
pub(crate) async fn up(args: UpArgs) -> Result<ExitCode> {
    let endpoints_path = args.dir.join(ENDPOINTS_FILE);
    let resuming = endpoints_path.exists();
    if args.nodes == Some(0) {
        bail!("--nodes must be at least 1 (a cluster keeps at least one voter)");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    // One `kv up` per cluster directory: it holds DIR/LOCK (as each server holds its own
    // DIR/nodeN/LOCK) until it exits, so a second one refuses even while every server of the
    // first is down and waiting for a restart.
    let (guard, supervisor) = lock_dir(&args.dir)?;
    if let (Some(pid), false) = (supervisor, resuming) {
        bail!(
            "another `kv up` (pid {}) is starting a cluster in {}",
            pid.map_or("unknown".to_string(), |p| p.to_string()),
            args.dir.display()
        );
    }
    let endpoints = if resuming {
        read_endpoints(&endpoints_path)?
    } else {
        let endpoints = shoal_cluster::free_local_addrs(args.nodes.unwrap_or(3) as usize)?;
        // The certificates before DIR/endpoints: a client that finds the endpoints finds them.
        if args.tls {
            local_certs(&args.dir, endpoints.len())?;
        }
        write_endpoints(&endpoints_path, &endpoints)?;
        endpoints
    };
    let list = endpoints_list(&endpoints);
    // The servers first started, with --peers (ids 1..=founders); the others joined.
    let founders_path = args.dir.join(FOUNDERS_FILE);
    let founders = if founders_path.exists() {
        read_endpoints(&founders_path)?
    } else {
        endpoints.clone()
    };
    let target = args.nodes.map_or(endpoints.len(), |n| n as usize);
    if target != endpoints.len() && !founders_path.exists() {
        // Recorded before the first change: the founders keep their --peers for good.
        write_synced(&founders_path, &endpoints_text(&founders))?;
    }
    let tls_dir = crate::tls_cmd::local_tls_dir(&args.dir);
    let tls = args.tls || tls_dir.join(crate::tls_cmd::CA_CERT).exists();
    if tls {
        local_certs(&args.dir, endpoints.len())?;
    }
    let mut cluster = Cluster {
        tls: tls.then_some(tls_dir),
        dir: args.dir.clone(),
        founders: founders.len(),
        peers: shoal_cluster::peers_arg(&founders),
        endpoints: endpoints.clone(),
        exe: std::env::current_exe().context("locating the shoal binary")?,
    };
    let mut set = cluster.supervised()?;
    let running = running_servers(
        set.members
            .iter()
            .map(|m| (m.name.as_str(), m.data.as_path())),
    )?;
    if supervisor.is_some() || !running.is_empty() {
        let mut pids: Vec<String> = running
            .iter()
            .map(|(name, pid)| pid.map_or(name.clone(), |p| p.to_string()))
            .collect();
        if let Some(pid) = supervisor {
            pids.push(pid.map_or("kv up".to_string(), |p| format!("kv up {p}")));
        }
        bail!(
            "a cluster already answers on these endpoints (pids {}): {list}; its directory {} \
             is in use. Use it (shoal kv --dir {} …), or stop it first",
            pids.join(", "),
            args.dir.display(),
            args.dir.display()
        );
    }
    if target == 2 {
        eprintln!(
            "warning: a cluster of 2 tolerates no failure (a majority of 2 is 2): with one \
             server down it answers nothing; 3 tolerate one"
        );
    }
    // Before the first child: a stop signal from now on stops the servers too.
    let mut signals = StopSignals::install()?;
    let mut servers = Running::start(&set)?;
    if target != cluster.endpoints.len() {
        let resized = tokio::select! {
            r = resize(&mut cluster, &mut set, &mut servers, target) => r,
            _ = signals.recv() => Err(anyhow::anyhow!(
                "stopped while changing the membership; run kv up again to finish"
            )),
        };
        if let Err(e) = resized {
            servers.stop();
            drop(guard);
            return Err(e.context(format!(
                "changing the cluster in {} from {} to {target} servers (the servers' logs \
                 are in {}; `shoal kv --dir {} member list` shows the membership)",
                args.dir.display(),
                endpoints.len(),
                args.dir.display(),
                args.dir.display()
            )));
        }
    }
    let endpoints = cluster.endpoints.clone();
    let list = endpoints_list(&endpoints);
    // A closed stdout (a script that read the first line and left) must not stop the
    // cluster: errors writing it are ignored.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "endpoints {list}");
    let _ = writeln!(
        out,
        "cluster of {}{} in {}; server logs in {}; Ctrl-C stops it",
        endpoints.len(),
        if tls { " (TLS)" } else { "" },
        args.dir.display(),
        cluster.log_path(1).with_file_name("nodeN.log").display(),
    );
    let _ = writeln!(
        out,
        "clients: shoal kv --dir {} …   or   export SHOAL_ENDPOINTS={list}",
        args.dir.display()
    );
    let _ = out.flush();
    drop(out);
    // Even when supervising fails (a restart that cannot be spawned), the servers are stopped
    // cleanly below, not SIGKILLed by their drop.
    let failure = match servers.supervise(&set, &mut signals).await {
        Ok(failure) => failure,
        Err(e) => Some(format!("{e:#}")),
    };
    // Ask every server to stop (SIGTERM: they finish the write in progress), then wait;
    // SIGKILL those still running after the grace period.
    servers.stop();
    drop(guard);
    match failure {
        Some(message) => bail!(message),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Makes (where missing) the CA and certificates of a local TLS cluster of `nodes` servers in
/// DIR/tls.
fn local_certs(dir: &std::path::Path, nodes: usize) -> Result<()> {
    let tls_dir = crate::tls_cmd::local_tls_dir(dir);
    let names: Vec<String> = (1..=nodes).map(|id| format!("node{id}")).collect();
    crate::tls_cmd::make_local(&tls_dir, &names)
        .with_context(|| format!("making certificates in {}", tls_dir.display()))
}

/// The addresses of the servers `kv up` first started with --peers (ids 1..=N), recorded in
/// DIR/founders before the first change of size: they keep that --peers on every start.
const FOUNDERS_FILE: &str = "founders";

/// How many times (every [`POLL`]) the resize waits for a leader, a caught-up learner or a
/// refused change to become possible: two minutes.
const POLLS: u32 = 600;
const POLL: std::time::Duration = std::time::Duration::from_millis(200);

fn endpoints_text(endpoints: &[std::net::SocketAddr]) -> String {
    endpoints.iter().map(|e| format!("{e}\n")).collect()
}

fn endpoints_list(endpoints: &[std::net::SocketAddr]) -> String {
    endpoints
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes DIR/endpoints (through a temporary file, fsynced, renamed, the directory fsynced):
/// after a crash it lists the old servers or the new ones, never half of it.
fn write_endpoints(path: &std::path::Path, endpoints: &[std::net::SocketAddr]) -> Result<()> {
    write_synced(path, &endpoints_text(endpoints))
}

fn write_synced(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// Grows or shrinks the running cluster to `target` servers through the leader, as an
/// operator would with `shoal kv member`, keeping DIR/endpoints and the supervised set in step
/// after each server.
async fn resize(
    cluster: &mut Cluster,
    set: &mut Supervised,
    servers: &mut Running,
    target: usize,
) -> Result<()> {
    let tls = crate::tls_cmd::ClientTlsArgs {
        ca: None,
        cert: None,
        key: None,
    };
    let mut config = ClientConfig::new(cluster.endpoints.clone());
    config.security = tls.security(Some(&cluster.dir))?;
    let mut client = Client::new(config)?;
    let endpoints_path = cluster.dir.join(ENDPOINTS_FILE);
    // On stderr, with the supervisor's lines: stdout's first line stays the endpoints.
    let say = |line: String| eprintln!("{line}");
    let mut members = poll_members(&mut client, "a leader", |_| true).await?;
    while cluster.endpoints.len() < target {
        let id = cluster.endpoints.len() as u64 + 1;
        if !members.iter().any(|m| m.id == id) {
            let addr = shoal_cluster::free_local_addrs(1)?[0];
            say(format!(
                "growing: adding server {id} at {addr} as a learner"
            ));
            let op = KvOp::MemberAdd {
                id,
                addr: addr.to_string(),
                learner: true,
            };
            change(&mut client, op, &format!("adding server {id}")).await?;
            cluster.endpoints.push(addr);
        } else {
            // Added by an earlier run that stopped before recording it.
            let addr = members
                .iter()
                .find(|m| m.id == id)
                .and_then(|m| crate::cli::parse_addr(&m.addr).ok())
                .with_context(|| format!("server {id} is a member with no usable address"))?;
            cluster.endpoints.push(addr);
        }
        write_endpoints(&endpoints_path, &cluster.endpoints)?;
        if cluster.tls.is_some() {
            local_certs(&cluster.dir, cluster.endpoints.len())?;
        }
        let member = cluster.member(id as usize, true);
        servers.add(&member)?;
        set.members.push(member);
        say(format!(
            "growing: started server {id} (--join); waiting until it caught up"
        ));
        members = poll_members(&mut client, &format!("server {id} to catch up"), |ms| {
            ms.iter()
                .any(|m| m.id == id && (m.voter || (m.match_index > 0 && m.behind == 0)))
        })
        .await?;
        if members.iter().any(|m| m.id == id && !m.voter) {
            members = change(
                &mut client,
                KvOp::MemberPromote { id },
                &format!("promoting server {id}"),
            )
            .await?;
        }
        say(format!("growing: server {id} is a voter"));
    }
    while cluster.endpoints.len() > target {
        let id = cluster.endpoints.len() as u64;
        if members.iter().any(|m| m.id == id) {
            say(format!("shrinking: removing server {id}"));
            members = change(
                &mut client,
                KvOp::MemberRemove { id },
                &format!("removing server {id}"),
            )
            .await?;
        }
        servers.stop_last();
        set.members.pop();
        cluster.endpoints.pop();
        write_endpoints(&endpoints_path, &cluster.endpoints)?;
        // A removed server refuses its old data directory: moved aside, so that a later
        // growth starts that id afresh.
        let data = cluster.data_dir(id as usize);
        let aside = data.with_extension("removed");
        if aside.exists() {
            std::fs::remove_dir_all(&aside)
                .with_context(|| format!("removing {}", aside.display()))?;
        }
        if data.exists() {
            std::fs::rename(&data, &aside)
                .with_context(|| format!("moving {} to {}", data.display(), aside.display()))?;
        }
        say(format!(
            "shrinking: server {id} removed and stopped; its data moved to {}",
            aside.display()
        ));
    }
    Ok(())
}

/// The member list, polled until `done` holds (at most [`POLLS`] times).
async fn poll_members(
    client: &mut Client,
    what: &str,
    mut done: impl FnMut(&[MemberInfo]) -> bool,
) -> Result<Vec<MemberInfo>> {
    let mut last = String::new();
    for _ in 0..POLLS {
        match client.member_list().await {
            Ok((_, members)) if done(&members) => return Ok(members),
            Ok((_, members)) => last = format!("members {members:?}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("gave up waiting for {what} (last answer: {last})")
}

/// A membership change, retried while the leader refuses it for now (another change in
/// flight, a learner still behind).
async fn change(client: &mut Client, op: KvOp, what: &str) -> Result<Vec<MemberInfo>> {
    let mut last = String::new();
    for _ in 0..POLLS {
        match client.member_change(op.clone()).await {
            Ok(Ok((_, members))) => return Ok(members),
            Ok(Err(reason)) if reason.contains("retry") => last = reason,
            Ok(Err(reason)) => bail!("{what}: {reason}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("{what}: gave up (last answer: {last})")
}

/// What `kv up` needs to start a server.
struct Cluster {
    /// The certificates' directory when the servers serve TLS.
    tls: Option<PathBuf>,
    dir: PathBuf,
    endpoints: Vec<std::net::SocketAddr>,
    /// How many servers were started with --peers (ids 1..=founders), and that --peers.
    founders: usize,
    peers: String,
    exe: PathBuf,
}

impl Cluster {
    fn data_dir(&self, id: usize) -> PathBuf {
        self.dir.join(format!("node{id}"))
    }

    fn log_path(&self, id: usize) -> PathBuf {
        self.dir.join(format!("node{id}.log"))
    }

    /// How to start server `id`: its stdout and stderr appended to its log (the supervisor
    /// gives it the parent-death signal: a SIGKILL of `kv up`, when no Drop runs, takes its
    /// servers with it).
    fn spec(&self, id: usize, joins: bool) -> Spec {
        let tls = match &self.tls {
            Some(dir) => crate::tls_cmd::ServerTlsArgs::for_node(dir, &format!("node{id}")),
            None => Vec::new(),
        };
        let cluster = if joins {
            // Restarted, it reads its membership from its data directory and ignores --join.
            let others: Vec<_> = (1..=self.endpoints.len())
                .filter(|&other| other != id)
                .map(|other| self.endpoints[other - 1])
                .collect();
            ["--join".to_string(), endpoints_list(&others)]
        } else {
            ["--peers".to_string(), self.peers.clone()]
        };
        Spec::new(format!("server {id}"), &self.exe, self.log_path(id))
            .append_log()
            .args(["kv", "server", "--id", &id.to_string()])
            .args(["--listen", &self.endpoints[id - 1].to_string()])
            .args(cluster)
            .arg("--data")
            .arg(self.data_dir(id))
            .args(tls)
            // Its own process group: a Ctrl-C in the terminal reaches `kv up` alone, which
            // then stops the servers itself (not a restart race with servers exiting).
            .own_process_group()
    }

    /// Its servers, for the supervisor: one group, "the cluster".
    /// A server that joined (an id beyond the founders, or whose data directory records a
    /// join) starts with --join, the others with the founders' --peers.
    fn supervised(&self) -> Result<Supervised> {
        let mut members = Vec::new();
        for id in 1..=self.endpoints.len() {
            let data = self.data_dir(id);
            let joined = shoal_runtime::kv::server::read_joined(&data)
                .with_context(|| format!("reading {}", data.display()))?
                .is_some();
            members.push(self.member(id, joined || id > self.founders));
        }
        Ok(Supervised {
            command: "kv up",
            dir: self.dir.clone(),
            groups: vec!["the cluster".to_string()],
            members,
        })
    }

    fn member(&self, id: usize, joins: bool) -> Member {
        Member {
            name: format!("server {id}"),
            data: self.data_dir(id),
            spec: self.spec(id, joins),
            group: 0,
        }
    }
}
