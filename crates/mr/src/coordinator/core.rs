//! The coordinator as a deterministic state machine: no I/O, no clock, no threads.
//!
//! The driver feeds it inputs (a worker registered, sent a heartbeat, asked for work, reported an
//! attempt done or failed or a fetch failure, was lost; a reduce output was committed; time
//! passed) with the current time `now` (a monotonic [`Duration`] since the driver started), and
//! drains [`Output`]s with [`Coordinator::poll_output`]: assignments, commits of reduce outputs,
//! disconnections, and the end of the job. Everything is kept in `BTreeMap`s and scanned in
//! index order, so the same inputs always produce the same outputs.
//!
//! Rules (paper §3.3 and §3.6; `docs/mapreduce.md` explains them at length):
//!
//! - Map tasks are handed out in index order; reduce tasks only once every map task is done.
//! - A worker is *lost* when its connection closes or nothing was heard from it (heartbeats) for
//!   `task_timeout`. Its running attempts are abandoned and, while some reduce task still needs
//!   map output, its completed map tasks are re-executed: their output lived on its disk.
//! - A task on a live worker is never taken away. An attempt running longer than
//!   `task_timeout` earns one duplicate on another idle worker; with backup tasks on, once no
//!   task of the phase is left to start, a task running much longer than its completed peers
//!   (see [`BACKUP_SLOWDOWN_FACTOR`]) is duplicated too. The first attempt to finish wins;
//!   later reports of the same task are ignored.
//! - A reduce attempt that cannot fetch a map output reports it; that map task is re-executed
//!   and the reduce task goes back to the queue (neither counts as a failure).
//! - Only attempts that *fail* (the app returned an error or panicked, or the winning reduce
//!   output could not be committed) count towards `max_attempts`; a lost worker is not the
//!   task's fault. At `max_attempts` the job fails.
//! - A reduce task is finished when its winning output has been committed (copied into the
//!   output directory and renamed) by the driver; the job is done when every reduce task is.
//!   A commit that failed in a way retrying cannot fix ([`CommitError::Unrecoverable`]: the
//!   output directory is full, read-only or not writable) fails the job at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use shoal_wire::mr::{AttemptRef, MapOutputLocation, TaskKind};

use crate::status::{
    AttemptLog, AttemptOutcome, JobOutcome, JobStatus, RunningAttemptStatus, TaskState, TaskStatus,
    WorkerState, WorkerStatus,
};

/// Identifies a registered worker. Never reused within a job: a worker that reconnects gets a
/// new id, so reports from its previous life are recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// A task is duplicated by the backup rule only after running this long (so that short tasks
/// finishing at slightly different speeds are never duplicated).
pub const BACKUP_MIN_RUNTIME: Duration = Duration::from_secs(1);

/// Backup rule: a task is duplicated when it has run this many times longer than the median
/// completed task of its phase.
pub const BACKUP_SLOWDOWN_FACTOR: u32 = 2;

/// At most this many attempts of one task run at the same time (the original and one
/// duplicate), so a slow or hung task never takes over the whole cluster.
pub const MAX_LIVE_ATTEMPTS_PER_TASK: usize = 2;

