//! The intermediate file format: sorted runs of length-prefixed records in CRC32C-checked
//! blocks.
//!
//! ```text
//! run    = MAGIC block* end
//! MAGIC  = "SHMRRUN1"                              (8 bytes)
//! block  = 'B' payload_len:u32le crc:u32le payload  (crc = CRC32C of payload_len ‖ payload)
//! end    = 'E' records:u64le blocks:u64le crc:u32le (crc = CRC32C of the 16 count bytes)
//! payload = record*,  record = varint(key_len) varint(value_len) key value
//! ```
//!
//! Keys and values are arbitrary bytes. Records are sorted by key within a run. A reader
//! checks every block's CRC before using it and the end record's counts, so corruption and
//! truncation are reported (naming the file and offset), never silently used. A map task's
//! partition file is one run; a spill file is one run per partition, back to back.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};

/// First bytes of every run.
pub const MAGIC: &[u8; 8] = b"SHMRRUN1";
/// Tag of a data block.
const TAG_BLOCK: u8 = b'B';
/// Tag of the end record.
const TAG_END: u8 = b'E';
/// A block is written once its payload reaches this size.
pub const BLOCK_TARGET_BYTES: usize = 64 * 1024;
/// Largest block payload a reader accepts (a record bigger than a block gets its own block).
pub const MAX_BLOCK_BYTES: u32 = u32::MAX - 1;
/// Bytes of the end record.
const END_BYTES: usize = 1 + 8 + 8 + 4;

/// Writes one sorted run into `W`.
pub struct RunWriter<W: Write> {
    out: W,
    block: Vec<u8>,
    records: u64,
    blocks: u64,
    bytes_written: u64,
}

impl<W: Write> RunWriter<W> {
    /// Starts a run (writes the magic).
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(MAGIC)?;
        Ok(Self {
            out,
            block: Vec::with_capacity(BLOCK_TARGET_BYTES + 1024),
            records: 0,
            blocks: 0,
            bytes_written: MAGIC.len() as u64,
        })
    }

    /// Appends one record (the caller keeps keys sorted).
    #[inline]
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        push_varint(&mut self.block, key.len() as u64);
        push_varint(&mut self.block, value.len() as u64);
        self.block.extend_from_slice(key);
        self.block.extend_from_slice(value);
        self.records += 1;
        if self.block.len() >= BLOCK_TARGET_BYTES {
            self.flush_block()?;
        }
        Ok(())
    }

    /// Records pushed so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    fn flush_block(&mut self) -> std::io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let len = u32::try_from(self.block.len())
            .ok()
            .filter(|&l| l <= MAX_BLOCK_BYTES)
            .ok_or_else(|| std::io::Error::other("record larger than 4 GiB"))?;
        let len_bytes = len.to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), &self.block);
        let mut header = [0u8; 9];
        header[0] = TAG_BLOCK;
        header[1..5].copy_from_slice(&len_bytes);
        header[5..9].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(&self.block)?;
        self.bytes_written += (header.len() + self.block.len()) as u64;
        self.blocks += 1;
        self.block.clear();
        Ok(())
    }

    /// Ends the run; returns the writer and the run's length in bytes.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        self.flush_block()?;
        let mut end = [0u8; END_BYTES];
        end[0] = TAG_END;
        end[1..9].copy_from_slice(&self.records.to_le_bytes());
        end[9..17].copy_from_slice(&self.blocks.to_le_bytes());
        let crc = crc32c::crc32c(&end[1..17]);
        end[17..21].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&end)?;
        self.bytes_written += END_BYTES as u64;
        Ok((self.out, self.bytes_written))
    }
}

#[inline]
fn push_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Decodes a varint at `buf[*pos..]`, advancing `pos`.
#[inline]
fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut n: u64 = 0;
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        if shift >= 64 {
            return None;
        }
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(n);
        }
        shift += 7;
    }
}

/// Reads one run from a byte slice (usually a memory-mapped file), checking as it goes.
pub struct RunReader<'a> {
    data: &'a [u8],
    /// Position of the next block header in `data`.
    next_block: usize,
    block: &'a [u8],
    pos_in_block: usize,
    records: u64,
    blocks: u64,
    label: &'a str,
    /// Offset of `data` in the file, for error messages.
    base_offset: u64,
    finished: bool,
}

