//! `shoal kv snapshot save|restore|status`: backups of a KV cluster, like etcd's
//! `etcdctl snapshot save` and `etcdutl snapshot restore|status`.
//!
//! **The file** (all integers little-endian):
//!
//! | bytes | what |
//! | --- | --- |
//! | 8 | magic `SHOALKVB` |
//! | 4 | format version ([`FORMAT_VERSION`]) |
//! | 4 | header length H (at most [`MAX_HEADER_BYTES`]) |
//! | 4 | CRC32C of the header |
//! | H | the header: postcard of [`BackupHeader`] (cluster, source server, index, term, voters, data length, …) |
//! | data length | the state machine's snapshot (`shoal_kv::KvStore::snapshot`: keys with versions and leases, client sessions, leases) |
//! | 4 | CRC32C of every byte before it |
//!
//! The header has its own checksum so that a damaged length is reported as damage, not as a
//! truncation; the last checksum covers everything. A file is written to `FILE.tmp`, fsynced,
//! renamed, and its directory fsynced.
//!
//! **Restore** makes the data directory of one member of a new cluster: the identity (cluster,
//! id), a Raft snapshot at the saved index and term whose voters are the NEW membership, a
//! hard state at that term with the commit index at the snapshot, and an empty log. Every
//! member restored from the same file starts from the same state; the first election happens
//! in the next term. It is built in a temporary directory beside the target and renamed into
//! place, so a refused or failed restore leaves nothing behind.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use shoal_kv::store::{KvStore, Limits};
use shoal_raft::{HardState, LogIndex, NodeId, Snapshot, SnapshotMeta, Term};
use shoal_storage::{DurableStorage, StdDisk, StorageConfig};

/// First bytes of a backup file.
pub const MAGIC: &[u8; 8] = b"SHOALKVB";
/// Version of the file format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest header accepted (a damaged length must not make us read a whole file as header).
pub const MAX_HEADER_BYTES: u32 = 64 * 1024;
/// Bytes before the header: magic, version, header length, header CRC32C.
const PREFIX_BYTES: usize = 20;
/// Bytes of the trailing checksum.
const CHECKSUM_BYTES: usize = 4;

/// What a backup file says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// The cluster id of the cluster it was taken from.
    pub cluster_id: u64,
    /// The server (the leader then) that took it.
    pub server: u64,
    /// The last log index the state covers.
    pub index: u64,
    /// The term of the entry at `index`.
    pub term: u64,
    /// The voting members at `index`.
    pub voters: Vec<u64>,
    /// Bytes of the state machine's snapshot that follow the header.
    pub data_len: u64,
    /// When it was saved, in seconds since the Unix epoch (the saving client's clock).
    pub saved_unix_secs: u64,
    /// The version of the `shoal` that saved it.
    pub shoal_version: String,
}

/// Why a file is not a usable backup. Each message says what is wrong and where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    /// The first bytes are not the magic.
    #[error("not a Shoal KV backup: bad magic (the file starts with {found:?}, a backup with \"SHOALKVB\")")]
    BadMagic {
        /// The first bytes, for a person.
        found: String,
    },
    /// A format version this build does not read.
    #[error("backup format version {found} is not supported (this build reads version {FORMAT_VERSION}; was it saved by a newer Shoal?)")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The file ends early.
    #[error("truncated at byte {at}: the backup is {}", match .expected { Some(n) => format!("{n} bytes long"), None => "longer".to_string() })]
    Truncated {
        /// The file's length.
        at: u64,
        /// Its length according to its header, once known.
        expected: Option<u64>,
    },
    /// More bytes than the header accounts for.
    #[error("{extra} unexpected bytes after the end of the backup at byte {end}")]
    Trailing {
        /// Where the backup should end.
        end: u64,
        /// Bytes after it.
        extra: u64,
    },
    /// The header is damaged.
    #[error("damaged header (bytes {PREFIX_BYTES} to {end}): {reason}")]
    Header {
        /// Where the header ends.
        end: u64,
        /// What is wrong.
        reason: String,
    },
    /// The checksum over the whole file does not match: some byte changed.
    #[error("checksum mismatch: the file says {stored:#010x}, its contents give {computed:#010x} (a byte between {PREFIX_BYTES} and {end} changed: the file is damaged)")]
    Checksum {
        /// The checksum stored at the end.
        stored: u32,
        /// The checksum of the contents.
        computed: u32,
        /// Where the checksummed contents end.
        end: u64,
    },
    /// The checksums match but the state does not decode (a bug, or a file made by hand).
    #[error("the state in the backup does not decode: {0}")]
    State(String),
}

