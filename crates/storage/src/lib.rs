//! Shoal's durable Raft storage (DESIGN.md §5): the log in segment files with a length and a
//! CRC32C per record, group commit, crash-safe suffix truncation and prefix compaction, hard
//! state and snapshots replaced atomically, and an identity file so a node never starts on
//! another node's or cluster's data.
//!
//! **Owns:** the on-disk format and recovery. **Must never:** report data durable before it was
//! fsynced, silently drop a record (a torn record at the very tail is the only thing truncated;
//! anything else refuses to start, naming file and offset), or depend on the Raft protocol
//! beyond the `shoal_raft::Storage` trait it implements.
//!
//! # Files (one flat directory per node)
//!
//! - `identity`: cluster id and node id, written once at creation.
//! - `hardstate`: one framed record, replaced via `*.tmp` + fsync + rename + directory fsync.
//! - `snapshot-v2` ([`SNAPSHOT_FILE`]): the snapshot, of any size, replaced the same way (its
//!   temporary file is written by [`prepare_snapshot`], possibly on another thread, and renamed
//!   by [`DurableStorage::install_prepared`]). A header record `{index, term, voters,
//!   data_len: u64, chunk_bytes: u32, chunks: u64}` followed in the same record by
//!   `{learners, voters_outgoing, auto_leave}` (postcard; the second part is absent in files
//!   of format version 2, read as "no learners, not joint"), then the data in `chunks` records whose payload
//!   is the raw bytes (not postcard): every chunk holds exactly `chunk_bytes` bytes
//!   ([`SNAPSHOT_CHUNK_BYTES`] when written, at most [`MAX_RECORD_BYTES`]) but the last, which
//!   holds the rest (`chunks = ceil(data_len / chunk_bytes)`; no chunk for empty data), and the
//!   file ends right after the last chunk. Each record has its CRC32C, so every byte is checked;
//!   a chunk of another length, a missing or extra byte, is corruption.
//! - `snapshot` ([`LEGACY_SNAPSHOT_FILE`], format of before `snapshot-v2`): the snapshot as one
//!   framed record (so at most 64 MiB). Read at open when `snapshot-v2` is absent; removed once
//!   a `snapshot-v2` is durable (if both exist, `snapshot-v2` is the newer).
//! - `*.tmp`: a replacement not yet renamed; removed at open.
//! - `seg-<seq:016>.log`: a header record `{seq, first_index}` then one record per entry, with
//!   consecutive indices. A higher `seq` supersedes lower ones from its `first_index` on: suffix
//!   truncation never rewrites a file, it starts a new segment. Recovery replays segments in
//!   `seq` order, so whatever prefix of the operations a crash keeps, the log read back is a
//!   state the log really had.
//!
//! A record is `len: u32 LE | crc32c(payload): u32 LE | payload` (postcard).

#![warn(missing_docs)]

pub mod disk;

use std::collections::{BTreeMap, BTreeSet};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shoal_raft::{
    Entry, HardState, LogIndex, NodeId, Snapshot, SnapshotMeta, StorageError as RaftStorageError,
    Term,
};

pub use disk::{Disk, DiskError, FilePin, MemDisk, StdDisk, LOCK_FILE};

/// Bytes of a record header (length + CRC32C).
pub const RECORD_HEADER_BYTES: usize = 8;
/// Largest record accepted when reading, in bytes (a corrupt length must not allocate 4 GiB),
/// but a log entry's ([`MAX_ENTRY_RECORD_BYTES`]).
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;
/// Largest log entry record, in bytes: 1 GiB, the transport's message limit. One entry may
/// carry a whole shard (a sharded group's Install of a migrated shard), so entries are not
/// held to [`MAX_RECORD_BYTES`]. A segment is read whole before its records are parsed, so a
/// corrupt length allocates nothing: it runs past the end of the file, or fails its CRC32C.
pub const MAX_ENTRY_RECORD_BYTES: usize = 1 << 30;
/// Default [`StorageConfig::max_segment_bytes`] (64 MiB).
pub const DEFAULT_MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Version of the on-disk format, in the identity file. 2: the snapshot is `snapshot-v2`
/// (chunked); 1 kept it in `snapshot` (one record). A version-1 directory is read and its
/// identity rewritten as version 2 at open, so that an older binary, which would not see
/// `snapshot-v2`, refuses the directory instead of starting without its snapshot.
/// 3: the snapshot header record carries the whole membership (learners, outgoing voters,
/// auto-leave) after the version-2 fields; a version-2 header (without it) still reads.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version [`DurableStorage::open`] reads (and upgrades).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// The snapshot file (see the crate doc's "Files").
pub const SNAPSHOT_FILE: &str = "snapshot-v2";
/// The snapshot file of the single-record format, read when [`SNAPSHOT_FILE`] is absent.
pub const LEGACY_SNAPSHOT_FILE: &str = "snapshot";
/// Data bytes per chunk record of the snapshot file (the last chunk may be shorter).
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

const IDENTITY: &str = "identity";
const HARD_STATE: &str = "hardstate";
/// Temporary name of a snapshot written by `compact` or `apply_snapshot` in the storage's own
/// thread (a prepared one is named after its index, so the two never clash).
const SNAPSHOT_TMP: &str = "snapshot-v2.tmp";

/// Errors of the storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Data on disk is damaged somewhere other than a torn tail: refuse to start.
    #[error("corrupt data in {file} at offset {offset}: {reason}")]
    Corrupt {
        /// The file.
        file: String,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The directory belongs to another node or cluster.
    #[error("data directory belongs to cluster {found_cluster} node {found_node}, not cluster {cluster} node {node}")]
    WrongIdentity {
        /// Expected cluster.
        cluster: u64,
        /// Expected node.
        node: u64,
        /// Cluster found on disk.
        found_cluster: u64,
        /// Node found on disk.
        found_node: u64,
    },
    /// The directory holds files but no identity: not a node's directory at all (a typo in a
    /// path, or a directory of something else). Nothing in it is touched.
    #[error("{dir} is not a Shoal data directory (it holds other files: {})", files_text(.files))]
    Foreign {
        /// The directory ([`Disk::location`]).
        dir: String,
        /// Some of the files found (at most [`FOREIGN_FILES_LISTED`]).
        files: Vec<String>,
    },
    /// A request the log cannot honour (e.g. an append leaving a gap).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// How many of a foreign directory's files [`Error::Foreign`] names.
pub const FOREIGN_FILES_LISTED: usize = 3;

fn files_text(files: &[String]) -> String {
    let mut text = files.join(", ");
    if files.len() >= FOREIGN_FILES_LISTED {
        text.push_str(", …");
    }
    text
}

impl Error {
    /// The error is about the directory as a whole (another process uses it, or it is not a
    /// Shoal data directory), and its message names the directory.
    pub fn is_about_directory(&self) -> bool {
        matches!(
            self,
            Error::Foreign { .. } | Error::Disk(DiskError::Locked { .. })
        )
    }
}

/// Limits of the storage.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// A segment is closed and a new one started once it exceeds this size.
    pub max_segment_bytes: u64,
    /// Keep the snapshot's data in memory (the default): `shoal_raft::Storage::snapshot`
    /// returns it whole, as the simulator needs (its messages carry snapshots whole). When
    /// `false` (the runtime, whose snapshots travel as files on a stream of their own, see
    /// `docs/raft.md`), only the snapshot's metadata is in memory: `snapshot()` returns empty
    /// data, the state machine restores from [`DurableStorage::snapshot_data`] (the file,
    /// read chunk by chunk), and a snapshot received from the leader is installed by renaming
    /// the file [`DurableStorage::stage_received_snapshot`] names into place. So neither
    /// side holds a copy of the serialized state beyond the state machine's own.
    pub snapshot_data_in_memory: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            max_segment_bytes: DEFAULT_MAX_SEGMENT_BYTES,
            snapshot_data_in_memory: true,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    format_version: u32,
    cluster_id: u64,
    node_id: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct SegmentHeader {
    seq: u64,
    first_index: LogIndex,
}

/// The first record of the snapshot file, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotHeader {
    meta: SnapshotMeta,
    data_len: u64,
    chunk_bytes: u32,
    chunks: u64,
}

/// The header record as written before membership changes (format version 2), which is still
/// its first part: `{index, term, voters, data_len, chunk_bytes, chunks}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct SnapshotHeaderV2 {
    index: LogIndex,
    term: Term,
    voters: Vec<NodeId>,
    data_len: u64,
    chunk_bytes: u32,
    chunks: u64,
}

/// The rest of the membership, after [`SnapshotHeaderV2`] in the same record (format version
/// 3). A header record without it is one of version 2: no learners, not joint.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct SnapshotHeaderMembership {
    learners: Vec<NodeId>,
    voters_outgoing: Vec<NodeId>,
    auto_leave: bool,
}

impl SnapshotHeader {
    /// The chunk size, checked against the record bound and the chunk count the header
    /// claims for its data length.
    fn chunk_bytes(&self) -> Result<u64, String> {
        let chunk_bytes = u64::from(self.chunk_bytes);
        if chunk_bytes == 0 || chunk_bytes > MAX_RECORD_BYTES as u64 {
            return Err(format!("chunk size {chunk_bytes} out of range"));
        }
        if self.chunks != self.data_len.div_ceil(chunk_bytes) {
            return Err(format!(
                "{} chunks cannot hold {} bytes in chunks of {chunk_bytes}",
                self.chunks, self.data_len
            ));
        }
        Ok(chunk_bytes)
    }

