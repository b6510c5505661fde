//! The sequential reference: the whole job in one thread, no processes, no network.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::app::App;
use crate::split::plan_splits;
use crate::task::DEFAULT_TASK_MEMORY_BYTES;
use crate::task::{attempt_id, run_map_task, run_reduce_task, Counters, ScratchDir};

/// Split size of the sequential run: files up to this size are mapped whole, like the lab's
/// `mrsequential` (apps such as `crash` see the whole file's length).
pub const SEQ_SPLIT_BYTES: u64 = 64 * 1024 * 1024;

/// Maps every input, sorts, and reduces everything into `out_file` (lines `key value`, keys
/// in byte order), with the same task engines as the distributed run and one reduce task.
/// Scratch files live in a temporary directory next to `out_file`; the output is renamed
/// into place atomically.
pub fn run_sequential(
    app: &dyn App,
    inputs: &[PathBuf],
    out_file: &Path,
) -> anyhow::Result<Counters> {
    let splits = plan_splits(inputs, SEQ_SPLIT_BYTES)?;
    let parent = match out_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = out_file
        .file_name()
        .with_context(|| format!("output {} has no file name", out_file.display()))?
        .to_string_lossy()
        .into_owned();
    let scratch = parent.join(format!(".{file_name}.seq-{}", attempt_id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let _cleanup = ScratchDir(scratch.clone());
    let mut counters = Counters::default();
    let mut partitions = Vec::with_capacity(splits.len());
    for (i, split) in splits.iter().enumerate() {
        let task = u32::try_from(i).context("too many splits")?;
        let out = run_map_task(app, split, task, 1, DEFAULT_TASK_MEMORY_BYTES, &scratch)?;
        counters.merge(&out.counters);
        partitions.extend(out.partitions);
    }
    let out_dir = scratch.join("out");
    counters.merge(&run_reduce_task(
        app,
        0,
        &partitions,
        DEFAULT_TASK_MEMORY_BYTES,
        &scratch,
        &out_dir,
    )?);
    let produced = out_dir.join("mr-out-0");
    std::fs::rename(&produced, out_file)
        .with_context(|| format!("moving output to {}", out_file.display()))?;
    Ok(counters)
}
