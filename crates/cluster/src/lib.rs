//! One local-cluster supervisor for every place that runs Shoal processes on this machine:
//! `shoal demo`, `shoal kv up`, `shoal bench kv`, `shoal bench raft` and the real-process
//! tests of the `shoal` crate.
//!
//! Why a crate of its own: the CLI (`shoal`), the benchmarks (`shoal-bench`) and the
//! integration tests all need it, and none of them should depend on another just for this.
//! It depends on nothing of Shoal, only on `libc` (signals, the parent-death signal) and
//! `tokio` (stop signals as streams, async waits for a probe), so every user links it cheaply.
//!
//! The rules, stated once (docs/processes.md repeats them for users):
//!
//! - **Spawn** ([`Proc::spawn`]): a [`Spec`] names the program, its arguments and environment,
//!   and its log file; stdin is `/dev/null`, stderr (and stdout, unless the spec says
//!   otherwise) go to the log. A fresh log is created or truncated at the first start (or
//!   appended to, see [`Spec::append_log`]); a restart always appends, and
//!   [`Proc::log_since_start`] reads what the current run wrote.
//! - **No child outlives its parent**: every child gets `PR_SET_PDEATHSIG = SIGKILL`
//!   ([`die_with_parent`]), so even a SIGKILLed supervisor takes its children along; a
//!   dropped [`Proc`] (or [`Procs`]) SIGKILLs and reaps its child; and [`StopSignals`] turns
//!   Ctrl-C, SIGTERM and SIGHUP into an orderly stop.
//! - **Kill** ([`Proc::kill`]): SIGCONT (a paused child must be able to die cleanly from the
//!   caller's point of view), SIGKILL, reap. Once it returns the process answers nothing.
//!   **Stop** ([`Proc::stop`], [`Procs::stop`]): SIGTERM, then SIGKILL after a grace period.
//! - **Restart** ([`Proc::restart`]): kill if running, start again with the same spec. A
//!   supervisor that restarts failing children waits [`Backoff::delay`] between tries.
//! - **Readiness** ([`Proc::wait_ready`], [`Procs::wait_for`]): poll a condition (a TCP port
//!   accepting, a line in the log, a caller's probe such as "some server leads") until a
//!   timeout; a child that exits meanwhile fails the wait at once, and every error quotes the
//!   tail of the relevant log.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read as _, Seek as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Lines of a log quoted in an error about its process.
pub const ERROR_TAIL_LINES: usize = 5;
/// Bytes of a log read to find its last lines.
const LOG_TAIL_BYTES: u64 = 16 * 1024;
/// Poll interval of readiness waits.
const READY_POLL: Duration = Duration::from_millis(20);

/// The supervisor's clock read. clippy.toml forbids `Instant::now` because protocol code must
/// take time from its driver; a supervisor's timeouts are on the wall clock by nature.
#[allow(clippy::disallowed_methods)]
pub fn now() -> Instant {
    Instant::now()
}

/// `n` distinct free ports on 127.0.0.1 for local servers: all are bound before any is
/// released, so no two are the same.
pub fn free_local_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")
        })
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().context("reading a free port's address"))
        .collect()
}

/// The `--peers` value for servers at `addrs`, with ids 1, 2, … in order: `1=A,2=B,3=C`.
pub fn peers_arg(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// Makes the kernel SIGKILL the process `cmd` starts when this process dies, even by SIGKILL
/// (when no `Drop` runs). The signal follows the spawning *thread*: spawn from a thread that
/// lives as long as the child should (the main thread, or the one `block_on` runs on). Linux
/// only; elsewhere a no-op.
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl(2) is async-signal-safe, as a pre_exec hook requires.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Sends `sig` to `pid`; an error names both.
pub fn send_signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid_t = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) has no memory effects; callers pass pids of children they have not
    // reaped, so the pid is still theirs.
    if unsafe { libc::kill(pid_t, sig) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("kill({pid}, signal {sig})"));
    }
    Ok(())
}

