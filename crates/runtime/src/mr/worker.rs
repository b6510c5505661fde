//! The worker process: registers with the coordinator, asks for tasks, runs them on blocking
//! threads while heartbeats continue, keeps their output on its local disk and serves it to
//! other workers through its shuffle server.
//!
//! A worker exits when the coordinator says the job is over (done or failed), or when it has
//! been unable to reach the coordinator for `coordinator_timeout`. If its connection drops it
//! reconnects and registers again under a new id (the coordinator has by then given its work
//! to others). Before its first welcome, it says at once that nothing answers (and keeps
//! trying), and gives up at once on a peer that is not a coordinator.
//!
//! A failed attempt's files are deleted when it ends; a reduce output is served once (to the
//! coordinator committing it) and then deleted: a full disk is never made fuller by retries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use shoal_wire::codec::FrameCodec;
use shoal_wire::mr::{
    AttemptRef, FileKey, JobSpec, MapOutputLocation, SplitSpec, TaskKind, ToCoordinator, ToWorker,
    MR_CONTROL_CLUSTER_ID, MR_CONTROL_MAX_FRAME_BYTES,
};
use shoal_wire::{Hello, Role};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

use shoal_mr::app::{build_app, App, AppConfig};
use shoal_mr::coordinator::core::attempt_name;
use shoal_mr::shuffle::{Fetched, FileTable};
use shoal_mr::split::InputSplit;

use super::net::{Security, Stream};
use super::shuffle::{fetch_file, serve_shuffle, ShuffleError};

/// Pause between attempts to reach the coordinator.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);

/// How long the worker waits for the coordinator's welcome after registering.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Map outputs fetched at once by one reduce attempt.
pub const MAX_PARALLEL_FETCHES: usize = 4;

/// Tries per map output before a reduce attempt reports a fetch failure.
pub const FETCH_TRIES: u32 = 3;

/// Options of a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator's address (`host:port`).
    pub coordinator: String,
    /// Directory for this worker's files (a fresh subdirectory is created in it and removed on
    /// exit). Default: the system's temporary directory.
    pub work_dir: Option<PathBuf>,
    /// Where the shuffle server listens.
    pub shuffle_listen: SocketAddr,
    /// Host name or address other workers use to reach the shuffle server. Default: the local
    /// address of the connection to the coordinator.
    pub advertise_host: Option<String>,
    /// Testing knob: after each task, sleep `(slow_factor - 1) ×` its duration, so this worker
    /// behaves like a machine `slow_factor` times slower (for backup-task benchmarks).
    pub slow_factor: f64,
    /// Exit after failing to reach the coordinator for this long.
    pub coordinator_timeout: Duration,
    /// How this worker connects to the coordinator and other workers, and serves its shuffle:
    /// plain TCP or mutual TLS (`--cert/--key/--ca`).
    pub security: Security,
}

/// How a worker ended normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerExit {
    /// The job is complete.
    JobDone,
    /// The job failed (the coordinator's reason).
    JobFailed(String),
}

/// Why a worker stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator could not be reached.
    #[error("coordinator at {addr} unreachable for {waited:.1?} ({last_error}); giving up (the job may have finished)")]
    Unreachable {
        /// Its address.
        addr: String,
        /// How long the worker tried.
        waited: Duration,
        /// The last error seen.
        last_error: String,
    },
    /// The coordinator was never reached: nothing listens there, or nothing answers.
    #[error("cannot reach a coordinator at {addr} ({last_error}) for {waited:.1?}; giving up — is the coordinator running?")]
    NeverReached {
        /// Its address.
        addr: String,
        /// How long the worker tried.
        waited: Duration,
        /// The last error seen.
        last_error: String,
    },
    /// Something answers at the address, but it is not a MapReduce coordinator (a KV or Raft
    /// server closes the connection on a worker's handshake).
    #[error("{addr}: that port is not a MapReduce coordinator ({detail})")]
    NotACoordinator {
        /// The address.
        addr: String,
        /// What it did.
        detail: String,
    },
    /// The coordinator refused this worker.
    #[error("coordinator refused this worker: {0}")]
    Refused(String),
    /// Local setup failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

