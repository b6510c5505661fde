//! The map and reduce task engines: run one task on local files.
//!
//! **Map** (`run_map_task`): read the split, call the app's map, partition each pair
//! (`App::partition`), buffer pairs in memory (or aggregate them in a hash table for the
//! native summing combiner), and when the buffer exceeds `memory_bytes`, sort it by
//! (partition, key), combine, and spill it to a file holding one sorted run per partition.
//! At the end, each partition's runs (spills plus the last buffer) are merged — combining
//! again — into one sorted partition file.
//!
//! **Reduce** (`run_reduce_task`): memory-map the task's partition files (one per map task),
//! k-way merge them with a heap, call the app's reduce once per key in byte order with the
//! values streamed from the merge, and write `mr-out-<r>` atomically (temporary name in the
//! output directory, fsync, rename, fsync the directory).
//!
//! Both engines catch panics in app code and turn them into errors naming the app and the
//! input, so a worker can report the failure and the task can be retried.
//! The file format is in [`format`].

pub mod format;
mod map;
mod reduce;
pub(crate) mod sum_table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use map::{run_map_task, run_map_task_on};
pub use reduce::{run_reduce_task, run_reduce_task_with, OutputDurability};

/// Default memory budget of one task's buffer (the caller may set another).
pub const DEFAULT_TASK_MEMORY_BYTES: u64 = 256 * 1024 * 1024;

/// Named counters of a task or job: `map.input.records` (lines, or the app's records),
/// `map.input.bytes`, `map.output.records`, `map.output.bytes` (pairs emitted by map),
/// `map.spills`, `map.spill.bytes` (written to spill files), `map.output.file.bytes` (the
/// final partition files), `combine.output.records`, `shuffle.fetched.bytes` (partition files
/// fetched from other workers), `reduce.input.bytes` (partition files merged),
/// `reduce.input.records`, `reduce.input.groups`, `reduce.output.records`,
/// `reduce.output.bytes`, and `user.<name>` for app counters. Where the time of the tasks
/// went, in milliseconds summed over tasks (a profile, not an input of any decision):
/// `map.read.ms` (reading the split), `map.run.ms` (the app's map and buffering), `map.spill.ms`
/// (sorting and writing spills), `map.finish.ms` (sorting or merging into the final partition
/// files), `shuffle.fetch.ms` (fetching partitions), `reduce.merge.ms` (merging and writing the
/// output), `reduce.fsync.ms` (fsync and rename of the output).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// Adds `delta` to counter `name` (creating it at 0).
    pub fn add(&mut self, name: &str, delta: u64) {
        match self.0.get_mut(name) {
            Some(v) => *v = v.saturating_add(delta),
            None => {
                self.0.insert(name.to_owned(), delta);
            }
        }
    }

    /// Adds every counter of `other` to this one.
    pub fn merge(&mut self, other: &Counters) {
        for (name, delta) in &other.0 {
            self.add(name, *delta);
        }
    }

    /// The value of counter `name` (0 if absent).
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }
}

/// What a map task produced.
#[derive(Clone, Debug)]
pub struct MapTaskOutput {
    /// `partitions[r]`: this map task's sorted records for reduce task `r` (a run in the
    /// [`format`]; possibly with no records). Names are unique per attempt.
    pub partitions: Vec<PathBuf>,
    /// The task's counters.
    pub counters: Counters,
}

/// The message of a caught panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// A name unique within this machine for files of one task attempt: pid and a counter.
pub(crate) fn attempt_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes a directory tree when dropped (scratch space of one task attempt).
pub(crate) struct ScratchDir(pub PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove scratch dir");
            }
        }
    }
}

/// Milliseconds since `start`, for the time counters (a profile only: task engines may read
/// the clock; no decision depends on it).
#[allow(clippy::disallowed_methods)]
pub(crate) fn stopwatch() -> std::time::Instant {
    std::time::Instant::now()
}

/// Milliseconds elapsed since `start`.
pub(crate) fn ms_since(start: std::time::Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// fsyncs a directory (after a rename into it).
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
