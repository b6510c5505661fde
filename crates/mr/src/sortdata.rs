//! Sort benchmark data, like gensort and valsort: [`generate`] writes records, [`validate`]
//! checks sorted output (order within and across `mr-out-*` files, record count, and an
//! order-independent checksum that must equal the input's).
//!
//! Record layouts (100 bytes each, deterministic for a given `--seed`; record `i` does not
//! depend on how many records are generated):
//!
//! ```text
//! terasort (binary, gensort's layout, no line ending):
//!   0..10   key: 10 random bytes (any value 0x00..0xff)
//!   10..12  0x00 0x11
//!   12..44  the record number, 32 upper-case hex digits
//!   44..48  0x88 0x99 0xAA 0xBB
//!   48..96  filler: hex digits, each repeated 4 times, derived from the record number
//!   96..100 0xCC 0xDD 0xEE 0xFF
//! lines (text, like `gensort -a` but ending in a plain `\n`):
//!   0..10   key: 10 random printable ASCII characters (' '..'~')
//!   10..12  two spaces
//!   12..44  the record number, 32 upper-case hex digits
//!   44..46  two spaces
//!   46..99  filler (as above)
//!   99      '\n'
//! ```
//!
//! The checksum is valsort's: the sum (128-bit, wrapping) of a CRC-32C of every record — for
//! `lines`, of the line without its `\n` — so it does not depend on the order of the records
//! or on how they are spread over files.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::apps::sort::{read_record, SortFormat, TERASORT_KEY_BYTES, TERASORT_RECORD_BYTES};

/// Bytes of a generated record, in either format.
pub const RECORD_BYTES: usize = 100;
/// Write buffer of [`generate`].
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Read buffer of [`validate`].
const READ_BUFFER_BYTES: usize = 1 << 20;

/// Record `index` of the stream seeded by `seed`, written into `out`.
pub fn record(format: SortFormat, seed: u64, index: u64, out: &mut [u8; RECORD_BYTES]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    // One small ChaCha stream per record: record i is the same whatever the count, and
    // generation can be split among threads.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let mut key = [0u8; TERASORT_KEY_BYTES];
    rng.fill_bytes(&mut key);
    let row = format!("{:032X}", u128::from(index));
    let filler = |i: usize| HEX[((index as usize).wrapping_add(i / 4)) % 16];
    match format {
        SortFormat::Terasort => {
            out[..10].copy_from_slice(&key);
            out[10..12].copy_from_slice(&[0x00, 0x11]);
            out[12..44].copy_from_slice(row.as_bytes());
            out[44..48].copy_from_slice(&[0x88, 0x99, 0xAA, 0xBB]);
            for (i, b) in out[48..96].iter_mut().enumerate() {
                *b = filler(i);
            }
            out[96..100].copy_from_slice(&[0xCC, 0xDD, 0xEE, 0xFF]);
        }
        SortFormat::Lines => {
            for (o, k) in out[..10].iter_mut().zip(key) {
                // 95 printable characters, ' ' (0x20) to '~' (0x7e).
                *o = b' ' + ((u32::from(k) * 95) >> 8) as u8;
            }
            out[10..12].copy_from_slice(b"  ");
            out[12..44].copy_from_slice(row.as_bytes());
            out[44..46].copy_from_slice(b"  ");
            for (i, b) in out[46..99].iter_mut().enumerate() {
                *b = filler(i);
            }
            out[99] = b'\n';
        }
    }
}

/// What [`generate`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Records.
    pub records: u64,
    /// Bytes.
    pub bytes: u64,
    /// The order-independent checksum (see the module docs).
    pub checksum: u128,
    /// Records whose key equals the previous record's (only counted by [`validate`]).
    pub duplicate_keys: u64,
}

/// Writes `records` records of `format` from `seed` to `out` (temporary name, fsync, rename).
pub fn generate(
    format: SortFormat,
    records: u64,
    seed: u64,
    out: &Path,
) -> anyhow::Result<Summary> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .with_context(|| format!("{} has no file name", out.display()))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let file = std::fs::File::create(&tmp).with_context(|| {
        format!(
            "cannot create {} (is the directory writable?)",
            tmp.display()
        )
    })?;
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
    let mut rec = [0u8; RECORD_BYTES];
    let mut checksum = 0u128;
    let result = (|| -> anyhow::Result<()> {
        for i in 0..records {
            record(format, seed, i, &mut rec);
            checksum = checksum.wrapping_add(u128::from(record_crc(format, &rec)));
            w.write_all(&rec)?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", tmp.display())));
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))?;
    Ok(Summary {
        records,
        bytes: records * RECORD_BYTES as u64,
        checksum,
        duplicate_keys: 0,
    })
}

/// The checksum term of one record (`lines`: without the `\n`).
fn record_crc(format: SortFormat, record: &[u8]) -> u32 {
    let body = match format {
        SortFormat::Lines => record.strip_suffix(b"\n").unwrap_or(record),
        SortFormat::Terasort => record,
    };
    crc32c::crc32c(body)
}

/// The `mr-out-<r>` files of `dir`, in partition order (numeric: mr-out-2 before mr-out-10).
pub fn output_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list output directory {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mr-out-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((index, entry.path()));
    }
    if found.is_empty() {
        bail!(
            "{} holds no mr-out-* files: is it the --out directory of a finished sort job?",
            dir.display()
        );
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// A record out of order: where it is and what it follows.
#[derive(Debug, thiserror::Error)]
#[error(
    "out of order: record {index} of {} (byte offset {offset}) has key {key}, below the \
     previous record's key {previous}",
    file.display()
)]
pub struct OutOfOrder {
    /// The file holding the record.
    pub file: PathBuf,
    /// Its byte offset in that file.
    pub offset: u64,
    /// Its index in that file (from 0).
    pub index: u64,
    /// Its key, escaped.
    pub key: String,
    /// The previous record's key, escaped.
    pub previous: String,
}