type ControlSink = SplitSink<Framed<Stream, FrameCodec<ToWorker, ToCoordinator>>, ToCoordinator>;

/// Removes the worker's directory when the worker ends (also on error paths).
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A clock for timeouts and the slow-factor knob.
#[allow(clippy::disallowed_methods)] // The worker is a driver: it owns the clock.
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Name prefix of a worker's directory; the pid follows.
const WORK_DIR_PREFIX: &str = "shoal-mr-worker-";

/// Removes the directories `base/PREFIX<pid>` of processes that died without cleaning up
/// (SIGKILLed, or a worker that exited inside an app): their pid no longer exists. Used for
/// workers' directories here and for `mr run`'s scratch directory.
pub fn remove_dirs_of_dead_processes(base: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            tracing::debug!(dir = %entry.path().display(), "removing a dead process's directory");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs a worker until the job ends or the coordinator stays unreachable.
pub async fn run_worker(options: WorkerOptions) -> Result<WorkerExit, WorkerError> {
    let pid = std::process::id();
    let base = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    remove_dirs_of_dead_processes(&base, WORK_DIR_PREFIX);
    let dir = base.join(format!("{WORK_DIR_PREFIX}{pid}"));
    std::fs::create_dir_all(&dir).map_err(|source| WorkerError::Io {
        context: format!("cannot create work directory {}", dir.display()),
        source,
    })?;
    let _guard = DirGuard(dir.clone());

    let listener = TcpListener::bind(options.shuffle_listen)
        .await
        .map_err(|source| WorkerError::Io {
            context: format!("cannot listen for shuffle on {}", options.shuffle_listen),
            source,
        })?;
    let shuffle_port = listener
        .local_addr()
        .map_err(|source| WorkerError::Io {
            context: "shuffle listener".into(),
            source,
        })?
        .port();
    let table = FileTable::default();
    let server = tokio::spawn(serve_shuffle(
        listener,
        table.clone(),
        options.security.clone(),
    ));
    let name = format!("{}:{pid}", host_name());

    let mut session = Session {
        options: &options,
        dir,
        table,
        shuffle_port,
        name,
        job: None,
        last_contact: now(),
        remote: RemoteInputs {
            coordinator: options.coordinator.clone(),
            security: options.security.clone(),
            logged: Arc::default(),
        },
    };
    let result = session.run().await;
    server.abort();
    result
}

struct Session<'a> {
    options: &'a WorkerOptions,
    dir: PathBuf,
    table: FileTable,
    shuffle_port: u16,
    name: String,
    /// The job and its app, kept across reconnections to the same coordinator.
    job: Option<(JobSpec, Arc<dyn App>)>,
    /// When the coordinator was last heard from (a welcome or a heartbeat answer).
    last_contact: std::time::Instant,
    /// Where inputs this host cannot open are read.
    remote: RemoteInputs,
}

enum SessionEnd {
    Exit(WorkerExit),
    Lost(String),
    /// The peer answered the handshake with something no coordinator sends (or closed the
    /// connection without a word): only decisive before any coordinator welcomed us.
    NotACoordinator(String),
}

type ControlStream =
    futures::stream::SplitStream<Framed<Stream, FrameCodec<ToWorker, ToCoordinator>>>;

/// A session's state while connected and welcomed.
struct Connected {
    sink: ControlSink,
    stream: ControlStream,
    heartbeat: tokio::time::Interval,
    /// The attempt running now (one at a time).
    current: Option<tokio::task::JoinHandle<Report>>,
    /// When the coordinator last answered a heartbeat.
    last_heard: std::time::Instant,
    app: Arc<dyn App>,
    job: JobSpec,
}

/// One input of a connected session, whatever its source.
enum SessionInput {
    /// Time to send a heartbeat (and to check the coordinator's silence).
    Heartbeat,
    /// The running attempt ended.
    Report(Result<Report, tokio::task::JoinError>),
    /// A frame from the coordinator, an error, or the end of the connection.
    Message(Option<Result<ToWorker, shoal_wire::codec::CodecError>>),
}