    /// The record's payload: the version-2 fields, then the membership.
    fn to_record(&self) -> (SnapshotHeaderV2, SnapshotHeaderMembership) {
        let m = &self.meta;
        (
            SnapshotHeaderV2 {
                index: m.index,
                term: m.term,
                voters: m.voters.clone(),
                data_len: self.data_len,
                chunk_bytes: self.chunk_bytes,
                chunks: self.chunks,
            },
            SnapshotHeaderMembership {
                learners: m.learners.clone(),
                voters_outgoing: m.voters_outgoing.clone(),
                auto_leave: m.auto_leave,
            },
        )
    }

    /// Decodes a header record's payload of format version 3 or 2, exactly.
    fn decode(payload: &[u8]) -> Result<SnapshotHeader, String> {
        let (v2, rest) = postcard::take_from_bytes::<SnapshotHeaderV2>(payload)
            .map_err(|e| format!("undecodable header record: {e}"))?;
        let membership = if rest.is_empty() {
            SnapshotHeaderMembership {
                learners: Vec::new(),
                voters_outgoing: Vec::new(),
                auto_leave: false,
            }
        } else {
            match postcard::take_from_bytes::<SnapshotHeaderMembership>(rest) {
                Ok((m, [])) => m,
                Ok((_, rest)) => {
                    return Err(format!(
                        "{} undecoded bytes in the header record",
                        rest.len()
                    ))
                }
                Err(e) => return Err(format!("undecodable membership in the header: {e}")),
            }
        };
        Ok(SnapshotHeader {
            meta: SnapshotMeta {
                index: v2.index,
                term: v2.term,
                voters: v2.voters,
                learners: membership.learners,
                voters_outgoing: membership.voters_outgoing,
                auto_leave: membership.auto_leave,
            },
            data_len: v2.data_len,
            chunk_bytes: v2.chunk_bytes,
            chunks: v2.chunks,
        })
    }
}

/// The single-record snapshot file ([`LEGACY_SNAPSHOT_FILE`]), as it was written: its meta
/// has no membership beyond the voters.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct LegacySnapshot {
    index: LogIndex,
    term: Term,
    voters: Vec<NodeId>,
    /// (Written with `serde_bytes`, whose postcard encoding is the plain sequence's.)
    data: Vec<u8>,
}

impl From<LegacySnapshot> for Snapshot {
    fn from(s: LegacySnapshot) -> Snapshot {
        Snapshot {
            meta: SnapshotMeta {
                index: s.index,
                term: s.term,
                voters: s.voters,
                ..Default::default()
            },
            data: s.data,
        }
    }
}

/// Frames a payload as a record (at most [`MAX_ENTRY_RECORD_BYTES`], the largest record of any
/// kind; every other kind is far smaller).
pub fn encode_record<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    let payload = postcard::to_allocvec(value).expect("postcard encoding of plain data");
    assert!(payload.len() <= MAX_ENTRY_RECORD_BYTES, "record too large");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Result of reading one record at an offset.
enum ReadRecord<T> {
    Ok(T, usize),
    /// Nothing (or only zero padding) left.
    End,
    /// The record runs past the end of the data or its checksum fails: torn or corrupt.
    Bad(String),
}

fn read_record<T: DeserializeOwned>(buf: &[u8], offset: usize) -> ReadRecord<T> {
    read_record_max(buf, offset, MAX_RECORD_BYTES)
}

/// A log entry's record: see [`MAX_ENTRY_RECORD_BYTES`].
fn read_entry_record(buf: &[u8], offset: usize) -> ReadRecord<Entry> {
    read_record_max(buf, offset, MAX_ENTRY_RECORD_BYTES)
}

