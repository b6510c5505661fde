//! The coordinator's status: a serializable snapshot of the job ([`JobStatus`]), rendered as an
//! HTML page at `/` and as JSON at `/status.json` by a small HTTP server (`--http ADDR`, in
//! `shoal_runtime::mr::status_http`), and written into the output directory as `_status.html`
//! and `_status.json` when the job ends — also when it is abandoned ([`JobStatus::abandoned`]).
//!
//! The rendering ([`page`]) is a pure function of a snapshot; the coordinator's state machine
//! records each attempt's start, end and outcome in an [`AttemptLog`] for the timeline.

pub mod page;

pub use page::{render_html, render_json, summarize, write_final, Summary};

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_wire::mr::{AttemptRef, TaskKind};

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// Every reduce output is committed.
    Done,
    /// A task failed `max_attempts` times.
    Failed {
        /// "map 3" or "reduce 7".
        task: String,
        /// Its last error.
        error: String,
    },
    /// The driver gave up on the job before it ended: Ctrl-C or SIGTERM, or every worker
    /// process gone.
    Abandoned {
        /// Why.
        reason: String,
    },
}

/// State of one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Waiting for a worker.
    Pending,
    /// At least one attempt is running.
    Running,
    /// A map task's winning output is available.
    Done,
    /// A reduce task's winning output is being copied into the output directory.
    Committing,
    /// A reduce task's output is in place.
    Committed,
}

/// State of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Registered, running nothing.
    Idle,
    /// Running an attempt.
    Busy,
    /// Connection closed or heartbeats stopped.
    Lost,
}

/// A running attempt of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningAttemptStatus {
    /// Attempt number.
    pub attempt: u32,
    /// Worker id.
    pub worker: u64,
    /// Running for this long, in milliseconds.
    pub elapsed_ms: u64,
}

/// One task on the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// "map" or "reduce".
    pub kind: String,
    /// Task index.
    pub index: u32,
    /// Its state.
    pub state: TaskState,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts that failed.
    pub failures: u32,
    /// Attempts running now.
    pub running: Vec<RunningAttemptStatus>,
    /// The winning attempt, once there is one.
    pub winner_attempt: Option<u32>,
    /// The worker of the winning attempt.
    pub winner_worker: Option<u64>,
    /// The last error reported.
    pub last_error: Option<String>,
    /// What it reads: a map task's file and byte range, a reduce task's partition.
    #[serde(default)]
    pub input: String,
    /// A map task's input size in bytes (its split's length).
    #[serde(default)]
    pub input_bytes: Option<u64>,
    /// Bytes the winning attempt read (map: `map.input.bytes`; reduce: `reduce.input.bytes`).
    #[serde(default)]
    pub bytes_in: Option<u64>,
    /// Bytes the winning attempt wrote (map: `map.output.file.bytes`; reduce:
    /// `reduce.output.bytes`).
    #[serde(default)]
    pub bytes_out: Option<u64>,
    /// How long the winning attempt ran, in milliseconds.
    #[serde(default)]
    pub winner_elapsed_ms: Option<u64>,
}

/// One worker on the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Worker id.
    pub id: u64,
    /// Host and pid.
    pub name: String,
    /// Its shuffle server.
    pub shuffle_addr: String,
    /// Its state.
    pub state: WorkerState,
    /// Milliseconds since anything was heard from it.
    pub last_heartbeat_ms_ago: u64,
    /// Attempts it runs now.
    pub running: Vec<String>,
    /// Attempts of it that won.
    pub attempts_won: u64,
}