impl Connected {
    /// Waits for the next input: a heartbeat tick, the running attempt's end, or a frame.
    async fn next_input(&mut self) -> SessionInput {
        let current = &mut self.current;
        tokio::select! {
            _ = self.heartbeat.tick() => SessionInput::Heartbeat,
            report = async { current.as_mut().expect("guarded by the select condition").await },
                if current.is_some() => SessionInput::Report(report),
            msg = self.stream.next() => SessionInput::Message(msg),
        }
    }
}

/// What a finished attempt reports.
enum Report {
    Done(AttemptRef, std::collections::BTreeMap<String, u64>),
    Failed(AttemptRef, String),
    FetchFailed {
        attempt: AttemptRef,
        map_task: u32,
        map_attempt: u32,
        error: String,
    },
}

impl Session<'_> {
    async fn run(&mut self) -> Result<WorkerExit, WorkerError> {
        let addr = self.options.coordinator.clone();
        let mut last_error;
        let mut said_unreachable = false;
        loop {
            match self.connect().await {
                Ok(stream) => match self.serve(stream).await? {
                    SessionEnd::Exit(exit) => return Ok(exit),
                    SessionEnd::NotACoordinator(detail) if self.job.is_none() => {
                        return Err(WorkerError::NotACoordinator { addr, detail });
                    }
                    SessionEnd::NotACoordinator(why) | SessionEnd::Lost(why) => {
                        tracing::warn!(coordinator = %addr, reason = %why, "lost the coordinator; reconnecting");
                        last_error = why;
                    }
                },
                Err(e) => {
                    last_error = lowercase_first(&shoal_mr::disk::reason(&e));
                    if self.job.is_none() && !said_unreachable {
                        // Said at once (and once), not after the whole --coordinator-timeout:
                        // a wrong address or a coordinator not started yet is the usual cause.
                        tracing::warn!(
                            "connecting to {addr}: {last_error} — is the coordinator running? \
                             (trying again for {:?})",
                            self.options.coordinator_timeout
                        );
                        said_unreachable = true;
                    }
                }
            }
            let waited = self.last_contact.elapsed();
            if waited >= self.options.coordinator_timeout {
                if self.job.is_none() {
                    return Err(WorkerError::NeverReached {
                        addr,
                        waited,
                        last_error,
                    });
                }
                return Err(WorkerError::Unreachable {
                    addr,
                    waited,
                    last_error,
                });
            }
            tokio::time::sleep(RECONNECT_BACKOFF).await;
        }
    }

    async fn connect(&self) -> std::io::Result<Stream> {
        super::net::dial(
            &self.options.security,
            &self.options.coordinator,
            Duration::from_secs(5),
        )
        .await
    }

    fn shuffle_addr(&self, stream: &Stream) -> String {
        let host = match &self.options.advertise_host {
            Some(h) => h.clone(),
            None => {
                let listen = self.options.shuffle_listen.ip();
                if listen.is_unspecified() {
                    stream
                        .tcp()
                        .local_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_else(|_| "127.0.0.1".into())
                } else {
                    listen.to_string()
                }
            }
        };
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", self.shuffle_port)
        } else {
            format!("{host}:{}", self.shuffle_port)
        }
    }

    /// One connection to the coordinator, from handshake to its end.
    async fn serve(&mut self, stream: Stream) -> Result<SessionEnd, WorkerError> {
        let shuffle_addr = self.shuffle_addr(&stream);
        let mut framed = Framed::new(
            stream,
            FrameCodec::<ToWorker, Hello>::new(MR_CONTROL_MAX_FRAME_BYTES),
        );
        if let Err(e) = framed
            .send(Hello::new(Role::Client, MR_CONTROL_CLUSTER_ID))
            .await
        {
            return Ok(SessionEnd::Lost(e.to_string()));
        }
        let framed = framed
            .map_codec(|_| FrameCodec::<ToWorker, ToCoordinator>::new(MR_CONTROL_MAX_FRAME_BYTES));
        let (mut sink, mut stream) = framed.split();
        let register = ToCoordinator::Register {
            name: self.name.clone(),
            shuffle_addr: shuffle_addr.clone(),
        };
        if let Err(e) = sink.send(register).await {
            return Ok(SessionEnd::Lost(e.to_string()));
        }
        let welcome_timeout = WELCOME_TIMEOUT.min(self.options.coordinator_timeout);
        let (worker_id, job) = match tokio::time::timeout(welcome_timeout, stream.next()).await {
            Ok(Some(Ok(ToWorker::Welcome { worker_id, job }))) => (worker_id, job),
            Ok(Some(Ok(ToWorker::Refused { reason }))) => return Err(WorkerError::Refused(reason)),
            Ok(Some(Ok(ToWorker::JobDone))) => return Ok(SessionEnd::Exit(WorkerExit::JobDone)),
            Ok(Some(Ok(ToWorker::JobFailed { reason }))) => {
                return Ok(SessionEnd::Exit(WorkerExit::JobFailed(reason)))
            }
            Ok(Some(Ok(other))) => {
                return Ok(SessionEnd::NotACoordinator(format!(
                    "it answered with {other:?}"
                )))
            }
            Ok(Some(Err(e))) => {
                return Ok(SessionEnd::NotACoordinator(format!(
                    "it answered with something else: {e}"
                )))
            }
            Ok(None) => {
                return Ok(SessionEnd::NotACoordinator(
                    "it closed the connection on the handshake, as a KV or Raft server does".into(),
                ))
            }
            Err(_) => return Ok(SessionEnd::Lost("no welcome from the coordinator".into())),
        };
        let app = self.app_for(&job)?;
        tracing::info!(worker_id, %shuffle_addr, app = %job.app.name, "registered");
        self.table.set_job_id(job.job_id);

        if let Err(e) = sink.send(ToCoordinator::RequestTask).await {
            return Ok(SessionEnd::Lost(e.to_string()));
        }
        let interval = Duration::from_millis(job.heartbeat_interval_ms.max(10));
        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut conn = Connected {
            sink,
            stream,
            heartbeat,
            current: None,
            last_heard: now(),
            app,
            job,
        };
        self.last_contact = conn.last_heard;
        let end = loop {
            let input = conn.next_input().await;
            if let Some(end) = self.handle(&mut conn, input).await? {
                break end;
            }
        };
        if let Some(task) = conn.current {
            // The blocking work itself cannot be interrupted; its result is dropped.
            task.abort();
        }
        Ok(end)
    }

    /// Acts on one input of a connected session; the session's end, once it is over.
    async fn handle(
        &mut self,
        conn: &mut Connected,
        input: SessionInput,
    ) -> Result<Option<SessionEnd>, WorkerError> {
        let msg = match input {
            SessionInput::Heartbeat => {
                let silent = conn.last_heard.elapsed();
                if silent >= self.options.coordinator_timeout {
                    return Ok(Some(SessionEnd::Lost(format!(
                        "no answer from the coordinator for {silent:?}"
                    ))));
                }
                if let Err(e) = conn.sink.send(ToCoordinator::Heartbeat).await {
                    return Ok(Some(SessionEnd::Lost(e.to_string())));
                }
                return Ok(None);
            }
            SessionInput::Report(report) => {
                conn.current = None;
                let msg = match report {
                    Ok(r) => r.into_message(),
                    Err(e) => {
                        tracing::error!(error = %e, "task runner crashed");
                        return Ok(None);
                    }
                };
                if let Err(e) = send_all(&mut conn.sink, [msg, ToCoordinator::RequestTask]).await {
                    return Ok(Some(SessionEnd::Lost(e)));
                }
                return Ok(None);
            }
            SessionInput::Message(msg) => msg,
        };
        let end = match msg {
            Some(Ok(ToWorker::HeartbeatAck)) => {
                conn.last_heard = now();
                self.last_contact = conn.last_heard;
                None
            }
            Some(Ok(ToWorker::Map { attempt, split })) => {
                tracing::debug!(attempt = %attempt_name(attempt), "running");
                conn.current = Some(tokio::spawn(run_map(
                    conn.app.clone(),
                    conn.job.clone(),
                    attempt,
                    split,
                    self.dir.clone(),
                    self.table.clone(),
                    self.options.slow_factor,
                    self.remote.clone(),
                )));
                None
            }
            Some(Ok(ToWorker::Reduce { attempt, inputs })) => {
                tracing::debug!(attempt = %attempt_name(attempt), "running");
                conn.current = Some(tokio::spawn(run_reduce(
                    conn.app.clone(),
                    conn.job.clone(),
                    attempt,
                    inputs,
                    self.dir.clone(),
                    self.table.clone(),
                    self.options.slow_factor,
                    self.options.security.clone(),
                )));
                None
            }
            Some(Ok(ToWorker::JobDone)) => Some(SessionEnd::Exit(WorkerExit::JobDone)),
            Some(Ok(ToWorker::JobFailed { reason })) => {
                Some(SessionEnd::Exit(WorkerExit::JobFailed(reason)))
            }
            Some(Ok(ToWorker::Refused { reason })) => return Err(WorkerError::Refused(reason)),
            Some(Ok(ToWorker::Welcome { .. })) => None,
            Some(Ok(ToWorker::Discard { attempt })) => {
                self.discard(attempt).await;
                None
            }
            Some(Err(e)) => Some(SessionEnd::Lost(e.to_string())),
            None => Some(SessionEnd::Lost("connection closed".into())),
        };
        Ok(end)
    }

    /// Deletes a losing attempt's files: they are no longer served, and its directory goes.
    async fn discard(&self, attempt: AttemptRef) {
        let dir = match attempt.kind {
            TaskKind::Map => {
                let reduces = self.job.as_ref().map_or(0, |(job, _)| job.reduces);
                for partition in 0..reduces {
                    self.table.remove(&FileKey::MapOutput {
                        map_task: attempt.task,
                        attempt: attempt.attempt,
                        partition,
                    });
                }
                self.dir
                    .join(format!("map-{}-a{}", attempt.task, attempt.attempt))
            }
            TaskKind::Reduce => {
                self.table.remove(&FileKey::ReduceOutput {
                    reduce_task: attempt.task,
                    attempt: attempt.attempt,
                });
                self.dir
                    .join(format!("reduce-{}-a{}", attempt.task, attempt.attempt))
            }
        };
        tracing::debug!(attempt = %attempt_name(attempt), "discarding a losing attempt's files");
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }

    /// Builds the app once per job (streaming apps materialise their shipped files).
    fn app_for(&mut self, job: &JobSpec) -> Result<Arc<dyn App>, WorkerError> {
        if let Some((known, app)) = &self.job {
            if known.job_id == job.job_id {
                return Ok(app.clone());
            }
            // Another coordinator: forget the previous job's files.
            self.table.clear();
        }
        let config = AppConfig::from_spec(&job.app).map_err(|e| {
            WorkerError::Refused(format!("cannot build app {}: {e:#}", job.app.name))
        })?;
        let app_dir = self.dir.join(format!("job-{:x}", job.job_id));
        let app = build_app(&config, &app_dir).map_err(|e| {
            WorkerError::Refused(format!("cannot build app {}: {e:#}", job.app.name))
        })?;
        self.job = Some((job.clone(), app.clone()));
        Ok(app)
    }
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

