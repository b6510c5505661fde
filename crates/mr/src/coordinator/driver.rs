//! The coordinator's tokio driver: accepts worker connections, turns their frames, the ticks
//! of a timer and the results of commits into [`Event`]s of the [`JobMachine`], and carries out
//! its [`Action`]s (sends, closes, fetching reduce outputs and renaming them into the output
//! directory). The decisions are all the machine's; this loop only does the I/O.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use shoal_wire::codec::FrameCodec;
use shoal_wire::mr::{
    AppSpec, AttemptRef, FileKey, JobSpec, ShippedFileSpec, ShuffleReply, ShuffleRequest, SortSpec,
    SplitSpec, TaskKind, ToCoordinator, ToWorker, MR_CONTROL_CLUSTER_ID,
    MR_CONTROL_MAX_FRAME_BYTES, SHUFFLE_MAX_FRAME_BYTES,
};
use shoal_wire::{Hello, Role};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

use super::core::{task_name, CommitError, CoordinatorConfig};
use super::machine::{Action, ConnId, Event, JobEnd, JobMachine};
use crate::app::AppConfig;
use crate::net::{Accepted, Security};
use crate::shuffle::{
    fetch_file, serve_input_request, shuffle_hello_refusal, Fetched, InputFiles, ShuffleError,
};
use crate::split::{plan_splits_with, InputSplit, RecordLayout};
use crate::status::JobStatus;

/// How often the state machine is ticked (timeouts, duplicates) and the status refreshed.
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// A connection must complete its handshake within this time or is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest interval between a worker's heartbeats.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Messages queued for one worker before it is considered stuck and disconnected.
pub const MAX_QUEUED_MESSAGES_PER_WORKER: usize = 64;

/// Events queued from connections to the coordinator loop.
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// After the job ends, how long the coordinator waits for "exit" messages to reach workers.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything that defines a job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The app and its options.
    pub app: AppConfig,
    /// Input files.
    pub inputs: Vec<PathBuf>,
    /// Target size of one map task's input, in bytes.
    pub split_size_bytes: u64,
    /// Number of reduce tasks.
    pub reduces: u32,
    /// Memory budget of one task, in bytes.
    pub memory_bytes: u64,
    /// Worker silence before it is lost; attempt runtime before it is duplicated.
    pub task_timeout: Duration,
    /// Failures of one task that fail the job.
    pub max_attempts: u32,
    /// Whether to run backup tasks near the end of a phase.
    pub backup_tasks: bool,
    /// Where `mr-out-<r>` files go.
    pub out_dir: PathBuf,
}

/// A job whose inputs were planned and whose app and output directory were checked.
#[derive(Debug, Clone)]
pub struct PreparedJob {
    /// The options.
    pub options: JobOptions,
    /// One split per map task.
    pub splits: Vec<InputSplit>,
    /// Sum of the inputs' sizes, in bytes.
    pub input_bytes: u64,
    /// Random id of this job (shuffle connections present it).
    pub job_id: u64,
    /// The inputs with their size and modification time when planned: served to workers that
    /// cannot open them, refused once changed.
    pub served_inputs: InputFiles,
    /// How workers connect and how reduce outputs are fetched: plain TCP (what
    /// [`prepare_job`] sets) or mutual TLS (`--cert/--key/--ca`).
    pub security: Security,
}

/// The result of a successful job.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// Wall time from start to the last commit.
    pub elapsed: Duration,
    /// Counters merged from winning attempts.
    pub counters: BTreeMap<String, u64>,
    /// Bytes of input.
    pub input_bytes: u64,
    /// The `mr-out-<r>` files, in partition order.
    pub outputs: Vec<PathBuf>,
    /// Attempts started over all tasks (maps + reduces when nothing ran twice).
    pub attempts: u64,
}

