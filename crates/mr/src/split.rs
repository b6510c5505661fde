//! Input splitting: cutting input files into map tasks at line boundaries (paper §3.1).
//!
//! A split owns the lines that *start* inside it. `plan_splits` aligns every boundary to a
//! line start while planning, so a split's byte range `[offset, offset + len)` holds exactly
//! its whole lines and the concatenation of a file's splits is the file. A line longer than
//! the split size makes its split longer; a file without newlines is one split.
//!
//! A gzip file (name ending in `.gz`) cannot be cut (gzip is not splittable), so it is one
//! split, read whole and decompressed by its map task, as Hadoop does. A directory given as
//! input stands for the files in it ([`expand_inputs`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Bytes read at a time while looking for the end of a line at a split boundary.
const BOUNDARY_SCAN_BYTES: usize = 64 * 1024;

/// One map task's input: a byte range of a file, aligned to line starts by [`plan_splits`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InputSplit {
    /// The input file, as given by the user (also the name passed to `App::map`).
    pub path: PathBuf,
    /// First byte of the split.
    pub offset: u64,
    /// Length of the split in bytes.
    pub len: u64,
}

/// Whether `path` is read through gzip (its name ends in `.gz`, as Hadoop's codec choice).
pub fn is_gzip(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Replaces each directory in `inputs` by the files directly in it, in name order, as Hadoop's
/// `FileInputFormat` does by default: names starting with `_` or `.` (such as `_SUCCESS` and
/// editor or checksum files) are skipped, and so are subdirectories (not read recursively).
/// A directory with nothing to read is an error; files are kept as given.
pub fn expand_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::with_capacity(inputs.len());
    for input in inputs {
        let meta = std::fs::metadata(input)
            .with_context(|| format!("cannot read input {}", input.display()))?;
        if !meta.is_dir() {
            files.push(input.clone());
            continue;
        }
        let mut found = Vec::new();
        let entries = std::fs::read_dir(input)
            .with_context(|| format!("cannot list input directory {}", input.display()))?;
        for entry in entries {
            let entry = entry
                .with_context(|| format!("cannot list input directory {}", input.display()))?;
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.starts_with('_') || n.starts_with('.'))
            {
                continue;
            }
            let path = entry.path();
            // Follows symbolic links, as a file named on the command line would be.
            let is_file = std::fs::metadata(&path)
                .with_context(|| format!("cannot read input {}", path.display()))?
                .is_file();
            if is_file {
                found.push(path);
            } else {
                tracing::debug!(path = %path.display(), "not a file: skipped");
            }
        }
        if found.is_empty() {
            bail!(
                "input directory {} has no files to read (names starting with _ or . and \
                 subdirectories are skipped)",
                input.display()
            );
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// Where records end in an input, and so where a split may end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordLayout {
    /// Records are lines: splits end after a `\n`.
    Lines,
    /// Records are this many bytes each (TeraSort: 100): splits end on a multiple, and a file
    /// whose length is not a multiple is an error.
    Fixed(u64),
}

/// Cuts `inputs` into splits of about `split_size_bytes` each (at least 1), in input order.
///
/// A missing or unreadable input, or a directory, is an error naming the file. An empty file
/// gets one empty split (its map still runs, as in the lab's sequential reference).
pub fn plan_splits(inputs: &[PathBuf], split_size_bytes: u64) -> anyhow::Result<Vec<InputSplit>> {
    plan_splits_with(inputs, split_size_bytes, RecordLayout::Lines)
}

/// [`plan_splits`] for records of `layout`: with [`RecordLayout::Fixed`] every split is a
/// whole number of records (never a record cut in two), at least one record long.
pub fn plan_splits_with(
    inputs: &[PathBuf],
    split_size_bytes: u64,
    layout: RecordLayout,
) -> anyhow::Result<Vec<InputSplit>> {
    let split_size_bytes = match layout {
        RecordLayout::Lines => split_size_bytes.max(1),
        RecordLayout::Fixed(record) => {
            let record = record.max(1);
            (split_size_bytes / record).max(1) * record
        }
    };
    let mut splits = Vec::new();
    for path in inputs {
        let mut file =
            File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat input {}", path.display()))?;
        // (A directory is an error here: callers expand directories first, see
        // `expand_inputs`.)
        if meta.is_dir() {
            bail!("input {} is a directory, not a file", path.display());
        }
        let file_len = meta.len();
        if file_len == 0 || is_gzip(path) {
            splits.push(InputSplit {
                path: path.clone(),
                offset: 0,
                len: 0,
            });
            continue;
        }
        if let RecordLayout::Fixed(record) = layout {
            if !file_len.is_multiple_of(record.max(1)) {
                bail!(
                    "input {} is {file_len} bytes, not a whole number of {record}-byte records \
                     (for TeraSort data, generate it with `shoal mr gen --format terasort`; \
                     for text, use --format lines)",
                    path.display()
                );
            }
        }
        let mut start = 0u64;
        while start < file_len {
            let tentative = start.saturating_add(split_size_bytes);
            let end = if tentative >= file_len {
                file_len
            } else if layout == RecordLayout::Lines {
                next_line_start(&mut file, path, tentative, file_len)?
            } else {
                // `split_size_bytes` is a multiple of the record size.
                tentative
            };
            splits.push(InputSplit {
                path: path.clone(),
                offset: start,
                len: end - start,
            });
            start = end;
        }
    }
    Ok(splits)
}

/// The first line start at or after `pos` (> 0): one past the first `\n` at or after
/// `pos - 1`, or `file_len` if there is none.
fn next_line_start(file: &mut File, path: &Path, pos: u64, file_len: u64) -> anyhow::Result<u64> {
    let mut at = pos - 1;
    file.seek(SeekFrom::Start(at))
        .with_context(|| format!("seeking in input {}", path.display()))?;
    let mut buf = vec![0u8; BOUNDARY_SCAN_BYTES];
    while at < file_len {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading input {}", path.display()))?;
        if n == 0 {
            break;
        }
        if let Some(i) = memchr::memchr(b'\n', &buf[..n]) {
            return Ok(at + i as u64 + 1);
        }
        at += n as u64;
    }
    Ok(file_len)
}

/// The bytes a map task reads for `split` from `raw`, the file's bytes of the split's range
/// (of the whole file, for a gzip input) fetched from elsewhere: decompressed for a gzip
/// input, as [`read_split`] returns them.
pub fn decode_fetched_split(split: &InputSplit, raw: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    if !is_gzip(&split.path) {
        return Ok(raw);
    }
    let mut contents = Vec::new();
    flate2::read::MultiGzDecoder::new(&raw[..])
        .read_to_end(&mut contents)
        .with_context(|| format!("cannot decompress input {}", split.path.display()))?;
    Ok(contents)
}

/// The byte range of the file a split reads: `(offset, Some(len))`, or `(0, None)` for a
/// gzip input (read whole).
pub fn split_range(split: &InputSplit) -> (u64, Option<u64>) {
    if is_gzip(&split.path) {
        (0, None)
    } else {
        (split.offset, Some(split.len))
    }
}

/// Reads a split's bytes (decompressed, for a gzip file: its one split is the whole file).
pub fn read_split(split: &InputSplit) -> anyhow::Result<Vec<u8>> {
    let mut file = File::open(&split.path)
        .with_context(|| format!("cannot open input {}", split.path.display()))?;
    if is_gzip(&split.path) {
        if split.offset != 0 {
            bail!(
                "input {} is gzip-compressed and cannot be read from offset {}",
                split.path.display(),
                split.offset
            );
        }
        let mut contents = Vec::new();
        // Multi-member files (concatenated .gz files, as `cat a.gz b.gz` makes) are read whole.
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file))
            .read_to_end(&mut contents)
            .with_context(|| format!("cannot decompress input {}", split.path.display()))?;
        return Ok(contents);
    }
    file.seek(SeekFrom::Start(split.offset))
        .with_context(|| format!("seeking in input {}", split.path.display()))?;
    let len = usize::try_from(split.len).context("split too large for this machine")?;
    let mut contents = Vec::with_capacity(len);
    file.take(split.len)
        .read_to_end(&mut contents)
        .with_context(|| format!("reading input {}", split.path.display()))?;
    if contents.len() != len {
        bail!(
            "input {} is shorter than planned: split at offset {} wants {} bytes, got {}",
            split.path.display(),
            split.offset,
            split.len,
            contents.len()
        );
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn a_directory_stands_for_its_visible_files_and_gz_is_one_decompressed_split() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b.txt"), "two\n").unwrap();
        std::fs::write(d.join("a.txt"), "one\n").unwrap();
        std::fs::write(d.join("_SUCCESS"), "").unwrap();
        std::fs::write(d.join(".a.txt.crc"), "x").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        let text = "the quick brown fox\n".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        std::fs::write(d.join("c.txt.gz"), gz.finish().unwrap()).unwrap();

        let files = expand_inputs(&[d.to_path_buf()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.txt", "b.txt", "c.txt.gz"]);

        // A small split size cuts text files, never a gzip file.
        let splits = plan_splits(&files, 8).unwrap();
        let gz_splits: Vec<_> = splits.iter().filter(|s| is_gzip(&s.path)).collect();
        assert_eq!(gz_splits.len(), 1);
        assert_eq!(read_split(gz_splits[0]).unwrap(), text.as_bytes());

        let empty = tempfile::tempdir().unwrap();
        std::fs::write(empty.path().join("_SUCCESS"), "").unwrap();
        let err = expand_inputs(&[empty.path().to_path_buf()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("has no files to read"),
            "{err:#}"
        );
    }
}