fn read_record_max<T: DeserializeOwned>(buf: &[u8], offset: usize, max: usize) -> ReadRecord<T> {
    let rest = &buf[offset..];
    if rest.is_empty() || rest.iter().all(|&b| b == 0) {
        return ReadRecord::End;
    }
    if rest.len() < RECORD_HEADER_BYTES {
        return ReadRecord::Bad("truncated record header".into());
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len > max {
        return ReadRecord::Bad(format!("record length {len} over the limit"));
    }
    if rest.len() < RECORD_HEADER_BYTES + len {
        return ReadRecord::Bad(format!(
            "record of {len} bytes runs past the end of the file"
        ));
    }
    let payload = &rest[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len];
    if crc32c::crc32c(payload) != crc {
        return ReadRecord::Bad("checksum mismatch".into());
    }
    match postcard::from_bytes(payload) {
        Ok(v) => ReadRecord::Ok(v, RECORD_HEADER_BYTES + len),
        Err(e) => ReadRecord::Bad(format!("undecodable record: {e}")),
    }
}

/// A directory without an identity file may only be empty (or hold leftover `*.tmp` files):
/// Shoal's files without it are damage ([`Error::Corrupt`]), other files mean it is not a data
/// directory at all ([`Error::Foreign`]).
fn refuse_without_identity(disk: &impl Disk) -> Result<(), Error> {
    let names = disk.list()?;
    let ours = |n: &str| {
        n == HARD_STATE
            || n == SNAPSHOT_FILE
            || n == LEGACY_SNAPSHOT_FILE
            || parse_segment_name(n).is_some()
    };
    if names.iter().any(|n| ours(n)) {
        return Err(Error::Corrupt {
            file: IDENTITY.into(),
            offset: 0,
            reason: "missing, but the directory holds data".into(),
        });
    }
    let others: Vec<String> = names
        .into_iter()
        .filter(|n| !n.ends_with(".tmp"))
        .take(FOREIGN_FILES_LISTED)
        .collect();
    if others.is_empty() {
        Ok(())
    } else {
        Err(Error::Foreign {
            dir: disk.location(),
            files: others,
        })
    }
}

fn segment_name(seq: u64) -> String {
    format!("seg-{seq:016}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

#[derive(Debug, Clone)]
struct Segment {
    /// Index the next record appended to it must have.
    next_index: LogIndex,
    bytes: u64,
}

/// The durable log, hard state and snapshot of one node, on a [`Disk`] lent to each call
/// that writes (so a simulator can keep owning its disks; reads never touch the disk).
///
/// Writes ([`DurableStorage::append`], [`DurableStorage::set_hard_state`]) are visible at once
/// and durable after [`DurableStorage::sync`], which fsyncs every file touched since the last
/// sync (group commit). Snapshots are durable when their call returns. Entries are also kept
/// in memory (the log is bounded by snapshots), so reads never touch the disk.
pub struct DurableStorage {
    config: StorageConfig,
    hard_state: HardState,
    durable_hard_state: HardState,
    snapshot: Snapshot,
    /// `entries[0]` has index `snapshot.meta.index + 1`.
    entries: Vec<Entry>,
    /// For each entry, the seq of the segment holding it.
    entry_segment: Vec<u64>,
    /// Sum of [`entry_bytes`] over `entries`, kept up to date by every change of `entries`.
    log_bytes: u64,
    /// The legacy snapshot file exists: remove it once a new snapshot file is durable.
    legacy_snapshot: bool,
    segments: BTreeMap<u64, Segment>,
    active: u64,
    /// Files written since the last sync.
    dirty: BTreeSet<String>,
    dir_dirty: bool,
    /// Entries were dropped (truncated, compacted, replaced by a snapshot) or the log was just
    /// recovered, so some segment may hold no live entry: the next sync looks. Without it,
    /// every sync would scan the whole in-memory log (the profile of the KV server under load
    /// showed that scan as 4% of the leader's CPU).
    maybe_garbage: bool,
    /// A snapshot file received from the leader, checked and fsynced, waiting for Raft to
    /// install it ([`DurableStorage::stage_received_snapshot`]): its name and what it covers.
    staged_snapshot: Option<(String, SnapshotMeta)>,
    /// The snapshot file's data, opened and checked at open, for the state machine's restore
    /// at start ([`DurableStorage::take_opened_snapshot_data`]); without
    /// [`StorageConfig::snapshot_data_in_memory`] only.
    opened_snapshot_data: Option<SnapshotDataReader>,
}

impl DurableStorage {
    /// Opens (or initialises, if the disk is empty) the storage of `node_id` in `cluster_id`.
    /// Takes the disk's lock first ([`Disk::lock`]: another process using the directory is
    /// refused with [`DiskError::Locked`]); a directory of files that are not Shoal's is
    /// refused with [`Error::Foreign`]. Truncates a torn record at the tail of the newest segment; refuses to start on any
    /// other damage, or on a directory of another node or cluster.
    pub fn open(
        disk: &mut impl Disk,
        cluster_id: u64,
        node_id: u64,
        config: StorageConfig,
    ) -> Result<DurableStorage, Error> {
        // A stranger's directory is refused before the lock, whose file would be the first
        // thing of ours in it: it is left exactly as it was. (Read-only, so safe unlocked.)
        if disk.read(IDENTITY)?.is_none() {
            refuse_without_identity(disk)?;
        }
        // Before anything else: a second process on the directory must not even recover
        // (truncating a torn tail the first one is still writing).
        disk.lock()?;
        let want = Identity {
            format_version: FORMAT_VERSION,
            cluster_id,
            node_id,
        };
        match read_single::<Identity>(disk, IDENTITY)? {
            Some(found) => {
                if (found.cluster_id, found.node_id) != (cluster_id, node_id) {
                    return Err(Error::WrongIdentity {
                        cluster: cluster_id,
                        node: node_id,
                        found_cluster: found.cluster_id,
                        found_node: found.node_id,
                    });
                }
                if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&found.format_version) {
                    return Err(Error::Corrupt {
                        file: IDENTITY.into(),
                        offset: 0,
                        reason: format!(
                            "unknown format version {} (this build reads {OLDEST_FORMAT_VERSION} \
                             to {FORMAT_VERSION}; was it written by a newer Shoal?)",
                            found.format_version
                        ),
                    });
                }
                if found.format_version < FORMAT_VERSION {
                    write_atomic(disk, IDENTITY, &want)?;
                    tracing::info!(
                        node = node_id,
                        from = found.format_version,
                        to = FORMAT_VERSION,
                        "storage format upgraded"
                    );
                }
            }
            None => {
                refuse_without_identity(disk)?;
                write_atomic(disk, IDENTITY, &want)?;
            }
        }
        for name in disk.list()? {
            if name.ends_with(".tmp") {
                disk.remove(&name)?; // an interrupted atomic replace
            }
        }
        let hard_state = read_single::<HardState>(disk, HARD_STATE)?.unwrap_or_default();
        let mut legacy_snapshot = disk.list()?.iter().any(|n| n == LEGACY_SNAPSHOT_FILE);
        let mut dir_dirty = false;
        let in_memory = config.snapshot_data_in_memory;
        let mut opened_snapshot_data = None;
        let stored = if in_memory {
            disk.read(SNAPSHOT_FILE)?
        } else {
            None
        };
        let file_only = !in_memory && disk.list()?.iter().any(|n| n == SNAPSHOT_FILE);
        let snapshot = match stored {
            // Only the metadata stays in memory: the file is checked whole (every chunk's
            // checksum) by streaming through it, and opened again for the restore at start.
            None if file_only => {
                let meta = check_snapshot_file(&*disk, SNAPSHOT_FILE)?;
                let (_, reader) = open_snapshot_data(&*disk, SNAPSHOT_FILE)?;
                opened_snapshot_data = Some(reader);
                if legacy_snapshot {
                    disk.remove(LEGACY_SNAPSHOT_FILE)?;
                    legacy_snapshot = false;
                    dir_dirty = true;
                }
                Snapshot {
                    meta,
                    data: Vec::new(),
                }
            }
            None if !in_memory && legacy_snapshot => {
                // The old single-record file (at most 64 MiB): written once as `snapshot-v2`,
                // which is what the snapshot stream sends.
                let old = read_single::<LegacySnapshot>(disk, LEGACY_SNAPSHOT_FILE)?
                    .map(Snapshot::from)
                    .unwrap_or_default();
                let prepared = prepare_as(disk, old, SNAPSHOT_TMP.to_string())?;
                disk.rename(&prepared.tmp, SNAPSHOT_FILE)?;
                disk.sync_dir()?;
                disk.remove(LEGACY_SNAPSHOT_FILE)?;
                legacy_snapshot = false;
                dir_dirty = true;
                opened_snapshot_data = Some(open_snapshot_data(&*disk, SNAPSHOT_FILE)?.1);
                Snapshot {
                    meta: prepared.meta,
                    data: Vec::new(),
                }
            }
            Some(buf) => {
                let snapshot = decode_snapshot_file(SNAPSHOT_FILE, buf)?;
                if legacy_snapshot {
                    // Older than the new file, which a crash kept along with it.
                    disk.remove(LEGACY_SNAPSHOT_FILE)?;
                    legacy_snapshot = false;
                    dir_dirty = true;
                }
                snapshot
            }
            None if legacy_snapshot => read_single::<LegacySnapshot>(disk, LEGACY_SNAPSHOT_FILE)?
                .map(Snapshot::from)
                .unwrap_or_default(),
            None => Snapshot::default(),
        };

        let mut seqs: Vec<u64> = disk
            .list()?
            .iter()
            .filter_map(|n| parse_segment_name(n))
            .collect();
        seqs.sort_unstable();
        let mut s = DurableStorage {
            config,
            hard_state,
            durable_hard_state: hard_state,
            snapshot,
            entries: Vec::new(),
            entry_segment: Vec::new(),
            log_bytes: 0,
            legacy_snapshot,
            maybe_garbage: true,
            segments: BTreeMap::new(),
            active: 0,
            dirty: BTreeSet::new(),
            dir_dirty,
            staged_snapshot: None,
            opened_snapshot_data,
        };
        let newest = seqs.last().copied();
        // A segment is superseded from the smallest first index of any later segment on. One
        // superseded whole is skipped: its deletion may have been undone by a crash, and what
        // it holds (perhaps after a gap) no longer matters.
        let mut firsts = Vec::with_capacity(seqs.len());
        for &seq in &seqs {
            let buf = disk.read(&segment_name(seq))?.unwrap_or_default();
            firsts.push(match read_record::<SegmentHeader>(&buf, 0) {
                ReadRecord::Ok(h, _) => Some(h.first_index),
                _ => None, // replay reports it (or discards a torn newest header)
            });
        }
        for (i, &seq) in seqs.iter().enumerate() {
            let superseded_from = firsts[i + 1..].iter().flatten().min().copied();
            s.replay_segment(disk, seq, Some(seq) == newest, superseded_from)?;
        }
        if s.segments.is_empty() {
            let first = s.snapshot.meta.index.next();
            s.start_segment(disk, first)?;
            s.sync(disk)?;
        } else {
            s.active = *s.segments.keys().next_back().expect("non-empty");
        }
        tracing::info!(node = node_id, first = %s.first(), last = %s.last(),
            term = %s.hard_state.term, "storage opened");
        Ok(s)
    }

    fn first(&self) -> LogIndex {
        self.snapshot.meta.index.next()
    }

    fn last(&self) -> LogIndex {
        LogIndex(self.snapshot.meta.index.0 + self.entries.len() as u64)
    }

    fn replay_segment(
        &mut self,
        disk: &mut impl Disk,
        seq: u64,
        newest: bool,
        superseded_from: Option<LogIndex>,
    ) -> Result<(), Error> {
        let name = segment_name(seq);
        let buf = disk.read(&name)?.unwrap_or_default();
        let corrupt = |offset: usize, reason: String| Error::Corrupt {
            file: name.clone(),
            offset: offset as u64,
            reason,
        };
        let header: SegmentHeader = match read_record(&buf, 0) {
            ReadRecord::Ok(h, _) => h,
            ReadRecord::End | ReadRecord::Bad(_) if newest => {
                // Created but its header never made it to disk: an empty tail segment.
                tracing::warn!(file = %name, "discarding newest segment with a torn header");
                // Durably: if a crash brought it back after we appended to the previous
                // segment, that segment would no longer be the newest and its tail (not yet
                // synced) could not be repaired.
                disk.remove(&name)?;
                disk.sync_dir()?;
                return Ok(());
            }
            ReadRecord::End => return Err(corrupt(0, "empty segment".into())),
            ReadRecord::Bad(why) => return Err(corrupt(0, why)),
        };
        if header.seq != seq {
            return Err(corrupt(0, format!("header says seq {}", header.seq)));
        }
        let mut offset = match read_record::<SegmentHeader>(&buf, 0) {
            ReadRecord::Ok(_, n) => n,
            _ => unreachable!("decoded above"),
        };
        // This segment supersedes everything from its first index on (suffix truncation).
        let first = header.first_index;
        if superseded_from.is_some_and(|from| from <= first) {
            tracing::debug!(file = %name, "skipping a wholly superseded segment");
            self.segments.insert(
                seq,
                Segment {
                    next_index: first,
                    bytes: buf.len() as u64,
                },
            );
            return Ok(());
        }
        // A segment starting beyond the end of the log is legitimate only if empty: it was
        // created for a snapshot install that a crash interrupted (see `apply_snapshot`).
        let gap = first > self.last().next() && first > self.first();
        if !gap {
            self.truncate_memory(first);
        }
        let mut expect = first;
        loop {
            match read_entry_record(&buf, offset) {
                ReadRecord::Ok(e, n) => {
                    if gap {
                        return Err(corrupt(
                            offset,
                            format!(
                                "segment starts at {first} but the log ends at {}",
                                self.last()
                            ),
                        ));
                    }
                    if e.index != expect {
                        return Err(corrupt(
                            offset,
                            format!("entry index {} where {expect} was expected", e.index),
                        ));
                    }
                    if e.index > self.snapshot.meta.index {
                        if e.index.prev() > self.snapshot.meta.index {
                            // Terms never decrease along a log.
                            let prev = self.entries.last().map(|p| p.term).unwrap_or_default();
                            if e.term < prev {
                                return Err(corrupt(offset, "term goes backwards".into()));
                            }
                        }
                        self.log_bytes += entry_bytes(&e);
                        self.entries.push(e);
                        self.entry_segment.push(seq);
                    }
                    expect = expect.next();
                    offset += n;
                }
                ReadRecord::End => break,
                ReadRecord::Bad(why) => {
                    let rest_is_tail = newest;
                    if !rest_is_tail {
                        return Err(corrupt(offset, why));
                    }
                    // A torn write at the very tail of the newest segment: the only damage we
                    // repair, by truncating it (DESIGN.md §5). Anything after it would be a
                    // second record, which a torn final write cannot produce.
                    if has_valid_record_after(&buf, offset) {
                        return Err(corrupt(offset, why));
                    }
                    tracing::warn!(file = %name, offset, %why, "truncating torn tail");
                    disk.truncate(&name, offset as u64)?;
                    disk.sync(&name)?;
                    break;
                }
            }
        }
        self.segments.insert(
            seq,
            Segment {
                next_index: expect,
                bytes: offset as u64,
            },
        );
        Ok(())
    }

    fn truncate_memory(&mut self, from: LogIndex) {
        self.maybe_garbage = true;
        if from <= self.snapshot.meta.index {
            // Everything after the snapshot is superseded.
            self.entries.clear();
            self.entry_segment.clear();
            self.log_bytes = 0;
            return;
        }
        let keep = (from.0 - self.first().0) as usize;
        if keep < self.entries.len() {
            self.log_bytes -= self.entries[keep..].iter().map(entry_bytes).sum::<u64>();
            self.entries.truncate(keep);
            self.entry_segment.truncate(keep);
        }
    }

    fn start_segment(&mut self, disk: &mut impl Disk, first_index: LogIndex) -> Result<(), Error> {
        // Barrier: the previous active segment is durable before a newer one exists, so only
        // the newest segment can ever have a torn tail.
        if self.segments.contains_key(&self.active) {
            let name = segment_name(self.active);
            if self.dirty.remove(&name) {
                disk.sync(&name)?;
            }
        }
        let seq = self.segments.keys().next_back().map_or(1, |s| s + 1);
        let name = segment_name(seq);
        disk.create(&name)?;
        let mut buf = Vec::new();
        encode_record(&SegmentHeader { seq, first_index }, &mut buf);
        disk.append(&name, &buf)?;
        self.segments.insert(
            seq,
            Segment {
                next_index: first_index,
                bytes: buf.len() as u64,
            },
        );
        self.active = seq;
        self.dirty.insert(name);
        self.dir_dirty = true;
        Ok(())
    }

    /// Appends entries, superseding any stored entry at or after `entries[0].index` (a
    /// conflict). Entries at or before the snapshot are skipped. Durable after
    /// [`DurableStorage::sync`].
    pub fn append(&mut self, disk: &mut impl Disk, entries: &[Entry]) -> Result<(), Error> {
        let entries: Vec<&Entry> = entries.iter().filter(|e| e.index >= self.first()).collect();
        let Some(head) = entries.first() else {
            return Ok(());
        };
        if head.index > self.last().next() {
            return Err(Error::Invalid(format!(
                "append at {} leaves a gap after {}",
                head.index,
                self.last()
            )));
        }
        if head.index <= self.last() {
            self.truncate_memory(head.index);
        }
        let active = &self.segments[&self.active];
        if head.index != active.next_index || active.bytes >= self.config.max_segment_bytes {
            // Suffix truncation (a conflict) or a full segment: a new segment, which
            // supersedes every older one from head.index on.
            self.start_segment(disk, head.index)?;
        }
        let name = segment_name(self.active);
        let mut buf = Vec::new();
        for e in &entries {
            encode_record(*e, &mut buf);
        }
        disk.append(&name, &buf)?;
        if let Some(seg) = self.segments.get_mut(&self.active) {
            seg.bytes += buf.len() as u64;
            seg.next_index = LogIndex(head.index.0 + entries.len() as u64);
        }
        for e in entries {
            self.log_bytes += entry_bytes(e);
            self.entries.push(e.clone());
            self.entry_segment.push(self.active);
        }
        self.dirty.insert(name);
        Ok(())
    }

    /// Records the hard state. A term or vote change is written (atomically) now; a change of
    /// the commit index alone is kept in memory and written with the next one or at a
    /// snapshot, since Raft re-learns its commit index after a restart.
    pub fn set_hard_state(&mut self, disk: &mut impl Disk, hs: HardState) -> Result<(), Error> {
        self.hard_state = hs;
        if (hs.term, hs.vote) != (self.durable_hard_state.term, self.durable_hard_state.vote) {
            self.write_hard_state(disk)?;
        }
        Ok(())
    }

    fn write_hard_state(&mut self, disk: &mut impl Disk) -> Result<(), Error> {
        // The log first, so a durable commit index never exceeds the durable log.
        self.sync(disk)?;
        let mut hs = self.hard_state;
        // Never claim a commit index beyond what the log holds durably.
        hs.commit = hs.commit.min(self.last());
        write_atomic(disk, HARD_STATE, &hs)?;
        self.durable_hard_state = hs;
        Ok(())
    }

    /// Group commit: one fsync per file written since the last call (plus the directory if
    /// names changed). After it returns, everything appended before is durable.
    pub fn sync(&mut self, disk: &mut impl Disk) -> Result<(), Error> {
        for name in std::mem::take(&mut self.dirty) {
            disk.sync(&name)?;
        }
        if self.dir_dirty {
            disk.sync_dir()?;
            self.dir_dirty = false;
        }
        if self.maybe_garbage {
            self.collect_garbage(disk)?;
        }
        Ok(())
    }

    /// Removes segments no live entry lives in any more (superseded or compacted). Only called
    /// once everything is durable, so the superseding data exists on disk.
    fn collect_garbage(&mut self, disk: &mut impl Disk) -> Result<(), Error> {
        // Entries sit in segments in log order, so equal seqs come in runs.
        let mut live = BTreeSet::new();
        let mut previous = None;
        for &seq in &self.entry_segment {
            if previous != Some(seq) {
                live.insert(seq);
                previous = Some(seq);
            }
        }
        let dead: Vec<u64> = self
            .segments
            .keys()
            .copied()
            .filter(|s| *s != self.active && !live.contains(s))
            .collect();
        for seq in dead {
            // If a crash undoes the removal, recovery skips the file's entries anyway.
            disk.remove(&segment_name(seq))?;
            self.segments.remove(&seq);
        }
        self.maybe_garbage = false;
        Ok(())
    }

    /// Installs a snapshot received from the leader: replaces the whole log. Durable when it
    /// returns.
    pub fn apply_snapshot(
        &mut self,
        disk: &mut impl Disk,
        snapshot: Snapshot,
    ) -> Result<(), Error> {
        let index = snapshot.meta.index;
        // The empty superseding segment is created (and its name made durable) before the
        // snapshot file, so no crash can leave the snapshot followed by the old log.
        self.start_segment(disk, index.next())?;
        self.sync(disk)?;
        let staged = self.staged_snapshot.take();
        match staged {
            // The received file is already a checked, fsynced snapshot file: a rename installs
            // it, with no second write.
            Some((name, meta)) if meta == snapshot.meta => {
                self.rename_snapshot_file(disk, &name)?;
                self.snapshot = Snapshot {
                    meta,
                    data: Vec::new(),
                };
                self.opened_snapshot_data = None;
            }
            staged => {
                if let Some((name, _)) = staged {
                    disk.remove(&name)?;
                }
                let prepared = prepare_as(disk, snapshot, SNAPSHOT_TMP.to_string())?;
                self.rename_snapshot_file(disk, &prepared.tmp)?;
                self.set_snapshot(prepared.meta, prepared.data);
            }
        }
        self.entries.clear();
        self.entry_segment.clear();
        self.log_bytes = 0;
        if self.hard_state.commit < index {
            self.hard_state.commit = index;
        }
        self.write_hard_state(disk)?;
        self.collect_garbage(disk)
    }

    /// Records the service's own snapshot and discards the log up to and including its index.
    /// Durable when it returns. Entries after it must already be stored. Does nothing if the
    /// log already starts after that index. It writes the whole snapshot file in the caller's
    /// thread: [`prepare_snapshot`] and [`DurableStorage::install_prepared`] split the same
    /// work so that the writing may happen elsewhere.
    pub fn compact(&mut self, disk: &mut impl Disk, snapshot: Snapshot) -> Result<(), Error> {
        let index = snapshot.meta.index;
        if index < self.first() {
            return Ok(());
        }
        self.check_compact(index)?;
        let prepared = prepare_as(disk, snapshot, SNAPSHOT_TMP.to_string())?;
        self.install_prepared(disk, prepared).map(|_| ())
    }

    /// Makes a snapshot written by [`prepare_snapshot`] the storage's snapshot and discards the
    /// log up to and including its index, as [`DurableStorage::compact`] does, but without
    /// writing its data: a rename and a directory fsync (plus the fsyncs `compact` does too:
    /// the log, the hard state). Entries after it must already be stored. Durable when it
    /// returns `Ok(true)`.
    ///
    /// If the log already starts after the snapshot's index (a newer snapshot was installed or
    /// compacted since it was prepared), removes its temporary file and returns `Ok(false)`. An
    /// error also removes it, when the disk lets it.
    pub fn install_prepared(
        &mut self,
        disk: &mut impl Disk,
        prepared: PreparedSnapshot,
    ) -> Result<bool, Error> {
        Ok(self.install_prepared_releasing(disk, prepared)?.is_some())
    }

    /// [`DurableStorage::install_prepared`], handing back the entries it dropped (`None` if the
    /// snapshot was superseded) instead of freeing them: a log of a few hundred thousand
    /// entries takes milliseconds to free, which a caller on a latency-sensitive loop can do
    /// on another thread.
    pub fn install_prepared_releasing(
        &mut self,
        disk: &mut impl Disk,
        prepared: PreparedSnapshot,
    ) -> Result<Option<Vec<Entry>>, Error> {
        let index = prepared.meta.index;
        if index < self.first() {
            disk.remove(&prepared.tmp)?;
            return Ok(None);
        }
        let mut prepared = prepared;
        if self.config.snapshot_data_in_memory && prepared.data.is_none() {
            // Written by a streaming preparation: the data this storage keeps is read back.
            match read_snapshot_file(&*disk, &prepared.tmp) {
                Ok(s) => prepared.data = Some(s.data),
                Err(e) => {
                    let _ = disk.remove(&prepared.tmp);
                    return Err(e);
                }
            }
        }
        let result = self.check_compact(index).and_then(|()| {
            // The log up to the snapshot (and, as for `compact`, after it) is durable before
            // the snapshot replaces it.
            self.sync(disk)?;
            self.rename_snapshot_file(disk, &prepared.tmp)
        });
        if let Err(e) = result {
            let _ = disk.remove(&prepared.tmp); // already failing: report the first error
            return Err(e);
        }
        let drop = (index.0 + 1 - self.first().0) as usize;
        self.log_bytes -= self.entries[..drop].iter().map(entry_bytes).sum::<u64>();
        let kept = self.entries.split_off(drop);
        let dropped = std::mem::replace(&mut self.entries, kept);
        self.entry_segment.drain(..drop);
        self.set_snapshot(prepared.meta, prepared.data);
        // A snapshot covers applied, hence committed, entries only. The hard state is not
        // rewritten for it (an fsync, a rename and a directory fsync in the caller's loop):
        // a durable commit index below the snapshot is harmless, Raft starts from
        // `max(commit, first index - 1)`, and the next term or vote change writes it.
        if self.hard_state.commit < index {
            self.hard_state.commit = index;
        }
        self.collect_garbage(disk)?;
        Ok(Some(dropped))
    }

    fn check_compact(&self, index: LogIndex) -> Result<(), Error> {
        if index > self.last() {
            return Err(Error::Invalid(format!(
                "compact to {index} beyond the last index {}",
                self.last()
            )));
        }
        Ok(())
    }

    /// The durable step of a snapshot install: the fsynced temporary file becomes the snapshot
    /// file, durably. The legacy file, now stale, goes too (durably at the next sync; if a
    /// crash brings it back, `open` prefers the new file and removes it again).
    fn rename_snapshot_file(&mut self, disk: &mut impl Disk, tmp: &str) -> Result<(), Error> {
        disk.rename(tmp, SNAPSHOT_FILE)?;
        disk.sync_dir()?;
        if self.legacy_snapshot {
            disk.remove(LEGACY_SNAPSHOT_FILE)?;
            self.legacy_snapshot = false;
            self.dir_dirty = true;
        }
        Ok(())
    }

    /// Records the installed snapshot: its data too if this storage keeps it in memory.
    fn set_snapshot(&mut self, meta: SnapshotMeta, data: Option<Vec<u8>>) {
        let data = match data {
            Some(d) if self.config.snapshot_data_in_memory => d,
            _ => Vec::new(),
        };
        self.snapshot = Snapshot { meta, data };
        self.opened_snapshot_data = None;
    }

    /// Names a snapshot file received from the leader (in this storage's directory, whole,
    /// checked and fsynced, for example by the snapshot stream) that Raft is about to be
    /// handed: if the `Ready` that installs a snapshot with the same metadata follows,
    /// [`DurableStorage::apply_snapshot`] renames this file into place instead of writing the
    /// snapshot's data. A file staged before and not installed is removed.
    pub fn stage_received_snapshot(
        &mut self,
        disk: &mut impl Disk,
        name: String,
        meta: SnapshotMeta,
    ) -> Result<(), Error> {
        self.discard_staged_snapshot(disk)?;
        self.staged_snapshot = Some((name, meta));
        Ok(())
    }

    /// Removes a staged received snapshot that Raft did not install (it was stale).
    pub fn discard_staged_snapshot(&mut self, disk: &mut impl Disk) -> Result<(), Error> {
        if let Some((name, _)) = self.staged_snapshot.take() {
            tracing::debug!(file = %name, "removing a received snapshot Raft did not install");
            disk.remove(&name)?;
        }
        Ok(())
    }

    /// Whether the snapshot's data is kept in memory ([`StorageConfig::snapshot_data_in_memory`]).
    pub fn snapshot_data_in_memory(&self) -> bool {
        self.config.snapshot_data_in_memory
    }

    /// The stored snapshot's data, to restore a state machine from: the bytes in memory, or
    /// the snapshot file read chunk by chunk, each chunk's checksum checked before any of its
    /// bytes is handed out (a damaged chunk is an `InvalidData` error naming file and offset).
    pub fn snapshot_data<'a>(
        &'a self,
        disk: &impl Disk,
    ) -> Result<Box<dyn std::io::Read + 'a>, Error> {
        if self.config.snapshot_data_in_memory || self.snapshot.meta.index == LogIndex(0) {
            return Ok(Box::new(self.snapshot.data.as_slice()));
        }
        let (meta, reader) = open_snapshot_data(disk, SNAPSHOT_FILE)?;
        if meta != self.snapshot.meta {
            return Err(Error::Corrupt {
                file: SNAPSHOT_FILE.into(),
                offset: 0,
                reason: format!(
                    "covers index {} term {}, the storage installed index {} term {}",
                    meta.index, meta.term, self.snapshot.meta.index, self.snapshot.meta.term
                ),
            });
        }
        Ok(Box::new(reader))
    }

    /// The snapshot file's data as opened (and checked) at open, once, for the restore at
    /// start; `None` when the data is in memory, when there is no snapshot, or once taken.
    pub fn take_opened_snapshot_data(&mut self) -> Option<Box<dyn std::io::Read + Send>> {
        self.opened_snapshot_data
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>)
    }

    /// What the stored snapshot covers (index 0 and no voters if none was taken), without
    /// copying its data.
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        &self.snapshot.meta
    }

    /// Bytes of the live log (the entries after the snapshot, each with its fixed overhead):
    /// what a service compares with its snapshot threshold. Unlike the segment files' sizes,
    /// it drops at once when the log is compacted (the active segment keeps its dead prefix
    /// until it is rotated, so measuring files made every check after a compaction ask for
    /// another snapshot). Kept as a running sum: O(1).
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

