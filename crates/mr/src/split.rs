//! Input splitting: cutting input files into map tasks at line boundaries (paper §3.1).
//!
//! A split owns the lines that *start* inside it. `plan_splits` aligns every boundary to a
//! line start while planning, so a split's byte range `[offset, offset + len)` holds exactly
//! its whole lines and the concatenation of a file's splits is the file. A line longer than
//! the split size makes its split longer; a file without newlines is one split.

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

/// Cuts `inputs` into splits of about `split_size_bytes` each (at least 1), in input order.
///
/// A missing or unreadable input, or a directory, is an error naming the file. An empty file
/// gets one empty split (its map still runs, as in the lab's sequential reference).
pub fn plan_splits(inputs: &[PathBuf], split_size_bytes: u64) -> anyhow::Result<Vec<InputSplit>> {
    let split_size_bytes = split_size_bytes.max(1);
    let mut splits = Vec::new();
    for path in inputs {
        let mut file =
            File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat input {}", path.display()))?;
        if meta.is_dir() {
            bail!("input {} is a directory, not a file", path.display());
        }
        let file_len = meta.len();
        if file_len == 0 {
            splits.push(InputSplit {
                path: path.clone(),
                offset: 0,
                len: 0,
            });
            continue;
        }
        let mut start = 0u64;
        while start < file_len {
            let tentative = start.saturating_add(split_size_bytes);
            let end = if tentative >= file_len {
                file_len
            } else {
                next_line_start(&mut file, path, tentative, file_len)?
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

/// Reads a split's bytes.
pub fn read_split(split: &InputSplit) -> anyhow::Result<Vec<u8>> {
    let mut file = File::open(&split.path)
        .with_context(|| format!("cannot open input {}", split.path.display()))?;
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
