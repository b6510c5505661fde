//! `sort`: the paper's sort (§5.3) and Hadoop's TeraSort — every record is mapped,
//! partitioned, spilled, shuffled, merged and written, and the outputs are in total order.
//!
//! Two record formats ([`SortFormat`]):
//! - `lines`: each line is a record, ordered by its bytes (without the `\n`); each output
//!   record is the line followed by `\n` (a last line without `\n` gets one);
//! - `terasort`: fixed 100-byte records (the gensort layout), ordered by their first 10 bytes
//!   (the key); splits fall on record boundaries and outputs hold the records unchanged.
//!
//! **Total order.** Before the maps run, the coordinator samples [`SAMPLE_RECORDS`] keys
//! spread evenly over the splits ([`sample_cut_points`]), sorts them and picks R-1 cut points
//! at the quantiles, as Hadoop's `TotalOrderPartitioner` does. The sample is taken at fixed
//! positions, so a given input always gives the same cut points. Partition `i` gets the keys
//! `cut[i-1] <= k < cut[i]`, so every key of `mr-out-i` is below every key of `mr-out-(i+1)`.
//! Equal keys always go to one partition: a key that fills more than 1/R of the input makes
//! its partition larger than the others (equal cut points collapse; some partitions are then
//! empty) — the summary reports the balance (largest partition over the mean).
//!
//! The map emits (key, rest of the record); the reduce is whole-task: it writes the merged
//! records back as they came in. Equal keys keep a deterministic order (by map task, then by
//! position in the split).

use std::io::{BufRead, Write};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::app::{App, Emit};
use crate::split::{is_gzip, InputSplit, RecordLayout};

/// Bytes of a TeraSort record.
pub const TERASORT_RECORD_BYTES: usize = 100;
/// Bytes of a TeraSort key (the record's first bytes).
pub const TERASORT_KEY_BYTES: usize = 10;
/// Keys sampled over the whole input to place the cut points (Hadoop TeraSort samples 100,000
/// by default; 10,000 already puts each of 100 partitions within a few percent of the mean on
/// uniform keys, and costs one small read per sampled key).
pub const SAMPLE_RECORDS: usize = 10_000;
/// Longest cut point kept: a prefix of a long line is as good a boundary (it is not above
/// the line), and it keeps the job description small.
pub const MAX_CUT_POINT_BYTES: usize = 1024;
/// Bytes read around a sample position to find the next whole line.
const SAMPLE_WINDOW_BYTES: usize = 64 * 1024;

/// How the sort app reads records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortFormat {
    /// Each line is a record, ordered by its bytes.
    Lines,
    /// 100-byte records ordered by their first 10 bytes.
    Terasort,
}

impl SortFormat {
    /// Parses `lines` or `terasort`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "lines" => Ok(Self::Lines),
            "terasort" => Ok(Self::Terasort),
            other => bail!("unknown record format `{other}`: use --format lines or terasort"),
        }
    }

    /// The name accepted by [`SortFormat::parse`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Lines => "lines",
            Self::Terasort => "terasort",
        }
    }

    /// How inputs of this format are cut into splits.
    pub fn layout(self) -> RecordLayout {
        match self {
            Self::Lines => RecordLayout::Lines,
            Self::Terasort => RecordLayout::Fixed(TERASORT_RECORD_BYTES as u64),
        }
    }

    /// The sort key of a record (for `lines`, the line without its `\n`).
    #[inline]
    pub fn key(self, record: &[u8]) -> &[u8] {
        match self {
            Self::Lines => record,
            Self::Terasort => &record[..TERASORT_KEY_BYTES.min(record.len())],
        }
    }
}

/// The sort app's parameters (see [`crate::app::AppConfig::sort`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SortConfig {
    /// Record format.
    pub format: SortFormat,
    /// Ascending cut points of the range partitioner (empty until the coordinator sampled).
    pub cut_points: Vec<Vec<u8>>,
}

/// The sort app.
#[derive(Clone, Debug)]
pub struct Sort {
    format: SortFormat,
    partitioner: RangePartitioner,
}

impl Sort {
    /// A sort of `config.format` records partitioned at `config.cut_points`.
    pub fn new(config: &SortConfig) -> anyhow::Result<Self> {
        Ok(Self {
            format: config.format,
            partitioner: RangePartitioner::new(config.cut_points.clone())?,
        })
    }
}