async fn send_all(
    sink: &mut ControlSink,
    msgs: impl IntoIterator<Item = ToCoordinator>,
) -> Result<(), String> {
    for msg in msgs {
        sink.feed(msg).await.map_err(|e| e.to_string())?;
    }
    sink.flush().await.map_err(|e| e.to_string())
}

impl Report {
    fn into_message(self) -> ToCoordinator {
        match self {
            Report::Done(attempt, counters) => {
                super::metrics::attempt_ended(&attempt, "done", Some(&counters));
                ToCoordinator::TaskDone { attempt, counters }
            }
            Report::Failed(attempt, error) => {
                super::metrics::attempt_ended(&attempt, "failed", None);
                ToCoordinator::TaskFailed { attempt, error }
            }
            Report::FetchFailed {
                attempt,
                map_task,
                map_attempt,
                error,
            } => {
                super::metrics::attempt_ended(&attempt, "fetch_failed", None);
                ToCoordinator::FetchFailed {
                    attempt,
                    map_task,
                    map_attempt,
                    error,
                }
            }
        }
    }
}

/// The slow-factor knob: sleep so the attempt appears to have taken `factor ×` as long.
async fn slow_down(started: std::time::Instant, factor: f64) {
    if factor > 1.0 {
        let extra = started.elapsed().mul_f64(factor - 1.0);
        tokio::time::sleep(extra).await;
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => {
            if let Some(s) = p.downcast_ref::<&str>() {
                format!("panicked: {s}")
            } else if let Some(s) = p.downcast_ref::<String>() {
                format!("panicked: {s}")
            } else {
                "panicked".into()
            }
        }
        Err(e) => e.to_string(),
    }
}

