//! The supervisor of the local clusters `shoal kv up` and `shoal shard up` run: their servers
//! as children, each restarted from its data directory when it dies.
//!
//! Each server writes its log next to its data directory; the supervisor prints one line per
//! restart or failure. A server that dies is restarted while the others keep serving; one that
//! keeps failing (exits with an error within a minute of each start: a damaged directory, a
//! full disk) is retried less and less often, and what is wrong with it and how to fix it is
//! printed once. Only when a majority of one of the Raft groups cannot run does the supervisor
//! give up: that group then serves nothing, and the foreground process exiting with the
//! reasons says so more plainly than one retrying silently.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use shoal_cluster::{now, Backoff, Procs, Spec, StopSignals};
use shoal_storage::{Disk as _, DiskError, StdDisk, LOCK_FILE};

/// How long the supervisor waits for its servers to exit after asking them to stop.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);
/// A server that died is restarted after this delay; one failing right after each start waits
/// twice as long after each failure, up to [`MAX_RESTART_DELAY`].
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between two starts of a failing server.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// A server that exits with an error sooner than this after starting has failed to start; one
/// that has run this long after failing is announced as running again.
const QUICK_FAILURE: Duration = Duration::from_secs(3);
/// A server that exits with an error within this long of its start continues its series of
/// failures (and the backoff): a full disk may let it run a few seconds each time. One that
/// has run this long starts afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// A server counts as unable to run after this many failed starts in a row; when a majority
/// of its group cannot run, the supervisor stops.
const GIVE_UP_FAILURES: u32 = 3;
/// Lines of a failing server's log printed with its diagnosis.
const LOG_TAIL_LINES: usize = 3;
/// How often waiting restarts are checked for a data directory moved aside (restarted at once)
/// and restarted servers for being healthy again.
const POLL: Duration = Duration::from_secs(1);
/// How often the servers are checked for having exited.
const EXIT_POLL: Duration = Duration::from_millis(50);
/// Restart delays of a failing server.
const BACKOFF: Backoff = Backoff {
    initial: RESTART_DELAY,
    max: MAX_RESTART_DELAY,
};

/// One supervised server.
pub(crate) struct Member {
    /// Its name in messages: "server 2", "group 1 server 3".
    pub name: String,
    /// Its data directory (moved aside by the user: it is started empty at once).
    pub data: PathBuf,
    /// How to start it (its log is the spec's).
    pub spec: Spec,
    /// The Raft group it belongs to: an index into [`Supervised::groups`].
    pub group: usize,
}

impl Member {
    fn log(&self) -> &Path {
        self.spec.log().unwrap_or(Path::new("(no log)"))
    }
}

/// What a supervisor runs: Raft groups of servers, all from one directory.
pub(crate) struct Supervised {
    /// The command, in messages: "kv up", "shard up".
    pub command: &'static str,
    /// The directory holding the data directories, logs and the supervisor's LOCK.
    pub dir: PathBuf,
    /// The groups' names in messages ("the cluster", "the controller store", "group 2").
    pub groups: Vec<String>,
    /// The servers, in start order.
    pub members: Vec<Member>,
}

/// Takes `dir`'s LOCK for the supervisor (held until the returned disk is dropped: one
/// supervisor per cluster directory, even while every server of the first is down and waiting
/// for a restart). `Ok((disk, Some(pid)))`: another process holds it (its pid, if recorded).
pub(crate) fn lock_dir(dir: &Path) -> Result<(StdDisk, Option<Option<u32>>)> {
    let mut guard = StdDisk::new(dir).with_context(|| format!("opening {}", dir.display()))?;
    let holder = match guard.lock() {
        Ok(()) => None,
        Err(DiskError::Locked { pid, .. }) => Some(pid),
        Err(e) => return Err(e).with_context(|| format!("locking {}", dir.display())),
    };
    Ok((guard, holder))
}

/// The servers among `members` that are running: their data directory's lock is held.
/// Returns their names and pids (as the lock file records them).
pub(crate) fn running_servers<'a>(
    members: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Result<Vec<(String, Option<u32>)>> {
    let mut running = Vec::new();
    for (name, data) in members {
        if !data.join(LOCK_FILE).exists() {
            continue;
        }
        // Taking the lock is the only sure test; a free one is released at once (the disk is
        // dropped), before any server of ours starts.
        let mut disk = StdDisk::new(data).with_context(|| format!("opening {}", data.display()))?;
        match disk.lock() {
            Ok(()) => {}
            Err(DiskError::Locked { pid, .. }) => running.push((name.to_string(), pid)),
            Err(e) => return Err(e).with_context(|| format!("checking {}", data.display())),
        }
    }
    Ok(running)
}

/// The restart policy's state of one server (its process is in `Procs`).
struct Slot {
    /// When it is restarted, while it waits for its restart.
    restart_at: Option<Instant>,
    /// Exits with an error in a row, each within [`HEALTHY_RUN`] of its start.
    failures: u32,
    /// "running again" was printed for its current start.
    announced: bool,
    /// The error last diagnosed for its current failures, printed once.
    reported: Option<String>,
}