fn has_valid_record_after(buf: &[u8], offset: usize) -> bool {
    // Scan for any later position where a well-formed entry record starts.
    (offset + 1..buf.len().saturating_sub(RECORD_HEADER_BYTES))
        .any(|o| matches!(read_entry_record(buf, o), ReadRecord::Ok(..)))
}

fn read_single<T: DeserializeOwned>(disk: &impl Disk, name: &str) -> Result<Option<T>, Error> {
    let Some(buf) = disk.read(name)? else {
        return Ok(None);
    };
    match read_record(&buf, 0) {
        ReadRecord::Ok(v, _) => Ok(Some(v)),
        ReadRecord::End => Err(Error::Corrupt {
            file: name.into(),
            offset: 0,
            reason: "empty file".into(),
        }),
        ReadRecord::Bad(reason) => Err(Error::Corrupt {
            file: name.into(),
            offset: 0,
            reason,
        }),
    }
}

/// Replaces a file atomically: temporary file, fsync, rename, directory fsync (DESIGN.md §5).
fn write_atomic<T: Serialize>(disk: &mut impl Disk, name: &str, value: &T) -> Result<(), Error> {
    let tmp = format!("{name}.tmp");
    let mut buf = Vec::new();
    encode_record(value, &mut buf);
    disk.create(&tmp)?;
    disk.append(&tmp, &buf)?;
    disk.sync(&tmp)?;
    disk.rename(&tmp, name)?;
    disk.sync_dir()?;
    Ok(())
}