/// Static parameters of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Number of map tasks (input splits).
    pub maps: u32,
    /// Number of reduce tasks (partitions); at least 1.
    pub reduces: u32,
    /// A worker not heard from for this long is lost; an attempt running this long earns a
    /// duplicate.
    pub task_timeout: Duration,
    /// A task that fails this many times fails the job.
    pub max_attempts: u32,
    /// Whether to run backup tasks near the end of a phase (paper §3.6).
    pub backup_tasks: bool,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a map attempt to a worker.
    AssignMap {
        /// The worker.
        worker: WorkerId,
        /// The attempt (`kind` is `Map`); the driver attaches the split of `attempt.task`.
        attempt: AttemptRef,
    },
    /// Send a reduce attempt to a worker.
    AssignReduce {
        /// The worker.
        worker: WorkerId,
        /// The attempt (`kind` is `Reduce`).
        attempt: AttemptRef,
        /// Where each map task's winning output lives.
        inputs: Vec<MapOutputLocation>,
    },
    /// Fetch the output of a winning reduce attempt from its worker, place it in the output
    /// directory atomically, and report with [`Coordinator::commit_done`].
    Commit {
        /// The winning attempt (`kind` is `Reduce`).
        attempt: AttemptRef,
        /// The worker holding the output.
        worker: WorkerId,
        /// Its shuffle server.
        shuffle_addr: String,
    },
    /// Tell `worker` to delete the files of `attempt`, which finished after another attempt of
    /// its task had won (a backup or a duplicate): they will never be fetched.
    Discard {
        /// The worker holding the files.
        worker: WorkerId,
        /// The losing attempt.
        attempt: AttemptRef,
    },
    /// Close this worker's connection: it was declared lost.
    Disconnect {
        /// The worker.
        worker: WorkerId,
    },
    /// Every reduce output is committed: tell the workers to exit, then exit 0.
    JobDone,
    /// A task failed `max_attempts` times: tell the workers to exit, then exit non-zero.
    JobFailed {
        /// The task (its last attempt).
        attempt: AttemptRef,
        /// The last error.
        error: String,
    },
    /// A commit failed in a way no retry can fix: tell the workers to exit, then exit non-zero
    /// with `error` (which names the output directory and what to do).
    JobAborted {
        /// The reduce attempt whose output could not be committed.
        attempt: AttemptRef,
        /// The error.
        error: String,
    },
}

/// Why the driver could not commit a winning reduce output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// Retrying may help (the worker could not be reached, the transfer broke): the attempt
    /// counts as failed and the reduce task runs again, up to `max_attempts`.
    Retryable(String),
    /// Retrying cannot help (the output directory is full, read-only or not writable): the job
    /// fails at once with this message.
    Unrecoverable(String),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Retryable(e) | CommitError::Unrecoverable(e) => f.write_str(e),
        }
    }
}

/// Whether a report changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The report was taken into account.
    Accepted,
    /// The report was stale (abandoned attempt, task already won, unknown or lost worker) and
    /// was ignored.
    Ignored,
}

#[derive(Debug, Clone)]
struct Running {
    worker: WorkerId,
    started: Duration,
}

#[derive(Debug, Clone)]
struct Winner {
    attempt: u32,
    worker: WorkerId,
    elapsed: Duration,
}

#[derive(Debug, Clone, Default)]
struct Task {
    next_attempt: u32,
    failures: u32,
    last_error: Option<String>,
    running: BTreeMap<u32, Running>,
    done: Option<Winner>,
    /// Reduce tasks only: the winner's output is in the output directory.
    committed: bool,
    counters: BTreeMap<String, u64>,
}

impl Task {
    fn is_pending(&self) -> bool {
        self.done.is_none() && self.running.is_empty()
    }

    fn oldest_start(&self) -> Option<Duration> {
        self.running.values().map(|r| r.started).min()
    }
}

#[derive(Debug, Clone)]
struct Worker {
    name: String,
    shuffle_addr: String,
    last_heard: Duration,
    waiting: bool,
    lost: bool,
    running: BTreeSet<AttemptRef>,
    attempts_won: u64,
}

/// The coordinator's state machine. See the module docs for the rules.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    maps: Vec<Task>,
    reduces: Vec<Task>,
    workers: BTreeMap<WorkerId, Worker>,
    next_worker_id: u64,
    outputs: VecDeque<Output>,
    outcome: Option<JobOutcome>,
    /// Every attempt's start, end and outcome, for the status page's timeline.
    log: AttemptLog,
}

impl Coordinator {
    /// A coordinator for a job of `config.maps` map tasks and `config.reduces` reduce tasks.
    pub fn new(config: CoordinatorConfig) -> Self {
        assert!(config.reduces >= 1, "a job needs at least one reduce task");
        assert!(config.max_attempts >= 1, "max_attempts must be at least 1");
        let mut c = Coordinator {
            maps: vec![Task::default(); config.maps as usize],
            reduces: vec![Task::default(); config.reduces as usize],
            config,
            workers: BTreeMap::new(),
            next_worker_id: 1,
            outputs: VecDeque::new(),
            outcome: None,
            log: AttemptLog::default(),
        };
        c.check_done();
        c
    }

    /// The job's parameters.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The next thing the driver must do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// How the job ended, once it has.
    pub fn outcome(&self) -> Option<&JobOutcome> {
        self.outcome.as_ref()
    }