/// Checks a whole backup file and returns its header and the state machine's snapshot.
/// Never panics, whatever the bytes.
pub fn decode(file: &[u8]) -> Result<(BackupHeader, &[u8]), BackupError> {
    let len = file.len() as u64;
    let truncated = |expected| BackupError::Truncated { at: len, expected };
    if file.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(file) {
            truncated(None)
        } else {
            bad_magic(file)
        });
    }
    if &file[..MAGIC.len()] != MAGIC {
        return Err(bad_magic(file));
    }
    if file.len() < PREFIX_BYTES {
        return Err(truncated(None));
    }
    let word = |at: usize| u32::from_le_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(BackupError::Version { found: version });
    }
    let header_len = word(12);
    let header_end = PREFIX_BYTES as u64 + u64::from(header_len);
    if header_len > MAX_HEADER_BYTES {
        return Err(BackupError::Header {
            end: header_end,
            reason: format!("its length {header_len} exceeds {MAX_HEADER_BYTES}"),
        });
    }
    if len < header_end {
        return Err(truncated(None));
    }
    let header_bytes = &file[PREFIX_BYTES..header_end as usize];
    let (stored, computed) = (word(16), crc32c::crc32c(header_bytes));
    if stored != computed {
        return Err(BackupError::Header {
            end: header_end,
            reason: format!("checksum mismatch ({stored:#010x} stored, {computed:#010x} computed)"),
        });
    }
    let header: BackupHeader = match postcard::from_bytes(header_bytes) {
        Ok(h) => h,
        Err(e) => {
            return Err(BackupError::Header {
                end: header_end,
                reason: e.to_string(),
            })
        }
    };
    let total = header_end
        .checked_add(header.data_len)
        .and_then(|n| n.checked_add(CHECKSUM_BYTES as u64))
        .ok_or_else(|| BackupError::Header {
            end: header_end,
            reason: format!("data length {} overflows", header.data_len),
        })?;
    if len < total {
        return Err(truncated(Some(total)));
    }
    if len > total {
        return Err(BackupError::Trailing {
            end: total,
            extra: len - total,
        });
    }
    let body_end = (total as usize) - CHECKSUM_BYTES;
    let stored = word(body_end);
    let computed = crc32c::crc32c(&file[..body_end]);
    if stored != computed {
        return Err(BackupError::Checksum {
            stored,
            computed,
            end: body_end as u64,
        });
    }
    Ok((header, &file[header_end as usize..body_end]))
}

fn bad_magic(file: &[u8]) -> BackupError {
    let head = &file[..file.len().min(MAGIC.len())];
    BackupError::BadMagic {
        found: String::from_utf8_lossy(head).into_owned(),
    }
}

/// The state in a verified backup, decoded (which also proves it restores).
pub fn decode_state(data: &[u8]) -> Result<KvStore, BackupError> {
    let mut store = KvStore::new(Limits::default());
    store
        .restore(data)
        .map_err(|e| BackupError::State(e.to_string()))?;
    Ok(store)
}

/// The bytes before the data: prefix and header.
fn encode_head(header: &BackupHeader) -> Result<Vec<u8>> {
    let h = postcard::to_stdvec(header).context("encoding the backup header")?;
    let mut head = Vec::with_capacity(PREFIX_BYTES + h.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    head.extend_from_slice(&(h.len() as u32).to_le_bytes());
    head.extend_from_slice(&crc32c::crc32c(&h).to_le_bytes());
    head.extend_from_slice(&h);
    Ok(head)
}

/// The whole file for `header` (whose `data_len` is set here) and `data`.
#[cfg(test)]
pub fn encode(mut header: BackupHeader, data: &[u8]) -> Vec<u8> {
    header.data_len = data.len() as u64;
    let mut file = encode_head(&header).expect("header encodes");
    file.extend_from_slice(data);
    let crc = crc32c::crc32c(&file);
    file.extend_from_slice(&crc.to_le_bytes());
    file
}

/// Writes a backup to `path`: `path.tmp` first, fsynced, then renamed, then the directory
/// fsynced. Returns the file's length.
pub fn write_file(path: &Path, mut header: BackupHeader, data: &[u8]) -> Result<u64> {
    header.data_len = data.len() as u64;
    let head = encode_head(&header)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), data);
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&head)?;
        f.write_all(data)?;
        f.write_all(&crc.to_le_bytes())?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_parent(path)?;
    Ok((head.len() + data.len() + CHECKSUM_BYTES) as u64)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Fsyncs the directory holding `path`, so that a rename in it is durable.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", parent.display()))
}

/// Reads and verifies a backup file; the error names the file and what is wrong.
pub fn read_file(path: &Path) -> Result<(BackupHeader, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (header, data) = decode(&bytes).with_context(|| format!("{}", path.display()))?;
    Ok((header, data.to_vec()))
}

/// What a restore made.
#[derive(Debug)]
pub struct Restored {
    /// The header of the file restored.
    pub header: BackupHeader,
    /// Keys in the state.
    pub keys: usize,
}

