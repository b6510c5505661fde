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

use crate::kv_cmd::{read_endpoints, DEFAULT_DIR, ENDPOINTS_FILE};
use crate::supervise::{lock_dir, running_servers, Member, Running, Supervised};

/// Arguments of `shoal kv up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Number of servers (ignored when DIR already holds a cluster). 3 tolerate one failure,
    /// 5 two; 2 tolerate none.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
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
    if !resuming && args.nodes == 0 {
        bail!("--nodes must be at least 1");
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
        let endpoints = shoal_cluster::free_local_addrs(args.nodes as usize)?;
        // The certificates before DIR/endpoints: a client that finds the endpoints finds them.
        if args.tls {
            local_certs(&args.dir, endpoints.len())?;
        }
        let text: String = endpoints.iter().map(|e| format!("{e}\n")).collect();
        std::fs::write(&endpoints_path, text)
            .with_context(|| format!("writing {}", endpoints_path.display()))?;
        endpoints
    };
    let list = endpoints
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let tls_dir = crate::tls_cmd::local_tls_dir(&args.dir);
    let tls = args.tls || tls_dir.join(crate::tls_cmd::CA_CERT).exists();
    if tls {
        local_certs(&args.dir, endpoints.len())?;
    }
    let cluster = Cluster {
        tls: tls.then_some(tls_dir),
        dir: args.dir.clone(),
        peers: shoal_cluster::peers_arg(&endpoints),
        endpoints: endpoints.clone(),
        exe: std::env::current_exe().context("locating the shoal binary")?,
    };
    let set = cluster.supervised();
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
    if endpoints.len() == 2 {
        eprintln!(
            "warning: a cluster of 2 tolerates no failure (a majority of 2 is 2): with one \
             server down it answers nothing; 3 tolerate one"
        );
    }
    // Before the first child: a stop signal from now on stops the servers too.
    let mut signals = StopSignals::install()?;
    let mut servers = Running::start(&set)?;
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

/// What `kv up` needs to start a server.
struct Cluster {
    /// The certificates' directory when the servers serve TLS.
    tls: Option<PathBuf>,
    dir: PathBuf,
    endpoints: Vec<std::net::SocketAddr>,
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
    fn spec(&self, id: usize) -> Spec {
        let tls = match &self.tls {
            Some(dir) => crate::tls_cmd::ServerTlsArgs::for_node(dir, &format!("node{id}")),
            None => Vec::new(),
        };
        Spec::new(format!("server {id}"), &self.exe, self.log_path(id))
            .append_log()
            .args(["kv", "server", "--id", &id.to_string()])
            .args(["--listen", &self.endpoints[id - 1].to_string()])
            .args(["--peers", &self.peers, "--data"])
            .arg(self.data_dir(id))
            .args(tls)
            // Its own process group: a Ctrl-C in the terminal reaches `kv up` alone, which
            // then stops the servers itself (not a restart race with servers exiting).
            .own_process_group()
    }

    /// Its servers, for the supervisor: one group, "the cluster".
    fn supervised(&self) -> Supervised {
        Supervised {
            command: "kv up",
            dir: self.dir.clone(),
            groups: vec!["the cluster".to_string()],
            members: (1..=self.endpoints.len())
                .map(|id| Member {
                    name: format!("server {id}"),
                    data: self.data_dir(id),
                    spec: self.spec(id),
                    group: 0,
                })
                .collect(),
        }
    }
}