/// What an entry counts for in [`DurableStorage::log_bytes`].
fn entry_bytes(e: &Entry) -> u64 {
    (e.data.len() + shoal_wire::raft::ENTRY_OVERHEAD_BYTES) as u64
}

/// A snapshot whose file is written and fsynced under a temporary name (ending in `.tmp`, so
/// one never installed is removed at the next open), ready to become the storage's snapshot
/// through [`DurableStorage::install_prepared`].
pub struct PreparedSnapshot {
    meta: SnapshotMeta,
    /// The data, if it was prepared from bytes in memory (`None`: streamed into the file).
    data: Option<Vec<u8>>,
    data_len: u64,
    /// The temporary file.
    tmp: String,
}

impl PreparedSnapshot {
    /// What the snapshot covers.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// Name of its temporary file.
    pub fn file_name(&self) -> &str {
        &self.tmp
    }

    /// Bytes of the state machine's serialized state it holds.
    pub fn data_bytes(&self) -> usize {
        self.data_len as usize
    }

    /// Gives the snapshot up: removes its temporary file.
    pub fn discard(self, disk: &mut impl Disk) -> Result<(), Error> {
        disk.remove(&self.tmp)?;
        Ok(())
    }
}

impl std::fmt::Debug for PreparedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedSnapshot")
            .field("meta", &self.meta)
            .field("data_len", &self.data_len)
            .field("tmp", &self.tmp)
            .finish()
    }
}