/// Where a worker reads map inputs it cannot open: the coordinator, which serves the job's
/// inputs over the shuffle protocol. Each such input is logged once.
#[derive(Clone)]
struct RemoteInputs {
    coordinator: String,
    security: Security,
    logged: Arc<std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>,
}

impl RemoteInputs {
    /// Whether `path` was not yet reported (and now is).
    fn first_time(&self, path: &Path) -> bool {
        self.logged
            .lock()
            .map(|mut l| l.insert(path.to_path_buf()))
            .unwrap_or(false)
    }
}

/// The split's bytes from the coordinator when this host cannot open the input (not there,
/// or no permission): `Ok(None)` when it can (the map task reads it locally), `Ok(Some(raw))`
/// with the file's bytes of the range, or why neither worked.
async fn fetch_input_if_unreadable(
    remote: &RemoteInputs,
    job_id: u64,
    split: &InputSplit,
) -> Result<Option<Vec<u8>>, String> {
    let local_error = match tokio::fs::File::open(&split.path).await {
        Ok(_) => return Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            e
        }
        // Another failure (an I/O error, too many open files): the map task reports it.
        Err(_) => return Ok(None),
    };
    if remote.first_time(&split.path) {
        tracing::info!(
            "input {} not readable here ({local_error}): reading it from the coordinator at {}",
            split.path.display(),
            remote.coordinator
        );
    }
    let (offset, len) = shoal_mr::split::split_range(split);
    let mut tries = 0;
    loop {
        match super::shuffle::fetch_input(
            &remote.security,
            &remote.coordinator,
            job_id,
            &split.path,
            offset,
            len,
        )
        .await
        {
            Ok(raw) => return Ok(Some(raw)),
            // The coordinator's answer (not an input, changed, unreadable there) will not change.
            Err(e @ ShuffleError::Remote(_)) => {
                return Err(format!(
                "input {} not readable here ({local_error}) and the coordinator refused it: {e}",
                split.path.display()
            ))
            }
            Err(e) => {
                tries += 1;
                if tries >= FETCH_TRIES {
                    return Err(format!(
                        "input {} not readable here ({local_error}) and fetching it from the \
                         coordinator at {} failed {tries} times: {e}",
                        split.path.display(),
                        remote.coordinator
                    ));
                }
                tracing::debug!(error = %e, "input fetch failed; trying again");
            }
        }
        tokio::time::sleep(RECONNECT_BACKOFF * tries).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_map(
    app: Arc<dyn App>,
    job: JobSpec,
    attempt: AttemptRef,
    split: SplitSpec,
    dir: PathBuf,
    table: FileTable,
    slow_factor: f64,
    remote: RemoteInputs,
) -> Report {
    let started = now();
    let task_dir = dir.join(format!("map-{}-a{}", attempt.task, attempt.attempt));
    let split = InputSplit {
        path: split.path,
        offset: split.offset,
        len: split.len,
    };
    let raw = match fetch_input_if_unreadable(&remote, job.job_id, &split).await {
        Ok(raw) => raw,
        Err(e) => return Report::Failed(attempt, e),
    };
    let remote_bytes = raw.as_ref().map(|r| r.len() as u64);
    let reduces = job.reduces;
    let memory = job.memory_bytes;
    let attempt_dir = task_dir.clone();
    let result = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&task_dir)?;
        let contents = match raw {
            Some(raw) => Some(shoal_mr::split::decode_fetched_split(&split, raw)?),
            None => None,
        };
        let mut out = shoal_mr::task::run_map_task_on(
            &*app,
            &split,
            contents,
            attempt.task,
            reduces,
            memory,
            &task_dir,
        )?;
        if let Some(bytes) = remote_bytes {
            out.counters.add("map.input.remote.bytes", bytes);
        }
        Ok(out)
    })
    .await;
    if !matches!(&result, Ok(Ok(out)) if out.partitions.len() == reduces as usize) {
        // A failed attempt's files are never served: delete them now, not at exit (on a full
        // disk, every retry's leftovers would make it fuller).
        let _ = tokio::fs::remove_dir_all(&attempt_dir).await;
    }
    match result {
        Ok(Ok(out)) if out.partitions.len() == reduces as usize => {
            for (r, path) in out.partitions.into_iter().enumerate() {
                table.insert(
                    FileKey::MapOutput {
                        map_task: attempt.task,
                        attempt: attempt.attempt,
                        partition: r as u32,
                    },
                    path,
                );
            }
            slow_down(started, slow_factor).await;
            Report::Done(attempt, out.counters.0)
        }
        Ok(Ok(out)) => Report::Failed(
            attempt,
            format!(
                "map produced {} partitions, expected {reduces}",
                out.partitions.len()
            ),
        ),
        Ok(Err(e)) => Report::Failed(attempt, failure_text(&e, &dir)),
        Err(e) => Report::Failed(attempt, panic_message(e)),
    }
}