impl<'a> RunReader<'a> {
    /// A reader of the run in `data`; `label` (the file name) and `base_offset` (where `data`
    /// starts in that file) appear in errors.
    pub fn new(data: &'a [u8], label: &'a str, base_offset: u64) -> anyhow::Result<Self> {
        if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
            bail!(
                "intermediate file {label}: bad or missing header at offset {base_offset} \
                 (not a Shoal run, or truncated)"
            );
        }
        Ok(Self {
            data,
            next_block: MAGIC.len(),
            block: &[],
            pos_in_block: 0,
            records: 0,
            blocks: 0,
            label,
            base_offset,
            finished: false,
        })
    }

    fn corrupt(&self, at: usize, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "intermediate file {} is corrupt at offset {}: {what}",
            self.label,
            self.base_offset + at as u64
        )
    }

    /// The next record, or `None` at the end of the run.
    #[inline]
    pub fn next_record(&mut self) -> anyhow::Result<Option<(&'a [u8], &'a [u8])>> {
        if self.pos_in_block >= self.block.len() && !self.load_block()? {
            return Ok(None);
        }
        let block = self.block;
        let mut pos = self.pos_in_block;
        let klen = read_varint(block, &mut pos);
        let vlen = read_varint(block, &mut pos);
        let (Some(klen), Some(vlen)) = (klen, vlen) else {
            return Err(self.corrupt(self.next_block, "bad record length"));
        };
        let end = (pos as u64)
            .checked_add(klen)
            .and_then(|e| e.checked_add(vlen))
            .filter(|&e| e <= block.len() as u64)
            .ok_or_else(|| self.corrupt(self.next_block, "record overruns its block"))?
            as usize;
        let key_end = pos + klen as usize;
        let record = (&block[pos..key_end], &block[key_end..end]);
        self.pos_in_block = end;
        self.records += 1;
        Ok(Some(record))
    }

    /// Moves to the next block; false at a verified end record.
    fn load_block(&mut self) -> anyhow::Result<bool> {
        loop {
            if self.finished {
                return Ok(false);
            }
            let at = self.next_block;
            let Some(&tag) = self.data.get(at) else {
                return Err(self.corrupt(at, "truncated (no end record)"));
            };
            match tag {
                TAG_BLOCK => {
                    let header = self
                        .data
                        .get(at + 1..at + 9)
                        .ok_or_else(|| self.corrupt(at, "truncated block header"))?;
                    let len_bytes: [u8; 4] = [header[0], header[1], header[2], header[3]];
                    let len = u32::from_le_bytes(len_bytes) as usize;
                    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
                    let payload = self
                        .data
                        .get(at + 9..at + 9 + len)
                        .ok_or_else(|| self.corrupt(at, "truncated block"))?;
                    let actual = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload);
                    if actual != crc {
                        return Err(self.corrupt(at, "block checksum mismatch"));
                    }
                    self.block = payload;
                    self.pos_in_block = 0;
                    self.next_block = at + 9 + len;
                    self.blocks += 1;
                    if !payload.is_empty() {
                        return Ok(true);
                    }
                }
                TAG_END => {
                    let end = self
                        .data
                        .get(at..at + END_BYTES)
                        .ok_or_else(|| self.corrupt(at, "truncated end record"))?;
                    let crc = u32::from_le_bytes([end[17], end[18], end[19], end[20]]);
                    if crc32c::crc32c(&end[1..17]) != crc {
                        return Err(self.corrupt(at, "end record checksum mismatch"));
                    }
                    let mut count = [0u8; 8];
                    count.copy_from_slice(&end[1..9]);
                    let records = u64::from_le_bytes(count);
                    count.copy_from_slice(&end[9..17]);
                    let blocks = u64::from_le_bytes(count);
                    if records != self.records || blocks != self.blocks {
                        return Err(self.corrupt(at, "record or block count mismatch"));
                    }
                    self.finished = true;
                    self.block = &[];
                    self.pos_in_block = 0;
                    return Ok(false);
                }
                _ => return Err(self.corrupt(at, "bad block tag")),
            }
        }
    }
}

/// A read-only memory map of a whole file (empty files map to an empty slice).
pub struct Mmap {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned; sharing `&[u8]` views across threads is sound.
unsafe impl Send for Mmap {}
// SAFETY: as above, no interior mutability.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Maps `path` read-only. The file must not be truncated while mapped (intermediate files
    /// are private to the task that reads them).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening intermediate file {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?
            .len();
        let len = usize::try_from(len).context("file too large to map")?;
        if len == 0 {
            return Ok(Self {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a fresh private read-only mapping of an open file; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {}", path.display()));
        }
        // SAFETY: advice on our own mapping; failure is harmless.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_SEQUENTIAL);
        }
        Ok(Self { ptr, len })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr/len describe a live read-only mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping the mapping created in `open`, exactly once.
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(records: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut w = RunWriter::new(Vec::new()).expect("vec write");
        for (k, v) in records {
            w.push(k, v).expect("vec write");
        }
        w.finish().expect("vec write").0
    }

    fn read_all(data: &[u8]) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut r = RunReader::new(data, "test", 0)?;
        let mut out = Vec::new();
        while let Some((k, v)) = r.next_record()? {
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    #[test]
    fn round_trips_arbitrary_bytes() {
        let big = vec![7u8; BLOCK_TARGET_BYTES * 2 + 3];
        let recs: Vec<(&[u8], &[u8])> = vec![
            (b"", b""),
            (b"a b\tc\nd", b"\x00\xff\n"),
            (b"k", &big),
            (b"z", b"last"),
        ];
        let data = write_run(&recs);
        let back = read_all(&data).expect("valid run");
        assert_eq!(back.len(), recs.len());
        for ((k, v), (k2, v2)) in recs.iter().zip(&back) {
            assert_eq!(*k, &k2[..]);
            assert_eq!(*v, &v2[..]);
        }
        assert!(read_all(&write_run(&[])).expect("empty run").is_empty());
    }

    #[test]
    fn detects_every_single_byte_corruption_and_truncation() {
        let data = write_run(&[(b"alpha", b"1"), (b"beta", b"22"), (b"gamma", b"333")]);
        for i in 0..data.len() {
            let mut bad = data.clone();
            bad[i] ^= 0x5a;
            assert!(read_all(&bad).is_err(), "flip at {i} not detected");
        }
        for len in 0..data.len() {
            assert!(
                read_all(&data[..len]).is_err(),
                "truncation to {len} not detected"
            );
        }
    }
}