/// Writes `snapshot` to a temporary file of the snapshot format and fsyncs it, for
/// [`DurableStorage::install_prepared`]. Touches no other file, so it may run on another
/// thread with its own `Disk` handle on the same directory (a second [`StdDisk::new`] of it)
/// while the [`DurableStorage`] keeps appending. The temporary file is named after the
/// snapshot's index: run at most one preparation per index at a time. On error, the temporary
/// file is removed when the disk lets it.
pub fn prepare_snapshot(
    disk: &mut impl Disk,
    snapshot: Snapshot,
) -> Result<PreparedSnapshot, Error> {
    let tmp = format!("{SNAPSHOT_FILE}.{:020}.tmp", snapshot.meta.index.0);
    prepare_as(disk, snapshot, tmp)
}

fn prepare_as(
    disk: &mut impl Disk,
    snapshot: Snapshot,
    tmp: String,
) -> Result<PreparedSnapshot, Error> {
    let written = write_snapshot_file(
        disk,
        &tmp,
        &snapshot,
        SNAPSHOT_CHUNK_BYTES,
        PREPARE_SYNC_EVERY_CHUNKS,
    );
    disk.close(&tmp);
    if let Err(e) = written {
        let _ = disk.remove(&tmp); // already failing: report the first error
        return Err(e);
    }
    Ok(PreparedSnapshot {
        data_len: snapshot.data.len() as u64,
        meta: snapshot.meta,
        data: Some(snapshot.data),
        tmp,
    })
}

/// [`prepare_snapshot`] for data that is never held whole: `write` writes exactly
/// `data_len` bytes (announced in the file's header, which comes first) to the writer it is
/// given, which cuts them into checksummed chunk records as they come, holding one chunk. An
/// error if `write` fails or writes another number of bytes; the temporary file is then
/// removed when the disk lets it.
pub fn prepare_snapshot_streaming(
    disk: &mut impl Disk,
    meta: SnapshotMeta,
    data_len: u64,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<PreparedSnapshot, Error> {
    let tmp = format!("{SNAPSHOT_FILE}.{:020}.tmp", meta.index.0);
    let written = write_snapshot_streaming(disk, &tmp, &meta, data_len, write);
    disk.close(&tmp);
    if let Err(e) = written {
        let _ = disk.remove(&tmp); // already failing: report the first error
        return Err(e);
    }
    Ok(PreparedSnapshot {
        meta,
        data: None,
        data_len,
        tmp,
    })
}

fn write_snapshot_streaming(
    disk: &mut impl Disk,
    name: &str,
    meta: &SnapshotMeta,
    data_len: u64,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), Error> {
    let chunk_bytes = SNAPSHOT_CHUNK_BYTES;
    let header = SnapshotHeader {
        meta: meta.clone(),
        data_len,
        chunk_bytes: chunk_bytes as u32,
        chunks: data_len.div_ceil(chunk_bytes as u64),
    };
    let mut head = Vec::new();
    encode_record(&header.to_record(), &mut head);
    disk.create(name)?;
    disk.append(name, &head)?;
    let mut w = ChunkWriter {
        disk: &mut *disk,
        name,
        chunk: Vec::with_capacity(chunk_bytes),
        chunk_bytes,
        written: 0,
        chunks: 0,
        error: None,
    };
    let result = write(&mut w).and_then(|()| w.flush_chunk());
    if let Some(e) = w.error.take() {
        return Err(e.into());
    }
    result.map_err(|e| Error::Invalid(format!("writing the snapshot: {e}")))?;
    if w.written != data_len {
        return Err(Error::Invalid(format!(
            "the state machine wrote {} snapshot bytes where it announced {data_len}",
            w.written
        )));
    }
    disk.sync(name)?;
    Ok(())
}

/// Cuts what is written into the snapshot file's chunk records (see [`prepare_snapshot_streaming`]).
struct ChunkWriter<'a, D: Disk> {
    disk: &'a mut D,
    name: &'a str,
    chunk: Vec<u8>,
    chunk_bytes: usize,
    written: u64,
    chunks: usize,
    /// The disk's error, kept to be returned as such.
    error: Option<DiskError>,
}

impl<D: Disk> ChunkWriter<'_, D> {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let mut frame = [0u8; RECORD_HEADER_BYTES];
        frame[0..4].copy_from_slice(&(self.chunk.len() as u32).to_le_bytes());
        frame[4..8].copy_from_slice(&crc32c::crc32c(&self.chunk).to_le_bytes());
        let result = self
            .disk
            .append(self.name, &frame)
            .and_then(|()| self.disk.append(self.name, &self.chunk))
            .and_then(|()| {
                self.chunks += 1;
                if self.chunks.is_multiple_of(PREPARE_SYNC_EVERY_CHUNKS) {
                    self.disk.sync(self.name)
                } else {
                    Ok(())
                }
            });
        self.written += self.chunk.len() as u64;
        self.chunk.clear();
        result.map_err(|e| {
            let io = std::io::Error::other(e.to_string());
            self.error = Some(e);
            io
        })
    }
}