/// Total-order partitioner: partition `i` holds keys in `[cut[i-1], cut[i])`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangePartitioner {
    cuts: Vec<Vec<u8>>,
}

impl RangePartitioner {
    /// A partitioner at `cuts`, which must be strictly ascending.
    pub fn new(cuts: Vec<Vec<u8>>) -> anyhow::Result<Self> {
        if let Some(i) = cuts.windows(2).position(|w| w[0] >= w[1]) {
            bail!("sort cut points are not strictly ascending (at {})", i + 1);
        }
        Ok(Self { cuts })
    }

    /// Cut points placed at the quantiles of `sample` for `partitions` partitions: duplicate
    /// cut points (a key covering more than one quantile) collapse into one, so such a key's
    /// records all go to one partition.
    pub fn from_sample(mut sample: Vec<Vec<u8>>, partitions: u32) -> Self {
        sample.sort_unstable();
        let mut cuts: Vec<Vec<u8>> = Vec::new();
        let n = sample.len();
        if n > 0 {
            for i in 1..u64::from(partitions.max(1)) {
                let at = (i * n as u64 / u64::from(partitions)) as usize;
                let mut cut = sample[at.min(n - 1)].clone();
                cut.truncate(MAX_CUT_POINT_BYTES);
                if cuts.last().is_none_or(|last| *last < cut) {
                    cuts.push(cut);
                }
            }
        }
        Self { cuts }
    }

    /// The cut points.
    pub fn cuts(&self) -> &[Vec<u8>] {
        &self.cuts
    }

    /// The partition of `key` (at most `partitions - 1`).
    #[inline]
    pub fn partition(&self, key: &[u8], partitions: u32) -> u32 {
        let p = self.cuts.partition_point(|c| c.as_slice() <= key) as u32;
        p.min(partitions.saturating_sub(1))
    }
}

impl App for Sort {
    fn name(&self) -> &str {
        "sort"
    }

    fn map(&self, name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        match self.format {
            SortFormat::Lines => {
                for line in lines(contents) {
                    emit.emit(line, b"");
                }
            }
            SortFormat::Terasort => {
                if !contents.len().is_multiple_of(TERASORT_RECORD_BYTES) {
                    bail!(
                        "{name}: a split of {} bytes is not whole {TERASORT_RECORD_BYTES}-byte \
                         records (is this TeraSort data? use --format lines for text)",
                        contents.len()
                    );
                }
                for record in contents.chunks_exact(TERASORT_RECORD_BYTES) {
                    let (key, rest) = record.split_at(TERASORT_KEY_BYTES);
                    emit.emit(key, rest);
                }
            }
        }
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        _values: &mut dyn Iterator<Item = &[u8]>,
        _out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        bail!("app `sort` reduces whole tasks")
    }

    fn partition(&self, key: &[u8], reduces: u32) -> u32 {
        self.partitioner.partition(key, reduces)
    }

    fn reduces_whole_task(&self) -> bool {
        true
    }

