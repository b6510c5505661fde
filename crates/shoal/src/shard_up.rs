//! `shoal shard up`: a local sharded cluster, supervised.
//!
//! On 127.0.0.1: the controller store (three `shoal kv server` children) and N replica groups
//! (gids 1..N) of R `shoal shard server` children each, supervised as `kv up` supervises its
//! servers (`crate::supervise`: a killed server is restarted from its data, one that keeps
//! failing is backed off, a stop signal stops everything, the children die with it). Once the
//! servers are started it joins every group not yet a member through a `ShardController`, prints
//! a summary and stays in the foreground.
//!
//! The directory holds everything: `DIR/controller` (the store's addresses, one per line),
//! `DIR/groups` (`GID ADDR,ADDR,ADDR` per line), `DIR/shards` (the number of shards), the data
//! directories `DIR/controllerI` and `DIR/groupG-serverI`, each with its log next to it
//! (`….log`), `DIR/joined` once the groups have joined, and `DIR/LOCK`, held by the running
//! `shard up`. A second run on the same directory resumes the same cluster: same addresses,
//! same data, no new join (a group that left stays out).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shoal_cluster::{Spec, StopSignals};
use shoal_shard::{Gid, Op};

use crate::kv_cmd::read_endpoints;
use crate::shard_cmd::{join_addrs, print_waiting, shard_ranges, CONTROLLER_FILE, DEFAULT_DIR};
use crate::supervise::{lock_dir, running_servers, Member, Running, Supervised};
use shoal_runtime::shard::{read_latest_secure, ControllerDriverConfig, ShardController};

/// The file listing the groups, one line per gid: `GID ADDR,ADDR,ADDR`.
pub(crate) const GROUPS_FILE: &str = "groups";
/// The file holding the number of shards the cluster was created with.
const SHARDS_FILE: &str = "shards";
/// The most group servers `shard up` starts (a typo such as `--groups 300` would otherwise
/// start hundreds of processes).
const MAX_LOCAL_SERVERS: u64 = 64;
/// Servers of the controller store.
const STORE_SERVERS: usize = 3;
/// How long each read of the controller store may take while waiting for it to answer.
const STORE_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The file recording that the groups joined once: later runs join nothing.
const JOINED_FILE: &str = "joined";
/// How long the controller store may not answer before `shard up` says so (and again after
/// each such period).
const STORE_PATIENCE: Duration = Duration::from_secs(10);
/// How often the join's progress is printed while it waits.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// Arguments of `shoal shard up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Number of replica groups, gids 1..N [default: 3; a resumed DIR keeps its own].
    #[arg(long)]
    groups: Option<u64>,
    /// Servers per group: 3 tolerate one failure per group, 5 two
    /// [default: 3; a resumed DIR keeps its own].
    #[arg(long)]
    replicas: Option<u64>,
    /// Number of shards, for good [default: 128; a resumed DIR keeps its own].
    #[arg(long)]
    shards: Option<u32>,
    /// Directory of the cluster: DIR/controller, DIR/groups, the servers' data directories
    /// and logs.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Serve TLS: make a CA and certificates in DIR/tls (`shoal cert`) and start every server
    /// (controller store and groups) with them. `shoal shard` and `shoal kv` commands run
    /// with --dir DIR (or where ./shoal-shard is) use DIR/tls/ca.pem and DIR/tls/client.pem by
    /// themselves. A cluster made with --tls stays TLS when resumed.
    #[arg(long)]
    tls: bool,
}

/// The shape of a cluster directory: its files, read back or about to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    store: Vec<SocketAddr>,
    groups: BTreeMap<Gid, Vec<SocketAddr>>,
    shards: u32,
}

impl Layout {
    fn replicas(&self) -> usize {
        self.groups.values().next().map_or(0, Vec::len)
    }

    fn store_data(dir: &Path, id: usize) -> PathBuf {
        dir.join(format!("controller{id}"))
    }

    fn group_data(dir: &Path, gid: Gid, id: usize) -> PathBuf {
        dir.join(format!("group{gid}-server{id}"))
    }