/// Where a child's stdout goes (stderr always goes to its log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StdoutTo {
    Log,
    Null,
}

/// How to start one child: program, arguments, environment, log. Restarts reuse it.
#[derive(Debug, Clone)]
pub struct Spec {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_remove: Vec<OsString>,
    /// `None`: no log; stdout is discarded and stderr inherited (see [`Spec::unlogged`]).
    log: Option<PathBuf>,
    append_log: bool,
    stdout: StdoutTo,
    own_process_group: bool,
}

impl Spec {
    /// A child called `name` in messages ("server 2"), running `program`, logging to `log`.
    pub fn new(name: impl Into<String>, program: impl AsRef<Path>, log: impl AsRef<Path>) -> Spec {
        Spec {
            name: name.into(),
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            log: Some(log.as_ref().to_path_buf()),
            append_log: false,
            stdout: StdoutTo::Log,
            own_process_group: false,
        }
    }

    /// A child without a log file: its stdout is discarded and its stderr is this process's
    /// (`mr run`'s workers print their rare errors on the user's terminal).
    pub fn unlogged(name: impl Into<String>, program: impl AsRef<Path>) -> Spec {
        Spec {
            log: None,
            stdout: StdoutTo::Null,
            ..Spec::new(name, program, "")
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Spec {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Spec {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Spec {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Removes `key` from the environment the child inherits.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Spec {
        self.env_remove.push(key.as_ref().to_os_string());
        self
    }

    /// Appends to the log from the first start on (a data directory reused across runs keeps
    /// its history); by default the first start truncates it.
    pub fn append_log(mut self) -> Spec {
        self.append_log = true;
        self
    }

    /// Discards stdout (a child that prints nothing useful there); stderr still goes to the log.
    pub fn stdout_null(mut self) -> Spec {
        self.stdout = StdoutTo::Null;
        self
    }

    /// Starts the child in a process group of its own: a Ctrl-C in the terminal then reaches
    /// the supervisor alone, which stops its children itself, in order.
    pub fn own_process_group(mut self) -> Spec {
        self.own_process_group = true;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file, unless it is [`Spec::unlogged`].
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Starts the process; `truncate` empties the log first. Returns it and the log's length
    /// before it started.
    fn start(&self, truncate: bool) -> Result<(Child, u64)> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null());
        let mut offset = 0;
        match &self.log {
            Some(path) => {
                let mut options = File::options();
                options.create(true);
                if truncate {
                    options.write(true).truncate(true);
                } else {
                    options.append(true);
                }
                let log = options
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                offset = log
                    .metadata()
                    .with_context(|| format!("reading {}", path.display()))?
                    .len();
                let stdout = match self.stdout {
                    StdoutTo::Log => Stdio::from(
                        log.try_clone()
                            .with_context(|| format!("opening {}", path.display()))?,
                    ),
                    StdoutTo::Null => Stdio::null(),
                };
                cmd.stdout(stdout).stderr(log);
            }
            None => {
                cmd.stdout(Stdio::null());
            }
        }
        for key in &self.env_remove {
            cmd.env_remove(key);
        }
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        if self.own_process_group {
            use std::os::unix::process::CommandExt as _;
            cmd.process_group(0);
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        Ok((child, offset))
    }
}

/// What [`Proc::wait_ready`] waits for.
#[derive(Debug, Clone)]
pub enum Ready {
    /// Something accepts TCP connections at this address.
    Listening(SocketAddr),
    /// The current run's log contains this text.
    LogLine(String),
}

/// One supervised child: its spec, its process, where its current run's log begins.
/// Dropping it SIGKILLs and reaps the process.
#[derive(Debug)]
pub struct Proc {
    name: String,
    /// How to start it again; `None` for a child the caller spawned (see [`Proc::adopt`]).
    spec: Option<Spec>,
    /// The current (or last) process, kept after it exits for its pid and piped output.
    child: Child,
    /// Its exit status once reaped (also after a kill); `None` while it runs.
    exited: Option<ExitStatus>,
    /// Waiting for it failed (it is not our child any more): treated as gone.
    lost: bool,
    started: Instant,
    log_offset: u64,
    /// The supervisor killed it or saw it finish its work: its exit is not news.
    exit_expected: bool,
}

impl Proc {
    /// Starts the child of `spec`.
    pub fn spawn(spec: Spec) -> Result<Proc> {
        let (child, log_offset) = spec.start(!spec.append_log)?;
        Ok(Proc {
            name: spec.name.clone(),
            spec: Some(spec),
            child,
            exited: None,
            lost: false,
            started: now(),
            log_offset,
            exit_expected: false,
        })
    }

    /// Supervises a child the caller spawned itself, for stdio a [`Spec`] does not describe
    /// (pipes a test reads): it is killed and reaped like any other, but has no log and cannot
    /// be restarted. The caller should have called [`die_with_parent`] on its command.
    pub fn adopt(name: impl Into<String>, child: Child) -> Proc {
        Proc {
            name: name.into(),
            spec: None,
            child,
            exited: None,
            lost: false,
            started: now(),
            log_offset: 0,
            exit_expected: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How it is started (`None` for an adopted child).
    pub fn spec(&self) -> Option<&Spec> {
        self.spec.as_ref()
    }

    /// Its log file, unless it is [`Spec::unlogged`] or adopted.
    pub fn log_path(&self) -> Option<&Path> {
        self.spec.as_ref()?.log()
    }

    /// When the current run started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Length of the log when the current run started: its messages follow.
    pub fn log_offset(&self) -> u64 {
        self.log_offset
    }

    /// Its pid while it runs (or has exited but is not reaped yet).
    pub fn pid(&self) -> Option<u32> {
        (self.exited.is_none() && !self.lost).then(|| self.child.id())
    }

    /// The pid of its current or last process, even after it exited.
    pub fn last_pid(&self) -> u32 {
        self.child.id()
    }

    /// The current or last process, for its piped stdio (an adopted child's).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status if it has exited (reaping it; also after a kill), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() && !self.lost {
            match self.child.try_wait() {
                Ok(Some(status)) => self.exited = Some(status),
                Ok(None) => return None,
                // Not our child any more (cannot happen for a child we own): treat as gone.
                Err(_) => self.lost = true,
            }
        }
        self.exited
    }

    /// Whether its process runs.
    pub fn is_running(&mut self) -> bool {
        self.try_exit();
        self.exited.is_none() && !self.lost
    }

    /// Marks its exit as expected (killed, or done with its work).
    pub fn expect_exit(&mut self) {
        self.exit_expected = true;
    }

    pub fn exit_expected(&self) -> bool {
        self.exit_expected
    }

    /// Sends `sig` to the running process (SIGSTOP / SIGCONT to pause and resume it).
    pub fn signal(&mut self, sig: libc::c_int) -> Result<()> {
        match self.pid() {
            Some(pid) => {
                send_signal(pid, sig).with_context(|| format!("signalling {}", self.name()))
            }
            None => bail!("{} is not running", self.name()),
        }
    }

    /// SIGKILLs and reaps the process (first SIGCONT, in case it is paused); once this
    /// returns it answers nothing more. Returns its exit status if it was running.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.exit_expected = true;
        if !self.is_running() {
            return None;
        }
        let _ = send_signal(self.child.id(), libc::SIGCONT);
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => self.exited = Some(status),
            Err(_) => self.lost = true,
        }
        self.exited
    }

    /// SIGTERM (a clean shutdown), then SIGKILL after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        stop_all(&mut [self], grace);
    }

    /// Kills the process if it runs and starts it again with the same spec, appending to
    /// its log.
    pub fn restart(&mut self) -> Result<()> {
        let Some(spec) = &self.spec else {
            bail!(
                "{} was started by the caller: it cannot be restarted",
                self.name
            );
        };
        let spec = spec.clone();
        self.kill();
        let (child, log_offset) = spec.start(false)?;
        self.child = child;
        self.exited = None;
        self.lost = false;
        self.started = now();
        self.log_offset = log_offset;
        self.exit_expected = false;
        Ok(())
    }

    /// Fails, naming it and quoting its log's last lines, if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.try_exit() {
            Some(status) => Err(self.exited_error(status)),
            None => Ok(()),
        }
    }

