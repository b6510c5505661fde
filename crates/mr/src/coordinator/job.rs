//! A job before and after its run: the options, the checks made before it starts
//! ([`prepare_job`]), what it tells workers ([`PreparedJob::spec`]), how its end reads
//! ([`PreparedJob::end_result`]) and its report. Pure apart from the checks of the inputs and
//! the output directory; the drivers (`shoal_runtime::mr`, the simulator) run it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_wire::mr::{
    AppSpec, AttemptRef, JobSpec, ShippedFileSpec, SortSpec, SplitSpec, TaskKind,
};

use super::core::{task_name, CommitError, CoordinatorConfig};
use super::machine::{JobEnd, JobMachine};
use crate::app::AppConfig;
use crate::shuffle::InputFiles;
use crate::split::{plan_splits_with, InputSplit, RecordLayout};
use crate::status::JobInfo;

/// Longest interval between a worker's heartbeats.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

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
    /// The job was abandoned before it ended (Ctrl-C or SIGTERM, or every worker process
    /// gone): the driver's reason.
    #[error("job abandoned: {0}")]
    Abandoned(String),
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

pub fn describe_split(split: &InputSplit) -> String {
    format!(
        "{} bytes {}..{}",
        split.path.display(),
        split.offset,
        split.offset + split.len
    )
}

impl PreparedJob {
    /// The state machine's configuration.
    pub fn config(&self) -> CoordinatorConfig {
        let options = &self.options;
        CoordinatorConfig {
            maps: self.splits.len() as u32,
            reduces: options.reduces,
            task_timeout: options.task_timeout,
            max_attempts: options.max_attempts,
            backup_tasks: options.backup_tasks,
        }
    }

    /// What the status page shows of the job that the state machine does not know.
    pub fn info(&self) -> JobInfo {
        JobInfo {
            app: self.options.app.name.clone(),
            out_dir: self.options.out_dir.display().to_string(),
            input_bytes: self.input_bytes,
            map_inputs: self
                .splits
                .iter()
                .map(|s| (describe_split(s), s.len))
                .collect(),
        }
    }

    /// The job as workers receive it in their welcome: the app, the reduce count, the memory
    /// budget, and a heartbeat interval of a quarter of the task timeout (at most
    /// [`MAX_HEARTBEAT_INTERVAL`]).
    pub fn spec(&self) -> JobSpec {
        let options = &self.options;
        let heartbeat = (options.task_timeout / 4).min(MAX_HEARTBEAT_INTERVAL);
        JobSpec {
            job_id: self.job_id,
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
        }
    }

    /// A fresh event machine for this job.
    pub fn machine(&self) -> JobMachine {
        let splits = self
            .splits
            .iter()
            .map(|split| SplitSpec {
                path: split.path.clone(),
                offset: split.offset,
                len: split.len,
            })
            .collect();
        JobMachine::new(self.config(), self.spec(), splits)
    }

    /// How the machine's [`JobEnd`] reads as the job's result: a failed task names its input.
    pub fn end_result(&self, end: JobEnd) -> Result<(), CoordinatorError> {
        match end {
            JobEnd::Done => Ok(()),
            JobEnd::TaskFailed { attempt, error } => {
                let input = match attempt.kind {
                    TaskKind::Map => self
                        .splits
                        .get(attempt.task as usize)
                        .map_or_else(|| format!("map task {}", attempt.task), describe_split),
                    TaskKind::Reduce => format!("partition {} of every map task", attempt.task),
                };
                Err(CoordinatorError::TaskFailed {
                    task: task_name(attempt),
                    input,
                    attempts: self.options.max_attempts,
                    error,
                })
            }
            JobEnd::Aborted { error, .. } => Err(CoordinatorError::Aborted(error)),
        }
    }

    /// The `mr-out-<r>` files of a job that is done, in partition order.
    pub fn outputs(&self) -> Vec<PathBuf> {
        (0..self.options.reduces)
            .map(|r| output_path(&self.options.out_dir, r))
            .collect()
    }
}

/// Where the output of reduce task `r` is committed: `OUT/mr-out-<r>`.
pub fn output_path(out_dir: &Path, r: u32) -> PathBuf {
    out_dir.join(format!("mr-out-{r}"))
}

/// Where a winning reduce output is fetched to before it is renamed into place: a hidden name
/// (`.mr-out-…`) that no reader takes for an output, and that the next job removes.
pub fn fetched_path(out_dir: &Path, attempt: AttemptRef) -> PathBuf {
    out_dir.join(format!(".mr-out-{}-a{}.tmp", attempt.task, attempt.attempt))
}

