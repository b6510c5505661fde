//! The simulated disk: a flat, file-system-like namespace per node with precise crash
//! semantics.
//!
//! Every node owns one [`SimDisk`]. It survives crashes; only what the crash model keeps of
//! it does. The model, which `docs/simulator.md` describes in full:
//!
//! - **File data.** Writes and truncations change the file's visible content at once (the page
//!   cache) and are queued, in order, as unsynced operations on that file. `Ctx::fsync(name)`
//!   marks every operation queued so far; when the fsync completes (it takes simulated time)
//!   those operations become durable. Later operations are not covered.
//! - **Names.** Create, rename and remove change the visible namespace at once and are queued
//!   as unsynced directory operations. `Ctx::fsync_dir()` makes every directory operation
//!   queued so far durable when it completes. A new file whose data was fsynced but whose name
//!   was not is lost by a crash (strict POSIX). Rename is atomic: after a crash the
//!   destination holds either its old or its new file, never a mix.
//! - **Crash.** Unsynced operations are dropped according to [`CrashPolicy`]: all of them
//!   (power loss, the worst case), a random prefix of them per file and of the directory's
//!   (a disk that wrote back some in order), optionally tearing the first lost write at a
//!   512-byte sector boundary, or none (a process crash: the OS page cache survives).
//!   Files whose names did not survive disappear.

use std::collections::{BTreeMap, VecDeque};

use rand::Rng;

/// Size of a disk sector: a torn write keeps a prefix that ends on a multiple of this offset.
pub const SECTOR_BYTES: u64 = 512;

/// Longest file name accepted, in bytes.
pub const MAX_FILE_NAME_BYTES: usize = 255;

/// Largest file size accepted, in bytes (a guard against runaway offsets in simulation).
pub const MAX_FILE_BYTES: u64 = 1 << 32;

/// What a crash keeps of data that was written but not fsynced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CrashPolicy {
    /// Every unsynced operation is lost (power loss with no write-back at all).
    LoseUnsynced,
    /// For each file and for the directory, a uniformly random prefix of the unsynced
    /// operations survives; with `torn_write_probability` the first write that did not
    /// survive whole is torn: a prefix of it ending on a 512-byte boundary of the file survives.
    KeepRandomPrefix {
        /// Chance in `[0, 1]` of tearing the first lost write.
        torn_write_probability: f64,
    },
    /// Everything written survives (a process crash: the page cache outlives the process).
    KeepAll,
}

impl Default for CrashPolicy {
    fn default() -> Self {
        CrashPolicy::KeepRandomPrefix {
            torn_write_probability: 0.5,
        }
    }
}

/// Why a disk operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// No file has that name.
    #[error("no such file: {0:?}")]
    NotFound(String),
    /// `create` of a name that exists.
    #[error("file exists: {0:?}")]
    AlreadyExists(String),
    /// Empty, too long, or containing a NUL byte.
    #[error("invalid file name: {0:?}")]
    InvalidName(String),
    /// A write or truncate past [`MAX_FILE_BYTES`].
    #[error("file {name:?} would grow to {bytes} bytes, over the limit of {MAX_FILE_BYTES}")]
    TooLarge {
        /// The file.
        name: String,
        /// The size it would have had.
        bytes: u64,
    },
}

type Ino = u64;

#[derive(Clone, Debug)]
enum FileOp {
    Write { offset: u64, bytes: Vec<u8> },
    Truncate { len: u64 },
}

impl FileOp {
    fn apply(&self, data: &mut Vec<u8>) {
        match self {
            FileOp::Write { offset, bytes } => write_into(data, *offset, bytes),
            FileOp::Truncate { len } => data.resize(*len as usize, 0),
        }
    }
}

fn write_into(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = offset as usize;
    let end = start + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(bytes);
}