    fn reduce_task_stream(
        &self,
        records: &mut dyn Iterator<Item = (&[u8], &[u8])>,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<()> {
        // One write per TeraSort record: the engine counts output records per write
        // (`output_records`).
        let mut record = [0u8; TERASORT_RECORD_BYTES];
        for (key, value) in records {
            match self.format {
                SortFormat::Lines => {
                    out.write_all(key)?;
                    out.write_all(b"\n")?;
                }
                SortFormat::Terasort if key.len() + value.len() == TERASORT_RECORD_BYTES => {
                    record[..key.len()].copy_from_slice(key);
                    record[key.len()..].copy_from_slice(value);
                    out.write_all(&record)?;
                }
                SortFormat::Terasort => bail!(
                    "intermediate record of {} bytes, expected {TERASORT_RECORD_BYTES}",
                    key.len() + value.len()
                ),
            }
        }
        Ok(())
    }

    fn input_records(&self, contents: &[u8]) -> u64 {
        match self.format {
            SortFormat::Lines => lines(contents).count() as u64,
            SortFormat::Terasort => (contents.len() / TERASORT_RECORD_BYTES) as u64,
        }
    }

    fn output_records(&self, bytes: &[u8]) -> u64 {
        match self.format {
            SortFormat::Lines => memchr::memchr_iter(b'\n', bytes).count() as u64,
            SortFormat::Terasort => (bytes.len() / TERASORT_RECORD_BYTES) as u64,
        }
    }
}

/// The lines of `contents` without their `\n` (a last line without `\n` included).
pub fn lines(contents: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    let body = contents.strip_suffix(b"\n").unwrap_or(contents);
    let empty = contents.is_empty();
    body.split(|&b| b == b'\n').filter(move |_| !empty)
}

/// Samples about [`SAMPLE_RECORDS`] keys spread evenly over `splits` (the same positions for
/// the same input) and places `partitions - 1` cut points at their quantiles.
pub fn sample_cut_points(
    splits: &[InputSplit],
    format: SortFormat,
    partitions: u32,
) -> anyhow::Result<RangePartitioner> {
    let sample = sample_keys(splits, format, SAMPLE_RECORDS)?;
    tracing::debug!(
        keys = sample.len(),
        partitions,
        "sampled the input for the partitioner"
    );
    Ok(RangePartitioner::from_sample(sample, partitions))
}

/// About `wanted` keys read at evenly spaced positions of every split.
pub fn sample_keys(
    splits: &[InputSplit],
    format: SortFormat,
    wanted: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let per_split = wanted.div_ceil(splits.len().max(1)).max(1) as u64;
    let mut keys = Vec::with_capacity(wanted);
    for split in splits {
        let file = std::fs::File::open(&split.path)
            .with_context(|| format!("cannot open input {}", split.path.display()))?;
        if is_gzip(&split.path) {
            // Not seekable: the first records of the decompressed stream.
            let mut reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
            for _ in 0..per_split {
                let Some(record) = read_record(&mut reader, format)
                    .with_context(|| format!("sampling {}", split.path.display()))?
                else {
                    break;
                };
                keys.push(format.key(&record).to_vec());
            }
            continue;
        }
        match format {
            SortFormat::Terasort => {
                let records = split.len / TERASORT_RECORD_BYTES as u64;
                let n = per_split.min(records);
                let mut key = [0u8; TERASORT_KEY_BYTES];
                for i in 0..n {
                    let at = split.offset + i * records / n * TERASORT_RECORD_BYTES as u64;
                    read_exact_at(&file, &mut key, at)
                        .with_context(|| format!("sampling {}", split.path.display()))?;
                    keys.push(key.to_vec());
                }
            }
            SortFormat::Lines => {
                let n = per_split.min(split.len);
                let mut window = vec![0u8; SAMPLE_WINDOW_BYTES];
                for i in 0..n {
                    let pos = split.offset + i * split.len / n;
                    let end = split.offset + split.len;
                    if let Some(line) = line_at(&file, pos, split.offset, end, &mut window)
                        .with_context(|| format!("sampling {}", split.path.display()))?
                    {
                        keys.push(line);
                    }
                }
            }
        }
    }
    Ok(keys)
}

fn read_exact_at(file: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, at)
}