    /// A new worker with a shuffle server at `shuffle_addr`. It is idle until it asks for work.
    pub fn register_worker(&mut self, now: Duration, name: &str, shuffle_addr: &str) -> WorkerId {
        let id = WorkerId(self.next_worker_id);
        self.next_worker_id += 1;
        tracing::debug!(worker = %id, name, shuffle_addr, "worker registered");
        self.workers.insert(
            id,
            Worker {
                name: name.to_string(),
                shuffle_addr: shuffle_addr.to_string(),
                last_heard: now,
                waiting: false,
                lost: false,
                running: BTreeSet::new(),
                attempts_won: 0,
            },
        );
        id
    }

    /// Any message from a worker proves it alive. Returns `false` for an unknown or lost worker
    /// (the driver should close its connection).
    pub fn heard_from(&mut self, now: Duration, worker: WorkerId) -> bool {
        match self.workers.get_mut(&worker) {
            Some(w) if !w.lost => {
                w.last_heard = w.last_heard.max(now);
                true
            }
            _ => false,
        }
    }

    /// The worker asks for work; it gets an assignment as soon as one is available.
    pub fn request_task(&mut self, now: Duration, worker: WorkerId) {
        if !self.heard_from(now, worker) {
            return;
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.waiting = true;
        }
        self.schedule(now);
    }

    /// An attempt finished. The first finished attempt of a task wins; every later one is
    /// ignored.
    pub fn task_done(
        &mut self,
        now: Duration,
        worker: WorkerId,
        attempt: AttemptRef,
        counters: BTreeMap<String, u64>,
    ) -> Disposition {
        if !self.heard_from(now, worker) {
            return Disposition::Ignored;
        }
        let Some(running) = self.take_running(worker, attempt) else {
            return Disposition::Ignored;
        };
        let task = self.task_mut(attempt);
        if task.done.is_some() {
            tracing::debug!(attempt = %attempt_name(attempt), "late result of a task already won: ignored");
            self.log.ended(attempt, now, AttemptOutcome::Superseded);
            self.outputs.push_back(Output::Discard { worker, attempt });
            self.schedule(now);
            return Disposition::Ignored;
        }
        self.log.ended(attempt, now, AttemptOutcome::Won);
        let task = self.task_mut(attempt);
        task.done = Some(Winner {
            attempt: attempt.attempt,
            worker,
            elapsed: now.saturating_sub(running.started),
        });
        task.counters = counters;
        if let Some(w) = self.workers.get_mut(&worker) {
            w.attempts_won += 1;
        }
        if attempt.kind == TaskKind::Reduce {
            let shuffle_addr = self.workers[&worker].shuffle_addr.clone();
            self.outputs.push_back(Output::Commit {
                attempt,
                worker,
                shuffle_addr,
            });
        }
        tracing::debug!(attempt = %attempt_name(attempt), %worker, "attempt won");
        self.schedule(now);
        Disposition::Accepted
    }

    /// An attempt failed with `error`. After `max_attempts` failures of a task, the job fails.
    pub fn task_failed(
        &mut self,
        now: Duration,
        worker: WorkerId,
        attempt: AttemptRef,
        error: &str,
    ) -> Disposition {
        if !self.heard_from(now, worker) {
            return Disposition::Ignored;
        }
        if self.take_running(worker, attempt).is_none() {
            return Disposition::Ignored;
        }
        self.log.ended(attempt, now, AttemptOutcome::Failed);
        let max_attempts = self.config.max_attempts;
        let task = self.task_mut(attempt);
        if task.done.is_some() {
            return Disposition::Ignored;
        }
        task.failures += 1;
        task.last_error = Some(error.to_string());
        let failures = task.failures;
        tracing::warn!(attempt = %attempt_name(attempt), %worker, failures, error, "attempt failed");
        if failures >= max_attempts && self.outcome.is_none() {
            self.finish(JobOutcome::Failed {
                task: task_name(attempt),
                error: error.to_string(),
            });
            self.outputs.push_back(Output::JobFailed {
                attempt,
                error: error.to_string(),
            });
            return Disposition::Accepted;
        }
        self.schedule(now);
        Disposition::Accepted
    }