/// The running servers of a [`Supervised`] set.
pub(crate) struct Running {
    procs: Procs,
    slots: Vec<Slot>,
}

impl Running {
    /// Starts every member. Call it on the thread that lives as long as the servers should
    /// (the one `block_on` runs on): their parent-death signal follows the spawning thread.
    pub(crate) fn start(set: &Supervised) -> Result<Running> {
        let mut procs = Procs::new();
        let mut slots = Vec::new();
        for m in &set.members {
            procs.spawn(m.spec.clone())?;
            slots.push(Slot {
                restart_at: None,
                failures: 0,
                announced: false,
                reported: None,
            });
        }
        Ok(Running { procs, slots })
    }

    /// Starts one more member (the caller appends it to its [`Supervised`] set too).
    pub(crate) fn add(&mut self, member: &Member) -> Result<()> {
        self.procs.spawn_at(self.slots.len(), member.spec.clone())?;
        self.slots.push(Slot {
            restart_at: None,
            failures: 0,
            announced: false,
            reported: None,
        });
        Ok(())
    }

    /// Stops the last member (SIGTERM, SIGKILL after [`STOP_GRACE`]) and stops supervising
    /// it (the caller removes it from its [`Supervised`] set too).
    pub(crate) fn stop_last(&mut self) {
        if self.slots.pop().is_some() {
            if let Some(proc) = self.procs.get_mut(self.slots.len()) {
                proc.stop(STOP_GRACE);
            }
        }
    }

    /// Supervises until a stop signal (`Ok(None)`) or until a majority of a group cannot run
    /// (`Ok(Some(why))`).
    pub(crate) async fn supervise(
        &mut self,
        set: &Supervised,
        signals: &mut StopSignals,
    ) -> Result<Option<String>> {
        supervise(set, &mut self.procs, &mut self.slots, signals).await
    }

    /// Asks every server to stop (SIGTERM: they finish the write in progress), then waits;
    /// SIGKILLs those still running after [`STOP_GRACE`].
    pub(crate) fn stop(mut self) {
        self.procs.stop(STOP_GRACE);
    }
}

/// What woke the supervisor.
enum Event {
    Stop,
    CheckExits,
    RestartDue,
    Poll,
}

/// Supervises until a stop signal (`Ok(None)`) or until a majority of a group cannot run
/// (`Ok(Some(why))`).
async fn supervise(
    set: &Supervised,
    procs: &mut Procs,
    slots: &mut [Slot],
    signals: &mut StopSignals,
) -> Result<Option<String>> {
    let mut poll = tokio::time::interval(POLL);
    let mut exits = tokio::time::interval(EXIT_POLL);
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
                _ = signals.recv() => Event::Stop,
                _ = restart_due => Event::RestartDue,
                _ = exits.tick() => Event::CheckExits,
                _ = poll.tick() => Event::Poll,
            }
        };
        let now = now();
        match event {
            Event::Stop => return Ok(None),
            Event::CheckExits => {
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
                    if let Some(why) = on_exit(set, procs, slots, i, status, now) {
                        return Ok(Some(why));
                    }
                }
            }
            Event::RestartDue => {
                for (i, slot) in slots.iter_mut().enumerate() {
                    if slot.restart_at.is_some_and(|at| at <= now) {
                        restart(procs, i, &set.members[i], slot)?;
                    }
                }
            }
            Event::Poll => {
                for (i, slot) in slots.iter_mut().enumerate() {
                    let member = &set.members[i];
                    if slot.restart_at.is_some() && slot.failures > 0 && !member.data.exists() {
                        // The user moved the directory aside as told: start it now, empty.
                        eprintln!(
                            "{}: {} is gone; starting it empty (it re-syncs from the others)",
                            member.name,
                            member.data.display()
                        );
                        restart(procs, i, member, slot)?;
                    } else if slot.failures > 0 {
                        let Some(proc) = procs.get_mut(i) else {
                            continue;
                        };
                        if !proc.is_running() {
                            continue;
                        }
                        let ran = now.duration_since(proc.started());
                        if ran >= QUICK_FAILURE && !slot.announced {
                            eprintln!("{} is running again", member.name);
                            slot.announced = true;
                        }
                        if ran >= HEALTHY_RUN {
                            slot.failures = 0;
                            slot.reported = None;
                        }
                    }
                }
            }
        }
    }
}