#[derive(Clone, Debug, Default)]
struct Inode {
    /// Visible content (page cache).
    data: Vec<u8>,
    /// Content that survives a crash.
    durable: Vec<u8>,
    /// Unsynced operations, oldest first, with their sequence numbers.
    ops: VecDeque<(u64, FileOp)>,
    next_op_seq: u64,
}

#[derive(Clone, Debug)]
enum DirOp {
    Link { name: String, ino: Ino },
    Rename { from: String, to: String },
    Unlink { name: String },
}

impl DirOp {
    fn apply(&self, names: &mut BTreeMap<String, Ino>) {
        match self {
            DirOp::Link { name, ino } => {
                names.insert(name.clone(), *ino);
            }
            DirOp::Rename { from, to } => {
                if let Some(ino) = names.remove(from) {
                    names.insert(to.clone(), ino);
                }
            }
            DirOp::Unlink { name } => {
                names.remove(name);
            }
        }
    }
}

/// What an in-flight fsync will make durable when it completes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SyncTarget {
    /// File data: operations of inode `ino` with sequence number below `until_seq`.
    File { ino: Ino, until_seq: u64 },
    /// Directory operations with sequence number below `until_seq`.
    Dir { until_seq: u64 },
}

/// One node's simulated disk. See the [module docs](self) for the crash model.
///
/// Reads return copies; every method is deterministic. Durability changes only through
/// fsyncs issued with [`crate::Ctx::fsync`] / [`crate::Ctx::fsync_dir`] (which take simulated
/// time), [`SimDisk::sync_all_now`] (test setup), and crashes.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    inodes: BTreeMap<Ino, Inode>,
    names: BTreeMap<String, Ino>,
    durable_names: BTreeMap<String, Ino>,
    dir_ops: VecDeque<(u64, DirOp)>,
    next_dir_seq: u64,
    next_ino: Ino,
    bytes_written: u64,
    fsyncs_completed: u64,
}