/// The first line starting at or after `pos` and before `end` (a prefix of at most the
/// window, which is enough for a cut point), or `None` if no line starts there within the
/// window.
fn line_at(
    file: &std::fs::File,
    pos: u64,
    split_start: u64,
    end: u64,
    window: &mut [u8],
) -> std::io::Result<Option<Vec<u8>>> {
    use std::os::unix::fs::FileExt;
    // Read from pos - 1 so that a line starting exactly at pos is found.
    let from = if pos == split_start { pos } else { pos - 1 };
    let want = window.len().min((end - from) as usize);
    let mut got = 0;
    while got < want {
        let n = file.read_at(&mut window[got..want], from + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let bytes = &window[..got];
    let start = if pos == split_start {
        0
    } else {
        match memchr::memchr(b'\n', bytes) {
            Some(i) => i + 1,
            None => return Ok(None),
        }
    };
    if start >= bytes.len() {
        return Ok(None);
    }
    let rest = &bytes[start..];
    let line = match memchr::memchr(b'\n', rest) {
        Some(i) => &rest[..i],
        None => rest,
    };
    Ok(Some(line[..line.len().min(MAX_CUT_POINT_BYTES)].to_vec()))
}

/// Reads the next record (`lines`: without its `\n`), `None` at the end. A partial TeraSort
/// record at the end is an error.
pub fn read_record(r: &mut impl BufRead, format: SortFormat) -> anyhow::Result<Option<Vec<u8>>> {
    let mut record = Vec::new();
    match format {
        SortFormat::Lines => {
            if r.read_until(b'\n', &mut record)? == 0 {
                return Ok(None);
            }
            if record.last() == Some(&b'\n') {
                record.pop();
            }
        }
        SortFormat::Terasort => {
            record.resize(TERASORT_RECORD_BYTES, 0);
            let mut got = 0;
            while got < record.len() {
                let n = r.read(&mut record[got..])?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got == 0 {
                return Ok(None);
            }
            if got < TERASORT_RECORD_BYTES {
                bail!("ends with a partial record of {got} bytes (TeraSort records are {TERASORT_RECORD_BYTES} bytes)");
            }
        }
    }
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lines_splits_like_a_text_reader() {
        let got: Vec<&[u8]> = lines(b"a\n\nb\nc").collect();
        assert_eq!(got, [&b"a"[..], b"", b"b", b"c"]);
        assert_eq!(lines(b"a\n").count(), 1);
        assert_eq!(lines(b"").count(), 0);
        assert_eq!(lines(b"\n").collect::<Vec<_>>(), [&b""[..]]);
    }

    #[test]
    fn equal_keys_go_to_one_partition_and_duplicate_cuts_collapse() {
        // 90% of the sample is one key: its cut points collapse, and all of it lands in one
        // partition.
        let mut sample = vec![b"mmm".to_vec(); 90];
        sample.extend((0..10u8).map(|i| vec![b'a' + i]));
        let p = RangePartitioner::from_sample(sample, 10);
        assert!(p.cuts().len() < 9, "{:?}", p.cuts());
        let target = p.partition(b"mmm", 10);
        for _ in 0..3 {
            assert_eq!(p.partition(b"mmm", 10), target);
        }
        assert!(RangePartitioner::new(vec![b"b".to_vec(), b"a".to_vec()]).is_err());
        assert_eq!(RangePartitioner::from_sample(Vec::new(), 4).cuts().len(), 0);
    }

    proptest! {
        #[test]
        fn partitions_are_monotone_and_in_range(
            sample in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..200),
            keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..200),
            partitions in 1u32..20,
        ) {
            let p = RangePartitioner::from_sample(sample, partitions);
            prop_assert!(p.cuts().len() < partitions as usize);
            let mut keys = keys;
            keys.sort();
            let mut last = 0;
            for k in &keys {
                let part = p.partition(k, partitions);
                prop_assert!(part < partitions);
                prop_assert!(part >= last, "key {:?} went to {} after {}", k, part, last);
                last = part;
            }
        }

        #[test]
        fn a_sample_of_distinct_keys_balances_its_own_keys(
            n in 50usize..400, partitions in 1u32..8,
        ) {
            let keys: Vec<Vec<u8>> = (0..n as u32).map(|i| i.to_be_bytes().to_vec()).collect();
            let p = RangePartitioner::from_sample(keys.clone(), partitions);
            let mut sizes = vec![0usize; partitions as usize];
            for k in &keys {
                sizes[p.partition(k, partitions) as usize] += 1;
            }
            let max = *sizes.iter().max().unwrap_or(&0);
            prop_assert!(max <= n / partitions as usize + 2, "{:?}", sizes);
        }

        #[test]
        fn read_record_round_trips_lines(lines_in in proptest::collection::vec("[a-z ]{0,8}", 0..20)) {
            let text = lines_in.iter().map(|l| format!("{l}\n")).collect::<String>();
            let mut r = std::io::BufReader::new(text.as_bytes());
            let mut back = Vec::new();
            while let Some(rec) = read_record(&mut r, SortFormat::Lines).unwrap() {
                back.push(String::from_utf8(rec).unwrap());
            }
            prop_assert_eq!(back, lines_in);
        }
    }

    #[test]
    fn terasort_reader_rejects_a_partial_record() {
        let data = [7u8; TERASORT_RECORD_BYTES + 3];
        let mut r = std::io::BufReader::new(&data[..]);
        assert!(read_record(&mut r, SortFormat::Terasort).unwrap().is_some());
        let err = read_record(&mut r, SortFormat::Terasort).unwrap_err();
        assert!(
            err.to_string().contains("partial record of 3 bytes"),
            "{err}"
        );
    }
}
