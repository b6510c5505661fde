//! `shoal kv up`: a local cluster of `shoal kv server` children, supervised.
//!
//! Each server writes its log to `DIR/nodeN.log`, next to its data directory `DIR/nodeN`;
//! `kv up` itself prints a few lines at start and one line per restart or failure. A server
//! that dies is restarted from its data directory while the others keep serving; one that keeps
//! failing (exits with an error within a minute of each start: a damaged directory, a full
//! disk) is retried less and less often, and what is wrong with it and how to fix it is
//! printed once. Only when a majority
//! cannot run does `kv up` give up: the cluster then serves nothing, and the foreground
//! process exiting with the reasons says so more plainly than one retrying silently.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_cluster::{now, Backoff, Procs, Spec, StopSignals};
use shoal_storage::{Disk as _, DiskError, StdDisk, LOCK_FILE};

use crate::kv_cmd::{read_endpoints, DEFAULT_DIR, ENDPOINTS_FILE};

/// How long `shoal kv up` waits for its servers to exit after asking them to stop.
const UP_STOP_GRACE: Duration = Duration::from_secs(5);
/// A server that died is restarted after this delay; one failing right after each start waits
/// twice as long after each failure, up to [`UP_MAX_RESTART_DELAY`].
const UP_RESTART_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between two starts of a failing server.
const UP_MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// A server that exits with an error sooner than this after starting has failed to start; one
/// that has run this long after failing is announced as running again.
const UP_QUICK_FAILURE: Duration = Duration::from_secs(3);
/// A server that exits with an error within this long of its start continues its series of
/// failures (and the backoff): a full disk may let it run a few seconds each time. One that
/// has run this long starts afresh.
const UP_HEALTHY_RUN: Duration = Duration::from_secs(60);
/// A server counts as unable to run after this many failed starts in a row; when a majority
/// cannot run, `kv up` stops.
const UP_GIVE_UP_FAILURES: u32 = 3;
/// Lines of a failing server's log printed with its diagnosis.
const LOG_TAIL_LINES: usize = 3;
/// How often waiting restarts are checked for a data directory moved aside (restarted at once)
/// and restarted servers for being healthy again.
const UP_POLL: Duration = Duration::from_secs(1);
/// How often the servers are checked for having exited.
const UP_EXIT_POLL: Duration = Duration::from_millis(50);
/// Restart delays of a failing server.
const UP_BACKOFF: Backoff = Backoff {
    initial: UP_RESTART_DELAY,
    max: UP_MAX_RESTART_DELAY,
};

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
    let mut guard =
        StdDisk::new(&args.dir).with_context(|| format!("opening {}", args.dir.display()))?;
    let supervisor = match guard.lock() {
        Ok(()) => None,
        Err(DiskError::Locked { pid, .. }) => Some(pid),
        Err(e) => return Err(e).with_context(|| format!("locking {}", args.dir.display())),
    };
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
    let running = running_servers(&args.dir, endpoints.len())?;
    if supervisor.is_some() || !running.is_empty() {
        let mut pids: Vec<String> = running
            .iter()
            .map(|(id, pid)| pid.map_or(format!("server {id}"), |p| p.to_string()))
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
    let cluster = Cluster {
        dir: args.dir.clone(),
        peers: shoal_cluster::peers_arg(&endpoints),
        endpoints: endpoints.clone(),
        exe: std::env::current_exe().context("locating the shoal binary")?,
    };
    // Before the first child: a stop signal from now on stops the servers too.
    let signals = StopSignals::install()?;
    let mut procs = Procs::new();
    let mut slots = Vec::new();
    for id in 1..=endpoints.len() {
        procs.spawn(cluster.spec(id)?)?;
        slots.push(UpSlot {
            restart_at: None,
            failures: 0,
            announced: false,
            reported: None,
        });
    }
    // A closed stdout (a script that read the first line and left) must not stop the
    // cluster: errors writing it are ignored.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "endpoints {list}");
    let _ = writeln!(
        out,
        "cluster of {} in {}; server logs in {}; Ctrl-C stops it",
        endpoints.len(),
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
    let failure = match supervise(&cluster, &mut procs, &mut slots, signals).await {
        Ok(failure) => failure,
        Err(e) => Some(format!("{e:#}")),
    };
    // Ask every server to stop (SIGTERM: they finish the write in progress), then wait;
    // SIGKILL those still running after the grace period.
    procs.stop(UP_STOP_GRACE);
    drop(guard);
    match failure {
        Some(message) => bail!(message),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// What `kv up` needs to start a server.
struct Cluster {
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
    fn spec(&self, id: usize) -> Result<Spec> {
        Ok(
            Spec::new(format!("server {id}"), &self.exe, self.log_path(id))
                .append_log()
                .args(["kv", "server", "--id", &id.to_string()])
                .args(["--listen", &self.endpoints[id - 1].to_string()])
                .args(["--peers", &self.peers, "--data"])
                .arg(self.data_dir(id))
                // Its own process group: a Ctrl-C in the terminal reaches `kv up` alone, which
                // then stops the servers itself (not a restart race with servers exiting).
                .own_process_group(),
        )
    }
}

/// Servers of the cluster in `dir` that are running: their data directory's lock is held.
/// Returns their ids and pids (as the lock file records them).
fn running_servers(dir: &Path, n: usize) -> Result<Vec<(usize, Option<u32>)>> {
    let mut running = Vec::new();
    for id in 1..=n {
        let data = dir.join(format!("node{id}"));
        if !data.join(LOCK_FILE).exists() {
            continue;
        }
        // Taking the lock is the only sure test; a free one is released at once (the disk is
        // dropped), before any server of ours starts.
        let mut disk =
            StdDisk::new(&data).with_context(|| format!("opening {}", data.display()))?;
        match disk.lock() {
            Ok(()) => {}
            Err(DiskError::Locked { pid, .. }) => running.push((id, pid)),
            Err(e) => return Err(e).with_context(|| format!("checking {}", data.display())),
        }
    }
    Ok(running)
}

/// The restart policy's state of one server of `shoal kv up` (its process is in `Procs`).
struct UpSlot {
    /// When it is restarted, while it waits for its restart.
    restart_at: Option<Instant>,
    /// Exits with an error in a row, each within [`UP_HEALTHY_RUN`] of its start.
    failures: u32,
    /// "running again" was printed for its current start.
    announced: bool,
    /// The error last diagnosed for its current failures, printed once.
    reported: Option<String>,
}

/// What woke `shoal kv up`'s supervisor.
enum UpEvent {
    Stop,
    CheckExits,
    RestartDue,
    Poll,
}

/// Supervises until a stop signal (`Ok(None)`) or until a majority cannot run
/// (`Ok(Some(why))`).
async fn supervise(
    cluster: &Cluster,
    procs: &mut Procs,
    slots: &mut [UpSlot],
    mut signals: StopSignals,
) -> Result<Option<String>> {
    let mut poll = tokio::time::interval(UP_POLL);
    let mut exits = tokio::time::interval(UP_EXIT_POLL);
    loop {
        let event = {
            let next_restart = slots.iter().filter_map(|slot| slot.restart_at).min();
            let restart_due = async move {
                match next_restart {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signals.recv() => UpEvent::Stop,
                _ = restart_due => UpEvent::RestartDue,
                _ = exits.tick() => UpEvent::CheckExits,
                _ = poll.tick() => UpEvent::Poll,
            }
        };
        let now = now();
        match event {
            UpEvent::Stop => return Ok(None),
            UpEvent::CheckExits => {
                for i in 0..slots.len() {
                    if slots[i].restart_at.is_some() {
                        continue;
                    }
                    let Some(proc) = procs.get_mut(i) else {
                        continue;
                    };
                    if proc.is_running() {
                        continue;
                    }
                    let status = proc.try_exit();
                    if let Some(why) = on_exit(cluster, procs, slots, i, status, now) {
                        return Ok(Some(why));
                    }
                }
            }
            UpEvent::RestartDue => {
                for (i, slot) in slots.iter_mut().enumerate() {
                    if slot.restart_at.is_some_and(|at| at <= now) {
                        restart(procs, i + 1, slot)?;
                    }
                }
            }
            UpEvent::Poll => {
                for (i, slot) in slots.iter_mut().enumerate() {
                    let id = i + 1;
                    if slot.restart_at.is_some()
                        && slot.failures > 0
                        && !cluster.data_dir(id).exists()
                    {
                        // The user moved the directory aside as told: start it now, empty.
                        eprintln!(
                            "server {id}: {} is gone; starting it empty (it re-syncs from the \
                             others)",
                            cluster.data_dir(id).display()
                        );
                        restart(procs, id, slot)?;
                    } else if slot.failures > 0 {
                        let Some(proc) = procs.get_mut(i) else {
                            continue;
                        };
                        if !proc.is_running() {
                            continue;
                        }
                        let ran = now.duration_since(proc.started());
                        if ran >= UP_QUICK_FAILURE && !slot.announced {
                            eprintln!("server {id} is running again");
                            slot.announced = true;
                        }
                        if ran >= UP_HEALTHY_RUN {
                            slot.failures = 0;
                            slot.reported = None;
                        }
                    }
                }
            }
        }
    }
}

/// Server `i + 1` exited with `status` (`None`: it could not be waited for): schedules its
/// restart, says why it failed once, and returns why `kv up` gives up when a majority cannot
/// run.
fn on_exit(
    cluster: &Cluster,
    procs: &Procs,
    slots: &mut [UpSlot],
    i: usize,
    status: Option<ExitStatus>,
    now: Instant,
) -> Option<String> {
    let id = i + 1;
    let majority = slots.len() / 2 + 1;
    let (started, log_offset) = procs
        .get(i)
        .map_or((now, 0), |p| (p.started(), p.log_offset()));
    let slot = &mut slots[i];
    // Only an exit with an error status is the server failing. Killed by a signal
    // (someone's `kill -9`, the OOM killer) or stopped cleanly by someone's
    // SIGTERM, it is restarted at once: the next start may well work.
    let failed = match &status {
        Some(status) => status.code().is_some_and(|c| c != 0),
        None => true,
    };
    let status = match status {
        Some(status) => status.to_string(),
        None => "wait failed".to_string(),
    };
    let ran = now.duration_since(started);
    if !failed || ran >= UP_HEALTHY_RUN {
        slot.failures = 0;
        slot.reported = None;
        slot.announced = false;
        slot.restart_at = Some(now + UP_RESTART_DELAY);
        eprintln!(
            "server {id} exited ({status}); restarting it in {} s; the others keep \
             serving",
            UP_RESTART_DELAY.as_secs()
        );
        return None;
    }
    slot.failures += 1;
    slot.announced = false;
    let delay = restart_delay(slot.failures);
    let failed_to = if ran < UP_QUICK_FAILURE {
        "failed to start"
    } else {
        "failed"
    };
    slot.restart_at = Some(now + delay);
    let diagnosis = diagnose(&cluster.log_path(id), log_offset, &cluster.data_dir(id));
    if slot.reported.as_deref() != Some(diagnosis.error.as_str()) {
        eprintln!(
            "server {id} {failed_to} ({status}); the others keep serving. From {}:",
            cluster.log_path(id).display()
        );
        for line in &diagnosis.tail {
            eprintln!("  {line}");
        }
        eprintln!("  fix: {}", diagnosis.fix);
        eprintln!(
            "  kv up retries it in {} s, then less often (every {} s at most)",
            delay.as_secs(),
            UP_MAX_RESTART_DELAY.as_secs()
        );
        slot.reported = Some(diagnosis.error);
    } else {
        eprintln!(
            "server {id} {failed_to} again ({} times in a row); next try in {} s",
            slot.failures,
            delay.as_secs()
        );
    }
    let broken: Vec<usize> = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.failures >= UP_GIVE_UP_FAILURES)
        .map(|(i, _)| i + 1)
        .collect();
    if slots.len() - broken.len() >= majority {
        return None;
    }
    let names = broken
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    Some(format!(
        "no majority can run ({} of {} servers keep failing to start: {names}; \
         see above and their logs in {}); the cluster is stopped, its data \
         kept: fix them and run `shoal kv up --dir {}` again",
        broken.len(),
        slots.len(),
        cluster.dir.display(),
        cluster.dir.display()
    ))
}

/// Starts server `id` again from its data directory, with the same arguments.
fn restart(procs: &mut Procs, id: usize, slot: &mut UpSlot) -> Result<()> {
    procs.restart(id - 1)?;
    slot.restart_at = None;
    if slot.failures == 0 {
        eprintln!("server {id} restarted");
    }
    Ok(())
}

/// The wait before the next start of a server that failed `failures` starts in a row:
/// 1 s, 2 s, 4 s, … up to [`UP_MAX_RESTART_DELAY`].
fn restart_delay(failures: u32) -> Duration {
    UP_BACKOFF.delay(failures)
}

/// Why a server failed to start, from its log.
#[derive(Debug, PartialEq, Eq)]
struct Diagnosis {
    /// Its error line (the last `error:` line, else its last line): identifies the failure.
    error: String,
    /// Its last lines, ending with the error.
    tail: Vec<String>,
    /// What to do about it.
    fix: String,
}

/// Reads what server wrote to `log` since `offset` and says what to do about it.
fn diagnose(log: &Path, offset: u64, data: &Path) -> Diagnosis {
    let text = shoal_cluster::read_log_from(log, offset).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    let error = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("error:"))
        .or(lines.last())
        .map_or_else(|| "(it wrote nothing)".to_string(), |l| l.to_string());
    let tail = match lines.iter().rposition(|l| *l == error) {
        Some(end) => lines[end.saturating_sub(LOG_TAIL_LINES - 1)..=end]
            .iter()
            .map(|l| l.to_string())
            .collect(),
        None => vec![error.clone()],
    };
    let fix = fix_for(&error, data);
    Diagnosis { error, tail, fix }
}

/// What to do about a server's start-up `error`, whose data directory is `data`.
fn fix_for(error: &str, data: &Path) -> String {
    let dir = data.display();
    if error.contains("corrupt data") {
        format!(
            "its data directory is damaged. With the others serving, move it aside \
             (mv {dir} {dir}.bad): kv up then starts it empty and it re-syncs from the others \
             (see docs/kv.md, \"A damaged server\")"
        )
    } else if error.contains("No space left on device") {
        format!("the disk holding {dir} is full: free space on it; kv up keeps retrying")
    } else if error.contains("is in use by") {
        format!("another process uses {dir}: stop it; kv up keeps retrying")
    } else if error.contains("not a Shoal data directory") || error.contains("belongs to cluster") {
        format!("{dir} is not this server's directory: move it aside (mv {dir} {dir}.other)")
    } else if error.contains("Address already in use") {
        "its port is taken by another program: stop that program; kv up keeps retrying".to_string()
    } else {
        "see the log above; kv up keeps retrying".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_to_a_minute() {
        let delays: Vec<u64> = (1..=8).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(restart_delay(u32::MAX), UP_MAX_RESTART_DELAY);
    }

    #[test]
    fn a_damaged_directory_is_diagnosed_from_the_servers_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node2.log");
        std::fs::write(&log, "error: an older run's failure\n").unwrap();
        let offset = std::fs::metadata(&log).unwrap().len();
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "2026-12-03T20:00:00Z  INFO kv server starting node=2").unwrap();
        writeln!(f, "error: kv server 2: storage in d/node2: corrupt data in seg-0000000000000001.log at offset 6001: checksum mismatch").unwrap();
        let data = dir.path().join("node2");
        let d = diagnose(&log, offset, &data);
        assert!(d.error.contains("checksum mismatch"), "{d:?}");
        assert_eq!(d.tail.len(), 2, "only this run's lines: {d:?}");
        let mv = format!("mv {} {}.bad", data.display(), data.display());
        assert!(d.fix.contains(&mv), "{d:?}");
        assert!(fix_for("error: No space left on device (os error 28)", &data).contains("full"));
        assert_eq!(
            diagnose(&dir.path().join("none.log"), 0, &data).error,
            "(it wrote nothing)"
        );
    }
}
