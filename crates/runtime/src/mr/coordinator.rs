//! The coordinator's tokio driver: accepts worker connections, turns their frames, the ticks
//! of a timer and the results of commits into [`Event`]s of the [`JobMachine`], and carries out
//! its [`Action`]s (sends, closes, fetching reduce outputs and renaming them into the output
//! directory). The decisions are all the machine's; this loop only does the I/O.
//!
//! The loop has two halves: [`Driver::next_input`] waits for whatever comes first (a
//! connection, a tick, a message or a commit's result, a request for the full status, the
//! caller's stop) and [`Driver::handle`] acts on it — one input at a time, in order.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use shoal_mr::coordinator::{
    commit_error, fetched_path, is_leftover_output, output_path, Action, CommitError, ConnId,
    CoordinatorError, Event, JobEnd, JobMachine, JobReport, PreparedJob,
};
use shoal_mr::shuffle::{shuffle_hello_refusal, Fetched, InputFiles};
use shoal_mr::status::JobInfo;
use shoal_wire::codec::FrameCodec;
use shoal_wire::mr::{
    AttemptRef, FileKey, ShuffleReply, ShuffleRequest, ToCoordinator, ToWorker,
    MR_CONTROL_CLUSTER_ID, MR_CONTROL_MAX_FRAME_BYTES, SHUFFLE_MAX_FRAME_BYTES,
};
use shoal_wire::{Hello, Role};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::Framed;

use super::net::{Accepted, Security};
use super::shuffle::{fetch_file, serve_input_request, ShuffleError};
use super::status_http::{StatusPublisher, StatusRequest};

/// How often the state machine is ticked (timeouts, duplicates) and the status refreshed.
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// A connection must complete its handshake within this time or is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Messages queued for one worker before it is considered stuck and disconnected.
pub const MAX_QUEUED_MESSAGES_PER_WORKER: usize = 64;

/// Events queued from connections to the coordinator loop.
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// After the job ends, how long the coordinator waits for "exit" messages to reach workers.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

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

/// One input of the loop, whatever its source.
enum Input {
    Accepted(std::io::Result<(TcpStream, SocketAddr)>),
    Tick,
    Incoming(Incoming),
    StatusRequest(StatusRequest),
    Stop(String),
}