fn check_name(name: &str) -> Result<(), DiskError> {
    if name.is_empty() || name.len() > MAX_FILE_NAME_BYTES || name.contains('\0') {
        return Err(DiskError::InvalidName(name.to_string()));
    }
    Ok(())
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn ino(&self, name: &str) -> Result<Ino, DiskError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| DiskError::NotFound(name.to_string()))
    }

    fn push_dir_op(&mut self, op: DirOp) {
        let seq = self.next_dir_seq;
        self.next_dir_seq += 1;
        self.dir_ops.push_back((seq, op));
    }

    fn push_file_op(&mut self, ino: Ino, op: FileOp) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            op.apply(&mut inode.data);
            let seq = inode.next_op_seq;
            inode.next_op_seq += 1;
            inode.ops.push_back((seq, op));
        }
    }

    /// Creates an empty file. Fails if the name exists.
    pub fn create(&mut self, name: &str) -> Result<(), DiskError> {
        check_name(name)?;
        if self.names.contains_key(name) {
            return Err(DiskError::AlreadyExists(name.to_string()));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::default());
        self.names.insert(name.to_string(), ino);
        self.push_dir_op(DirOp::Link {
            name: name.to_string(),
            ino,
        });
        Ok(())
    }

    /// Creates the file if it does not exist; leaves an existing file as it is.
    pub fn open_or_create(&mut self, name: &str) -> Result<(), DiskError> {
        if self.names.contains_key(name) {
            return Ok(());
        }
        self.create(name)
    }

    /// Whether a file has this name now.
    pub fn exists(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Writes `bytes` at `offset`, zero-filling any gap past the end.
    pub fn write_at(&mut self, name: &str, offset: u64, bytes: &[u8]) -> Result<(), DiskError> {
        let ino = self.ino(name)?;
        let end = offset.saturating_add(bytes.len() as u64);
        if end > MAX_FILE_BYTES {
            return Err(DiskError::TooLarge {
                name: name.to_string(),
                bytes: end,
            });
        }
        self.bytes_written += bytes.len() as u64;
        self.push_file_op(
            ino,
            FileOp::Write {
                offset,
                bytes: bytes.to_vec(),
            },
        );
        Ok(())
    }

    /// Appends `bytes` and returns the offset they were written at.
    pub fn append(&mut self, name: &str, bytes: &[u8]) -> Result<u64, DiskError> {
        let offset = self.len(name)?;
        self.write_at(name, offset, bytes)?;
        Ok(offset)
    }

    /// Sets the file's length, cutting or zero-extending it.
    pub fn truncate(&mut self, name: &str, len: u64) -> Result<(), DiskError> {
        let ino = self.ino(name)?;
        if len > MAX_FILE_BYTES {
            return Err(DiskError::TooLarge {
                name: name.to_string(),
                bytes: len,
            });
        }
        self.push_file_op(ino, FileOp::Truncate { len });
        Ok(())
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file; none past it).
    pub fn read_at(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let data = self.data(name)?;
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(len).min(data.len());
        Ok(data[start..end].to_vec())
    }

    /// Reads the whole file.
    pub fn read_all(&self, name: &str) -> Result<Vec<u8>, DiskError> {
        Ok(self.data(name)?.to_vec())
    }

    /// Borrows the file's visible content without copying.
    pub fn data(&self, name: &str) -> Result<&[u8], DiskError> {
        let ino = self.ino(name)?;
        Ok(self
            .inodes
            .get(&ino)
            .map(|i| i.data.as_slice())
            .unwrap_or(&[]))
    }

    /// The file's visible length in bytes.
    pub fn len(&self, name: &str) -> Result<u64, DiskError> {
        Ok(self.data(name)?.len() as u64)
    }

    /// Atomically renames `from` to `to`, replacing any file named `to`.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), DiskError> {
        check_name(to)?;
        let ino = self.ino(from)?;
        if from == to {
            return Ok(());
        }
        self.names.remove(from);
        self.names.insert(to.to_string(), ino);
        self.push_dir_op(DirOp::Rename {
            from: from.to_string(),
            to: to.to_string(),
        });
        self.collect_garbage();
        Ok(())
    }

    /// Removes the name. The data goes when no surviving name refers to it.
    pub fn remove(&mut self, name: &str) -> Result<(), DiskError> {
        self.ino(name)?;
        self.names.remove(name);
        self.push_dir_op(DirOp::Unlink {
            name: name.to_string(),
        });
        self.collect_garbage();
        Ok(())
    }

    /// Every file name, in order.
    pub fn list(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    /// Every file name starting with `prefix`, in order.
    pub fn list_prefix(&self, prefix: &str) -> Vec<String> {
        self.names
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Sum of the visible lengths of all files, in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.names
            .values()
            .filter_map(|ino| self.inodes.get(ino))
            .map(|i| i.data.len() as u64)
            .sum()
    }

    /// Sum of the lengths of the files a crash with [`CrashPolicy::LoseUnsynced`] would keep:
    /// the node's persisted state size, in bytes.
    pub fn durable_bytes(&self) -> u64 {
        self.durable_names
            .values()
            .filter_map(|ino| self.inodes.get(ino))
            .map(|i| i.durable.len() as u64)
            .sum()
    }

    /// Durable length of the file that the durable namespace calls `name`, if any.
    pub fn durable_len(&self, name: &str) -> Option<u64> {
        let ino = self.durable_names.get(name)?;
        self.inodes.get(ino).map(|i| i.durable.len() as u64)
    }

    /// Whether every operation on this disk is durable.
    pub fn is_fully_synced(&self) -> bool {
        self.dir_ops.is_empty() && self.inodes.values().all(|i| i.ops.is_empty())
    }

    /// Bytes ever passed to `write_at`/`append` (a write-amplification counter).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Fsyncs (file or directory) completed on this disk.
    pub fn fsyncs_completed(&self) -> u64 {
        self.fsyncs_completed
    }

    /// Flips bits of the file's byte at `offset` (`byte ^= xor_mask`) in both its visible and
    /// its durable content: bit rot, for tests of corruption detection. Fails if the file does
    /// not exist; does nothing past the end of either content.
    pub fn corrupt(&mut self, name: &str, offset: u64, xor_mask: u8) -> Result<(), DiskError> {
        let ino = self.ino(name)?;
        if let Some(inode) = self.inodes.get_mut(&ino) {
            let at = offset as usize;
            if let Some(b) = inode.data.get_mut(at) {
                *b ^= xor_mask;
            }
            if let Some(b) = inode.durable.get_mut(at) {
                *b ^= xor_mask;
            }
        }
        Ok(())
    }

    /// Makes everything durable at once, with no simulated time (for test setup only:
    /// protocol code must use [`crate::Ctx::fsync`]).
    pub fn sync_all_now(&mut self) {
        let targets: Vec<SyncTarget> = self
            .inodes
            .iter()
            .map(|(ino, i)| SyncTarget::File {
                ino: *ino,
                until_seq: i.next_op_seq,
            })
            .chain(std::iter::once(SyncTarget::Dir {
                until_seq: self.next_dir_seq,
            }))
            .collect();
        for t in targets {
            self.complete_sync(&t);
        }
    }

    pub(crate) fn begin_file_sync(&self, name: &str) -> Result<SyncTarget, DiskError> {
        let ino = self.ino(name)?;
        let until_seq = self.inodes.get(&ino).map(|i| i.next_op_seq).unwrap_or(0);
        Ok(SyncTarget::File { ino, until_seq })
    }

    pub(crate) fn begin_dir_sync(&self) -> SyncTarget {
        SyncTarget::Dir {
            until_seq: self.next_dir_seq,
        }
    }

    pub(crate) fn complete_sync(&mut self, target: &SyncTarget) {
        self.fsyncs_completed += 1;
        match *target {
            SyncTarget::File { ino, until_seq } => {
                if let Some(inode) = self.inodes.get_mut(&ino) {
                    while inode.ops.front().is_some_and(|(seq, _)| *seq < until_seq) {
                        if let Some((_, op)) = inode.ops.pop_front() {
                            op.apply(&mut inode.durable);
                        }
                    }
                }
            }
            SyncTarget::Dir { until_seq } => {
                while self
                    .dir_ops
                    .front()
                    .is_some_and(|(seq, _)| *seq < until_seq)
                {
                    if let Some((_, op)) = self.dir_ops.pop_front() {
                        op.apply(&mut self.durable_names);
                    }
                }
                self.collect_garbage();
            }
        }
    }

    /// Applies a crash: keeps what `policy` says of unsynced operations, drawing from `rng`.
    /// Returns a short description of what was lost, for the trace.
    pub(crate) fn crash<R: Rng>(&mut self, policy: CrashPolicy, rng: &mut R) -> String {
        let mut lost_ops = 0usize;
        let mut torn = 0usize;
        // Directory first: a random prefix of namespace changes survives.
        let n = self.dir_ops.len();
        let keep = keep_count(policy, n, rng);
        for (i, (_, op)) in std::mem::take(&mut self.dir_ops).into_iter().enumerate() {
            if i < keep {
                op.apply(&mut self.durable_names);
            } else {
                lost_ops += 1;
            }
        }
        self.names = self.durable_names.clone();
        for inode in self.inodes.values_mut() {
            let n = inode.ops.len();
            let keep = keep_count(policy, n, rng);
            let ops = std::mem::take(&mut inode.ops);
            for (i, (_, op)) in ops.into_iter().enumerate() {
                if i < keep {
                    op.apply(&mut inode.durable);
                    continue;
                }
                lost_ops += 1;
                if i == keep {
                    if let (
                        CrashPolicy::KeepRandomPrefix {
                            torn_write_probability,
                        },
                        FileOp::Write { offset, bytes },
                    ) = (policy, &op)
                    {
                        if crate::net::chance(rng, torn_write_probability) {
                            if let Some(cut) = torn_prefix_len(*offset, bytes.len() as u64, rng) {
                                write_into(&mut inode.durable, *offset, &bytes[..cut as usize]);
                                torn += 1;
                            }
                        }
                    }
                }
            }
            inode.data.clone_from(&inode.durable);
        }
        self.collect_garbage();
        format!("{lost_ops} unsynced ops lost, {torn} torn")
    }

    /// Drops inodes no name (visible or durable) refers to.
    fn collect_garbage(&mut self) {
        let names = &self.names;
        let durable = &self.durable_names;
        let pending_links: Vec<Ino> = self
            .dir_ops
            .iter()
            .filter_map(|(_, op)| match op {
                DirOp::Link { ino, .. } => Some(*ino),
                _ => None,
            })
            .collect();
        self.inodes.retain(|ino, _| {
            names.values().any(|i| i == ino)
                || durable.values().any(|i| i == ino)
                || pending_links.contains(ino)
        });
    }
}