/// A snapshot of the whole job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// "starting", "map", "reduce", "done", "failed" or "abandoned".
    pub phase: String,
    /// Milliseconds since the coordinator started.
    pub elapsed_ms: u64,
    /// Number of map tasks.
    pub maps_total: u32,
    /// Map tasks done.
    pub maps_done: u32,
    /// Number of reduce tasks.
    pub reduces_total: u32,
    /// Reduce outputs committed.
    pub reduces_done: u32,
    /// Every map task.
    pub maps: Vec<TaskStatus>,
    /// Every reduce task.
    pub reduces: Vec<TaskStatus>,
    /// Every worker that ever registered.
    pub workers: Vec<WorkerStatus>,
    /// Counters merged from winning attempts.
    pub counters: BTreeMap<String, u64>,
    /// How the job ended, once it has.
    pub outcome: Option<JobOutcome>,
    /// The app's name.
    #[serde(default)]
    pub app: String,
    /// The output directory.
    #[serde(default)]
    pub out_dir: String,
    /// Sum of the inputs' sizes, in bytes.
    #[serde(default)]
    pub input_bytes: u64,
    /// Every attempt started, in start order (at most [`MAX_RECORDED_ATTEMPTS`]); empty in a
    /// snapshot taken without them (`Coordinator::status_without_attempts`, what the driver
    /// publishes every tick: see `attempts_included`).
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// Attempts started beyond [`MAX_RECORDED_ATTEMPTS`], not in `attempts`.
    #[serde(default)]
    pub attempts_not_recorded: u64,
    /// Whether `attempts` holds the attempt log (false in the light snapshot published every
    /// tick for progress bars and metrics; the status page asks for a full one).
    #[serde(default = "yes")]
    pub attempts_included: bool,
}

fn yes() -> bool {
    true
}

/// What the driver knows of a job that the state machine does not: the app, the output
/// directory and each map task's input. [`JobStatus::with_job`] adds it to a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobInfo {
    /// The app's name.
    pub app: String,
    /// The output directory.
    pub out_dir: String,
    /// Sum of the inputs' sizes, in bytes.
    pub input_bytes: u64,
    /// Each map task's input (file and byte range) and its size in bytes, by task index.
    pub map_inputs: Vec<(String, u64)>,
}

/// The attempt log keeps at most this many attempts (a timeline of more would not be
/// readable; the count of the others is kept).
pub const MAX_RECORDED_ATTEMPTS: usize = 50_000;

/// How an attempt ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// Still running.
    Running,
    /// Finished first: its output is the task's.
    Won,
    /// Finished after another attempt of its task had won (a backup or duplicate race lost).
    Superseded,
    /// The app returned an error or panicked.
    Failed,
    /// A reduce attempt could not fetch a map output.
    FetchFailed,
    /// Its worker was lost (connection closed or heartbeats stopped) while it ran.
    WorkerLost,
    /// It won, but its output could not be committed into the output directory.
    CommitFailed,
}

/// One attempt on the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// "map" or "reduce".
    pub kind: String,
    /// Task index.
    pub task: u32,
    /// Attempt number.
    pub attempt: u32,
    /// Worker id.
    pub worker: u64,
    /// Started at, in milliseconds since the coordinator started.
    pub start_ms: u64,
    /// Ended at (reported or abandoned), once it has.
    pub end_ms: Option<u64>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// Started while another attempt of its task ran: a duplicate of an overdue task or a
    /// backup of a straggler.
    pub backup: bool,
    /// A winning map attempt whose output was lost later (its worker was lost or a reduce
    /// could not fetch it), so the map task ran again.
    pub output_lost: bool,
}

/// The coordinator's record of every attempt, for the timeline: bounded by
/// [`MAX_RECORDED_ATTEMPTS`].
#[derive(Debug, Clone, Default)]
pub struct AttemptLog {
    records: Vec<AttemptRecord>,
    index: BTreeMap<AttemptRef, usize>,
    not_recorded: u64,
}

impl AttemptLog {
    /// `attempt` started on `worker` at `now`; `backup` if another attempt of it runs.
    pub fn started(&mut self, attempt: AttemptRef, worker: u64, now: Duration, backup: bool) {
        if self.records.len() >= MAX_RECORDED_ATTEMPTS {
            self.not_recorded += 1;
            return;
        }
        self.index.insert(attempt, self.records.len());
        self.records.push(AttemptRecord {
            kind: kind_name(attempt.kind).into(),
            task: attempt.task,
            attempt: attempt.attempt,
            worker,
            start_ms: millis(now),
            end_ms: None,
            outcome: AttemptOutcome::Running,
            backup,
            output_lost: false,
        });
    }

