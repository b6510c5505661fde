//! Helpers shared by the data-path tests (included with `mod`, not a test target itself).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use shoal_mr::app::App;
use shoal_mr::split::plan_splits;
use shoal_mr::task::{run_map_task, run_reduce_task, Counters};

/// Runs a job in process: every split through `run_map_task`, every reduce through
/// `run_reduce_task`; returns the concatenated output lines, sorted, and the counters.
pub fn run_job(
    app: &dyn App,
    inputs: &[PathBuf],
    split_bytes: u64,
    reduces: u32,
    memory_bytes: u64,
    dir: &Path,
) -> anyhow::Result<(Vec<Vec<u8>>, Counters)> {
    let splits = plan_splits(inputs, split_bytes)?;
    let mut counters = Counters::default();
    let mut per_reduce: Vec<Vec<PathBuf>> = vec![Vec::new(); reduces as usize];
    for (m, split) in splits.iter().enumerate() {
        let out = run_map_task(
            app,
            split,
            m as u32,
            reduces,
            memory_bytes,
            &dir.join("map"),
        )?;
        assert_eq!(out.partitions.len(), reduces as usize);
        counters.merge(&out.counters);
        for (r, p) in out.partitions.into_iter().enumerate() {
            per_reduce[r].push(p);
        }
    }
    let out_dir = dir.join("out");
    for (r, inputs) in per_reduce.iter().enumerate() {
        let c = run_reduce_task(
            app,
            r as u32,
            inputs,
            memory_bytes,
            &dir.join("scratch"),
            &out_dir,
        )?;
        counters.merge(&c);
    }
    let mut lines = Vec::new();
    for r in 0..reduces {
        let bytes = std::fs::read(out_dir.join(format!("mr-out-{r}")))?;
        lines.extend(split_lines(&bytes));
    }
    lines.sort();
    Ok((lines, counters))
}

/// The lines of `bytes` (without newlines).
pub fn split_lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Writes `files` (name, contents) into `dir`; returns their paths.
pub fn write_inputs(dir: &Path, files: &[(&str, &[u8])]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("create input dir");
    files
        .iter()
        .map(|(name, contents)| {
            let p = dir.join(name);
            std::fs::write(&p, contents).expect("write input");
            p
        })
        .collect()
}

/// The repository's Gutenberg books (the lab's inputs).
pub fn books() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/gutenberg");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata/gutenberg")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    v.sort();
    v
}