/// How many of `n` unsynced operations survive a crash.
fn keep_count<R: Rng>(policy: CrashPolicy, n: usize, rng: &mut R) -> usize {
    match policy {
        CrashPolicy::LoseUnsynced => 0,
        CrashPolicy::KeepAll => n,
        CrashPolicy::KeepRandomPrefix { .. } => {
            if n == 0 {
                0
            } else {
                rng.gen_range(0..=n)
            }
        }
    }
}

/// For a write of `len` bytes at `offset`, picks how many of its bytes a tear keeps: the
/// prefix up to a random 512-byte boundary strictly inside the write. `None` if the write
/// crosses no boundary (it is then lost whole).
fn torn_prefix_len<R: Rng>(offset: u64, len: u64, rng: &mut R) -> Option<u64> {
    let end = offset + len;
    let first = (offset / SECTOR_BYTES + 1) * SECTOR_BYTES;
    if first >= end {
        return None;
    }
    let last = (end - 1) / SECTOR_BYTES * SECTOR_BYTES;
    let boundaries = (last - first) / SECTOR_BYTES + 1;
    let k = rng.gen_range(0..boundaries);
    Some(first + k * SECTOR_BYTES - offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn torn_prefix_ends_on_sector_boundary() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(torn_prefix_len(0, 512, &mut rng), None);
        assert_eq!(torn_prefix_len(100, 400, &mut rng), None);
        for _ in 0..100 {
            let cut = torn_prefix_len(100, 2000, &mut rng).unwrap_or(0);
            assert!(cut > 0 && cut < 2000);
            assert_eq!((100 + cut) % SECTOR_BYTES, 0);
        }
    }

    #[test]
    fn visible_reads_and_names() {
        let mut d = SimDisk::new();
        d.create("a").unwrap();
        assert_eq!(d.create("a"), Err(DiskError::AlreadyExists("a".into())));
        d.write_at("a", 3, b"xy").unwrap();
        assert_eq!(d.read_all("a").unwrap(), b"\0\0\0xy");
        assert_eq!(d.append("a", b"z").unwrap(), 5);
        d.truncate("a", 2).unwrap();
        assert_eq!(d.len("a").unwrap(), 2);
        d.rename("a", "b").unwrap();
        assert!(!d.exists("a"));
        assert_eq!(d.list(), vec!["b".to_string()]);
        assert_eq!(d.read_at("b", 1, 10).unwrap(), vec![0]);
        d.remove("b").unwrap();
        assert!(d.list().is_empty());
        assert_eq!(d.durable_bytes(), 0);
        assert!(matches!(d.read_all("b"), Err(DiskError::NotFound(_))));
        assert!(matches!(d.create(""), Err(DiskError::InvalidName(_))));
    }
}