/// An attempt's error for the coordinator: when this worker's disk is full or read-only, a
/// message naming its directory and the way out first, then the details.
fn failure_text(e: &anyhow::Error, dir: &Path) -> String {
    let disk = e.chain().find_map(|c| {
        c.downcast_ref::<std::io::Error>().filter(|io| {
            matches!(
                io.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS)
            )
        })
    });
    match disk {
        // The cause, once: the chain below it would repeat "No space left on device".
        Some(io) => shoal_mr::disk::describe("worker directory", dir, "--work-dir", io),
        None => format!("{e:#}"),
    }
}

/// Fetches one map output with a few tries.
async fn fetch_with_retries(
    security: &Security,
    job_id: u64,
    location: &MapOutputLocation,
    partition: u32,
    dest: &Path,
) -> Result<(), ShuffleError> {
    let key = FileKey::MapOutput {
        map_task: location.map_task,
        attempt: location.attempt,
        partition,
    };
    let mut tries = 0;
    loop {
        match fetch_file(
            security,
            &location.shuffle_addr,
            job_id,
            key,
            dest,
            Fetched::Scratch,
        )
        .await
        {
            Ok(_) => return Ok(()),
            // Our own disk failed: trying again, or re-running the map, cannot help.
            Err(e @ ShuffleError::LocalWrite { .. }) => return Err(e),
            Err(e) => {
                tries += 1;
                if tries >= FETCH_TRIES {
                    return Err(e);
                }
            }
        }
        tokio::time::sleep(RECONNECT_BACKOFF * tries).await;
    }
}