/// Makes `dir` the data directory of server `id` of a new cluster `cluster_id` whose voters
/// are `voters`, from the backup `file`. Refuses a damaged file, an `id` not among `voters`,
/// and a `dir` that exists and is not empty; writes nothing then.
pub fn restore(
    file: &Path,
    dir: &Path,
    id: u64,
    voters: &[u64],
    cluster_id: Option<u64>,
) -> Result<Restored> {
    if !voters.contains(&id) {
        bail!("--id {id} is not one of the ids in --peers ({voters:?})");
    }
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            bail!(
                "{} is not empty: restore makes a new server's data directory; give a new or \
                 empty directory (move the old one aside first)",
                dir.display()
            );
        }
    } else if dir.exists() {
        bail!("{} exists and is not a directory", dir.display());
    }
    let (header, data) = read_file(file)?;
    let keys = decode_state(&data)
        .with_context(|| format!("{}", file.display()))?
        .len();
    let cluster_id = cluster_id.unwrap_or(header.cluster_id);
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".restore-{}", std::process::id()));
    let tmp = dir.with_file_name(tmp_name);
    let build = || -> Result<()> {
        let mut disk = StdDisk::new(&tmp)?;
        let mut storage =
            DurableStorage::open(&mut disk, cluster_id, id, StorageConfig::default())?;
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                index: LogIndex(header.index),
                term: Term(header.term),
                // The new cluster's members, all voters (whatever learners or joint
                // configuration the saved cluster had).
                voters: voters.iter().map(|&v| NodeId(v)).collect(),
                ..SnapshotMeta::default()
            },
            data,
        };
        storage.apply_snapshot(&mut disk, snapshot)?;
        let hard_state = HardState {
            term: Term(header.term),
            vote: None,
            commit: LogIndex(header.index),
        };
        storage.set_hard_state(&mut disk, hard_state)?;
        storage.sync(&mut disk)?;
        drop(storage);
        drop(disk);
        if dir.exists() {
            std::fs::remove_dir(dir).with_context(|| format!("replacing {}", dir.display()))?;
        }
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        sync_parent(dir)
    };
    if let Err(e) = build() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("restoring into {}", dir.display())));
    }
    Ok(Restored { header, keys })
}

/// The voter ids of a `--peers` list: `ID=ADDR` items (as `kv server --peers`) give their ids;
/// plain items (`ADDR`, as `--endpoints`) are numbered 1, 2, … in order.
pub fn peer_ids(peers: &str) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for (i, item) in peers.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            bail!("--peers {peers:?} has an empty item");
        }
        let id = match item.split_once('=') {
            Some((id, _)) => id
                .parse::<u64>()
                .with_context(|| format!("--peers: {id:?} in {item:?} is not a server id"))?,
            None => i as u64 + 1,
        };
        if id == 0 || ids.contains(&id) {
            bail!("--peers: server id {id} is zero or given twice");
        }
        ids.push(id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (BackupHeader, Vec<u8>) {
        let put = shoal_wire::kv::KvRequest {
            client: 1,
            request: 1,
            op: shoal_wire::kv::KvOp::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                expected: shoal_wire::kv::Expected::Any,
            },
            serializable: false,
        };
        let mut store = KvStore::new(Limits {
            max_sessions: 0,
            ..Limits::default()
        });
        store.apply(1, &put);
        let header = BackupHeader {
            cluster_id: 1,
            server: 2,
            index: 9,
            term: 3,
            voters: vec![1, 2, 3],
            data_len: 0,
            saved_unix_secs: 1_700_000_000,
            shoal_version: "0.1.0".into(),
        };
        (header, store.snapshot())
    }

    #[test]
    fn a_backup_round_trips() {
        let (header, data) = sample();
        let file = encode(header.clone(), &data);
        let (h, d) = decode(&file).unwrap();
        assert_eq!(d, data.as_slice());
        assert_eq!((h.index, h.term, h.data_len), (9, 3, data.len() as u64));
        assert_eq!(decode_state(d).unwrap().len(), 1);
    }

    /// Every single flipped byte and every truncation is refused (never a panic), with the
    /// message that names it.
    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let (header, data) = sample();
        let file = encode(header, &data);
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x40;
            let err = decode(&bad).expect_err("a flipped byte");
            let ok = match i {
                0..=7 => matches!(err, BackupError::BadMagic { .. }),
                8..=11 => matches!(err, BackupError::Version { .. }),
                _ if i + 4 >= file.len() => matches!(err, BackupError::Checksum { .. }),
                _ => matches!(
                    err,
                    BackupError::Header { .. }
                        | BackupError::Checksum { .. }
                        | BackupError::Truncated { .. }
                ),
            };
            assert!(ok, "byte {i}: {err}");
        }
        for cut in 0..file.len() {
            let err = decode(&file[..cut]).expect_err("a truncated file");
            assert!(
                matches!(err, BackupError::Truncated { at, .. } if at == cut as u64),
                "cut at {cut}: {err}"
            );
        }
        let err = decode(&file[..file.len() - 3]).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("truncated at byte {}", file.len() - 3))
                && err.contains(&format!("{} bytes long", file.len())),
            "{err}"
        );
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(BackupError::Trailing { extra: 1, .. })
        ));
    }

    #[test]
    fn peers_give_ids() {
        assert_eq!(peer_ids("1=a:1,2=b:2,5=c:3").unwrap(), vec![1, 2, 5]);
        assert_eq!(peer_ids("a:1,b:2,c:3").unwrap(), vec![1, 2, 3]);
        assert!(peer_ids("1=a:1,1=b:2").is_err());
        assert!(peer_ids("x=a:1").is_err());
    }
}