    /// `attempt` ended at `now` with `outcome` (ignored if it already ended).
    pub fn ended(&mut self, attempt: AttemptRef, now: Duration, outcome: AttemptOutcome) {
        if let Some(r) = self.get_mut(attempt) {
            if r.end_ms.is_none() {
                r.end_ms = Some(millis(now));
                r.outcome = outcome;
            }
        }
    }

    /// A winning attempt's output could not be committed.
    pub fn commit_failed(&mut self, attempt: AttemptRef) {
        if let Some(r) = self.get_mut(attempt) {
            r.outcome = AttemptOutcome::CommitFailed;
        }
    }

    /// A winning map attempt's output was lost and the task runs again.
    pub fn output_lost(&mut self, attempt: AttemptRef) {
        if let Some(r) = self.get_mut(attempt) {
            r.output_lost = true;
        }
    }

    /// The attempts recorded, in start order.
    pub fn records(&self) -> &[AttemptRecord] {
        &self.records
    }

    /// Attempts started beyond the bound.
    pub fn not_recorded(&self) -> u64 {
        self.not_recorded
    }

    fn get_mut(&mut self, attempt: AttemptRef) -> Option<&mut AttemptRecord> {
        let i = *self.index.get(&attempt)?;
        self.records.get_mut(i)
    }
}

fn kind_name(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Map => "map",
        TaskKind::Reduce => "reduce",
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl JobStatus {
    /// The status before the coordinator has published any: phase "starting", nothing known.
    pub fn starting() -> JobStatus {
        JobStatus {
            phase: "starting".into(),
            elapsed_ms: 0,
            maps_total: 0,
            maps_done: 0,
            reduces_total: 0,
            reduces_done: 0,
            maps: vec![],
            reduces: vec![],
            workers: vec![],
            counters: BTreeMap::new(),
            outcome: None,
            app: String::new(),
            out_dir: String::new(),
            input_bytes: 0,
            attempts: vec![],
            attempts_not_recorded: 0,
            attempts_included: true,
        }
    }

    /// The snapshot of a job its driver gave up on (`reason`: Ctrl-C, every worker gone): phase
    /// "abandoned" with the reason as its outcome; what ran then is kept as it was.
    pub fn abandoned(mut self, reason: &str) -> JobStatus {
        self.phase = "abandoned".into();
        self.outcome = Some(JobOutcome::Abandoned {
            reason: reason.to_string(),
        });
        self
    }

    /// Adds what the driver knows (`info`) to a snapshot of the state machine: the app, the
    /// output directory and each task's input.
    pub fn with_job(mut self, info: &JobInfo) -> JobStatus {
        self.app.clone_from(&info.app);
        self.out_dir.clone_from(&info.out_dir);
        self.input_bytes = info.input_bytes;
        for t in &mut self.maps {
            if let Some((input, bytes)) = info.map_inputs.get(t.index as usize) {
                t.input.clone_from(input);
                t.input_bytes = Some(*bytes);
            }
        }
        for t in &mut self.reduces {
            t.input = format!("partition {} of every map output", t.index);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_job_says_so_and_why() {
        let s = JobStatus::starting().abandoned("interrupted (SIGINT)");
        assert_eq!(s.phase, "abandoned");
        assert_eq!(
            s.outcome,
            Some(JobOutcome::Abandoned {
                reason: "interrupted (SIGINT)".into()
            })
        );
        let html = render_html(&s);
        assert!(
            html.contains("The job was abandoned:</b> interrupted (SIGINT)"),
            "{html}"
        );
        let json: serde_json::Value = serde_json::from_str(&render_json(&s)).unwrap();
        assert_eq!(json["phase"], "abandoned");
    }
}