    /// Reads DIR/controller, DIR/groups and DIR/shards.
    fn read(dir: &Path) -> Result<Layout> {
        let store = read_endpoints(&dir.join(CONTROLLER_FILE))?;
        let groups = read_groups(&dir.join(GROUPS_FILE))?;
        let path = dir.join(SHARDS_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let shards = text
            .trim()
            .parse()
            .with_context(|| format!("{}: not a number of shards: {text:?}", path.display()))?;
        Ok(Layout {
            store,
            groups,
            shards,
        })
    }

    /// Writes the files, DIR/controller last: its presence marks a complete directory.
    fn write(&self, dir: &Path) -> Result<()> {
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write(SHARDS_FILE, format!("{}\n", self.shards))?;
        write(
            GROUPS_FILE,
            self.groups
                .iter()
                .map(|(gid, addrs)| format!("{gid} {}\n", join_addrs(addrs)))
                .collect(),
        )?;
        write(
            CONTROLLER_FILE,
            self.store.iter().map(|a| format!("{a}\n")).collect(),
        )
    }

    /// Makes (where missing) the CA and every server's certificate in DIR/tls.
    fn make_certs(&self, dir: &Path) -> Result<()> {
        let tls_dir = crate::tls_cmd::local_tls_dir(dir);
        let mut names: Vec<String> = (1..=self.store.len())
            .map(|id| format!("controller{id}"))
            .collect();
        for (gid, addrs) in &self.groups {
            names.extend((1..=addrs.len()).map(|id| format!("group{gid}-server{id}")));
        }
        crate::tls_cmd::make_local(&tls_dir, &names)
            .with_context(|| format!("making certificates in {}", tls_dir.display()))
    }

    /// What the supervisor runs: the store's servers (group 0), then each group's.
    fn supervised(&self, dir: &Path, exe: &Path, tls: Option<&Path>) -> Supervised {
        let tls_flags = |name: &str| match tls {
            Some(tls) => crate::tls_cmd::ServerTlsArgs::for_node(tls, name),
            None => Vec::new(),
        };
        let mut members = Vec::new();
        let store_peers = shoal_cluster::peers_arg(&self.store);
        for (i, addr) in self.store.iter().enumerate() {
            let id = i + 1;
            let data = Layout::store_data(dir, id);
            let spec = Spec::new(
                format!("controller server {id}"),
                exe,
                data.with_extension("log"),
            )
            .append_log()
            .args(["kv", "server", "--id", &id.to_string()])
            .args(["--listen", &addr.to_string(), "--peers", &store_peers])
            .arg("--data")
            .arg(&data)
            .args(tls_flags(&format!("controller{id}")))
            // Its own process group: a Ctrl-C in the terminal reaches `shard up` alone, which
            // then stops the servers itself.
            .own_process_group();
            members.push(Member {
                name: format!("controller server {id}"),
                data,
                spec,
                group: 0,
            });
        }
        let mut names = vec!["the controller store".to_string()];
        let controller = join_addrs(&self.store);
        for (g, (gid, addrs)) in self.groups.iter().enumerate() {
            names.push(format!("group {gid}"));
            let peers = join_addrs(addrs);
            for (i, addr) in addrs.iter().enumerate() {
                let id = i + 1;
                let data = Layout::group_data(dir, *gid, id);
                let spec = Spec::new(
                    format!("group {gid} server {id}"),
                    exe,
                    data.with_extension("log"),
                )
                .append_log()
                .args(["shard", "server", "--gid", &gid.to_string()])
                .args(["--id", &id.to_string(), "--listen", &addr.to_string()])
                .args(["--peers", &peers, "--shards", &self.shards.to_string()])
                .args(["--controller", &controller, "--data"])
                .arg(&data)
                .args(tls_flags(&format!("group{gid}-server{id}")))
                .own_process_group();
                members.push(Member {
                    name: format!("group {gid} server {id}"),
                    data,
                    spec,
                    group: g + 1,
                });
            }
        }
        Supervised {
            command: "shard up",
            dir: dir.to_path_buf(),
            groups: names,
            members,
        }
    }
}

/// Reads a groups file: one `GID ADDR,ADDR,…` per line.
pub(crate) fn read_groups(path: &Path) -> Result<BTreeMap<Gid, Vec<SocketAddr>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut groups = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || {
            format!(
                "{}: bad line {line:?} (want: GID ADDR,ADDR,…)",
                path.display()
            )
        };
        let (gid, addrs) = line.split_once(' ').with_context(bad)?;
        let gid: Gid = gid.parse().with_context(bad)?;
        let addrs = addrs
            .trim()
            .split(',')
            .map(|a| crate::cli::parse_addr(a.trim()))
            .collect::<Result<Vec<_>>>()
            .with_context(bad)?;
        groups.insert(gid, addrs);
    }
    if groups.is_empty() {
        bail!("{} lists no groups", path.display());
    }
    Ok(groups)
}

