//! The map task engine: buffer, sort, combine, spill, merge.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};

use super::format::{Mmap, RunReader, RunWriter};
use super::reduce::Merger;
use super::sum_table::SumTable;
use super::{attempt_id, ms_since, panic_message, stopwatch, Counters, MapTaskOutput, ScratchDir};
use crate::app::{App, Combiner, Emit, MapInput};
use crate::apps::{parse_decimal, push_decimal};
use crate::split::{read_split, InputSplit};

/// The summing table addresses its key arena with 32-bit offsets: it spills before reaching
/// this size whatever the memory budget.
const MAX_SUM_TABLE_BYTES: usize = 1 << 31;
/// Longest key the summing table takes (well below its 32-bit lengths and offsets).
const MAX_SUM_KEY_BYTES: usize = 1 << 30;
/// Smallest buffer budget honoured (a smaller one would spill on every pair).
const MIN_MEMORY_BYTES: usize = 4 * 1024;

/// One buffered pair: its bytes live in the arena at `offset` (key then value).
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// First 8 key bytes, big-endian, zero-padded: most comparisons stop here.
    prefix: u64,
    offset: usize,
    partition: u32,
    key_len: u32,
    value_len: u32,
}

#[inline]
fn key_prefix(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

/// The map output buffer for apps without the native summing combiner.
#[derive(Default)]
struct SortBuffer {
    arena: Vec<u8>,
    entries: Vec<Entry>,
}

impl SortBuffer {
    fn bytes(&self) -> usize {
        self.arena.len() + self.entries.len() * std::mem::size_of::<Entry>()
    }

    fn push(&mut self, partition: u32, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        let key_len = u32::try_from(key.len()).map_err(|_| anyhow!("key larger than 4 GiB"))?;
        let value_len =
            u32::try_from(value.len()).map_err(|_| anyhow!("value larger than 4 GiB"))?;
        self.entries.push(Entry {
            prefix: key_prefix(key),
            offset: self.arena.len(),
            partition,
            key_len,
            value_len,
        });
        self.arena.extend_from_slice(key);
        self.arena.extend_from_slice(value);
        Ok(())
    }

    fn key(&self, e: &Entry) -> &[u8] {
        &self.arena[e.offset..e.offset + e.key_len as usize]
    }

    fn value(&self, e: &Entry) -> &[u8] {
        let start = e.offset + e.key_len as usize;
        &self.arena[start..start + e.value_len as usize]
    }

    /// Sorts by (partition, key, emission order).
    fn sort(&mut self) {
        let arena = &self.arena;
        self.entries.sort_unstable_by(|a, b| {
            a.partition
                .cmp(&b.partition)
                .then(a.prefix.cmp(&b.prefix))
                .then_with(|| {
                    let ka = &arena[a.offset..a.offset + a.key_len as usize];
                    let kb = &arena[b.offset..b.offset + b.key_len as usize];
                    ka.cmp(kb)
                })
                .then(a.offset.cmp(&b.offset))
        });
    }

    fn clear(&mut self) {
        self.arena.clear();
        self.entries.clear();
    }
}

/// (partition, key, sum) of the summing buffer.
type SumRecord = (u32, Box<[u8]>, u64);

/// The map output buffer for [`Combiner::SumDecimal`]: key → running sum.
#[derive(Default)]
struct SumBuffer {
    sums: SumTable,
}

impl SumBuffer {
    /// True if the key was new.
    #[inline]
    fn add(&mut self, key: &[u8], n: u64) -> bool {
        self.sums.add(key, n)
    }

    fn bytes(&self) -> usize {
        self.sums.bytes()
    }

    /// Drains into (partition, key, sum) sorted by partition then key.
    fn drain_sorted(&mut self, app: &dyn App, reduces: u32) -> anyhow::Result<Vec<SumRecord>> {
        let mut out: Vec<SumRecord> = Vec::with_capacity(self.sums.len());
        let mut error = None;
        self.sums.drain(|key, sum| {
            if error.is_some() {
                return;
            }
            match checked_partition(app, key, reduces) {
                Ok(p) => out.push((p, key.into(), sum)),
                Err(e) => error = Some(e),
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        Ok(out)
    }
}

fn checked_partition(app: &dyn App, key: &[u8], reduces: u32) -> anyhow::Result<u32> {
    let p = catch_unwind(AssertUnwindSafe(|| app.partition(key, reduces))).map_err(|payload| {
        anyhow!(
            "app `{}` panicked in partition of key {:?}: {}",
            app.name(),
            String::from_utf8_lossy(key),
            panic_message(&*payload)
        )
    })?;
    if p >= reduces {
        bail!(
            "app `{}` partitioned key {:?} to {p}, but there are only {reduces} reduce tasks",
            app.name(),
            String::from_utf8_lossy(key)
        );
    }
    Ok(p)
}

/// Where sorted, partitioned records go: one spill file holding a run per partition, or one
/// final file per partition.
struct PartitionedOut {
    reduces: u32,
    /// Partition of `writer`.
    partition: u32,
    writer: Option<RunWriter<File>>,
    kind: OutKind,
    /// Records written.
    records: u64,
    /// Bytes written (every partition's run).
    bytes: u64,
}

enum OutKind {
    /// Runs back to back in one file: `segments[r] = (offset, len)`.
    Spill {
        path: PathBuf,
        file: Option<File>,
        position: u64,
        segments: Vec<(u64, u64)>,
    },
    /// `paths[r]` (temporary names until `finish` renames them to `finals[r]`).
    Final {
        temps: Vec<PathBuf>,
        finals: Vec<PathBuf>,
    },
}

impl PartitionedOut {
    fn spill(path: PathBuf, reduces: u32) -> anyhow::Result<Self> {
        let file =
            File::create(&path).with_context(|| format!("creating spill {}", path.display()))?;
        let mut out = Self {
            reduces,
            partition: 0,
            writer: None,
            kind: OutKind::Spill {
                path,
                file: Some(file),
                position: 0,
                segments: Vec::with_capacity(reduces as usize),
            },
            records: 0,
            bytes: 0,
        };
        out.open_partition(0)?;
        Ok(out)
    }

    fn finals(dir: &Path, map_task: u32, reduces: u32) -> anyhow::Result<Self> {
        let attempt = attempt_id();
        let finals = (0..reduces)
            .map(|r| dir.join(format!("mr-{map_task}-{r}.{attempt}")))
            .collect();
        let temps = (0..reduces)
            .map(|r| dir.join(format!(".mr-{map_task}-{r}.{attempt}.tmp")))
            .collect();
        let mut out = Self {
            reduces,
            partition: 0,
            writer: None,
            kind: OutKind::Final { temps, finals },
            records: 0,
            bytes: 0,
        };
        out.open_partition(0)?;
        Ok(out)
    }

    fn open_partition(&mut self, r: u32) -> anyhow::Result<()> {
        self.partition = r;
        let file = match &mut self.kind {
            OutKind::Spill { file, .. } => file.take().ok_or_else(|| anyhow!("spill file lost"))?,
            OutKind::Final { temps, .. } => {
                let p = &temps[r as usize];
                File::create(p).with_context(|| format!("creating {}", p.display()))?
            }
        };
        self.writer = Some(RunWriter::new(file).context("writing map output")?);
        Ok(())
    }

    fn close_partition(&mut self) -> anyhow::Result<()> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        let (file, len) = w.finish().context("writing map output")?;
        self.bytes += len;
        match &mut self.kind {
            OutKind::Spill {
                file: slot,
                position,
                segments,
                ..
            } => {
                segments.push((*position, len));
                *position += len;
                *slot = Some(file);
            }
            OutKind::Final { .. } => drop(file),
        }
        Ok(())
    }

    #[inline]
    fn push(&mut self, partition: u32, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        while self.partition != partition {
            debug_assert!(self.partition < partition, "records out of partition order");
            self.close_partition()?;
            self.open_partition(self.partition + 1)?;
        }
        self.records += 1;
        match &mut self.writer {
            Some(w) => w.push(key, value).context("writing map output"),
            None => bail!("map output writer closed"),
        }
    }

    /// Closes every partition; returns the spill (path, segments) or the final paths and
    /// their total size.
    fn finish(mut self) -> anyhow::Result<Finished> {
        loop {
            self.close_partition()?;
            if self.partition + 1 >= self.reduces {
                break;
            }
            self.open_partition(self.partition + 1)?;
        }
        match self.kind {
            OutKind::Spill { path, segments, .. } => Ok(Finished::Spill(Spill { path, segments })),
            OutKind::Final { temps, finals } => {
                for (t, f) in temps.iter().zip(&finals) {
                    std::fs::rename(t, f)
                        .with_context(|| format!("renaming {} to {}", t.display(), f.display()))?;
                }
                Ok(Finished::Final(finals, self.bytes))
            }
        }
    }
}

enum Finished {
    Spill(Spill),
    Final(Vec<PathBuf>, u64),
}

/// A spill file: one sorted run per partition.
struct Spill {
    path: PathBuf,
    segments: Vec<(u64, u64)>,
}

/// The map side's [`Emit`]: buffers, combines and spills.
struct MapSink<'a> {
    app: &'a dyn App,
    reduces: u32,
    memory_bytes: usize,
    combiner: Combiner,
    sort_buf: SortBuffer,
    sum_buf: SumBuffer,
    spills: Vec<Spill>,
    scratch: &'a Path,
    scratch_created: bool,
    /// The first error (emit cannot return one); later pairs are ignored.
    error: Option<anyhow::Error>,
    counters: Counters,
    output_records: u64,
    output_bytes: u64,
    combine_output_records: u64,
    /// Bytes written to spill files.
    spill_bytes: u64,
    /// Time spent spilling.
    spill_ms: u64,
    /// Bytes of the final partition files.
    output_file_bytes: u64,
    /// Reused buffer for combiner output.
    combined: Vec<u8>,
}

impl Emit for MapSink<'_> {
    #[inline]
    fn emit(&mut self, key: &[u8], value: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.output_records += 1;
        self.output_bytes += (key.len() + value.len()) as u64;
        let over = match self.combiner {
            Combiner::SumDecimal => {
                let n = if value == b"1" {
                    1
                } else {
                    match parse_decimal(value) {
                        Some(n) => n,
                        None => {
                            self.error = Some(anyhow!(
                                "app `{}` emitted value {:?} for key {:?}, but its summing \
                                 combiner needs an unsigned decimal integer",
                                self.app.name(),
                                String::from_utf8_lossy(value),
                                String::from_utf8_lossy(key)
                            ));
                            return;
                        }
                    }
                };
                if key.len() > MAX_SUM_KEY_BYTES {
                    self.error = Some(anyhow!(
                        "app `{}` emitted a {}-byte key; the summing combiner takes keys of \
                         at most {MAX_SUM_KEY_BYTES} bytes",
                        self.app.name(),
                        key.len()
                    ));
                    return;
                }
                // Memory only grows when a key is new.
                self.sum_buf.add(key, n)
                    && self.sum_buf.bytes() > self.memory_bytes.min(MAX_SUM_TABLE_BYTES)
            }
            Combiner::None | Combiner::Custom => {
                let pushed = checked_partition(self.app, key, self.reduces)
                    .and_then(|p| self.sort_buf.push(p, key, value));
                if let Err(e) = pushed {
                    self.error = Some(e);
                    return;
                }
                self.sort_buf.bytes() > self.memory_bytes
            }
        };
        if over {
            if let Err(e) = self.spill() {
                self.error = Some(e);
            }
        }
    }

    fn counter(&mut self, name: &str, delta: u64) {
        self.counters.add(&format!("user.{name}"), delta);
    }
}

impl MapSink<'_> {
    /// Writes the buffer, sorted and combined, into `out`.
    fn drain_into(&mut self, out: &mut PartitionedOut) -> anyhow::Result<()> {
        match self.combiner {
            Combiner::SumDecimal => {
                let mut digits = Vec::with_capacity(20);
                for (p, key, sum) in self.sum_buf.drain_sorted(self.app, self.reduces)? {
                    digits.clear();
                    push_decimal(&mut digits, sum);
                    out.push(p, &key, &digits)?;
                    self.combine_output_records += 1;
                }
            }
            Combiner::None => {
                self.sort_buf.sort();
                let buf = &self.sort_buf;
                for e in &buf.entries {
                    out.push(e.partition, buf.key(e), buf.value(e))?;
                }
                self.sort_buf.clear();
            }
            Combiner::Custom => {
                self.sort_buf.sort();
                let buf = &self.sort_buf;
                let entries = &buf.entries;
                let mut i = 0;
                while i < entries.len() {
                    let e = &entries[i];
                    let key = buf.key(e);
                    let mut j = i + 1;
                    while j < entries.len()
                        && entries[j].partition == e.partition
                        && buf.key(&entries[j]) == key
                    {
                        j += 1;
                    }
                    if j == i + 1 {
                        out.push(e.partition, key, buf.value(e))?;
                    } else {
                        let mut values = entries[i..j].iter().map(|e| buf.value(e));
                        combine(self.app, key, &mut values, &mut self.combined)?;
                        out.push(e.partition, key, &self.combined)?;
                    }
                    self.combine_output_records += 1;
                    i = j;
                }
                self.sort_buf.clear();
            }
        }
        Ok(())
    }

    fn spill(&mut self) -> anyhow::Result<()> {
        let started = stopwatch();
        let result = self.spill_now();
        self.spill_ms += ms_since(started);
        result
    }

    fn spill_now(&mut self) -> anyhow::Result<()> {
        if !self.scratch_created {
            std::fs::create_dir_all(self.scratch)
                .with_context(|| format!("creating {}", self.scratch.display()))?;
            self.scratch_created = true;
        }
        let path = self.scratch.join(format!("spill-{}", self.spills.len()));
        let mut out = PartitionedOut::spill(path, self.reduces)?;
        self.drain_into(&mut out)?;
        match out.finish()? {
            Finished::Spill(s) => {
                self.spill_bytes += s.segments.iter().map(|(_, len)| len).sum::<u64>();
                self.spills.push(s);
            }
            Finished::Final(..) => bail!("spill produced final files"),
        }
        tracing::debug!(spills = self.spills.len(), "map buffer spilled");
        Ok(())
    }

    /// Writes the final partition files.
    fn finish(&mut self, work_dir: &Path, map_task: u32) -> anyhow::Result<Vec<PathBuf>> {
        if self.spills.is_empty() {
            let mut out = PartitionedOut::finals(work_dir, map_task, self.reduces)?;
            self.drain_into(&mut out)?;
            return match out.finish()? {
                Finished::Final(paths, bytes) => {
                    self.output_file_bytes = bytes;
                    Ok(paths)
                }
                Finished::Spill(_) => bail!("final output produced a spill"),
            };
        }
        self.spill()?;
        self.counters.add("map.spills", self.spills.len() as u64);
        let maps = self
            .spills
            .iter()
            .map(|s| Mmap::open(&s.path))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let labels: Vec<String> = self
            .spills
            .iter()
            .map(|s| s.path.display().to_string())
            .collect();
        let mut out = PartitionedOut::finals(work_dir, map_task, self.reduces)?;
        // Combiner output counts what reaches the final files.
        self.combine_output_records = 0;
        for r in 0..self.reduces {
            let mut readers = Vec::with_capacity(self.spills.len());
            for ((s, m), label) in self.spills.iter().zip(&maps).zip(&labels) {
                let (offset, len) = s.segments[r as usize];
                let bytes = m
                    .bytes()
                    .get(offset as usize..(offset + len) as usize)
                    .ok_or_else(|| anyhow!("spill {label} is shorter than written"))?;
                readers.push(RunReader::new(bytes, label, offset)?);
            }
            let mut merger = Merger::new(readers)?;
            self.merge_partition(r, &mut merger, &mut out)?;
            merger.check()?;
        }
        match out.finish()? {
            Finished::Final(paths, bytes) => {
                self.output_file_bytes = bytes;
                Ok(paths)
            }
            Finished::Spill(_) => bail!("final output produced a spill"),
        }
    }

    fn merge_partition(
        &mut self,
        r: u32,
        merger: &mut Merger<'_>,
        out: &mut PartitionedOut,
    ) -> anyhow::Result<()> {
        match self.combiner {
            Combiner::None => {
                while let Some((k, v)) = merger.next_record() {
                    out.push(r, k, v)?;
                }
            }
            Combiner::SumDecimal => {
                let mut digits = Vec::with_capacity(20);
                while let Some(key) = merger.peek_key() {
                    let mut sum = 0u64;
                    for v in merger.group(key) {
                        let n = parse_decimal(v)
                            .ok_or_else(|| anyhow!("spill holds a non-decimal count"))?;
                        sum = sum.saturating_add(n);
                    }
                    digits.clear();
                    push_decimal(&mut digits, sum);
                    out.push(r, key, &digits)?;
                    self.combine_output_records += 1;
                }
            }
            Combiner::Custom => {
                while let Some(key) = merger.peek_key() {
                    let mut values = merger.group(key);
                    let result = combine(self.app, key, &mut values, &mut self.combined);
                    values.drain();
                    result?;
                    out.push(r, key, &self.combined)?;
                    self.combine_output_records += 1;
                }
            }
        }
        Ok(())
    }
}