/// Whether a file of the output directory is left over from a commit (`.mr-out-*`) or, when
/// `failed`, is an output a failed job committed (`mr-out-*`): the driver removes both at the
/// end, so that a failed job leaves no output that could be taken for a complete one.
pub fn is_leftover_output(name: &str, failed: bool) -> bool {
    name.starts_with(".mr-out-") || (failed && name.starts_with("mr-out-"))
}

/// A failure to write into the output directory: unrecoverable (the job fails at once, naming
/// the directory) when no retry can fix it, retryable otherwise.
pub fn commit_error(out_dir: &Path, e: &std::io::Error) -> CommitError {
    let text = crate::disk::describe("output directory", out_dir, "--out", e);
    if crate::disk::is_unrecoverable(e) {
        CommitError::Unrecoverable(text)
    } else {
        CommitError::Retryable(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &Path) -> PreparedJob {
        let input = dir.join("in.txt");
        std::fs::write(&input, "a b c\nd e f\n".repeat(100)).unwrap();
        prepare_job(JobOptions {
            app: AppConfig {
                name: "wordcount".into(),
                pattern: None,
                mapper: None,
                reducer: None,
                shipped: Vec::new(),
                sort: None,
            },
            inputs: vec![input],
            split_size_bytes: 500,
            reduces: 3,
            memory_bytes: 1 << 20,
            task_timeout: Duration::from_secs(8),
            max_attempts: 2,
            backup_tasks: false,
            out_dir: dir.join("out"),
        })
        .unwrap()
    }

    #[test]
    fn a_prepared_job_describes_itself_to_workers_and_the_page() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        assert_eq!(job.splits.len(), 3);
        let spec = job.spec();
        assert_eq!(spec.job_id, job.job_id);
        assert_eq!(spec.reduces, 3);
        // A quarter of the 8 s task timeout, capped at a second.
        assert_eq!(spec.heartbeat_interval_ms, 1000);
        let info = job.info();
        assert_eq!(info.map_inputs.len(), 3);
        // Splits end at a line's end: 500 bytes of 12-byte lines end at 504.
        assert!(
            info.map_inputs[1].0.ends_with("in.txt bytes 504..1008"),
            "{info:?}"
        );
        assert_eq!(info.map_inputs[1].1, 504);
        assert_eq!(job.config().maps, 3);
        let app = AppConfig::from_spec(&spec.app).unwrap();
        assert_eq!(app.name, "wordcount");
        assert!(app.sort.is_none());
        assert_eq!(
            job.outputs(),
            (0..3)
                .map(|r| dir.path().join("out").join(format!("mr-out-{r}")))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_failed_task_names_its_input_and_bad_ends_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        assert!(job.end_result(JobEnd::Done).is_ok());
        let attempt = AttemptRef {
            kind: TaskKind::Map,
            task: 2,
            attempt: 1,
        };
        let e = job
            .end_result(JobEnd::TaskFailed {
                attempt,
                error: "boom".into(),
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("map 2 (input: ") && e.contains("bytes 1008..1200") && e.contains("boom"),
            "{e}"
        );
        let reduce = AttemptRef {
            kind: TaskKind::Reduce,
            task: 1,
            attempt: 0,
        };
        let e = job
            .end_result(JobEnd::TaskFailed {
                attempt: reduce,
                error: "x".into(),
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("partition 1 of every map task"), "{e}");
        let e = job.end_result(JobEnd::Aborted {
            attempt: reduce,
            error: "full".into(),
        });
        assert!(matches!(e, Err(CoordinatorError::Aborted(m)) if m == "full"));
    }

    #[test]
    fn leftovers_of_commits_are_recognised() {
        let out = Path::new("/o");
        let a = AttemptRef {
            kind: TaskKind::Reduce,
            task: 4,
            attempt: 2,
        };
        let tmp = fetched_path(out, a);
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(is_leftover_output(name, false));
        assert!(!is_leftover_output("mr-out-4", false));
        assert!(is_leftover_output("mr-out-4", true));
        assert!(!is_leftover_output("_status.html", true));
        let full = commit_error(out, &std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(full, CommitError::Unrecoverable(m) if m.contains("/o is full")));
        let other = commit_error(out, &std::io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(other, CommitError::Retryable(_)));
    }
}