impl<D: Disk> std::io::Write for ChunkWriter<'_, D> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.chunk_bytes - self.chunk.len();
        let n = room.min(buf.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() == self.chunk_bytes {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A snapshot prepared off the caller's loop is fsynced every this many chunks (4 MiB), not
/// only at the end: one fsync of tens of megabytes occupies the disk for tens of milliseconds,
/// and the log's fsyncs of every server on that disk queue behind it (the stalls of the KV
/// server's requests at each snapshot). Small fsyncs let the log's in between.
pub const PREPARE_SYNC_EVERY_CHUNKS: usize = 4;

/// Creates `name` holding `snapshot` in the snapshot file format, and fsyncs it (also after
/// every `sync_every` chunks, if not 0). Streams: the header record, then each chunk's record
/// header and the chunk straight from `snapshot.data`.
fn write_snapshot_file(
    disk: &mut impl Disk,
    name: &str,
    snapshot: &Snapshot,
    chunk_bytes: usize,
    sync_every: usize,
) -> Result<(), Error> {
    assert!(
        (1..=MAX_RECORD_BYTES).contains(&chunk_bytes),
        "chunk size {chunk_bytes} out of range"
    );
    let data = &snapshot.data;
    let header = SnapshotHeader {
        meta: snapshot.meta.clone(),
        data_len: data.len() as u64,
        chunk_bytes: chunk_bytes as u32,
        chunks: data.len().div_ceil(chunk_bytes) as u64,
    };
    let mut head = Vec::new();
    encode_record(&header.to_record(), &mut head);
    disk.create(name)?;
    disk.append(name, &head)?;
    for (i, chunk) in data.chunks(chunk_bytes).enumerate() {
        let mut frame = [0u8; RECORD_HEADER_BYTES];
        frame[0..4].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        frame[4..8].copy_from_slice(&crc32c::crc32c(chunk).to_le_bytes());
        disk.append(name, &frame)?;
        disk.append(name, chunk)?;
        if sync_every > 0 && (i + 1) % sync_every == 0 {
            disk.sync(name)?;
        }
    }
    disk.sync(name)?;
    Ok(())
}

/// Decodes a whole snapshot file (`buf`, read from `name`) exactly: every record's length and
/// checksum, the chunk count and sizes the header announces, nothing after the last chunk.
/// The data is gathered in place in `buf` (chunk payloads moved over the record headers), so
/// nothing is allocated beyond the file's own size, whatever the header claims.
fn decode_snapshot_file(name: &str, mut buf: Vec<u8>) -> Result<Snapshot, Error> {
    let corrupt = |offset: usize, reason: String| Error::Corrupt {
        file: name.to_string(),
        offset: offset as u64,
        reason,
    };
    if buf.is_empty() {
        return Err(corrupt(0, "empty file".into()));
    }
    let payload = frame_payload(&buf, 0, RecordLen::AtMost(MAX_RECORD_BYTES))
        .map_err(|why| corrupt(0, why))?;
    let header = SnapshotHeader::decode(payload).map_err(|why| corrupt(0, why))?;
    let mut pos = RECORD_HEADER_BYTES + payload.len();
    let chunk_bytes = header.chunk_bytes().map_err(|why| corrupt(0, why))?;
    // Each chunk is checked before it is moved; every step moves past at least one record
    // header of the real file, so a huge claimed size fails at the end of the file, not later.
    let mut data_end = 0usize;
    let mut remaining = header.data_len;
    for i in 0..header.chunks {
        let want = remaining.min(chunk_bytes) as usize;
        frame_payload(&buf, pos, RecordLen::Exactly(want))
            .map_err(|why| corrupt(pos, format!("chunk {i} of {}: {why}", header.chunks)))?;
        let from = pos + RECORD_HEADER_BYTES;
        buf.copy_within(from..from + want, data_end);
        data_end += want;
        pos = from + want;
        remaining -= want as u64;
    }
    if pos != buf.len() {
        return Err(corrupt(
            pos,
            format!("{} bytes after the last chunk", buf.len() - pos),
        ));
    }
    buf.truncate(data_end);
    Ok(Snapshot {
        meta: header.meta,
        data: buf,
    })
}

/// Largest snapshot header record [`read_snapshot_meta`] accepts: the metadata and the member
/// lists, far below this.
pub const MAX_SNAPSHOT_HEADER_BYTES: usize = 1024 * 1024;

/// Reads the metadata of a snapshot file from its first record (the header), reading no
/// further, and the size the whole file has if it is intact: the snapshot stream checks what
/// the file it is about to send covers, and that it is whole. The caller names the file in
/// its error.
pub fn read_snapshot_meta(file: &mut impl std::io::Read) -> Result<(SnapshotMeta, u64), String> {
    let (header, header_bytes) = read_snapshot_header(file)?;
    let file_bytes =
        header_bytes + header.chunks.saturating_mul(RECORD_HEADER_BYTES as u64) + header.data_len;
    Ok((header.meta, file_bytes))
}

/// Reads a snapshot file's header record: the header, and the bytes of its record.
fn read_snapshot_header(file: &mut impl std::io::Read) -> Result<(SnapshotHeader, u64), String> {
    let mut head = [0u8; RECORD_HEADER_BYTES];
    file.read_exact(&mut head)
        .map_err(|e| format!("reading the header record: {e}"))?;
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_SNAPSHOT_HEADER_BYTES {
        return Err(format!(
            "header record of {len} bytes over the limit of {MAX_SNAPSHOT_HEADER_BYTES}"
        ));
    }
    let mut buf = vec![0u8; RECORD_HEADER_BYTES + len];
    buf[..RECORD_HEADER_BYTES].copy_from_slice(&head);
    file.read_exact(&mut buf[RECORD_HEADER_BYTES..])
        .map_err(|e| format!("reading the header record: {e}"))?;
    let payload = frame_payload(&buf, 0, RecordLen::AtMost(MAX_SNAPSHOT_HEADER_BYTES))?;
    let header = SnapshotHeader::decode(payload)?;
    Ok((header, (RECORD_HEADER_BYTES + len) as u64))
}

/// Reads and checks a whole file of the snapshot format (`snapshot-v2`), as a node received
/// it from its leader: every record's length and checksum, the chunk count and sizes the
/// header announces, nothing after the last chunk. Holds the file's size in memory once.
pub fn read_snapshot_file(disk: &impl Disk, name: &str) -> Result<Snapshot, Error> {
    let buf = disk.read(name)?.ok_or_else(|| Error::Corrupt {
        file: name.to_string(),
        offset: 0,
        reason: "the file is missing".into(),
    })?;
    decode_snapshot_file(name, buf)
}

/// Checks a whole file of the snapshot format by streaming through it (every record's
/// length and checksum, the chunk count and sizes its header announces, nothing after the
/// last chunk), holding one chunk at a time; returns what it covers.
pub fn check_snapshot_file(disk: &impl Disk, name: &str) -> Result<SnapshotMeta, Error> {
    let (meta, mut reader) = open_snapshot_data(disk, name)?;
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| reader.error_of(e))?;
    Ok(meta)
}

/// Opens a file of the snapshot format for reading its data: what it covers, and a reader of
/// the data (see [`SnapshotDataReader`]).
pub fn open_snapshot_data(
    disk: &impl Disk,
    name: &str,
) -> Result<(SnapshotMeta, SnapshotDataReader), Error> {
    let corrupt = |offset: u64, reason: String| Error::Corrupt {
        file: name.to_string(),
        offset,
        reason,
    };
    let mut inner = disk
        .open_read(name)?
        .ok_or_else(|| corrupt(0, "the file is missing".into()))?;
    let (header, header_bytes) = read_snapshot_header(&mut inner).map_err(|why| corrupt(0, why))?;
    let chunk_bytes = header.chunk_bytes().map_err(|why| corrupt(0, why))?;
    let reader = SnapshotDataReader {
        inner,
        name: name.to_string(),
        offset: header_bytes,
        chunk_bytes,
        chunks: header.chunks,
        next_chunk: 0,
        remaining: header.data_len,
        chunk: Vec::new(),
        pos: 0,
        finished: false,
    };
    Ok((header.meta, reader))
}

/// Reads a snapshot file's data (the chunks' payloads, in order) from just after its header,
/// checking each chunk's length and checksum before handing out any of its bytes, and that
/// the file ends right after the last chunk. Holds one chunk. A damaged file is an
/// `InvalidData` error naming the file, the offset and what is wrong.
pub struct SnapshotDataReader {
    inner: Box<dyn std::io::Read + Send>,
    name: String,
    /// File offset of the next record.
    offset: u64,
    chunk_bytes: u64,
    chunks: u64,
    next_chunk: u64,
    /// Data bytes not yet read from the file.
    remaining: u64,
    chunk: Vec<u8>,
    pos: usize,
    finished: bool,
}

impl std::fmt::Debug for SnapshotDataReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotDataReader")
            .field("name", &self.name)
            .field("offset", &self.offset)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl SnapshotDataReader {
    fn corrupt(&self, reason: String) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "corrupt data in {} at offset {}: {reason}",
                self.name, self.offset
            ),
        )
    }

    /// The storage error an I/O error of this reader stands for.
    fn error_of(&self, e: std::io::Error) -> Error {
        Error::Corrupt {
            file: self.name.clone(),
            offset: self.offset,
            reason: e.to_string(),
        }
    }

    /// Loads the next chunk; `false` at the end of the data (once the end of the file is
    /// checked).
    fn load_chunk(&mut self) -> std::io::Result<bool> {
        if self.next_chunk == self.chunks {
            if !self.finished {
                let mut extra = [0u8; 1];
                let n = read_full(&mut self.inner, &mut extra)?;
                if n > 0 {
                    return Err(self.corrupt("bytes after the last chunk".into()));
                }
                self.finished = true;
            }
            return Ok(false);
        }
        let want = self.remaining.min(self.chunk_bytes) as usize;
        let (i, of) = (self.next_chunk, self.chunks);
        let mut head = [0u8; RECORD_HEADER_BYTES];
        if read_full(&mut self.inner, &mut head)? < RECORD_HEADER_BYTES {
            return Err(self.corrupt(format!("chunk {i} of {of}: truncated record header")));
        }
        let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        if len != want {
            return Err(self.corrupt(format!(
                "chunk {i} of {of}: record length {len} where {want} was expected"
            )));
        }
        self.chunk.clear();
        self.chunk.resize(want, 0);
        if read_full(&mut self.inner, &mut self.chunk)? < want {
            return Err(self.corrupt(format!(
                "chunk {i} of {of}: record of {len} bytes runs past the end of the file"
            )));
        }
        if crc32c::crc32c(&self.chunk) != crc {
            return Err(self.corrupt(format!("chunk {i} of {of}: checksum mismatch")));
        }
        self.offset += (RECORD_HEADER_BYTES + want) as u64;
        self.remaining -= want as u64;
        self.next_chunk += 1;
        self.pos = 0;
        Ok(true)
    }
}

impl std::io::Read for SnapshotDataReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos == self.chunk.len() {
            if !self.load_chunk()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.chunk.len() - self.pos);
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads until `buf` is full or the end of the input; returns the bytes read.
fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a record's length may be.
#[derive(Debug, Clone, Copy)]
enum RecordLen {
    AtMost(usize),
    Exactly(usize),
}