/// `shoal shard up`.
///
/// Runs inside `Runtime::block_on`, that is on the main thread, which spawns every child (their
/// parent-death signal follows the spawning thread): the join runs concurrently in the same
/// task, so restarts happen on that thread too.
pub(crate) async fn up(args: UpArgs) -> Result<ExitCode> {
    let dir = args.dir.clone();
    let resuming = dir.join(CONTROLLER_FILE).exists();
    let layout = if resuming {
        let layout = Layout::read(&dir)
            .with_context(|| format!("{} holds a damaged cluster directory", dir.display()))?;
        check_agrees(&args, &layout)?;
        Some(layout)
    } else {
        None
    };
    let groups = args.groups.unwrap_or(3);
    let replicas = args.replicas.unwrap_or(3);
    let shards = args.shards.unwrap_or(shoal_shard::DEFAULT_SHARDS);
    if layout.is_none() {
        if groups == 0 {
            bail!("--groups must be at least 1");
        }
        if replicas == 0 {
            bail!("--replicas must be at least 1");
        }
        if groups.saturating_mul(replicas) > MAX_LOCAL_SERVERS {
            bail!(
                "--groups {groups} --replicas {replicas} is {} group servers on this machine, \
                 more than {MAX_LOCAL_SERVERS}: run fewer (shard up is for one machine; on \
                 several, start `shoal shard server` on each and `shoal shard join` them)",
                groups.saturating_mul(replicas)
            );
        }
        shoal_shard::validate_shards(u64::from(shards))
            .map_err(|e| anyhow::anyhow!("--shards: {e}"))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (guard, supervisor) = lock_dir(&dir)?;
    if let (Some(pid), false) = (supervisor, resuming) {
        bail!(
            "another `shard up` (pid {}) is starting a cluster in {}",
            pid.map_or("unknown".to_string(), |p| p.to_string()),
            dir.display()
        );
    }
    let layout = match layout {
        Some(layout) => layout,
        None => {
            let n = STORE_SERVERS + (groups * replicas) as usize;
            let mut addrs = shoal_cluster::free_local_addrs(n)?.into_iter();
            let store: Vec<SocketAddr> = addrs.by_ref().take(STORE_SERVERS).collect();
            let groups = (1..=groups)
                .map(|gid| (gid, addrs.by_ref().take(replicas as usize).collect()))
                .collect();
            let layout = Layout {
                store,
                groups,
                shards,
            };
            // The certificates before DIR/controller: a client that finds the cluster finds
            // them.
            if args.tls {
                layout.make_certs(&dir)?;
            }
            layout.write(&dir)?;
            layout
        }
    };
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let tls_dir = crate::tls_cmd::local_tls_dir(&dir);
    let tls = args.tls || tls_dir.join(crate::tls_cmd::CA_CERT).exists();
    if tls {
        layout.make_certs(&dir)?;
        // This process joins the groups and reads the store as the local client.
        let client = crate::tls_cmd::ClientTlsArgs {
            ca: None,
            cert: None,
            key: None,
        };
        crate::shard_cmd::set_security(client.security(Some(&dir))?);
    }
    let set = layout.supervised(&dir, &exe, tls.then_some(tls_dir.as_path()));
    let running = running_servers(
        set.members
            .iter()
            .map(|m| (m.name.as_str(), m.data.as_path())),
    )?;
    if supervisor.is_some() || !running.is_empty() {
        let mut pids: Vec<String> = running
            .iter()
            .map(|(name, pid)| pid.map_or(name.clone(), |p| format!("{name} {p}")))
            .collect();
        if let Some(pid) = supervisor {
            pids.push(pid.map_or("shard up".to_string(), |p| format!("shard up {p}")));
        }
        bail!(
            "a sharded cluster already runs in {} (pids {}): controller {}. Use it (shoal shard \
             status --dir {}), or stop it first",
            dir.display(),
            pids.join(", "),
            join_addrs(&layout.store),
            dir.display()
        );
    }
    if layout.replicas() == 2 {
        eprintln!(
            "warning: a group of 2 tolerates no failure (a majority of 2 is 2): with one \
             server down it answers nothing; 3 tolerate one"
        );
    }
    // Before the first child: a stop signal from now on stops the servers too.
    let mut signals = StopSignals::install()?;
    let mut servers = Running::start(&set)?;
    let mut out = std::io::stdout().lock();
    // A closed stdout (a script that read the first lines and left) must not stop the
    // cluster: errors writing it are ignored.
    let _ = writeln!(out, "controller {}", join_addrs(&layout.store));
    for (gid, addrs) in &layout.groups {
        let _ = writeln!(out, "group {gid} {}", join_addrs(addrs));
    }
    let _ = writeln!(
        out,
        "{} in {}; server logs next to their data directories there; Ctrl-C stops it",
        if resuming {
            "resuming the cluster"
        } else {
            "starting a cluster"
        },
        dir.display()
    );
    let _ = out.flush();
    drop(out);
    let failure = {
        let join = join_missing(&layout, &dir);
        tokio::pin!(join);
        let supervise = servers.supervise(&set, &mut signals);
        tokio::pin!(supervise);
        let mut joined = false;
        loop {
            tokio::select! {
                result = &mut supervise => {
                    break match result {
                        Ok(failure) => failure,
                        Err(e) => Some(format!("{e:#}")),
                    };
                }
                result = &mut join, if !joined => {
                    joined = true;
                    if let Err(e) = result {
                        break Some(format!("joining the groups: {e:#}"));
                    }
                }
            }
        }
    };
    servers.stop();
    drop(guard);
    match failure {
        Some(message) => bail!(message),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Refuses --groups, --replicas or --shards that disagree with the directory's cluster.
fn check_agrees(args: &UpArgs, layout: &Layout) -> Result<()> {
    let dir = args.dir.display();
    let mut wrong = Vec::new();
    if let Some(g) = args.groups.filter(|&g| g as usize != layout.groups.len()) {
        wrong.push(format!("--groups {g} (it has {})", layout.groups.len()));
    }
    if let Some(r) = args.replicas.filter(|&r| r as usize != layout.replicas()) {
        wrong.push(format!("--replicas {r} (it has {})", layout.replicas()));
    }
    if let Some(s) = args.shards.filter(|&s| s != layout.shards) {
        wrong.push(format!("--shards {s} (it has {})", layout.shards));
    }
    if wrong.is_empty() {
        return Ok(());
    }
    bail!(
        "{dir} already holds a cluster that disagrees with {}: run `shoal shard up --dir {dir}` \
         without them to resume it; to change its groups use `shoal shard join` and `shoal \
         shard leave`; for another shape use another --dir (the number of shards is fixed for \
         good)",
        wrong.join(", ")
    )
}

/// Joins the groups of `layout` that are not members yet (all at once), or completes a change
/// left incomplete; then prints the summary.
async fn join_missing(layout: &Layout, dir: &Path) -> Result<()> {
    let store = &layout.store;
    // The store's servers were just started: wait for them to elect a leader and answer.
    let mut said = shoal_cluster::now();
    let latest = loop {
        match read_latest_secure(&crate::shard_cmd::security(), store, 1, STORE_READ_TIMEOUT).await
        {
            Ok(latest) => break latest,
            Err(e) => {
                if shoal_cluster::now().duration_since(said) >= STORE_PATIENCE {
                    eprintln!("waiting for the controller store to answer: {e}");
                    said = shoal_cluster::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The groups join once, on the first run: a group that left since (`shard leave`) stays
    // out when `shard up` runs again.
    let joined_path = dir.join(JOINED_FILE);
    let joined_before = joined_path.exists();
    let missing: BTreeMap<Gid, Vec<String>> = layout
        .groups
        .iter()
        .filter(|(gid, _)| {
            (!joined_before || latest.is_none())
                && latest
                    .as_ref()
                    .is_none_or(|r| !r.config.groups.contains_key(gid))
        })
        .map(|(&gid, addrs)| (gid, addrs.iter().map(ToString::to_string).collect()))
        .collect();
    let complete = latest.as_ref().is_some_and(|r| r.complete);
    if !missing.is_empty() {
        let mut config = ControllerDriverConfig::new(store.clone(), layout.shards);
        config.security = crate::shard_cmd::security();
        config.cluster_id = 1;
        let controller = ShardController::start(config)?;
        let gids: Vec<String> = missing.keys().map(ToString::to_string).collect();
        eprintln!("joining group(s) {}", gids.join(", "));
        let result = {
            // A change left incomplete by an interrupted controller is completed first.
            let submit = controller.submit(Op::Join(missing));
            tokio::pin!(submit);
            let mut progress = tokio::time::interval(PROGRESS_EVERY);
            progress.tick().await;
            loop {
                tokio::select! {
                    result = &mut submit => break result,
                    _ = progress.tick() => print_waiting(&controller.status(), store, 1).await,
                }
            }
        };
        controller.stop().await;
        if let Err(reason) = result {
            bail!("{reason}");
        }
    } else if !complete {
        // Not completed here: a controller waiting in the background (for a group that may
        // never come back) would hold the lock every other command needs.
        eprintln!(
            "configuration {} is not complete (a change was interrupted): the next `shoal shard \
             join`, `leave` or `move` completes it first; `shoal shard status` shows its \
             migrations",
            latest.as_ref().map_or(0, |r| r.config.num)
        );
    }
    if !joined_before {
        std::fs::write(&joined_path, "the groups of DIR/groups joined once\n")
            .with_context(|| format!("writing {}", joined_path.display()))?;
    }
    let record = read_latest_secure(
        &crate::shard_cmd::security(),
        store,
        1,
        Duration::from_secs(10),
    )
    .await?
    .context("the controller store holds no configuration after the join")?;
    let mut out = std::io::stdout().lock();
    let config = &record.config;
    let gids: Vec<String> = config.groups.keys().map(ToString::to_string).collect();
    let owners = match gids.len() {
        1 => format!("group {} owns", gids[0]),
        _ => format!("groups {} own", gids.join(", ")),
    };
    let _ = writeln!(
        out,
        "config {}: {owners} the {} shards",
        config.num,
        config.num_shards()
    );
    for line in shard_ranges(config) {
        let _ = writeln!(out, "  {line}");
    }
    let d = dir.display();
    for (gid, addrs) in &layout.groups {
        if !config.groups.contains_key(gid) {
            let _ = writeln!(
                out,
                "group {gid} runs but is not a member (it left): `shoal shard join \
                 {gid}={}{}` adds it back",
                join_addrs(addrs),
                if dir == Path::new(DEFAULT_DIR) {
                    String::new()
                } else {
                    format!(" --dir {d}")
                }
            );
        }
    }
    let default = dir == Path::new(DEFAULT_DIR);
    let with_dir = if default {
        String::new()
    } else {
        format!(" --dir {d}")
    };
    let _ = writeln!(out, "try (in another terminal):");
    let _ = writeln!(out, "  shoal shard status{with_dir}");
    let _ = writeln!(
        out,
        "  shoal kv --controller {} put greeting hello",
        join_addrs(store)
    );
    // A move and a leave that would be accepted: shard 7 (or the last) to a member that does
    // not own it, and the last member leaving.
    let shard = 7.min(config.num_shards().saturating_sub(1));
    let owner = config.owner(shard);
    if let Some(to) = config.groups.keys().rev().find(|&&g| Some(g) != owner) {
        let _ = writeln!(out, "  shoal shard move {shard} {to}{with_dir}");
    }
    if let (true, Some(last)) = (config.groups.len() >= 2, config.groups.keys().last()) {
        let _ = writeln!(out, "  shoal shard leave {last}{with_dir}");
    }
    let _ = out.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let addrs = shoal_cluster::free_local_addrs(9).unwrap();
        let layout = Layout {
            store: addrs[..3].to_vec(),
            groups: [(1, addrs[3..6].to_vec()), (2, addrs[6..].to_vec())].into(),
            shards: 16,
        };
        layout.write(dir.path()).unwrap();
        assert_eq!(Layout::read(dir.path()).unwrap(), layout);
        let groups = std::fs::read_to_string(dir.path().join(GROUPS_FILE)).unwrap();
        let first = groups.lines().next().unwrap();
        assert_eq!(first, format!("1 {}", join_addrs(&addrs[3..6])));
        std::fs::write(dir.path().join(GROUPS_FILE), "1\n").unwrap();
        let err = format!("{:#}", Layout::read(dir.path()).unwrap_err());
        assert!(err.contains("want: GID ADDR,ADDR"), "{err}");
    }

    #[test]
    fn options_that_disagree_with_the_directory_are_named() {
        let addrs = shoal_cluster::free_local_addrs(6).unwrap();
        let layout = Layout {
            store: addrs[..3].to_vec(),
            groups: [(1, addrs[3..].to_vec())].into(),
            shards: 128,
        };
        let args = |groups, replicas, shards| UpArgs {
            groups,
            replicas,
            shards,
            dir: "d".into(),
            tls: false,
        };
        check_agrees(&args(None, None, None), &layout).unwrap();
        check_agrees(&args(Some(1), Some(3), Some(128)), &layout).unwrap();
        let err = check_agrees(&args(Some(2), None, Some(64)), &layout)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--groups 2 (it has 1), --shards 64 (it has 128)"),
            "{err}"
        );
        assert!(err.contains("shoal shard join"), "{err}");
    }
}