    /// A reduce attempt could not fetch the output of `map_task` attempt `map_attempt`. The
    /// reduce attempt is abandoned and, if that output is still the winner, the map task is
    /// re-executed (paper §3.3).
    pub fn fetch_failed(
        &mut self,
        now: Duration,
        worker: WorkerId,
        attempt: AttemptRef,
        map_task: u32,
        map_attempt: u32,
    ) -> Disposition {
        if !self.heard_from(now, worker) || self.take_running(worker, attempt).is_none() {
            return Disposition::Ignored;
        }
        self.log.ended(attempt, now, AttemptOutcome::FetchFailed);
        if let Some(map) = self.maps.get_mut(map_task as usize) {
            if map.done.as_ref().map(|d| d.attempt) == Some(map_attempt) {
                tracing::warn!(
                    map_task,
                    map_attempt,
                    "map output unreachable: re-executing"
                );
                map.done = None;
                map.counters.clear();
                self.log.output_lost(AttemptRef {
                    kind: TaskKind::Map,
                    task: map_task,
                    attempt: map_attempt,
                });
            }
        }
        self.schedule(now);
        Disposition::Accepted
    }

    /// The driver finished committing a reduce output: `Ok` if it is in place. A
    /// [`CommitError::Retryable`] failure counts toward `max_attempts` like a failed attempt
    /// and the reduce task runs again; a [`CommitError::Unrecoverable`] one fails the job at
    /// once (retries would fail the same way, each leaving files behind).
    pub fn commit_done(
        &mut self,
        now: Duration,
        attempt: AttemptRef,
        result: Result<(), CommitError>,
    ) -> Disposition {
        let max_attempts = self.config.max_attempts;
        let Some(task) = self.reduces.get_mut(attempt.task as usize) else {
            return Disposition::Ignored;
        };
        if task.committed || task.done.as_ref().map(|d| d.attempt) != Some(attempt.attempt) {
            return Disposition::Ignored;
        }
        match result {
            Ok(()) => task.committed = true,
            Err(error) => {
                self.log.commit_failed(attempt);
                task.done = None;
                task.counters.clear();
                task.failures += 1;
                let failures = task.failures;
                let text = error.to_string();
                task.last_error = Some(text.clone());
                let abort = matches!(error, CommitError::Unrecoverable(_));
                if abort {
                    // The job's own error says it; a warning too would say it twice.
                    tracing::debug!(attempt = %attempt_name(attempt), error = %text, "commit failed");
                } else {
                    tracing::warn!(
                        attempt = %attempt_name(attempt),
                        failures,
                        error = %text,
                        "commit failed: running the reduce task again"
                    );
                }
                if (abort || failures >= max_attempts) && self.outcome.is_none() {
                    self.finish(JobOutcome::Failed {
                        task: task_name(attempt),
                        error: text.clone(),
                    });
                    self.outputs.push_back(if abort {
                        Output::JobAborted {
                            attempt,
                            error: text,
                        }
                    } else {
                        Output::JobFailed {
                            attempt,
                            error: text,
                        }
                    });
                    return Disposition::Accepted;
                }
                self.invalidate_lost_map_outputs();
            }
        }
        self.check_done();
        self.schedule(now);
        Disposition::Accepted
    }

    /// Whether `attempt` is a reduce attempt that won and whose output is not committed yet:
    /// the driver places a fetched output only then.
    pub fn awaiting_commit(&self, attempt: AttemptRef) -> bool {
        attempt.kind == TaskKind::Reduce
            && self.reduces.get(attempt.task as usize).is_some_and(|t| {
                !t.committed && t.done.as_ref().map(|d| d.attempt) == Some(attempt.attempt)
            })
    }