/// The payload of the framed record at `offset`, after checking its length, that it lies
/// within `buf`, and its checksum.
fn frame_payload(buf: &[u8], offset: usize, allowed: RecordLen) -> Result<&[u8], String> {
    let rest = buf.get(offset..).unwrap_or_default();
    if rest.len() < RECORD_HEADER_BYTES {
        return Err(format!(
            "truncated record header ({} of {RECORD_HEADER_BYTES} bytes)",
            rest.len()
        ));
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    match allowed {
        RecordLen::AtMost(max) if len > max => {
            return Err(format!("record length {len} over the limit of {max}"));
        }
        RecordLen::Exactly(want) if len != want => {
            return Err(format!("record length {len} where {want} was expected"));
        }
        _ => {}
    }
    let Some(payload) = rest.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len) else {
        return Err(format!(
            "record of {len} bytes runs past the end of the file"
        ));
    };
    if crc32c::crc32c(payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(payload)
}

impl shoal_raft::Storage for DurableStorage {
    fn hard_state(&self) -> HardState {
        self.hard_state
    }

    fn entries(
        &self,
        lo: LogIndex,
        hi: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        shoal_raft::window_entries(&self.snapshot.meta, &self.entries, lo, hi, max_bytes)
    }

    fn term(&self, index: LogIndex) -> Result<Term, RaftStorageError> {
        shoal_raft::window_term(&self.snapshot.meta, &self.entries, index)
    }

    fn first_index(&self) -> LogIndex {
        self.first()
    }

    fn last_index(&self) -> LogIndex {
        self.last()
    }

    fn snapshot(&self) -> Result<Snapshot, RaftStorageError> {
        Ok(self.snapshot.clone())
    }

    fn snapshot_metadata(&self) -> Result<SnapshotMeta, RaftStorageError> {
        Ok(self.snapshot.meta.clone())
    }
}

#[cfg(test)]
mod tests {
    /// A version-1 directory opens (its legacy snapshot read) and is marked version 2; a
    /// version from the future is refused with a message that says so.
    #[test]
    fn an_older_format_is_upgraded_and_a_newer_one_refused() {
        let mut d = MemDisk::default();
        let old = Identity {
            format_version: 1,
            cluster_id: 4,
            node_id: 2,
        };
        write_atomic(&mut d, IDENTITY, &old).unwrap();
        let legacy = snapshot(10);
        let old_snapshot = LegacySnapshot {
            index: legacy.meta.index,
            term: legacy.meta.term,
            voters: legacy.meta.voters.clone(),
            data: legacy.data.clone(),
        };
        write_atomic(&mut d, LEGACY_SNAPSHOT_FILE, &old_snapshot).unwrap();
        let s = DurableStorage::open(&mut d, 4, 2, StorageConfig::default()).unwrap();
        assert_eq!(shoal_raft::Storage::snapshot(&s).unwrap(), legacy);
        let id: Identity = read_single(&d, IDENTITY).unwrap().unwrap();
        assert_eq!(id.format_version, FORMAT_VERSION);

        let mut d = MemDisk::default();
        let future = Identity {
            format_version: FORMAT_VERSION + 1,
            ..old
        };
        write_atomic(&mut d, IDENTITY, &future).unwrap();
        let e = DurableStorage::open(&mut d, 4, 2, StorageConfig::default())
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("newer Shoal") || format!("{e:?}").contains("newer Shoal"),
            "{e:?}"
        );
    }
    use super::*;

    fn snapshot(len: usize) -> Snapshot {
        Snapshot {
            meta: SnapshotMeta {
                index: LogIndex(7),
                term: Term(2),
                voters: vec![NodeId(1), NodeId(3)],
                ..Default::default()
            },
            data: (0..len).map(|i| (i * 7 + i / 256) as u8).collect(),
        }
    }

    fn written(s: &Snapshot, chunk_bytes: usize) -> Vec<u8> {
        let mut d = MemDisk::new();
        write_snapshot_file(&mut d, "f", s, chunk_bytes, 2).unwrap();
        d.read("f").unwrap().unwrap()
    }

    fn corrupt_at(buf: Vec<u8>) -> (u64, String) {
        match decode_snapshot_file("f", buf) {
            Err(Error::Corrupt {
                file,
                offset,
                reason,
            }) => {
                assert_eq!(file, "f");
                (offset, reason)
            }
            other => panic!("expected corruption, got {:?}", other.map(|s| s.meta)),
        }
    }

    fn with_header(header: &SnapshotHeader, rest: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_record(&header.to_record(), &mut buf);
        buf.extend_from_slice(rest);
        buf
    }

    #[test]
    fn snapshot_files_round_trip_at_every_size_around_the_chunk_size() {
        for len in [0, 1, 7, 8, 9, 16, 17, 100] {
            let s = snapshot(len);
            let buf = written(&s, 8);
            assert_eq!(buf.len(), {
                let mut head = Vec::new();
                encode_record(
                    &SnapshotHeader {
                        meta: s.meta.clone(),
                        data_len: len as u64,
                        chunk_bytes: 8,
                        chunks: len.div_ceil(8) as u64,
                    }
                    .to_record(),
                    &mut head,
                );
                head.len() + len + RECORD_HEADER_BYTES * len.div_ceil(8)
            });
            assert_eq!(decode_snapshot_file("f", buf).unwrap(), s, "{len} bytes");
        }
    }

    /// Every byte is checked: flipping any one, cutting the file anywhere or adding to it is
    /// corruption, never a panic or another snapshot.
    #[test]
    fn every_damage_to_a_snapshot_file_is_detected() {
        let s = snapshot(29);
        let buf = written(&s, 8);
        for at in 0..buf.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = buf.clone();
                bad[at] ^= flip;
                corrupt_at(bad);
            }
        }
        for len in 0..buf.len() {
            let (offset, _) = corrupt_at(buf[..len].to_vec());
            assert!(offset <= len as u64);
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert_eq!(corrupt_at(longer).0, buf.len() as u64);
    }

    /// A header announcing more data than the file holds fails at the end of the real file
    /// (no allocation follows its claims); inconsistent or impossible sizes fail at once.
    #[test]
    fn lying_snapshot_headers_are_corrupt() {
        let meta = snapshot(0).meta;
        let header = |data_len: u64, chunk_bytes: u32, chunks: u64| SnapshotHeader {
            meta: meta.clone(),
            data_len,
            chunk_bytes,
            chunks,
        };
        let head_len = with_header(&header(u64::MAX, 1, u64::MAX), &[]).len() as u64;
        // Huge claims with tiny chunks: the first missing record is reported.
        let (offset, reason) = corrupt_at(with_header(&header(u64::MAX, 1, u64::MAX), &[]));
        assert_eq!(offset, head_len, "{reason}");
        let mut one_chunk = Vec::new();
        one_chunk.extend_from_slice(&1u32.to_le_bytes());
        one_chunk.extend_from_slice(&crc32c::crc32c(b"x").to_le_bytes());
        one_chunk.push(b'x');
        let head_len = with_header(&header(1 << 40, 1, 1 << 40), &[]).len() as u64;
        let (offset, reason) = corrupt_at(with_header(&header(1 << 40, 1, 1 << 40), &one_chunk));
        assert_eq!(offset, head_len + 9, "{reason}");
        // A chunk count that does not match, a zero or oversized chunk size.
        for h in [
            header(1, 1, 2),
            header(1, 1, 0),
            header(0, 8, 1),
            header(16, 8, 1),
            header(1, 0, 0),
            header(0, 0, 0),
            header(1, MAX_RECORD_BYTES as u32 + 1, 1),
        ] {
            let (offset, reason) = corrupt_at(with_header(&h, &one_chunk));
            assert_eq!(offset, 0, "{h:?}: {reason}");
        }
        // The right header and chunk: it decodes.
        let s = decode_snapshot_file("f", with_header(&header(1, 1, 1), &one_chunk)).unwrap();
        assert_eq!(s.data, b"x");
        // Extra bytes inside the header record.
        let mut payload = postcard::to_allocvec(&header(1, 1, 1).to_record()).unwrap();
        payload.push(0);
        let mut buf = Vec::new();
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        buf.extend_from_slice(&payload);
        buf.extend_from_slice(&one_chunk);
        assert_eq!(corrupt_at(buf).0, 0);
    }

    /// The membership round-trips through the header; a header of format version 2 (the
    /// fields before the membership only) still reads, as "no learners, not joint".
    #[test]
    fn snapshot_headers_keep_the_membership_and_old_ones_still_read() {
        let mut s = snapshot(3);
        s.meta.voters = vec![NodeId(2), NodeId(3), NodeId(4)];
        s.meta.voters_outgoing = vec![NodeId(1), NodeId(2), NodeId(3)];
        s.meta.learners = vec![NodeId(5)];
        s.meta.auto_leave = true;
        assert_eq!(decode_snapshot_file("f", written(&s, 8)).unwrap(), s);

        let old = snapshot(3);
        let header = SnapshotHeader {
            meta: old.meta.clone(),
            data_len: 3,
            chunk_bytes: 8,
            chunks: 1,
        };
        let mut buf = Vec::new();
        encode_record(&header.to_record().0, &mut buf);
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&old.data).to_le_bytes());
        buf.extend_from_slice(&old.data);
        assert_eq!(decode_snapshot_file("f", buf).unwrap(), old);
    }

    /// A snapshot prepared through a second handle leaves no file open in it (a server
    /// preparing one per snapshot would otherwise leak a descriptor each time).
    #[test]
    fn preparing_through_a_std_disk_keeps_no_handle_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = StdDisk::new(dir.path()).unwrap();
        let p = prepare_snapshot(&mut d, snapshot(3 * SNAPSHOT_CHUNK_BYTES / 2)).unwrap();
        assert_eq!(d.open_handles(), 0);
        let mut other = StdDisk::new(dir.path()).unwrap();
        let buf = other.read(p.file_name()).unwrap().unwrap();
        assert_eq!(
            decode_snapshot_file(p.file_name(), buf).unwrap(),
            snapshot(3 * SNAPSHOT_CHUNK_BYTES / 2)
        );
        p.discard(&mut other).unwrap();
        // A large file is freed by a reaper thread under a doomed name (see `StdDisk`).
        let left: Vec<String> = other
            .list()
            .unwrap()
            .into_iter()
            .filter(|n| !n.ends_with(".doomed.tmp"))
            .collect();
        assert_eq!(left, Vec::<String>::new());
    }
}