/// Runs the app's combiner on one key, catching panics.
fn combine(
    app: &dyn App,
    key: &[u8],
    values: &mut dyn Iterator<Item = &[u8]>,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    out.clear();
    match catch_unwind(AssertUnwindSafe(|| app.combine(key, values, out))) {
        Ok(r) => r.with_context(|| {
            format!(
                "app `{}` failed in combine at key {:?}",
                app.name(),
                String::from_utf8_lossy(key)
            )
        }),
        Err(payload) => bail!(
            "app `{}` panicked in combine at key {:?}: {}",
            app.name(),
            String::from_utf8_lossy(key),
            panic_message(&*payload)
        ),
    }
}

/// Runs map task `map_task` on `split`, partitioning its output for `reduces` reduce tasks,
/// with a buffer of about `memory_bytes`; writes the partition files into `work_dir`.
pub fn run_map_task(
    app: &dyn App,
    split: &InputSplit,
    map_task: u32,
    reduces: u32,
    memory_bytes: u64,
    work_dir: &Path,
) -> anyhow::Result<MapTaskOutput> {
    run_map_task_on(app, split, None, map_task, reduces, memory_bytes, work_dir)
}

/// [`run_map_task`] on the split's bytes already in memory when `contents` is given (as
/// [`read_split`] returns them: decompressed for a gzip input), fetched from the coordinator
/// by a worker that cannot open the input; the app still sees the split's own path and offset.
pub fn run_map_task_on(
    app: &dyn App,
    split: &InputSplit,
    contents: Option<Vec<u8>>,
    map_task: u32,
    reduces: u32,
    memory_bytes: u64,
    work_dir: &Path,
) -> anyhow::Result<MapTaskOutput> {
    if reduces == 0 {
        bail!("a job needs at least one reduce task");
    }
    let span = tracing::debug_span!("map", task = map_task, app = app.name());
    let _enter = span.enter();
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating work dir {}", work_dir.display()))?;
    let started = stopwatch();
    let contents = match contents {
        Some(contents) => contents,
        None => read_split(split)?,
    };
    let read_ms = ms_since(started);
    let started = stopwatch();
    let name = split.path.to_string_lossy();
    let scratch = work_dir.join(format!(".map-{map_task}-{}", attempt_id()));
    let _cleanup = ScratchDir(scratch.clone());
    let memory_bytes = usize::try_from(memory_bytes)
        .unwrap_or(usize::MAX)
        .max(MIN_MEMORY_BYTES);
    let mut sink = MapSink {
        app,
        reduces,
        memory_bytes,
        combiner: app.combiner(),
        sort_buf: SortBuffer::default(),
        sum_buf: SumBuffer::default(),
        spills: Vec::new(),
        scratch: &scratch,
        scratch_created: false,
        error: None,
        counters: Counters::default(),
        output_records: 0,
        output_bytes: 0,
        combine_output_records: 0,
        spill_bytes: 0,
        spill_ms: 0,
        output_file_bytes: 0,
        combined: Vec::new(),
    };
    let input = MapInput {
        name: &name,
        path: &split.path,
        offset: split.offset,
        contents: &contents,
    };
    let where_ = || format!("{} at offset {}", split.path.display(), split.offset);
    match catch_unwind(AssertUnwindSafe(|| app.map_input(&input, &mut sink))) {
        Err(payload) => bail!(
            "app `{}` panicked in map of {}: {}",
            app.name(),
            where_(),
            panic_message(&*payload)
        ),
        Ok(r) => {
            r.with_context(|| format!("app `{}` failed in map of {}", app.name(), where_()))?
        }
    }
    if let Some(e) = sink.error.take() {
        return Err(e.context(format!("map of {}", where_())));
    }
    let run_ms = ms_since(started).saturating_sub(sink.spill_ms);
    let started = stopwatch();
    // (A spill from `finish` counts in map.finish.ms.)
    let spill_ms = sink.spill_ms;
    let partitions = sink.finish(work_dir, map_task)?;
    let finish_ms = ms_since(started);
    let mut counters = std::mem::take(&mut sink.counters);
    counters.add("map.input.records", app.input_records(&contents));
    counters.add("map.input.bytes", contents.len() as u64);
    counters.add("map.output.records", sink.output_records);
    counters.add("map.output.bytes", sink.output_bytes);
    counters.add("map.spill.bytes", sink.spill_bytes);
    counters.add("map.read.ms", read_ms);
    counters.add("map.run.ms", run_ms);
    counters.add("map.spill.ms", spill_ms);
    counters.add("map.finish.ms", finish_ms);
    counters.add("map.output.file.bytes", sink.output_file_bytes);
    if sink.combiner != Combiner::None {
        counters.add("combine.output.records", sink.combine_output_records);
    }
    Ok(MapTaskOutput {
        partitions,
        counters,
    })
}
