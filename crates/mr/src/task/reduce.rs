//! The reduce task engine and the k-way merge shared with the map side.

use std::collections::binary_heap::PeekMut;
use std::collections::BinaryHeap;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::format::{Mmap, RunReader};
use super::{attempt_id, ms_since, panic_message, stopwatch, sync_dir, Counters};
use crate::app::App;

/// Output file write buffer.
const OUTPUT_BUFFER_BYTES: usize = 1 << 20;

/// The current record of one input of a merge.
struct Head<'a> {
    key: &'a [u8],
    value: &'a [u8],
    source: usize,
}

impl PartialEq for Head<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.source == other.source
    }
}
impl Eq for Head<'_> {}
impl PartialOrd for Head<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head<'_> {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the smallest key first; ties go to the
    /// lower source, which keeps merges deterministic.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .key
            .cmp(self.key)
            .then_with(|| other.source.cmp(&self.source))
    }
}

/// K-way merge of sorted runs. Records borrow from the runs' bytes (memory maps), so they
/// stay valid while the merge moves on; memory is one heap entry per run.
pub(crate) struct Merger<'a> {
    readers: Vec<RunReader<'a>>,
    heap: BinaryHeap<Head<'a>>,
    /// The first read error; the merge stops at it.
    pub error: Option<anyhow::Error>,
    /// Records returned so far.
    pub records: u64,
}

impl<'a> Merger<'a> {
    /// A merge of `readers`.
    pub fn new(mut readers: Vec<RunReader<'a>>) -> anyhow::Result<Self> {
        let mut heap = BinaryHeap::with_capacity(readers.len());
        for (source, r) in readers.iter_mut().enumerate() {
            if let Some((key, value)) = r.next_record()? {
                heap.push(Head { key, value, source });
            }
        }
        Ok(Self {
            readers,
            heap,
            error: None,
            records: 0,
        })
    }

    /// The smallest key left.
    #[inline]
    pub fn peek_key(&self) -> Option<&'a [u8]> {
        self.heap.peek().map(|h| h.key)
    }

    /// Takes the next record in key order.
    #[inline]
    pub fn next_record(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let Self { readers, heap, .. } = self;
        let mut top = heap.peek_mut()?;
        let record = (top.key, top.value);
        match readers[top.source].next_record() {
            Ok(Some((key, value))) => {
                top.key = key;
                top.value = value;
            }
            Ok(None) => {
                PeekMut::pop(top);
            }
            Err(e) => {
                drop(top);
                self.heap.clear();
                self.error = Some(e);
            }
        }
        self.records += 1;
        Some(record)
    }

    /// The values of `key`, streamed from the merge.
    pub fn group(&mut self, key: &'a [u8]) -> GroupValues<'_, 'a> {
        GroupValues { merger: self, key }
    }

    /// Fails if a read error stopped the merge.
    pub fn check(&mut self) -> anyhow::Result<()> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<'a> Iterator for Merger<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record()
    }
}

/// The values of one key, streamed from a [`Merger`].
pub(crate) struct GroupValues<'m, 'a> {
    merger: &'m mut Merger<'a>,
    key: &'a [u8],
}

impl<'a> Iterator for GroupValues<'_, 'a> {
    type Item = &'a [u8];
    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.merger.peek_key()? != self.key {
            return None;
        }
        self.merger.next_record().map(|(_, v)| v)
    }
}

impl GroupValues<'_, '_> {
    /// Skips the values the app did not read.
    pub fn drain(&mut self) -> u64 {
        let mut n = 0;
        while self.next().is_some() {
            n += 1;
        }
        n
    }
}

/// Memory-maps runs and keeps their names for error messages.
pub(crate) struct MappedRuns {
    maps: Vec<Mmap>,
    labels: Vec<String>,
}

impl MappedRuns {
    /// Maps every file of `paths`.
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut labels = Vec::with_capacity(paths.len());
        for p in paths {
            maps.push(Mmap::open(p)?);
            labels.push(p.display().to_string());
        }
        Ok(Self { maps, labels })
    }

    /// A reader per file (each file holds one run).
    pub fn readers(&self) -> anyhow::Result<Vec<RunReader<'_>>> {
        self.maps
            .iter()
            .zip(&self.labels)
            .map(|(m, l)| RunReader::new(m.bytes(), l, 0))
            .collect()
    }
}

/// Whether a reduce output must survive a machine crash once written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputDurability {
    /// The output is final: fsync the file, rename, fsync the directory.
    Durable,
    /// The output is a worker's copy that the coordinator fetches and commits durably itself:
    /// written and renamed (so it is whole when served), not fsynced. A worker whose machine
    /// crashes loses its directory anyway, and the task runs again.
    Scratch,
}

/// Runs reduce task `reduce_task` over `inputs` (this partition's file from every map task,
/// local copies) and writes `out_dir/mr-out-<reduce_task>` atomically and durably.
///
/// Memory stays bounded whatever the data size: inputs are memory-mapped and merged with one
/// heap entry each, and values are streamed to the app. `memory_bytes` and `scratch_dir` are
/// accepted for callers' symmetry with the map side; the merge needs neither.
pub fn run_reduce_task(
    app: &dyn App,
    reduce_task: u32,
    inputs: &[PathBuf],
    memory_bytes: u64,
    scratch_dir: &Path,
    out_dir: &Path,
) -> anyhow::Result<Counters> {
    run_reduce_task_with(
        app,
        reduce_task,
        inputs,
        memory_bytes,
        scratch_dir,
        out_dir,
        OutputDurability::Durable,
    )
}