/// Reads `files` in order: count, checksum and (if `check_order`) that keys never go down,
/// within a file and from one file to the next.
pub fn scan(files: &[PathBuf], format: SortFormat, check_order: bool) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        records: 0,
        bytes: 0,
        checksum: 0,
        duplicate_keys: 0,
    };
    let mut previous: Option<Vec<u8>> = None;
    for path in files {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let mut offset = 0u64;
        let mut index = 0u64;
        loop {
            let rec = read_record(&mut r, format)
                .with_context(|| format!("reading {} at byte offset {offset}", path.display()))?;
            let Some(rec) = rec else { break };
            let len = match format {
                SortFormat::Lines => rec.len() as u64 + 1,
                SortFormat::Terasort => TERASORT_RECORD_BYTES as u64,
            };
            summary.checksum = summary
                .checksum
                .wrapping_add(u128::from(crc32c::crc32c(&rec)));
            if check_order {
                let key = format.key(&rec);
                if let Some(prev) = &previous {
                    match key.cmp(prev.as_slice()) {
                        std::cmp::Ordering::Less => {
                            return Err(OutOfOrder {
                                file: path.clone(),
                                offset,
                                index,
                                key: escape(key),
                                previous: escape(prev),
                            }
                            .into())
                        }
                        std::cmp::Ordering::Equal => summary.duplicate_keys += 1,
                        std::cmp::Ordering::Greater => {}
                    }
                }
                previous = Some(key.to_vec());
            }
            summary.records += 1;
            offset += len;
            index += 1;
        }
        // (A last line without `\n` was counted one byte long.)
        summary.bytes += std::fs::metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
    }
    Ok(summary)
}

/// Checks the sort output in `dir` (see [`scan`]); with `inputs`, also that the output holds
/// the same number of records and the same checksum as the inputs.
pub fn validate(
    dir: &Path,
    format: SortFormat,
    inputs: &[PathBuf],
) -> anyhow::Result<(Summary, Option<Summary>)> {
    let outputs = output_files(dir)?;
    let out = scan(&outputs, format, true)?;
    if inputs.is_empty() {
        return Ok((out, None));
    }
    let inputs = crate::split::expand_inputs(inputs)?;
    let input = scan(&inputs, format, false)?;
    if input.records != out.records {
        bail!(
            "record count differs: the output has {} records, the input {}",
            out.records,
            input.records
        );
    }
    if input.checksum != out.checksum {
        bail!(
            "checksum differs (same record count, {}): the output's records are not the \
             input's — output {:032x}, input {:032x}",
            out.records,
            out.checksum,
            input.checksum
        );
    }
    Ok((out, Some(input)))
}

/// A key for a message: printable ASCII as is, other bytes as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let shown: String = bytes
        .iter()
        .take(64)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if bytes.len() > 64 {
        format!("\"{shown}…\"")
    } else {
        format!("\"{shown}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_deterministic_and_laid_out_as_documented() {
        let mut a = [0u8; RECORD_BYTES];
        let mut b = [0u8; RECORD_BYTES];
        record(SortFormat::Terasort, 7, 3, &mut a);
        record(SortFormat::Terasort, 7, 3, &mut b);
        assert_eq!(a, b);
        record(SortFormat::Terasort, 7, 4, &mut b);
        assert_ne!(a[..10], b[..10]);
        assert_eq!(&a[10..12], &[0x00, 0x11]);
        assert_eq!(&a[12..44], format!("{:032X}", 3).as_bytes());
        assert_eq!(&a[96..], &[0xCC, 0xDD, 0xEE, 0xFF]);
        record(SortFormat::Lines, 7, 3, &mut a);
        assert!(a[..99].iter().all(|&c| (b' '..=b'~').contains(&c)), "{a:?}");
        assert_eq!(a[99], b'\n');
    }

    #[test]
    fn validate_finds_the_first_record_out_of_order_and_a_changed_record() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        generate(SortFormat::Lines, 50, 1, &input).unwrap();
        let mut lines: Vec<Vec<u8>> = std::fs::read(&input)
            .unwrap()
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        lines.sort();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("mr-out-0"), lines[..20].concat()).unwrap();
        std::fs::write(out.join("mr-out-1"), lines[20..].concat()).unwrap();
        let (summary, from_input) =
            validate(&out, SortFormat::Lines, std::slice::from_ref(&input)).unwrap();
        assert_eq!(summary.records, 50);
        assert_eq!(from_input.map(|s| s.checksum), Some(summary.checksum));

        // Swap two records across files: out of order in mr-out-1 at its first record.
        let mut swapped = lines.clone();
        swapped.swap(19, 20);
        std::fs::write(out.join("mr-out-0"), swapped[..20].concat()).unwrap();
        std::fs::write(out.join("mr-out-1"), swapped[20..].concat()).unwrap();
        let err = validate(&out, SortFormat::Lines, &[]).unwrap_err();
        let ooo = err
            .downcast_ref::<OutOfOrder>()
            .expect("an OutOfOrder error");
        assert!(ooo.file.ends_with("mr-out-1"), "{err}");
        assert_eq!((ooo.offset, ooo.index), (0, 0));

        // One changed byte keeps the order and count, but not the checksum.
        let mut changed = lines.clone();
        changed[49][50] ^= 1;
        std::fs::write(out.join("mr-out-0"), changed[..20].concat()).unwrap();
        std::fs::write(out.join("mr-out-1"), changed[20..].concat()).unwrap();
        let err = validate(&out, SortFormat::Lines, &[input]).unwrap_err();
        assert!(err.to_string().contains("checksum differs"), "{err}");
    }
}