/// Why a job could not run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Inputs missing or unreadable (reported before the job starts).
    #[error("bad input: {0:#}")]
    Input(anyhow::Error),
    /// The app or its options are invalid.
    #[error("bad app configuration: {0:#}")]
    App(anyhow::Error),
    /// Invalid option.
    #[error("{0}")]
    Options(String),
    /// The output directory or the network failed. (The cause is part of the message, not a
    /// `source`, so that a chain printed with `{:#}` says it once.)
    #[error("{context}: {}", crate::disk::reason(error))]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        error: std::io::Error,
    },
    /// A commit failed in a way no retry can fix (the output directory is full, read-only or
    /// not writable); the message names the directory and what to do.
    #[error("job failed: {0}")]
    Aborted(String),
    /// A task failed `max_attempts` times.
    #[error("job failed: {task} (input: {input}) failed {attempts} times; last error: {error}")]
    TaskFailed {
        /// "map 3" or "reduce 7".
        task: String,
        /// The task's input.
        input: String,
        /// Failures.
        attempts: u32,
        /// The last error.
        error: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CoordinatorError {
    let context = context.into();
    move |error| CoordinatorError::Io { context, error }
}

/// Checks everything that can be checked before the job starts: options, inputs (planned into
/// splits), the app (built once), the output directory (created, stale `mr-out-*` removed,
/// writable).
pub fn prepare_job(options: JobOptions) -> Result<PreparedJob, CoordinatorError> {
    if options.reduces == 0 {
        return Err(CoordinatorError::Options(
            "--reduces must be at least 1".into(),
        ));
    }
    if options.max_attempts == 0 {
        return Err(CoordinatorError::Options(
            "--max-attempts must be at least 1".into(),
        ));
    }
    if options.split_size_bytes == 0 {
        return Err(CoordinatorError::Options(
            "--split-size must be positive".into(),
        ));
    }
    if options.task_timeout < Duration::from_millis(200) {
        return Err(CoordinatorError::Options(
            "--task-timeout must be at least 200ms".into(),
        ));
    }
    if options.inputs.is_empty() {
        return Err(CoordinatorError::Options("no input files given".into()));
    }
    let mut options = options;
    options.inputs =
        crate::split::expand_inputs(&options.inputs).map_err(CoordinatorError::Input)?;
    let layout = options
        .app
        .sort
        .as_ref()
        .map_or(RecordLayout::Lines, |s| s.format.layout());
    let splits = plan_splits_with(&options.inputs, options.split_size_bytes, layout)
        .map_err(CoordinatorError::Input)?;
    if let Some(sort) = options.app.sort.as_mut() {
        // The total-order partitioner, from a sample of the input, before any map runs.
        let partitioner =
            crate::apps::sort::sample_cut_points(&splits, sort.format, options.reduces)
                .map_err(CoordinatorError::Input)?;
        sort.cut_points = partitioner.cuts().to_vec();
    }
    let mut input_bytes = 0;
    for input in &options.inputs {
        input_bytes += std::fs::metadata(input)
            .map_err(io_err(format!("cannot read input {}", input.display())))?
            .len();
    }
    let served_inputs = InputFiles::snapshot(&options.inputs)
        .map_err(|e| CoordinatorError::Input(anyhow::Error::new(e)))?;
    let job_id = new_job_id();
    let probe_dir = std::env::temp_dir().join(format!("shoal-mr-check-{job_id:x}"));
    let built = crate::app::build_app(&options.app, &probe_dir);
    let _ = std::fs::remove_dir_all(&probe_dir);
    built.map_err(CoordinatorError::App)?;

    let out = &options.out_dir;
    if out.is_file() {
        return Err(CoordinatorError::Options(format!(
            "--out {} is a file, not a directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io_err(format!(
        "cannot create output directory {}",
        out.display()
    )))?;
    for entry in std::fs::read_dir(out).map_err(io_err(format!("cannot list {}", out.display())))? {
        let entry = entry.map_err(io_err(format!("cannot list {}", out.display())))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("mr-out-")
            || name.starts_with(".mr-out-")
            || crate::status::page::is_final_file(&name)
        {
            tracing::debug!(file = %entry.path().display(), "removing output of a previous job");
            std::fs::remove_file(entry.path())
                .map_err(io_err(format!("cannot remove {}", entry.path().display())))?;
        }
    }
    let probe = out.join(format!(".mr-out-probe-{job_id:x}"));
    std::fs::write(&probe, b"").map_err(io_err(format!(
        "output directory {} is not writable",
        out.display()
    )))?;
    let _ = std::fs::remove_file(&probe);
    Ok(PreparedJob {
        options,
        splits,
        input_bytes,
        job_id,
        served_inputs,
        security: Security::plain(),
    })
}

/// A job id unlikely to collide with another job's: wall-clock nanoseconds mixed with the pid.
#[allow(clippy::disallowed_methods)] // The driver may read the clock; the id is only a guard.
fn new_job_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let id = nanos ^ (u64::from(std::process::id()) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    id.max(1)
}

fn describe_split(split: &InputSplit) -> String {
    format!(
        "{} bytes {}..{}",
        split.path.display(),
        split.offset,
        split.offset + split.len
    )
}

/// What the connection and commit tasks tell the loop.
enum Incoming {
    Connected {
        conn: ConnId,
        tx: mpsc::Sender<ToWorker>,
    },
    Message {
        conn: ConnId,
        msg: ToCoordinator,
    },
    Closed {
        conn: ConnId,
    },
    /// A winning reduce output was fetched into the output directory under its temporary
    /// name ([`fetched_path`]), or could not be fetched.
    Fetched {
        attempt: AttemptRef,
        result: Result<(), CommitError>,
    },
}

/// A monotonic clock for the state machine, counted from the driver's start.
struct Clock(std::time::Instant);

impl Clock {
    #[allow(clippy::disallowed_methods)] // The driver owns the clock and passes time in.
    fn start() -> Self {
        Clock(std::time::Instant::now())
    }

    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Runs `job` with workers connecting to `listener` until it is done (every `mr-out-<r>` in
/// place) or failed; publishes a status snapshot on `status` every tick.
pub async fn run_job(
    job: PreparedJob,
    listener: TcpListener,
    status: watch::Sender<Arc<JobStatus>>,
) -> Result<JobReport, CoordinatorError> {
    let clock = Clock::start();
    let options = &job.options;
    let config = CoordinatorConfig {
        maps: job.splits.len() as u32,
        reduces: options.reduces,
        task_timeout: options.task_timeout,
        max_attempts: options.max_attempts,
        backup_tasks: options.backup_tasks,
    };
    let info = crate::status::JobInfo {
        app: options.app.name.clone(),
        out_dir: options.out_dir.display().to_string(),
        input_bytes: job.input_bytes,
        map_inputs: job
            .splits
            .iter()
            .map(|s| (describe_split(s), s.len))
            .collect(),
    };
    let heartbeat = (options.task_timeout / 4).min(MAX_HEARTBEAT_INTERVAL);
    let spec = JobSpec {
        job_id: job.job_id,
        app: AppSpec {
            name: options.app.name.clone(),
            pattern: options.app.pattern.clone(),
            mapper: options.app.mapper.clone(),
            reducer: options.app.reducer.clone(),
            shipped: options
                .app
                .shipped
                .iter()
                .map(|f| ShippedFileSpec {
                    name: f.name.clone(),
                    contents: f.contents.clone(),
                    executable: f.executable,
                })
                .collect(),
            sort: options.app.sort.as_ref().map(|s| SortSpec {
                format: s.format.name().to_owned(),
                cut_points: s.cut_points.clone(),
            }),
        },
        reduces: options.reduces,
        memory_bytes: options.memory_bytes,
        heartbeat_interval_ms: heartbeat.as_millis() as u64,
    };
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    tracing::debug!(
        addr = %addr,
        maps = job.splits.len(),
        reduces = options.reduces,
        app = %options.app.name,
        "coordinator waiting for workers"
    );

    let splits = job
        .splits
        .iter()
        .map(|split| SplitSpec {
            path: split.path.clone(),
            offset: split.offset,
            len: split.len,
        })
        .collect();
    let mut machine = JobMachine::new(config, spec, splits);

    let (events_tx, mut events) = mpsc::channel::<Incoming>(MAX_QUEUED_EVENTS);
    let mut conns: BTreeMap<ConnId, mpsc::Sender<ToWorker>> = BTreeMap::new();
    let mut next_conn: ConnId = 0;
    let mut connection_tasks = tokio::task::JoinSet::new();
    let mut commits = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(TICK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        // Wait for the next event: a connection, a tick, or something from a connection or a
        // commit.
        let event = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_conn += 1;
                    let conn = next_conn;
                    tracing::debug!(%peer, conn, "connection");
                    connection_tasks.spawn(connection(
                        job.security.clone(),
                        stream,
                        conn,
                        events_tx.clone(),
                        (job.job_id, job.served_inputs.clone()),
                    ));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ticker.tick() => Event::Tick,
            Some(incoming) = events.recv() => match incoming {
                Incoming::Connected { conn, tx } => {
                    conns.insert(conn, tx);
                    Event::Connected { conn }
                }
                Incoming::Message { conn, msg } => Event::Message { conn, msg },
                Incoming::Closed { conn } => {
                    conns.remove(&conn);
                    Event::Closed { conn }
                }
                Incoming::Fetched { attempt, result } => Event::Fetched { attempt, result },
            },
        };
        let tick = event == Event::Tick;

        // Hand it to the state machine and carry out its actions, in order (a rename reports
        // back at once, so its result is handled before anything else).
        let mut pending = VecDeque::from([event]);
        let mut finished: Option<JobEnd> = None;
        while let Some(event) = pending.pop_front() {
            for action in machine.handle(clock.now(), event) {
                match action {
                    Action::Send { conn, msg } => send_to(&mut conns, conn, msg),
                    Action::Close { conn } => {
                        conns.remove(&conn);
                    }
                    Action::Fetch {
                        attempt,
                        shuffle_addr,
                    } => {
                        commits.spawn(commit(
                            job.security.clone(),
                            job.job_id,
                            shuffle_addr,
                            attempt,
                            options.out_dir.clone(),
                            events_tx.clone(),
                        ));
                    }
                    Action::Place { attempt } => {
                        let tmp = fetched_path(&options.out_dir, attempt);
                        let dest = options.out_dir.join(format!("mr-out-{}", attempt.task));
                        let result = place(&tmp, &dest, &options.out_dir).map_err(|e| {
                            let _ = std::fs::remove_file(&tmp);
                            commit_error(&options.out_dir, &e)
                        });
                        pending.push_back(Event::Placed { attempt, result });
                    }
                    Action::RemoveFetched { attempt } => {
                        let _ = std::fs::remove_file(fetched_path(&options.out_dir, attempt));
                    }
                    Action::Finish { end } => finished = Some(end),
                }
            }
        }
        if tick {
            status.send_replace(Arc::new(machine.core().status(clock.now()).with_job(&info)));
        }
        if let Some(end) = finished {
            let result = match end {
                JobEnd::Done => Ok(()),
                JobEnd::TaskFailed { attempt, error } => {
                    let input = match attempt.kind {
                        TaskKind::Map => describe_split(&job.splits[attempt.task as usize]),
                        TaskKind::Reduce => {
                            format!("partition {} of every map task", attempt.task)
                        }
                    };
                    Err(CoordinatorError::TaskFailed {
                        task: task_name(attempt),
                        input,
                        attempts: options.max_attempts,
                        error,
                    })
                }
                JobEnd::Aborted { error, .. } => Err(CoordinatorError::Aborted(error)),
            };
            let last = Arc::new(machine.core().status(clock.now()).with_job(&info));
            status.send_replace(last.clone());
            let farewell = match &result {
                Ok(()) => ToWorker::JobDone,
                Err(e) => ToWorker::JobFailed {
                    reason: e.to_string(),
                },
            };
            for tx in conns.values() {
                let _ = tx.try_send(farewell.clone());
            }
            // Closing the queues lets each connection flush its farewell and end.
            conns.clear();
            drop(events_tx);
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
                while connection_tasks.join_next().await.is_some() {}
            })
            .await;
            connection_tasks.abort_all();
            // A commit still fetching (the job failed meanwhile) would leave its temporary
            // file in the output directory: stop them, then remove what they wrote.
            commits.abort_all();
            while commits.join_next().await.is_some() {}
            remove_outputs(&options.out_dir, result.is_err());
            if let Err(e) = crate::status::write_final(&options.out_dir, &last) {
                tracing::warn!(dir = %options.out_dir.display(), error = %e, "cannot write the final status page");
            }
            result?;
            let outputs = (0..options.reduces)
                .map(|r| options.out_dir.join(format!("mr-out-{r}")))
                .collect();
            let core = machine.core();
            return Ok(JobReport {
                elapsed: clock.now(),
                counters: core.counters(),
                input_bytes: job.input_bytes,
                outputs,
                attempts: core.attempts_started(),
            });
        }
    }
}

/// Queues `msg` on connection `conn`; a full or closed queue closes the connection (its
/// `Closed` event then makes the state machine treat the worker as lost).
fn send_to(conns: &mut BTreeMap<ConnId, mpsc::Sender<ToWorker>>, conn: ConnId, msg: ToWorker) {
    if let Some(tx) = conns.get(&conn) {
        if tx.try_send(msg).is_err() {
            tracing::warn!(conn, "worker's queue is full or closed: disconnecting");
            conns.remove(&conn);
        }
    }
}

/// Where a winning reduce output is fetched to before it is renamed into place.
fn fetched_path(out_dir: &Path, attempt: AttemptRef) -> PathBuf {
    out_dir.join(format!(".mr-out-{}-a{}.tmp", attempt.task, attempt.attempt))
}

/// Fetches a winning reduce output from its worker into the output directory under a
/// temporary name (fsynced); the main loop renames it.
async fn commit(
    security: Security,
    job_id: u64,
    shuffle_addr: String,
    attempt: AttemptRef,
    out_dir: PathBuf,
    events: mpsc::Sender<Incoming>,
) {
    let tmp = fetched_path(&out_dir, attempt);
    let key = FileKey::ReduceOutput {
        reduce_task: attempt.task,
        attempt: attempt.attempt,
    };
    let result = match fetch_file(
        &security,
        &shuffle_addr,
        job_id,
        key,
        &tmp,
        Fetched::Durable,
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(ShuffleError::LocalWrite { error, .. }) => Err(commit_error(&out_dir, &error)),
        Err(e) => Err(CommitError::Retryable(format!(
            "cannot fetch the output from {shuffle_addr}: {e}"
        ))),
    };
    let _ = events.send(Incoming::Fetched { attempt, result }).await;
}

/// Removes the temporary files of commits (`.mr-out-*`) from the output directory and, after a
/// failed job, the outputs it did commit (`mr-out-*`): a failed job leaves no output that
/// could be taken for a complete one, and gives back the space it took.
fn remove_outputs(out_dir: &Path, failed: bool) {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".mr-out-") || (failed && name.starts_with("mr-out-")) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A failure to write into the output directory: unrecoverable (the job fails at once, naming
/// the directory) when no retry can fix it, retryable otherwise.
fn commit_error(out_dir: &Path, e: &std::io::Error) -> CommitError {
    let text = crate::disk::describe("output directory", out_dir, "--out", e);
    if crate::disk::is_unrecoverable(e) {
        CommitError::Unrecoverable(text)
    } else {
        CommitError::Retryable(text)
    }
}

/// Renames a fetched output into place and fsyncs the directory.
fn place(tmp: &Path, dest: &Path, dir: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, dest)?;
    std::fs::File::open(dir)?.sync_all()
}

/// One worker connection: handshake, then frames in both directions until either side ends.
/// A malformed or oversized frame closes the connection (and only it).
///
/// A connection with a shuffle handshake for this job is a worker fetching a map input it
/// cannot open (`ShuffleRequest::FetchInput`): it is answered from `inputs` and closed.
async fn connection(
    security: Security,
    stream: TcpStream,
    conn: ConnId,
    events: mpsc::Sender<Incoming>,
    (job_id, inputs): (u64, InputFiles),
) {
    let Some(Accepted {
        stream,
        refusal: unauthenticated,
    }) = crate::net::accept(&security, stream, HANDSHAKE_TIMEOUT, "coordinator").await
    else {
        return;
    };
    let mut framed = Framed::new(
        stream,
        FrameCodec::<Hello, ToWorker>::new(MR_CONTROL_MAX_FRAME_BYTES),
    );
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(hello))) => hello,
        Ok(Some(Err(e))) => {
            tracing::warn!(conn, error = %e, "bad handshake frame: closing connection");
            return;
        }
        Ok(None) => return,
        Err(_) => {
            tracing::warn!(
                conn,
                "no handshake within {HANDSHAKE_TIMEOUT:?}: closing connection"
            );
            return;
        }
    };
    if hello.role == Role::Shuffle {
        let mut framed = framed.map_codec(|_| {
            FrameCodec::<ShuffleRequest, ShuffleReply>::new(SHUFFLE_MAX_FRAME_BYTES)
        });
        let refusal =
            unauthenticated.or_else(|| shuffle_hello_refusal(&hello, job_id, "coordinator"));
        if let Some(reason) = refusal {
            tracing::warn!(conn, %reason, "input fetch refused");
            let _ = framed.send(ShuffleReply::Error(reason)).await;
            return;
        }
        if let Err(e) = serve_input_request(&mut framed, &inputs).await {
            tracing::debug!(conn, error = %e, "input fetch ended with an error");
        }
        return;
    }
    let refusal = match hello.validate() {
        Err(e) => Some(e),
        Ok(()) if unauthenticated.is_some() => unauthenticated,
        Ok(()) if hello.role != Role::Client || hello.cluster_id != MR_CONTROL_CLUSTER_ID => {
            Some("this is a MapReduce coordinator: connect with `shoal mr worker`".to_string())
        }
        Ok(()) => None,
    };
    if let Some(reason) = refusal {
        tracing::warn!(conn, %reason, "handshake refused");
        let _ = framed.send(ToWorker::Refused { reason }).await;
        return;
    }
    let mut framed = framed
        .map_codec(|_| FrameCodec::<ToCoordinator, ToWorker>::new(MR_CONTROL_MAX_FRAME_BYTES));
    let (tx, mut rx) = mpsc::channel(MAX_QUEUED_MESSAGES_PER_WORKER);
    if events.send(Incoming::Connected { conn, tx }).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(msg) => {
                    if let Err(e) = framed.send(msg).await {
                        tracing::debug!(conn, error = %e, "send failed");
                        break;
                    }
                }
                None => break,
            },
            frame = framed.next() => match frame {
                Some(Ok(msg)) => {
                    if msg == ToCoordinator::Heartbeat {
                        // Answered here, not by the state machine: it only proves this process
                        // is alive to the worker.
                        if let Err(e) = framed.send(ToWorker::HeartbeatAck).await {
                            tracing::debug!(conn, error = %e, "send failed");
                            break;
                        }
                    }
                    if events.send(Incoming::Message { conn, msg }).await.is_err() {
                        break;
                    }
                }
                Some(Err(shoal_wire::codec::CodecError::Frame(e))) => {
                    tracing::warn!(conn, error = %e, "bad frame from worker: closing connection");
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(conn, error = %e, "connection failed");
                    break;
                }
                None => break,
            },
        }
    }
    let _ = events.send(Incoming::Closed { conn }).await;
}