/// [`run_reduce_task`] with the output's durability chosen by the caller.
pub fn run_reduce_task_with(
    app: &dyn App,
    reduce_task: u32,
    inputs: &[PathBuf],
    memory_bytes: u64,
    scratch_dir: &Path,
    out_dir: &Path,
    durability: OutputDurability,
) -> anyhow::Result<Counters> {
    let _ = (memory_bytes, scratch_dir);
    let span = tracing::debug_span!("reduce", task = reduce_task, app = app.name());
    let _enter = span.enter();
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating output dir {}", out_dir.display()))?;
    let runs = MappedRuns::open(inputs)?;
    let input_bytes: u64 = runs.maps.iter().map(|m| m.bytes().len() as u64).sum();
    let mut merger = Merger::new(runs.readers()?)?;

    let final_path = out_dir.join(format!("mr-out-{reduce_task}"));
    let tmp_path = out_dir.join(format!(".mr-out-{reduce_task}.tmp-{}", attempt_id()));
    let file = std::fs::File::create(&tmp_path)
        .with_context(|| format!("creating {}", tmp_path.display()))?;
    let mut out = CountingWriter {
        inner: std::io::BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, file),
        bytes: 0,
        count_records: app.reduces_whole_task().then_some(app),
        records: 0,
    };
    let started = stopwatch();
    let result = reduce_into(app, reduce_task, &mut merger, &mut out);
    let merge_ms = ms_since(started);
    let finished = result.and_then(|mut counters| {
        let started = stopwatch();
        let bytes = out.bytes;
        let file = out
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", tmp_path.display()))?;
        if durability == OutputDurability::Durable {
            file.sync_all()
                .with_context(|| format!("fsync {}", tmp_path.display()))?;
        }
        drop(file);
        std::fs::rename(&tmp_path, &final_path)
            .with_context(|| format!("renaming to {}", final_path.display()))?;
        if durability == OutputDurability::Durable {
            sync_dir(out_dir).with_context(|| format!("fsync dir {}", out_dir.display()))?;
        }
        counters.add("reduce.output.bytes", bytes);
        counters.add("reduce.input.bytes", input_bytes);
        counters.add("reduce.merge.ms", merge_ms);
        counters.add("reduce.fsync.ms", ms_since(started));
        Ok(counters)
    });
    if finished.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    finished
}

/// Counts bytes written through it.
struct CountingWriter<'a, W: Write> {
    inner: W,
    bytes: u64,
    /// The app whose records to count (`App::output_records`), for whole-task reducers,
    /// whose records the engine does not write itself.
    count_records: Option<&'a dyn App>,
    records: u64,
}

impl<W: Write> CountingWriter<'_, W> {
    #[inline]
    fn note(&mut self, written: &[u8]) {
        self.bytes += written.len() as u64;
        if let Some(app) = self.count_records {
            self.records += app.output_records(written);
        }
    }
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.note(&buf[..n]);
        Ok(n)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(buf)?;
        self.note(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn reduce_into<W: Write + Send>(
    app: &dyn App,
    reduce_task: u32,
    merger: &mut Merger<'_>,
    out: &mut CountingWriter<'_, W>,
) -> anyhow::Result<Counters> {
    let mut counters = Counters::default();
    let app_name = app.name();
    if app.reduces_whole_task() {
        let result = catch_unwind(AssertUnwindSafe(|| {
            app.reduce_task_stream(&mut *merger, &mut *out)
        }));
        match result {
            Err(payload) => bail!(
                "app `{app_name}` panicked in reduce task {reduce_task}: {}",
                panic_message(&*payload)
            ),
            Ok(r) => {
                r.with_context(|| format!("app `{app_name}` failed in reduce task {reduce_task}"))?
            }
        }
        // Drain what the app left unread so that corruption is still noticed.
        for _ in merger.by_ref() {}
        merger.check()?;
        counters.add("reduce.input.records", merger.records);
        counters.add("reduce.output.records", out.records);
        return Ok(counters);
    }

    let mut value = Vec::new();
    let mut groups = 0u64;
    while let Some(key) = merger.peek_key() {
        value.clear();
        let mut values = merger.group(key);
        let result = catch_unwind(AssertUnwindSafe(|| {
            app.reduce(key, &mut values, &mut value)
        }));
        values.drain();
        match result {
            Err(payload) => bail!(
                "app `{app_name}` panicked in reduce task {reduce_task} at key {:?}: {}",
                String::from_utf8_lossy(key),
                panic_message(&*payload)
            ),
            Ok(r) => r.with_context(|| {
                format!(
                    "app `{app_name}` failed in reduce task {reduce_task} at key {:?}",
                    String::from_utf8_lossy(key)
                )
            })?,
        }
        merger.check()?;
        out.write_all(key)?;
        out.write_all(b" ")?;
        out.write_all(&value)?;
        out.write_all(b"\n")?;
        groups += 1;
    }
    merger.check()?;
    counters.add("reduce.input.records", merger.records);
    counters.add("reduce.input.groups", groups);
    counters.add("reduce.output.records", groups);
    Ok(counters)
}