    /// The worker's connection closed or it stopped answering: abandon its attempts and
    /// re-execute its completed map tasks whose output is still needed.
    pub fn worker_lost(&mut self, now: Duration, worker: WorkerId) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if w.lost {
            return;
        }
        w.lost = true;
        w.waiting = false;
        let running = std::mem::take(&mut w.running);
        tracing::warn!(%worker, name = %w.name, abandoned = running.len(), "worker lost");
        for attempt in running {
            self.task_mut(attempt).running.remove(&attempt.attempt);
            self.log.ended(attempt, now, AttemptOutcome::WorkerLost);
        }
        // Reduce outputs not yet committed lived on its disk.
        for (index, task) in self.reduces.iter_mut().enumerate() {
            if !task.committed && task.done.as_ref().map(|d| d.worker) == Some(worker) {
                if let Some(d) = &task.done {
                    self.log.output_lost(AttemptRef {
                        kind: TaskKind::Reduce,
                        task: index as u32,
                        attempt: d.attempt,
                    });
                }
                task.done = None;
                task.counters.clear();
            }
        }
        self.invalidate_lost_map_outputs();
        self.outputs.push_back(Output::Disconnect { worker });
        self.schedule(now);
    }

    /// Time passed: declare silent workers lost and start duplicates that became due.
    pub fn tick(&mut self, now: Duration) {
        let timeout = self.config.task_timeout;
        let silent: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.lost && now.saturating_sub(w.last_heard) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for worker in silent {
            tracing::warn!(%worker, ?timeout, "no heartbeat within the task timeout");
            self.worker_lost(now, worker);
        }
        self.schedule(now);
    }

    /// Merged counters of the winning attempts.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut total = BTreeMap::new();
        for task in self.maps.iter().chain(&self.reduces) {
            if task.done.is_some() {
                for (k, v) in &task.counters {
                    *total.entry(k.clone()).or_insert(0) += v;
                }
            }
        }
        total
    }

    /// Attempts started so far, over all tasks (more than the number of tasks when backups,
    /// duplicates or re-executions ran).
    pub fn attempts_started(&self) -> u64 {
        self.maps
            .iter()
            .chain(&self.reduces)
            .map(|t| u64::from(t.next_attempt))
            .sum()
    }

    /// Map tasks done and reduce tasks committed.
    pub fn progress(&self) -> (u32, u32) {
        let maps = self.maps.iter().filter(|t| t.done.is_some()).count() as u32;
        let reduces = self.reduces.iter().filter(|t| t.committed).count() as u32;
        (maps, reduces)
    }

    /// A snapshot for the status page, with the whole attempt log (up to
    /// [`MAX_RECORDED_ATTEMPTS`](crate::status::MAX_RECORDED_ATTEMPTS) records: take it when
    /// someone looks, not on every tick).
    pub fn status(&self, now: Duration) -> JobStatus {
        let mut s = self.status_without_attempts(now);
        s.attempts = self.log.records().to_vec();
        s.attempts_included = true;
        s
    }

    /// A snapshot without the attempt log (`attempts` empty, `attempts_included` false): what
    /// progress bars and metrics need, at a cost that grows with the tasks and workers, not
    /// with the attempts. The driver publishes this one every tick.
    pub fn status_without_attempts(&self, now: Duration) -> JobStatus {
        let (maps_done, reduces_done) = self.progress();
        let task_status = |kind: TaskKind, index: usize, t: &Task| TaskStatus {
            kind: match kind {
                TaskKind::Map => "map".into(),
                TaskKind::Reduce => "reduce".into(),
            },
            index: index as u32,
            state: if t.committed {
                TaskState::Committed
            } else if t.done.is_some() {
                match kind {
                    TaskKind::Map => TaskState::Done,
                    TaskKind::Reduce => TaskState::Committing,
                }
            } else if t.running.is_empty() {
                TaskState::Pending
            } else {
                TaskState::Running
            },
            attempts: t.next_attempt,
            failures: t.failures,
            running: t
                .running
                .iter()
                .map(|(a, r)| RunningAttemptStatus {
                    attempt: *a,
                    worker: r.worker.0,
                    elapsed_ms: now.saturating_sub(r.started).as_millis() as u64,
                })
                .collect(),
            winner_attempt: t.done.as_ref().map(|d| d.attempt),
            winner_worker: t.done.as_ref().map(|d| d.worker.0),
            last_error: t.last_error.clone(),
            input: String::new(),
            input_bytes: None,
            bytes_in: t.done.as_ref().and_then(|_| {
                t.counters
                    .get(match kind {
                        TaskKind::Map => "map.input.bytes",
                        TaskKind::Reduce => "reduce.input.bytes",
                    })
                    .copied()
            }),
            bytes_out: t.done.as_ref().and_then(|_| {
                t.counters
                    .get(match kind {
                        TaskKind::Map => "map.output.file.bytes",
                        TaskKind::Reduce => "reduce.output.bytes",
                    })
                    .copied()
            }),
            winner_elapsed_ms: t.done.as_ref().map(|d| d.elapsed.as_millis() as u64),
        };
        JobStatus {
            phase: self.phase_name().into(),
            elapsed_ms: now.as_millis() as u64,
            maps_total: self.config.maps,
            maps_done,
            reduces_total: self.config.reduces,
            reduces_done,
            maps: self
                .maps
                .iter()
                .enumerate()
                .map(|(i, t)| task_status(TaskKind::Map, i, t))
                .collect(),
            reduces: self
                .reduces
                .iter()
                .enumerate()
                .map(|(i, t)| task_status(TaskKind::Reduce, i, t))
                .collect(),
            workers: self
                .workers
                .iter()
                .map(|(id, w)| WorkerStatus {
                    id: id.0,
                    name: w.name.clone(),
                    shuffle_addr: w.shuffle_addr.clone(),
                    state: if w.lost {
                        WorkerState::Lost
                    } else if w.running.is_empty() {
                        WorkerState::Idle
                    } else {
                        WorkerState::Busy
                    },
                    last_heartbeat_ms_ago: now.saturating_sub(w.last_heard).as_millis() as u64,
                    running: w.running.iter().map(|a| attempt_name(*a)).collect(),
                    attempts_won: w.attempts_won,
                })
                .collect(),
            counters: self.counters(),
            outcome: self.outcome.clone(),
            app: String::new(),
            out_dir: String::new(),
            input_bytes: 0,
            attempts: Vec::new(),
            attempts_not_recorded: self.log.not_recorded(),
            attempts_included: false,
        }
    }

    fn phase_name(&self) -> &'static str {
        match &self.outcome {
            Some(JobOutcome::Done) => "done",
            Some(JobOutcome::Failed { .. }) => "failed",
            // The core never abandons a job (its driver does: `JobStatus::abandoned`).
            Some(JobOutcome::Abandoned { .. }) => "abandoned",
            None if !self.all_maps_done() => "map",
            None => "reduce",
        }
    }

    fn all_maps_done(&self) -> bool {
        self.maps.iter().all(|t| t.done.is_some())
    }

    fn task_mut(&mut self, attempt: AttemptRef) -> &mut Task {
        match attempt.kind {
            TaskKind::Map => &mut self.maps[attempt.task as usize],
            TaskKind::Reduce => &mut self.reduces[attempt.task as usize],
        }
    }

    /// Removes a running attempt reported by `worker`; `None` if it is not running there
    /// (abandoned, unknown task, or another worker's).
    fn take_running(&mut self, worker: WorkerId, attempt: AttemptRef) -> Option<Running> {
        let tasks = match attempt.kind {
            TaskKind::Map => &mut self.maps,
            TaskKind::Reduce => &mut self.reduces,
        };
        let task = tasks.get_mut(attempt.task as usize)?;
        if task.running.get(&attempt.attempt)?.worker != worker {
            return None;
        }
        let running = task.running.remove(&attempt.attempt);
        if let Some(w) = self.workers.get_mut(&worker) {
            w.running.remove(&attempt);
        }
        running
    }

    /// Map outputs on lost workers are re-executed while a reduce task may still fetch them.
    fn invalidate_lost_map_outputs(&mut self) {
        if self.reduces.iter().all(|t| t.done.is_some()) {
            return;
        }
        for (index, task) in self.maps.iter_mut().enumerate() {
            let on_lost = task
                .done
                .as_ref()
                .is_some_and(|d| self.workers.get(&d.worker).is_none_or(|w| w.lost));
            if on_lost {
                tracing::warn!(
                    map_task = index,
                    "output lost with its worker: re-executing"
                );
                if let Some(d) = &task.done {
                    self.log.output_lost(AttemptRef {
                        kind: TaskKind::Map,
                        task: index as u32,
                        attempt: d.attempt,
                    });
                }
                task.done = None;
                task.counters.clear();
            }
        }
    }

    fn finish(&mut self, outcome: JobOutcome) {
        self.outcome = Some(outcome);
        for w in self.workers.values_mut() {
            w.waiting = false;
        }
    }

    fn check_done(&mut self) {
        if self.outcome.is_none() && self.reduces.iter().all(|t| t.committed) {
            self.finish(JobOutcome::Done);
            self.outputs.push_back(Output::JobDone);
        }
    }

    /// Hands work to waiting workers, in worker-id order.
    fn schedule(&mut self, now: Duration) {
        if self.outcome.is_some() {
            return;
        }
        let waiting: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.waiting && !w.lost)
            .map(|(id, _)| *id)
            .collect();
        for worker in waiting {
            let Some((kind, index)) = self.pick(now, worker) else {
                continue;
            };
            let tasks = match kind {
                TaskKind::Map => &mut self.maps,
                TaskKind::Reduce => &mut self.reduces,
            };
            let task = &mut tasks[index];
            let attempt = AttemptRef {
                kind,
                task: index as u32,
                attempt: task.next_attempt,
            };
            task.next_attempt += 1;
            let duplicate = !task.running.is_empty();
            task.running.insert(
                attempt.attempt,
                Running {
                    worker,
                    started: now,
                },
            );
            if let Some(w) = self.workers.get_mut(&worker) {
                w.waiting = false;
                w.running.insert(attempt);
            }
            tracing::debug!(attempt = %attempt_name(attempt), %worker, duplicate, "assigned");
            self.log.started(attempt, worker.0, now, duplicate);
            self.outputs.push_back(match kind {
                TaskKind::Map => Output::AssignMap { worker, attempt },
                TaskKind::Reduce => Output::AssignReduce {
                    worker,
                    attempt,
                    inputs: self.map_locations(),
                },
            });
        }
    }

    fn map_locations(&self) -> Vec<MapOutputLocation> {
        self.maps
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let d = t.done.as_ref()?;
                Some(MapOutputLocation {
                    map_task: i as u32,
                    attempt: d.attempt,
                    shuffle_addr: self.workers.get(&d.worker)?.shuffle_addr.clone(),
                })
            })
            .collect()
    }

    /// What `worker` should run next: a pending map, a pending reduce once all maps are done,
    /// or a duplicate of an overdue or straggling task of the current phase.
    fn pick(&self, now: Duration, worker: WorkerId) -> Option<(TaskKind, usize)> {
        if let Some(i) = self.maps.iter().position(Task::is_pending) {
            return Some((TaskKind::Map, i));
        }
        let (kind, tasks) = if self.all_maps_done() {
            if let Some(i) = self.reduces.iter().position(Task::is_pending) {
                return Some((TaskKind::Reduce, i));
            }
            (TaskKind::Reduce, &self.reduces)
        } else {
            (TaskKind::Map, &self.maps)
        };
        // Nothing left to start in this phase: consider duplicates.
        let backup_after = self.backup_threshold(tasks);
        tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                t.done.is_none()
                    && !t.running.is_empty()
                    && t.running.len() < MAX_LIVE_ATTEMPTS_PER_TASK
                    && t.running.values().all(|r| r.worker != worker)
            })
            .filter_map(|(i, t)| {
                let elapsed = now.saturating_sub(t.oldest_start()?);
                let overdue = elapsed >= self.config.task_timeout;
                let straggler = backup_after.is_some_and(|b| elapsed >= b);
                (overdue || straggler).then_some((elapsed, i))
            })
            // The longest-running first; among equals, the lowest index.
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, i)| (kind, i))
    }

    /// Running time after which a task of this phase gets a backup, if backups are on and at
    /// least one task of the phase has completed to compare with.
    fn backup_threshold(&self, tasks: &[Task]) -> Option<Duration> {
        if !self.config.backup_tasks {
            return None;
        }
        let mut done: Vec<Duration> = tasks
            .iter()
            .filter_map(|t| t.done.as_ref().map(|d| d.elapsed))
            .collect();
        if done.is_empty() {
            return None;
        }
        done.sort();
        let median = done[done.len() / 2];
        Some((median * BACKUP_SLOWDOWN_FACTOR).max(BACKUP_MIN_RUNTIME))
    }
}

/// "map 3" or "reduce 7".
pub fn task_name(attempt: AttemptRef) -> String {
    match attempt.kind {
        TaskKind::Map => format!("map {}", attempt.task),
        TaskKind::Reduce => format!("reduce {}", attempt.task),
    }
}

/// "map 3 attempt 1".
pub fn attempt_name(attempt: AttemptRef) -> String {
    format!("{} attempt {}", task_name(attempt), attempt.attempt)
}

#[cfg(test)]
mod tests;