    /// "NAME exited (STATUS); its log (PATH) ends with: …".
    pub fn exited_error(&self, status: ExitStatus) -> anyhow::Error {
        anyhow!("{} exited ({status}){}", self.name(), self.log_note())
    }

    /// "; its log (PATH) ends with:\n…" (or says it is empty), for an error message.
    fn log_note(&self) -> String {
        let Some(path) = self.log_path() else {
            return String::new();
        };
        let tail = self.log_tail(ERROR_TAIL_LINES);
        if tail.is_empty() {
            format!("; its log {} is empty", path.display())
        } else {
            format!(
                "; its log ({}) ends with:\n{}",
                path.display(),
                tail.join("\n")
            )
        }
    }

    /// What the current run wrote to the log (its last 16 KiB at most, from a line start).
    pub fn log_since_start(&self) -> String {
        self.log_path()
            .and_then(|path| read_log_from(path, self.log_offset).ok())
            .unwrap_or_default()
    }

    /// The log's last `n` lines (of every run).
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        self.log_path()
            .map_or_else(Vec::new, |path| log_tail(path, n))
    }

    /// Waits until `ready` holds, at most `timeout`; fails at once if the process exits.
    pub fn wait_ready(&mut self, ready: &Ready, timeout: Duration) -> Result<()> {
        let deadline = now() + timeout;
        loop {
            self.check_running()?;
            let ok = match ready {
                Ready::Listening(addr) => std::net::TcpStream::connect_timeout(
                    addr,
                    READY_POLL.max(Duration::from_millis(100)),
                )
                .is_ok(),
                Ready::LogLine(text) => self.log_since_start().contains(text.as_str()),
            };
            if ok {
                return Ok(());
            }
            if now() >= deadline {
                let what = match ready {
                    Ready::Listening(addr) => format!("listening on {addr}"),
                    Ready::LogLine(text) => format!("logging {text:?}"),
                };
                bail!(
                    "{} was not {what} within {timeout:?}{}",
                    self.name(),
                    self.log_note()
                );
            }
            std::thread::sleep(READY_POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGTERM to every running process, then SIGKILL to those still running after `grace`;
/// reaps all.
pub fn stop_all(procs: &mut [&mut Proc], grace: Duration) {
    for p in procs.iter_mut() {
        if p.is_running() {
            p.exit_expected = true;
            if let Some(pid) = p.pid() {
                let _ = send_signal(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = now() + grace;
    while procs.iter_mut().any(|p| p.is_running()) && now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for p in procs.iter_mut() {
        p.kill();
    }
}

/// A set of children (a cluster's members, a job's workers), addressed by index. Slots may be
/// empty (a member not started yet). Dropping it SIGKILLs and reaps every child.
#[derive(Debug, Default)]
pub struct Procs {
    procs: Vec<Option<Proc>>,
}

impl Procs {
    pub fn new() -> Procs {
        Procs::default()
    }

    /// `n` empty slots.
    pub fn with_slots(n: usize) -> Procs {
        Procs {
            procs: (0..n).map(|_| None).collect(),
        }
    }

    /// Starts `spec` in a new slot; returns its index.
    pub fn spawn(&mut self, spec: Spec) -> Result<usize> {
        self.procs.push(Some(Proc::spawn(spec)?));
        Ok(self.procs.len() - 1)
    }

    /// Supervises a child the caller spawned (see [`Proc::adopt`]) in a new slot; returns its
    /// index.
    pub fn adopt(&mut self, name: impl Into<String>, child: Child) -> usize {
        self.procs.push(Some(Proc::adopt(name, child)));
        self.procs.len() - 1
    }

    /// Starts `spec` in slot `i` (killing what ran there).
    pub fn spawn_at(&mut self, i: usize, spec: Spec) -> Result<()> {
        if i >= self.procs.len() {
            self.procs.resize_with(i + 1, || None);
        }
        self.procs[i] = None;
        self.procs[i] = Some(Proc::spawn(spec)?);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Proc> {
        self.procs.get(i)?.as_ref()
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut Proc> {
        self.procs.get_mut(i)?.as_mut()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.procs.iter_mut().flatten()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Proc> {
        self.procs.iter().flatten()
    }

    /// SIGKILLs and reaps child `i` (see [`Proc::kill`]); a no-op for an empty slot.
    pub fn kill(&mut self, i: usize) -> Option<ExitStatus> {
        self.get_mut(i)?.kill()
    }

    /// Restarts child `i` with its spec (see [`Proc::restart`]).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.get_mut(i)
            .ok_or_else(|| anyhow!("no process in slot {i}"))?
            .restart()
    }

    /// Indices of the running children.
    pub fn live(&mut self) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| self.procs[i].as_mut().is_some_and(Proc::is_running))
            .collect()
    }

    /// Number of running children.
    pub fn running(&mut self) -> usize {
        self.iter_mut()
            .map(|p| p.is_running())
            .filter(|&running| running)
            .count()
    }

    pub fn all_exited(&mut self) -> bool {
        self.running() == 0
    }

    /// Fails, naming the first child that exited without being expected to and quoting its
    /// log, if any has.
    pub fn check_running(&mut self) -> Result<()> {
        for p in self.iter_mut() {
            if p.exit_expected {
                continue;
            }
            if let Some(status) = p.try_exit() {
                return Err(p.exited_error(status));
            }
        }
        Ok(())
    }

    /// `NAME exited (STATUS)` for each child that has exited (killed ones included).
    pub fn exits(&mut self) -> Vec<String> {
        self.iter_mut()
            .filter_map(|p| {
                let status = p.try_exit()?;
                Some(format!("{} exited ({status})", p.name()))
            })
            .collect()
    }

    /// Marks every child as done with its work.
    pub fn expect_exits(&mut self) {
        for p in self.iter_mut() {
            p.expect_exit();
        }
    }

    /// (name, log path) of every child that has a log.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        self.iter()
            .filter_map(|p| Some((p.name().to_string(), p.log_path()?.to_path_buf())))
            .collect()
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps every child.
    pub fn stop(&mut self, grace: Duration) {
        let mut all: Vec<&mut Proc> = self.iter_mut().collect();
        stop_all(&mut all, grace);
    }

    /// SIGKILLs and reaps every child.
    pub fn kill_all(&mut self) {
        for p in self.iter_mut() {
            p.kill();
        }
    }

    /// Polls `probe` every `poll` until it answers `Some`, at most `timeout`; between polls
    /// fails at once, quoting its log, if a child exited unexpectedly. The error of a timeout
    /// says what was awaited (`what`, e.g. "a leader").
    pub async fn wait_for<T, F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        poll: Duration,
        mut probe: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = now() + timeout;
        loop {
            self.check_running()?;
            if let Some(found) = probe().await {
                return Ok(found);
            }
            if now() >= deadline {
                bail!("no {what} within {}", human(timeout));
            }
            tokio::time::sleep(poll).await;
        }
    }
}

/// `20 s` for whole seconds (as the CLI's messages write them), else `1.5s` / `50ms`.
fn human(d: Duration) -> String {
    if d.subsec_nanos() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{d:?}")
    }
}

/// The end of the log at `path` from `offset` on: at most its last 16 KiB, starting at a line.
pub fn read_log_from(path: &Path, offset: u64) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = offset.max(len.saturating_sub(LOG_TAIL_BYTES));
    file.seek(std::io::SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > offset {
        // Cut in the middle of a line: drop its end.
        if let Some(nl) = text.find('\n') {
            text.drain(..=nl);
        }
    }
    Ok(text)
}

/// The last `n` lines of the log at `path` (none if it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> Vec<String> {
    let text = read_log_from(path, 0).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// Restart delays of a child that keeps failing: `initial`, doubling after each failure in a
/// row, up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before the next start after `failures` failed starts in a row (1 → `initial`).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (self.initial * 2u32.pow(doublings)).min(self.max)
    }
}

/// The signals that stop a supervisor — SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`, a
/// service manager), SIGHUP (the terminal closed) — as streams, so that one arriving between
/// two waits is kept. Once installed they no longer kill the process: the supervisor stops
/// its children itself.
pub struct StopSignals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            sigint: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            sighup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Waits for the next stop signal.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.sigint.recv() => {}
            _ = self.sigterm.recv() => {}
            _ = self.sighup.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn sh(dir: &Path, name: &str, script: &str) -> Spec {
        Spec::new(name, "/bin/sh", dir.join(format!("{name}.log"))).args(["-c", script])
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (1..=8).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(u32::MAX), b.max);
    }

    #[test]
    fn an_exit_is_reported_with_the_logs_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proc::spawn(sh(
            dir.path(),
            "server 1",
            "echo one; echo 'error: boom' >&2; exit 3",
        ))
        .unwrap();
        let err = p
            .wait_ready(&Ready::LogLine("never".into()), Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("server 1 exited (exit status: 3)"), "{err}");
        assert!(err.contains("one\nerror: boom"), "{err}");
        assert!(!p.is_running());
    }

    #[test]
    fn readiness_by_log_line_and_port_then_kill_and_restart_appending() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("n.log");
        std::fs::write(&log, "an old run\n").unwrap();
        let mut p = Proc::spawn(sh(dir.path(), "n", "echo ready; exec sleep 30")).unwrap();
        // The first start truncates.
        p.wait_ready(&Ready::LogLine("ready".into()), Duration::from_secs(10))
            .unwrap();
        assert!(!std::fs::read_to_string(&log)
            .unwrap()
            .contains("an old run"));
        let first = p.pid().unwrap();
        p.signal(libc::SIGSTOP).unwrap();
        assert!(p.kill().is_some(), "a paused child is killed and reaped");
        assert!(!p.is_running());
        p.restart().unwrap();
        assert_ne!(p.pid(), Some(first));
        p.wait_ready(&Ready::LogLine("ready".into()), Duration::from_secs(10))
            .unwrap();
        // The restart appended: two runs, and this run's text starts after the first's.
        assert_eq!(
            std::fs::read_to_string(&log)
                .unwrap()
                .matches("ready")
                .count(),
            2
        );
        assert_eq!(p.log_since_start().matches("ready").count(), 1);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        p.wait_ready(&Ready::Listening(addr), Duration::from_secs(10))
            .unwrap();
        drop(listener);
        let err = p
            .wait_ready(&Ready::Listening(addr), Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("was not listening on {addr}")),
            "{err}"
        );
    }

    #[test]
    fn stop_terms_then_kills_and_drop_reaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut procs = Procs::new();
        procs
            .spawn(sh(dir.path(), "polite", "exec sleep 30"))
            .unwrap();
        // Ignores SIGTERM: only the SIGKILL after the grace period ends it.
        procs
            .spawn(sh(
                dir.path(),
                "stubborn",
                "trap '' TERM; echo up; while :; do sleep 0.05; done",
            ))
            .unwrap();
        procs
            .get_mut(1)
            .unwrap()
            .wait_ready(&Ready::LogLine("up".into()), Duration::from_secs(10))
            .unwrap();
        assert_eq!(procs.live(), [0, 1]);
        let pids: Vec<u32> = procs.iter().filter_map(Proc::pid).collect();
        procs.stop(Duration::from_millis(200));
        assert!(procs.all_exited());
        assert!(
            procs.check_running().is_ok(),
            "stopped children were expected to exit"
        );
        for pid in pids {
            // Reaped: the pid is no longer ours (kill(pid, 0) fails or names someone else's).
            assert!(std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| !s.contains(") Z ")));
        }

        let mut procs = Procs::with_slots(2);
        procs
            .spawn_at(1, sh(dir.path(), "later", "exec sleep 30"))
            .unwrap();
        let pid = procs.get(1).unwrap().pid().unwrap();
        drop(procs);
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(state.is_empty() || !state.contains(") S "), "{state}");
    }

    #[test]
    fn an_unexpected_exit_fails_a_wait_for_a_probe() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut procs = Procs::new();
        procs
            .spawn(sh(dir.path(), "member 1", "echo 'bad flag' >&2; exit 2"))
            .unwrap();
        let err = rt
            .block_on(
                procs.wait_for("leader", Duration::from_secs(10), READY_POLL, || async {
                    None::<()>
                }),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("member 1 exited") && err.contains("bad flag"),
            "{err}"
        );

        let mut procs = Procs::new();
        procs
            .spawn(sh(dir.path(), "fine", "exec sleep 30"))
            .unwrap();
        let mut n = 0;
        let found = rt
            .block_on(
                procs.wait_for("leader", Duration::from_secs(10), READY_POLL, || {
                    n += 1;
                    let answer = (n >= 3).then_some(n);
                    async move { answer }
                }),
            )
            .unwrap();
        assert_eq!(found, 3);
        let err = rt
            .block_on(
                procs.wait_for("leader", Duration::from_millis(50), READY_POLL, || async {
                    None::<()>
                }),
            )
            .unwrap_err()
            .to_string();
        assert_eq!(err, "no leader within 50ms");
        assert_eq!(human(Duration::from_secs(20)), "20 s");
    }

    #[test]
    fn an_unlogged_child_has_no_log_and_its_exit_says_so_plainly() {
        let mut p =
            Proc::spawn(Spec::unlogged("worker 0", "/bin/sh").args(["-c", "exit 4"])).unwrap();
        assert!(p.log_path().is_none());
        let err = p
            .wait_ready(&Ready::LogLine("x".into()), Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "worker 0 exited (exit status: 4)");
        assert!(p.log_since_start().is_empty() && p.log_tail(3).is_empty());
        let mut procs = Procs::new();
        procs
            .spawn(Spec::unlogged("worker 1", "/bin/sh").args(["-c", "exec sleep 30"]))
            .unwrap();
        assert!(procs.logs().is_empty());
        assert_eq!(procs.running(), 1);
    }

    #[test]
    fn an_adopted_child_keeps_its_pipes_and_pid_and_cannot_be_restarted() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut procs = Procs::new();
        let i = procs.adopt("coordinator", cmd.spawn().unwrap());
        let p = procs.get_mut(i).unwrap();
        let pid = p.last_pid();
        let mut err = String::new();
        p.child_mut()
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(err, "err\n");
        let deadline = now() + Duration::from_secs(10);
        while p.is_running() && now() < deadline {
            std::thread::sleep(READY_POLL);
        }
        assert_eq!(p.try_exit().and_then(|s| s.code()), Some(1));
        assert_eq!((p.pid(), p.last_pid()), (None, pid));
        assert!(p.log_path().is_none());
        let e = p.restart().unwrap_err().to_string();
        assert!(e.contains("cannot be restarted"), "{e}");
        assert_eq!(procs.exits(), ["coordinator exited (exit status: 1)"]);
    }

    #[test]
    fn log_reads_start_at_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        let mut f = File::create(&path).unwrap();
        for i in 0..5000 {
            writeln!(f, "line {i}").unwrap();
        }
        let text = read_log_from(&path, 0).unwrap();
        assert!(text.len() as u64 <= LOG_TAIL_BYTES);
        assert!(text.starts_with("line "), "{}", &text[..20]);
        assert_eq!(log_tail(&path, 2), ["line 4998", "line 4999"]);
        assert!(log_tail(&dir.path().join("none.log"), 3).is_empty());
        assert_eq!(
            peers_arg(&free_local_addrs(2).unwrap())
                .matches('=')
                .count(),
            2
        );
    }
}