/// How the loop ended.
enum Ending {
    /// The machine ended the job.
    Machine(JobEnd),
    /// The caller stopped it (the reason).
    Abandoned(String),
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

/// Runs `job` with workers connecting to `listener` (through `security`: plain TCP or mutual
/// TLS) until it is done (every `mr-out-<r>` in place), failed, or abandoned because `stop`
/// completed (with the reason: Ctrl-C, every worker gone). Publishes a light status on
/// `status` every tick and answers its requests for full ones. However it ends, the final
/// status is written into the output directory (`_status.html`, `_status.json`), the workers
/// still connected are told the job is over, and a job that did not succeed leaves no
/// `mr-out-*` behind.
pub async fn run_job(
    job: PreparedJob,
    security: Security,
    listener: TcpListener,
    status: StatusPublisher,
    stop: impl Future<Output = String>,
) -> Result<JobReport, CoordinatorError> {
    let mut driver = Driver::new(job, security, status);
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    tracing::debug!(
        addr = %addr,
        maps = driver.job.splits.len(),
        reduces = driver.job.options.reduces,
        app = %driver.job.options.app.name,
        "coordinator waiting for workers"
    );
    let mut ticker = tokio::time::interval(TICK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = std::pin::pin!(stop);
    let ending = loop {
        let input = driver.next_input(&listener, &mut ticker, &mut stop).await;
        if let Some(ending) = driver.handle(input).await {
            break ending;
        }
    };
    driver.finish(ending).await
}

/// The coordinator loop's state: the machine and the I/O around it.
struct Driver {
    job: PreparedJob,
    security: Security,
    status: StatusPublisher,
    machine: JobMachine,
    info: JobInfo,
    clock: Clock,
    events_tx: mpsc::Sender<Incoming>,
    events: mpsc::Receiver<Incoming>,
    conns: BTreeMap<ConnId, mpsc::Sender<ToWorker>>,
    next_conn: ConnId,
    connection_tasks: JoinSet<()>,
    commits: JoinSet<()>,
}

impl Driver {
    fn new(job: PreparedJob, security: Security, status: StatusPublisher) -> Driver {
        let (events_tx, events) = mpsc::channel::<Incoming>(MAX_QUEUED_EVENTS);
        Driver {
            machine: job.machine(),
            info: job.info(),
            job,
            security,
            status,
            clock: Clock::start(),
            events_tx,
            events,
            conns: BTreeMap::new(),
            next_conn: 0,
            connection_tasks: JoinSet::new(),
            commits: JoinSet::new(),
        }
    }

    /// Waits for the next input, whichever source it comes from.
    async fn next_input(
        &mut self,
        listener: &TcpListener,
        ticker: &mut tokio::time::Interval,
        stop: &mut std::pin::Pin<&mut impl Future<Output = String>>,
    ) -> Input {
        tokio::select! {
            accepted = listener.accept() => Input::Accepted(accepted),
            _ = ticker.tick() => Input::Tick,
            Some(incoming) = self.events.recv() => Input::Incoming(incoming),
            request = self.status.next_request() => Input::StatusRequest(request),
            reason = stop.as_mut() => Input::Stop(reason),
        }
    }

    /// Acts on one input; the ending once the job is over.
    async fn handle(&mut self, input: Input) -> Option<Ending> {
        let event = match input {
            Input::Accepted(Ok((stream, peer))) => {
                self.next_conn += 1;
                let conn = self.next_conn;
                tracing::debug!(%peer, conn, "connection");
                self.connection_tasks.spawn(connection(
                    self.security.clone(),
                    stream,
                    conn,
                    self.events_tx.clone(),
                    (self.job.job_id, self.job.served_inputs.clone()),
                ));
                return None;
            }
            Input::Accepted(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                return None;
            }
            Input::StatusRequest(reply) => {
                let full = self.machine.core().status(self.clock.now());
                let _ = reply.send(Arc::new(full.with_job(&self.info)));
                return None;
            }
            Input::Stop(reason) => return Some(Ending::Abandoned(reason)),
            Input::Tick => Event::Tick,
            Input::Incoming(Incoming::Connected { conn, tx }) => {
                self.conns.insert(conn, tx);
                Event::Connected { conn }
            }
            Input::Incoming(Incoming::Message { conn, msg }) => Event::Message { conn, msg },
            Input::Incoming(Incoming::Closed { conn }) => {
                self.conns.remove(&conn);
                Event::Closed { conn }
            }
            Input::Incoming(Incoming::Fetched { attempt, result }) => {
                Event::Fetched { attempt, result }
            }
        };
        let tick = event == Event::Tick;
        let end = self.step(event);
        if tick {
            // Light: the attempt log is copied only when someone asks for the page.
            let now = self.clock.now();
            let light = self.machine.core().status_without_attempts(now);
            self.status.publish(Arc::new(light.with_job(&self.info)));
        }
        end.map(Ending::Machine)
    }

    /// Hands `event` to the state machine and carries out its actions, in order (a rename
    /// reports back at once, so its result is handled before anything else).
    fn step(&mut self, event: Event) -> Option<JobEnd> {
        let out_dir = self.job.options.out_dir.clone();
        let mut pending = VecDeque::from([event]);
        let mut finished = None;
        while let Some(event) = pending.pop_front() {
            for action in self.machine.handle(self.clock.now(), event) {
                match action {
                    Action::Send { conn, msg } => send_to(&mut self.conns, conn, msg),
                    Action::Close { conn } => {
                        self.conns.remove(&conn);
                    }
                    Action::Fetch {
                        attempt,
                        shuffle_addr,
                    } => {
                        self.commits.spawn(commit(
                            self.security.clone(),
                            self.job.job_id,
                            shuffle_addr,
                            attempt,
                            out_dir.clone(),
                            self.events_tx.clone(),
                        ));
                    }
                    Action::Place { attempt } => {
                        let tmp = fetched_path(&out_dir, attempt);
                        let dest = output_path(&out_dir, attempt.task);
                        let result = place(&tmp, &dest, &out_dir).map_err(|e| {
                            let _ = std::fs::remove_file(&tmp);
                            commit_error(&out_dir, &e)
                        });
                        pending.push_back(Event::Placed { attempt, result });
                    }
                    Action::RemoveFetched { attempt } => {
                        let _ = std::fs::remove_file(fetched_path(&out_dir, attempt));
                    }
                    Action::Finish { end } => finished = Some(end),
                }
            }
        }
        finished
    }

    /// Ends the job: publishes and writes the final status, says farewell to the workers,
    /// stops the commits still running and cleans the output directory.
    async fn finish(mut self, ending: Ending) -> Result<JobReport, CoordinatorError> {
        let now = self.clock.now();
        let mut last = self.machine.core().status(now).with_job(&self.info);
        let result = match ending {
            Ending::Machine(end) => self.job.end_result(end),
            Ending::Abandoned(reason) => {
                tracing::warn!(%reason, "abandoning the job");
                last = last.abandoned(&reason);
                Err(CoordinatorError::Abandoned(reason))
            }
        };
        let last = Arc::new(last);
        self.status.publish(last.clone());
        let farewell = match &result {
            Ok(()) => ToWorker::JobDone,
            Err(e) => ToWorker::JobFailed {
                reason: e.to_string(),
            },
        };
        for tx in self.conns.values() {
            let _ = tx.try_send(farewell.clone());
        }
        // Closing the queues lets each connection flush its farewell and end.
        self.conns.clear();
        drop(self.events_tx);
        let connection_tasks = &mut self.connection_tasks;
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            while connection_tasks.join_next().await.is_some() {}
        })
        .await;
        self.connection_tasks.abort_all();
        // A commit still fetching (the job failed meanwhile) would leave its temporary
        // file in the output directory: stop them, then remove what they wrote.
        self.commits.abort_all();
        while self.commits.join_next().await.is_some() {}
        let out_dir = &self.job.options.out_dir;
        remove_outputs(out_dir, result.is_err());
        if let Err(e) = shoal_mr::status::write_final(out_dir, &last) {
            tracing::warn!(dir = %out_dir.display(), error = %e, "cannot write the final status page");
        }
        result?;
        let core = self.machine.core();
        Ok(JobReport {
            elapsed: self.clock.now(),
            counters: core.counters(),
            input_bytes: self.job.input_bytes,
            outputs: self.job.outputs(),
            attempts: core.attempts_started(),
        })
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

/// Fetches a winning reduce output from its worker into the output directory under a
/// temporary name (fsynced); the main loop renames it.
async fn commit(
    security: Security,
    job_id: u64,
    shuffle_addr: String,
    attempt: AttemptRef,
    out_dir: std::path::PathBuf,
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
/// job that did not succeed, the outputs it did commit (`mr-out-*`): such a job leaves no
/// output that could be taken for a complete one, and gives back the space it took.
fn remove_outputs(out_dir: &Path, failed: bool) {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if is_leftover_output(&name.to_string_lossy(), failed) {
            let _ = std::fs::remove_file(entry.path());
        }
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
    }) = super::net::accept(&security, stream, HANDSHAKE_TIMEOUT, "coordinator").await
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