/// Server `i` exited with `status` (`None`: it could not be waited for): schedules its
/// restart, says why it failed once, and returns why the supervisor gives up when a majority
/// of its group cannot run.
fn on_exit(
    set: &Supervised,
    procs: &Procs,
    slots: &mut [Slot],
    i: usize,
    status: Option<ExitStatus>,
    now: Instant,
) -> Option<String> {
    let member = &set.members[i];
    let name = &member.name;
    let command = set.command;
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
    if !failed || ran >= HEALTHY_RUN {
        slot.failures = 0;
        slot.reported = None;
        slot.announced = false;
        slot.restart_at = Some(now + RESTART_DELAY);
        eprintln!(
            "{name} exited ({status}); restarting it in {} s; the others keep serving",
            RESTART_DELAY.as_secs()
        );
        return None;
    }
    slot.failures += 1;
    slot.announced = false;
    let delay = restart_delay(slot.failures);
    let failed_to = if ran < QUICK_FAILURE {
        "failed to start"
    } else {
        "failed"
    };
    slot.restart_at = Some(now + delay);
    let diagnosis = diagnose(member.log(), log_offset, &member.data, command);
    if slot.reported.as_deref() != Some(diagnosis.error.as_str()) {
        eprintln!(
            "{name} {failed_to} ({status}); the others keep serving. From {}:",
            member.log().display()
        );
        for line in &diagnosis.tail {
            eprintln!("  {line}");
        }
        eprintln!("  fix: {}", diagnosis.fix);
        eprintln!(
            "  {command} retries it in {} s, then less often (every {} s at most)",
            delay.as_secs(),
            MAX_RESTART_DELAY.as_secs()
        );
        slot.reported = Some(diagnosis.error);
    } else {
        eprintln!(
            "{name} {failed_to} again ({} times in a row); next try in {} s",
            slot.failures,
            delay.as_secs()
        );
    }
    let group: Vec<usize> = (0..set.members.len())
        .filter(|&j| set.members[j].group == member.group)
        .collect();
    let broken: Vec<&str> = group
        .iter()
        .filter(|&&j| slots[j].failures >= GIVE_UP_FAILURES)
        .map(|&j| set.members[j].name.as_str())
        .collect();
    let majority = group.len() / 2 + 1;
    if group.len() - broken.len() >= majority {
        return None;
    }
    Some(format!(
        "no majority of {} can run ({} of {} servers keep failing to start: {}; see above and \
         their logs in {}); everything is stopped, the data kept: fix them and run `shoal \
         {command} --dir {}` again",
        set.groups[member.group],
        broken.len(),
        group.len(),
        broken.join(", "),
        set.dir.display(),
        set.dir.display()
    ))
}

/// Starts server `i` again from its data directory, with the same arguments.
fn restart(procs: &mut Procs, i: usize, member: &Member, slot: &mut Slot) -> Result<()> {
    procs.restart(i)?;
    slot.restart_at = None;
    if slot.failures == 0 {
        eprintln!("{} restarted", member.name);
    }
    Ok(())
}

/// The wait before the next start of a server that failed `failures` starts in a row:
/// 1 s, 2 s, 4 s, … up to [`MAX_RESTART_DELAY`].
fn restart_delay(failures: u32) -> Duration {
    BACKOFF.delay(failures)
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
fn diagnose(log: &Path, offset: u64, data: &Path, command: &str) -> Diagnosis {
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
    let fix = fix_for(&error, data, command);
    Diagnosis { error, tail, fix }
}

/// What to do about a server's start-up `error`, whose data directory is `data`.
fn fix_for(error: &str, data: &Path, command: &str) -> String {
    let dir = data.display();
    if error.contains("corrupt data") {
        format!(
            "its data directory is damaged. With the others serving, move it aside \
             (mv {dir} {dir}.bad): {command} then starts it empty and it re-syncs from the \
             others (see docs/kv.md, \"A damaged server\")"
        )
    } else if error.contains("No space left on device") {
        format!("the disk holding {dir} is full: free space on it; {command} keeps retrying")
    } else if error.contains("is in use by") {
        format!("another process uses {dir}: stop it; {command} keeps retrying")
    } else if error.contains("not a Shoal data directory") || error.contains("belongs to cluster") {
        format!("{dir} is not this server's directory: move it aside (mv {dir} {dir}.other)")
    } else if error.contains("Address already in use") {
        format!("its port is taken by another program: stop that program; {command} keeps retrying")
    } else {
        format!("see the log above; {command} keeps retrying")
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn restarts_back_off_to_a_minute() {
        let delays: Vec<u64> = (1..=8).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(restart_delay(u32::MAX), MAX_RESTART_DELAY);
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
        let d = diagnose(&log, offset, &data, "kv up");
        assert!(d.error.contains("checksum mismatch"), "{d:?}");
        assert_eq!(d.tail.len(), 2, "only this run's lines: {d:?}");
        let mv = format!("mv {} {}.bad", data.display(), data.display());
        assert!(d.fix.contains(&mv), "{d:?}");
        assert!(d.fix.contains("kv up then starts it empty"), "{d:?}");
        let full = fix_for(
            "error: No space left on device (os error 28)",
            &data,
            "shard up",
        );
        assert!(
            full.contains("full") && full.contains("shard up keeps retrying"),
            "{full}"
        );
        assert_eq!(
            diagnose(&dir.path().join("none.log"), 0, &data, "kv up").error,
            "(it wrote nothing)"
        );
    }
}