#[allow(clippy::too_many_arguments)] // As run_map: the attempt, its inputs and the worker's context.
async fn run_reduce(
    app: Arc<dyn App>,
    job: JobSpec,
    attempt: AttemptRef,
    inputs: Vec<MapOutputLocation>,
    dir: PathBuf,
    table: FileTable,
    slow_factor: f64,
    security: Security,
) -> Report {
    let started = now();
    let r = attempt.task;
    let task_dir = dir.join(format!("reduce-{r}-a{}", attempt.attempt));
    let fetch_dir = task_dir.join("in");
    let scratch = task_dir.join("scratch");
    let out_dir = task_dir.join("out");
    for d in [&fetch_dir, &scratch, &out_dir] {
        if let Err(e) = tokio::fs::create_dir_all(d).await {
            return Report::Failed(attempt, format!("cannot create {}: {e}", d.display()));
        }
    }
    // Fetch partition r of every map output (local files are used in place).
    let fetch_started = now();
    let job_id = job.job_id;
    let fetches = futures::stream::iter(inputs.into_iter().map(|loc| {
        let key = FileKey::MapOutput {
            map_task: loc.map_task,
            attempt: loc.attempt,
            partition: r,
        };
        let dest = fetch_dir.join(format!("map-{}", loc.map_task));
        let local = table.get(&key);
        let security = &security;
        async move {
            if let Some(path) = local {
                return (loc, Ok(path));
            }
            let result = fetch_with_retries(security, job_id, &loc, r, &dest).await;
            (loc, result.map(|()| dest))
        }
    }))
    .buffered(MAX_PARALLEL_FETCHES)
    .collect::<Vec<_>>()
    .await;
    let mut files = Vec::with_capacity(fetches.len());
    let mut fetched_bytes = 0u64;
    for (loc, result) in fetches {
        match result {
            Ok(path) => {
                if path.starts_with(&fetch_dir) {
                    fetched_bytes += tokio::fs::metadata(&path).await.map_or(0, |m| m.len());
                }
                files.push(path);
            }
            Err(ShuffleError::LocalWrite { path, error }) => {
                // This worker's disk, not the map output, is the problem: a task failure
                // (counted toward --max-attempts), not a reason to re-run the map.
                let _ = tokio::fs::remove_dir_all(&task_dir).await;
                let text = shoal_mr::disk::describe("worker directory", &dir, "--work-dir", &error);
                return Report::Failed(
                    attempt,
                    format!("{text} (fetching into {})", path.display()),
                );
            }
            Err(error) => {
                let _ = tokio::fs::remove_dir_all(&task_dir).await;
                return Report::FetchFailed {
                    attempt,
                    map_task: loc.map_task,
                    map_attempt: loc.attempt,
                    error: error.to_string(),
                };
            }
        }
    }
    let fetch_ms = fetch_started.elapsed().as_millis() as u64;
    let memory = job.memory_bytes;
    let reduce_out = out_dir.clone();
    let reduce_scratch = scratch.clone();
    let result = tokio::task::spawn_blocking(move || {
        // The coordinator fetches this output and commits it durably: no fsync here.
        shoal_mr::task::run_reduce_task_with(
            &*app,
            r,
            &files,
            memory,
            &reduce_scratch,
            &reduce_out,
            shoal_mr::task::OutputDurability::Scratch,
        )
    })
    .await;
    let _ = tokio::fs::remove_dir_all(&fetch_dir).await;
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    let out = out_dir.join(format!("mr-out-{r}"));
    let report = match result {
        Ok(Ok(_)) if !out.exists() => {
            Report::Failed(attempt, format!("reduce wrote no {}", out.display()))
        }
        Ok(Ok(mut counters)) => {
            counters.add("shuffle.fetched.bytes", fetched_bytes);
            counters.add("shuffle.fetch.ms", fetch_ms);
            // Served once, to the coordinator committing it; then the attempt's directory
            // goes (a failed commit runs the task again as a new attempt).
            table.insert_once(
                FileKey::ReduceOutput {
                    reduce_task: r,
                    attempt: attempt.attempt,
                },
                out,
                task_dir.clone(),
            );
            slow_down(started, slow_factor).await;
            return Report::Done(attempt, counters.0);
        }
        Ok(Err(e)) => Report::Failed(attempt, failure_text(&e, &dir)),
        Err(e) => Report::Failed(attempt, panic_message(e)),
    };
    let _ = tokio::fs::remove_dir_all(&task_dir).await;
    report
}
