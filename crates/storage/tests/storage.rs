//! Durability tests: restart, torn tails, corruption, truncation and compaction across
//! restarts, identity, group commit, snapshot files (any size, legacy format, corruption,
//! prepared on another handle, crashes at every step), and a property test against an
//! in-memory model.

use proptest::prelude::*;
use shoal_raft::{
    Entry, EntryKind, HardState, LogIndex, NodeId, Snapshot, SnapshotMeta, Storage, Term,
};
use shoal_storage::{
    encode_record, prepare_snapshot, Disk, DiskError, DurableStorage, Error, MemDisk,
    PreparedSnapshot, StdDisk, StorageConfig, LEGACY_SNAPSHOT_FILE, LOCK_FILE,
    SNAPSHOT_CHUNK_BYTES, SNAPSHOT_FILE,
};

fn e(index: u64, term: u64) -> Entry {
    Entry {
        term: Term(term),
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data: format!("{index}/{term}").into_bytes(),
    }
}

fn open(disk: &mut MemDisk) -> DurableStorage {
    DurableStorage::open(disk, 7, 1, small()).expect("opens")
}

fn small() -> StorageConfig {
    StorageConfig {
        max_segment_bytes: 200,
        ..StorageConfig::default()
    }
}

fn all(s: &DurableStorage) -> Vec<Entry> {
    s.entries(s.first_index(), s.last_index().next(), usize::MAX)
        .unwrap()
}

fn snap(index: u64, term: u64) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            index: LogIndex(index),
            term: Term(term),
            voters: vec![NodeId(1)],
            ..Default::default()
        },
        data: vec![1, 2, 3],
    }
}

#[test]
fn restart_reads_back_log_and_hard_state() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    let entries: Vec<_> = (1..=20).map(|i| e(i, 1 + i / 7)).collect();
    for x in &entries {
        s.append(&mut d, std::slice::from_ref(x)).unwrap();
    }
    let hs = HardState {
        term: Term(3),
        vote: Some(NodeId(2)),
        commit: LogIndex(12),
    };
    s.set_hard_state(&mut d, hs).unwrap();
    s.sync(&mut d).unwrap();
    assert!(s.segment_count() > 1, "segments rolled");
    d.crash(|_, _| 0);
    let s = open(&mut d);
    assert_eq!(all(&s), entries);
    assert_eq!(s.hard_state(), hs);
}

#[test]
fn unsynced_appends_are_lost_and_a_torn_tail_is_truncated() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    let synced: Vec<_> = (1..=3).map(|i| e(i, 1)).collect();
    s.append(&mut d, &synced).unwrap();
    s.sync(&mut d).unwrap();
    s.append(&mut d, &[e(4, 1), e(5, 1)]).unwrap();
    let mut torn = d.clone();
    d.crash(|_, _| 0);
    assert_eq!(all(&open(&mut d)), synced);
    // Keep all but 3 bytes of the unsynced tail: entry 4 whole, entry 5 torn.
    torn.crash(|_, n| n - 3);
    let mut s = open(&mut torn);
    assert_eq!(all(&s), vec![e(1, 1), e(2, 1), e(3, 1), e(4, 1)]);
    // The torn record was cut off: appending again and restarting works.
    s.append(&mut torn, &[e(5, 2)]).unwrap();
    s.sync(&mut torn).unwrap();
    let s = open(&mut torn);
    assert_eq!(all(&s).last(), Some(&e(5, 2)));
}

#[test]
fn corruption_in_the_middle_refuses_to_start_naming_file_and_offset() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &(1..=4).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    let seg = d
        .list()
        .unwrap()
        .into_iter()
        .find(|n| n.starts_with("seg-"))
        .unwrap();
    // Corrupt the payload of the second entry record.
    let buf = d.read(&seg).unwrap().unwrap();
    let header_len = 8 + buf[0] as usize;
    let first_len = 8 + buf[header_len] as usize;
    d.corrupt(&seg, header_len + first_len + 10);
    match DurableStorage::open(&mut d, 7, 1, small()) {
        Err(Error::Corrupt { file, offset, .. }) => {
            assert_eq!(file, seg);
            assert_eq!(offset, (header_len + first_len) as u64);
        }
        other => panic!("expected corruption, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn another_nodes_directory_is_refused() {
    let mut d = MemDisk::new();
    open(&mut d);
    match DurableStorage::open(&mut d, 7, 2, small()) {
        Err(Error::WrongIdentity {
            node: 2,
            found_node: 1,
            ..
        }) => {}
        other => panic!("expected wrong identity, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(
        DurableStorage::open(&mut d, 8, 1, small()),
        Err(Error::WrongIdentity { .. })
    ));
}

#[test]
fn truncation_and_compaction_survive_restarts() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &(1..=10).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    // Conflict at 6: entries 6.. replaced by term 2.
    s.append(&mut d, &[e(6, 2), e(7, 2)]).unwrap();
    s.sync(&mut d).unwrap();
    let mut s = open(&mut d);
    let want: Vec<_> = (1..=5).map(|i| e(i, 1)).chain([e(6, 2), e(7, 2)]).collect();
    assert_eq!(all(&s), want);
    // Compact to 4, restart.
    s.compact(&mut d, snap(4, 1)).unwrap();
    let mut s = open(&mut d);
    assert_eq!(s.first_index(), LogIndex(5));
    assert_eq!(s.term(LogIndex(4)), Ok(Term(1)));
    assert_eq!(all(&s), want[4..].to_vec());
    // A leader's snapshot replaces everything.
    s.apply_snapshot(&mut d, snap(20, 3)).unwrap();
    s.append(&mut d, &[e(21, 3)]).unwrap();
    s.sync(&mut d).unwrap();
    let s = open(&mut d);
    assert_eq!(s.first_index(), LogIndex(21));
    assert_eq!(all(&s), vec![e(21, 3)]);
    assert_eq!(s.snapshot().unwrap().data, vec![1, 2, 3]);
}

/// The snapshot threshold's measure: the live log, which compaction shrinks at once, even
/// while the active segment file keeps its dead prefix (measuring the files made the KV
/// server snapshot at every check after its first compaction).
#[test]
fn log_bytes_count_live_entries_and_drop_at_compaction() {
    let mut d = MemDisk::new();
    let mut s = DurableStorage::open(&mut d, 7, 1, StorageConfig::default()).expect("opens");
    assert_eq!(s.log_bytes(), 0);
    let entries: Vec<Entry> = (1..=10).map(|i| e(i, 1)).collect();
    s.append(&mut d, &entries).unwrap();
    s.sync(&mut d).unwrap();
    let per_entry = |e: &Entry| (e.data.len() + shoal_wire::raft::ENTRY_OVERHEAD_BYTES) as u64;
    assert_eq!(s.log_bytes(), entries.iter().map(per_entry).sum::<u64>());
    s.compact(&mut d, snap(8, 1)).unwrap();
    assert_eq!(s.segment_count(), 1, "one active segment, its prefix dead");
    assert_eq!(
        s.log_bytes(),
        entries[8..].iter().map(per_entry).sum::<u64>()
    );
    let s = open(&mut d);
    assert_eq!(
        s.log_bytes(),
        entries[8..].iter().map(per_entry).sum::<u64>()
    );
}

/// Regression (simulator, seed 8856 of `unreliable_churn`): a crash undid the deletion of one
/// superseded segment but not of the one before it, leaving a gap in front of a segment that a
/// later one supersedes. Recovery must skip wholly superseded segments.
#[test]
fn a_superseded_segment_after_a_gap_is_skipped() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    for i in 1..=30 {
        s.append(&mut d, &[e(i, 1)]).unwrap();
    }
    s.sync(&mut d).unwrap();
    let before: Vec<String> = d.list().unwrap();
    // Conflict at 3: a new segment supersedes from 3 on; the later segments die.
    s.append(&mut d, &[e(3, 2)]).unwrap();
    s.sync(&mut d).unwrap();
    // The crash undoes the deletions; then only the second segment's deletion is redone.
    d.crash(|_, n| n);
    let segs: Vec<&String> = before.iter().filter(|n| n.starts_with("seg-")).collect();
    assert!(segs.len() >= 3, "need several segments: {segs:?}");
    d.remove(segs[1]).unwrap();
    d.sync_dir().unwrap();
    let s = open(&mut d);
    assert_eq!(all(&s), vec![e(1, 1), e(2, 1), e(3, 2)]);
}

#[test]
fn group_commit_uses_one_fsync_for_many_appends() {
    let mut d = MemDisk::new();
    let mut s = DurableStorage::open(&mut d, 7, 1, StorageConfig::default()).unwrap();
    let before = d.syncs;
    for i in 1..=50 {
        s.append(&mut d, &[e(i, 1)]).unwrap();
    }
    s.sync(&mut d).unwrap();
    assert_eq!(d.syncs - before, 1);
}

#[test]
fn real_directory_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 1, 1, small()).unwrap();
    s.append(&mut d, &(1..=30).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    s.append(&mut d, &[e(25, 2)]).unwrap();
    s.sync(&mut d).unwrap();
    s.compact(&mut d, snap(10, 1)).unwrap();
    drop((s, d));
    let mut d = StdDisk::new(dir.path()).unwrap();
    let s = DurableStorage::open(&mut d, 1, 1, small()).unwrap();
    assert_eq!(s.first_index(), LogIndex(11));
    assert_eq!(s.last_index(), LogIndex(25));
    assert_eq!(s.term(LogIndex(25)), Ok(Term(2)));
    assert!(DurableStorage::open(&mut d, 1, 9, small()).is_err());
}

/// A directory is used by one `DurableStorage` at a time: a second open (a second process,
/// or here a second handle, which `flock` treats alike) is refused with the holder's pid, and
/// the lock goes with the disk that took it.
#[test]
fn a_second_open_of_a_directory_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = StdDisk::new(dir.path()).unwrap();
    let s = DurableStorage::open(&mut first, 1, 1, small()).unwrap();
    let mut second = StdDisk::new(dir.path()).unwrap();
    match DurableStorage::open(&mut second, 1, 1, small()) {
        Err(err @ Error::Disk(DiskError::Locked { .. })) => {
            assert!(err.is_about_directory());
            let text = err.to_string();
            let expected = format!(
                "data directory {} is in use by pid {}",
                dir.path().display(),
                std::process::id()
            );
            assert_eq!(text, expected);
        }
        other => panic!("expected the directory locked, got {:?}", other.map(|_| ())),
    }
    // Reopening through the disk that holds the lock is fine (it is already ours).
    drop(s);
    DurableStorage::open(&mut first, 1, 1, small()).unwrap();
    drop(first);
    DurableStorage::open(&mut second, 1, 1, small()).unwrap();
    // The lock file is the disk's, not the storage's: not listed.
    assert!(!second.list().unwrap().iter().any(|n| n == LOCK_FILE));
}

/// A LOCK file left by a process that died (SIGKILL leaves it behind) does not block a start:
/// only a live flock does.
#[test]
fn a_stale_lock_file_does_not_block_a_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(LOCK_FILE), "999999\n").unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    DurableStorage::open(&mut d, 1, 1, small()).unwrap();
    let pid = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
    assert_eq!(pid.trim(), std::process::id().to_string());
}

/// A directory of unrelated files is named as such, not reported as corrupt, and left alone.
#[test]
fn a_directory_of_other_files_is_not_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    match DurableStorage::open(&mut d, 1, 1, small()) {
        Err(err @ Error::Foreign { .. }) => {
            assert!(err.is_about_directory());
            assert_eq!(
                err.to_string(),
                format!(
                    "{} is not a Shoal data directory (it holds other files: notes.txt)",
                    dir.path().display()
                )
            );
        }
        other => panic!("expected a foreign directory, got {:?}", other.map(|_| ())),
    }
    // Left exactly as it was: no identity, no lock file.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, ["notes.txt"]);
    // Shoal's own files without the identity are damage, reported as such.
    let mut m = MemDisk::new();
    m.create("hardstate").unwrap();
    assert!(matches!(
        DurableStorage::open(&mut m, 1, 1, small()),
        Err(Error::Corrupt { .. })
    ));
}

/// The OS error under a disk error is its `source()`, not repeated in its message.
#[test]
fn a_disk_error_does_not_repeat_its_cause() {
    let err = Error::Disk(DiskError::Io {
        op: "append",
        name: "seg-0000000000000001.log".into(),
        source: std::io::Error::from_raw_os_error(28),
    });
    let text = err.to_string();
    assert_eq!(text, "append seg-0000000000000001.log");
    let cause = std::error::Error::source(&err)
        .expect("a cause")
        .to_string();
    assert!(cause.contains("No space left on device"), "{cause}");
}

/// A snapshot whose data says which index it is of.
fn snap_of(index: u64, term: u64) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            index: LogIndex(index),
            term: Term(term),
            voters: vec![NodeId(1), NodeId(2)],
            ..Default::default()
        },
        data: format!("state at {index}").into_bytes(),
    }
}

/// `len` bytes of a pattern that repeats only every 2^32 bytes (so a misplaced chunk shows).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) ^ seed).rotate_right(11) as u8)
        .collect()
}

fn big_snap(index: u64, term: u64, len: usize, seed: u32) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            index: LogIndex(index),
            term: Term(term),
            voters: vec![NodeId(1)],
            ..Default::default()
        },
        data: pattern(len, seed),
    }
}

fn per_entry(e: &Entry) -> u64 {
    (e.data.len() + shoal_wire::raft::ENTRY_OVERHEAD_BYTES) as u64
}

/// `log_bytes` by its definition.
fn summed_log_bytes(s: &DurableStorage) -> u64 {
    all(s).iter().map(per_entry).sum()
}

fn tmp_files(d: &impl Disk) -> Vec<String> {
    d.list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Over 64 MiB, the limit of one record: the snapshot file has no limit but memory. Through
/// `compact`, through `prepare_snapshot` + `install_prepared`, and back at open, on a real
/// directory.
#[test]
fn a_snapshot_over_64_mib_round_trips_on_a_real_directory() {
    const LEN: usize = (65 << 20) + 3;
    let dir = tempfile::tempdir().unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 1, 1, StorageConfig::default()).unwrap();
    s.append(&mut d, &(1..=10).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    s.compact(&mut d, big_snap(4, 1, LEN, 1)).unwrap();
    drop((s, d));
    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 1, 1, StorageConfig::default()).unwrap();
    assert_eq!(s.first_index(), LogIndex(5));
    let got = s.snapshot().unwrap();
    assert_eq!(got.meta, big_snap(4, 1, 0, 1).meta);
    assert_eq!(got.data.len(), LEN);
    assert!(got.data == pattern(LEN, 1), "snapshot data differs");
    drop(got);
    // Header, one record per chunk, nothing else.
    let file_len = std::fs::metadata(dir.path().join(SNAPSHOT_FILE))
        .unwrap()
        .len() as usize;
    let chunks = LEN.div_ceil(SNAPSHOT_CHUNK_BYTES);
    assert_eq!(chunks, 66);
    assert!(file_len > LEN + 8 * chunks && file_len < LEN + 8 * chunks + 64);

    let prepared = prepare_snapshot(&mut d, big_snap(8, 1, LEN, 2)).unwrap();
    assert_eq!(prepared.meta().index, LogIndex(8));
    assert!(s.install_prepared(&mut d, prepared).unwrap());
    assert_eq!(s.first_index(), LogIndex(9));
    drop((s, d));
    let mut d = StdDisk::new(dir.path()).unwrap();
    let s = DurableStorage::open(&mut d, 1, 1, StorageConfig::default()).unwrap();
    assert_eq!(s.first_index(), LogIndex(9));
    assert_eq!(all(&s), vec![e(9, 1), e(10, 1)]);
    assert!(s.snapshot().unwrap().data == pattern(LEN, 2));
    assert_eq!(tmp_files(&d), Vec::<String>::new());
}

/// A log entry over 64 MiB (a sharded group's Install of a large shard is one entry): written,
/// synced, read back at open on a real directory, between small entries.
#[test]
fn a_log_entry_over_64_mib_round_trips_on_a_real_directory() {
    const LEN: usize = (65 << 20) + 5;
    let dir = tempfile::tempdir().unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 1, 1, StorageConfig::default()).unwrap();
    let mut big = e(2, 1);
    big.data = pattern(LEN, 3);
    let entries = vec![e(1, 1), big, e(3, 1)];
    s.append(&mut d, &entries).unwrap();
    s.sync(&mut d).unwrap();
    drop((s, d));
    let mut d = StdDisk::new(dir.path()).unwrap();
    let s = DurableStorage::open(&mut d, 1, 1, StorageConfig::default()).unwrap();
    assert!(all(&s) == entries, "entries differ after a reopen");
    assert_eq!(summed_log_bytes(&s), s.log_bytes());
}

/// The same size through `apply_snapshot`, a crash and a reopen, on the in-memory disk.
#[test]
fn a_leaders_snapshot_over_64_mib_survives_a_crash() {
    const LEN: usize = (65 << 20) + 3;
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &[e(1, 1), e(2, 1)]).unwrap();
    s.apply_snapshot(&mut d, big_snap(30, 2, LEN, 3)).unwrap();
    drop(s);
    d.crash(|_, _| 0);
    let s = open(&mut d);
    assert_eq!(s.first_index(), LogIndex(31));
    assert_eq!(s.last_index(), LogIndex(30));
    let got = s.snapshot().unwrap();
    assert_eq!(got.meta.term, Term(2));
    assert!(got.data == pattern(LEN, 3));
}

/// Writes the snapshot file as the storage did before `snapshot-v2`: one framed record.
fn write_legacy_snapshot(d: &mut MemDisk, snapshot: &Snapshot) {
    /// The single-record layout: the meta had only the voters.
    #[derive(serde::Serialize)]
    struct Legacy<'a> {
        index: LogIndex,
        term: Term,
        voters: &'a [NodeId],
        data: &'a [u8],
    }
    let legacy = Legacy {
        index: snapshot.meta.index,
        term: snapshot.meta.term,
        voters: &snapshot.meta.voters,
        data: &snapshot.data,
    };
    let mut buf = Vec::new();
    encode_record(&legacy, &mut buf);
    d.create(LEGACY_SNAPSHOT_FILE).unwrap();
    d.append(LEGACY_SNAPSHOT_FILE, &buf).unwrap();
    d.sync(LEGACY_SNAPSHOT_FILE).unwrap();
    d.sync_dir().unwrap();
}

#[test]
fn a_legacy_snapshot_file_is_read_and_removed_once_a_new_one_is_durable() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &(1..=8).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    drop(s);
    // A directory of the previous version, compacted to 3.
    write_legacy_snapshot(&mut d, &snap_of(3, 1));
    let mut s = open(&mut d);
    assert_eq!(s.first_index(), LogIndex(4));
    assert_eq!(s.snapshot().unwrap(), snap_of(3, 1));
    assert_eq!(s.log_bytes(), summed_log_bytes(&s));
    // Reading it changes nothing on disk.
    assert!(d
        .list()
        .unwrap()
        .contains(&LEGACY_SNAPSHOT_FILE.to_string()));
    assert!(!d.list().unwrap().contains(&SNAPSHOT_FILE.to_string()));

    s.compact(&mut d, snap_of(5, 1)).unwrap();
    let names = d.list().unwrap();
    assert!(names.contains(&SNAPSHOT_FILE.to_string()));
    assert!(!names.contains(&LEGACY_SNAPSHOT_FILE.to_string()));
    // Whether or not the removal survives a crash, the new snapshot is the one read.
    for keep_dir in [0, 1] {
        let mut c = d.clone();
        c.crash_keeping(keep_dir, |_, _| 0);
        let s = open(&mut c);
        assert_eq!(s.snapshot().unwrap(), snap_of(5, 1));
        assert_eq!(all(&s), (6..=8).map(|i| e(i, 1)).collect::<Vec<_>>());
        assert!(!c
            .list()
            .unwrap()
            .contains(&LEGACY_SNAPSHOT_FILE.to_string()));
    }
    // The removal is durable after the next sync.
    s.sync(&mut d).unwrap();
    assert_eq!(d.unsynced_dir_ops(), 0);
}

#[test]
fn a_legacy_snapshot_file_next_to_a_new_one_is_stale() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &(1..=8).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    s.compact(&mut d, snap_of(6, 1)).unwrap();
    drop(s);
    write_legacy_snapshot(&mut d, &snap_of(3, 1));
    let mut s = open(&mut d);
    assert_eq!(s.snapshot().unwrap(), snap_of(6, 1));
    assert!(!d
        .list()
        .unwrap()
        .contains(&LEGACY_SNAPSHOT_FILE.to_string()));
    s.sync(&mut d).unwrap();
    assert_eq!(d.unsynced_dir_ops(), 0, "its removal is made durable");
}

/// A storage compacted to 2 with a snapshot of three and a half chunks, and the snapshot file.
fn with_multi_chunk_snapshot() -> (MemDisk, Vec<u8>) {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &(1..=4).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    s.compact(&mut d, big_snap(2, 1, SNAPSHOT_CHUNK_BYTES * 7 / 2, 4))
        .unwrap();
    let file = d.read(SNAPSHOT_FILE).unwrap().unwrap();
    (d, file)
}

fn expect_corrupt(d: &mut MemDisk, what: &str) -> (u64, String) {
    match DurableStorage::open(d, 7, 1, small()) {
        Err(Error::Corrupt {
            file,
            offset,
            reason,
        }) => {
            assert_eq!(file, SNAPSHOT_FILE, "{what}");
            (offset, reason)
        }
        other => panic!("{what}: expected corruption, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_damaged_snapshot_file_refuses_to_start_naming_file_and_offset() {
    let (d, file) = with_multi_chunk_snapshot();
    let header = 8 + u32::from_le_bytes(file[0..4].try_into().unwrap()) as usize;
    let chunk = |k: usize| header + k * (8 + SNAPSHOT_CHUNK_BYTES);
    assert_eq!(file.len(), chunk(3) + 8 + SNAPSHOT_CHUNK_BYTES / 2);
    // It opens as written.
    let mut ok = d.clone();
    assert_eq!(
        open(&mut ok).snapshot().unwrap().data,
        pattern(SNAPSHOT_CHUNK_BYTES * 7 / 2, 4)
    );

    // A flipped byte in the data, in a record header, in the header record.
    for (at, record) in [
        (chunk(1) + 8 + 12_345, chunk(1)),
        (chunk(3) + 8, chunk(3)),
        (chunk(2) + 1, chunk(2)),
        (chunk(2) + 5, chunk(2)),
        (3, 0),
        (header - 1, 0),
    ] {
        let mut bad = d.clone();
        bad.corrupt(SNAPSHOT_FILE, at);
        let (offset, reason) = expect_corrupt(&mut bad, &format!("byte {at} flipped"));
        assert_eq!(offset, record as u64, "byte {at} flipped: {reason}");
    }
    // Truncated: inside a record header, inside a chunk, at a record boundary, empty.
    for (len, record) in [
        (chunk(2) + 3, chunk(2)),
        (chunk(3) + 100, chunk(3)),
        (chunk(3), chunk(3)),
        (header, header),
        (5, 0),
        (0, 0),
    ] {
        let mut bad = d.clone();
        bad.truncate(SNAPSHOT_FILE, len as u64).unwrap();
        bad.sync(SNAPSHOT_FILE).unwrap();
        let (offset, reason) = expect_corrupt(&mut bad, &format!("cut at {len}"));
        assert_eq!(offset, record as u64, "cut at {len}: {reason}");
    }
    // Trailing bytes, even zeros.
    for tail in [&[0u8][..], &[0; 8], b"garbage"] {
        let mut bad = d.clone();
        bad.append(SNAPSHOT_FILE, tail).unwrap();
        bad.sync(SNAPSHOT_FILE).unwrap();
        let (offset, reason) = expect_corrupt(&mut bad, "trailing bytes");
        assert_eq!(offset, file.len() as u64, "{reason}");
    }
    // A chunk record claiming another length than the header implies.
    for claimed in [0u32, 1, SNAPSHOT_CHUNK_BYTES as u32 + 1, u32::MAX] {
        let mut bad = d.clone();
        let mut buf = file.clone();
        buf[chunk(1)..chunk(1) + 4].copy_from_slice(&claimed.to_le_bytes());
        bad.create(SNAPSHOT_FILE).unwrap();
        bad.append(SNAPSHOT_FILE, &buf).unwrap();
        bad.sync(SNAPSHOT_FILE).unwrap();
        bad.sync_dir().unwrap();
        let (offset, reason) = expect_corrupt(&mut bad, &format!("length {claimed}"));
        assert_eq!(offset, chunk(1) as u64, "{reason}");
        assert!(reason.contains("length"), "{reason}");
    }
}

#[test]
fn a_superseded_prepared_snapshot_is_not_installed_and_its_file_goes() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &(1..=10).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    let older = prepare_snapshot(&mut d, snap_of(4, 1)).unwrap();
    let same = prepare_snapshot(&mut d, snap_of(6, 1)).unwrap();
    assert_ne!(older.file_name(), same.file_name());
    assert_eq!(tmp_files(&d).len(), 2);
    s.compact(&mut d, snap_of(6, 1)).unwrap();
    assert!(!s.install_prepared(&mut d, older).unwrap());
    assert!(!s.install_prepared(&mut d, same).unwrap());
    assert_eq!(tmp_files(&d), Vec::<String>::new());
    assert_eq!(s.first_index(), LogIndex(7));
    assert_eq!(s.snapshot().unwrap(), snap_of(6, 1));
    // A leader's snapshot supersedes one prepared before it, too.
    let stale = prepare_snapshot(&mut d, snap_of(8, 1)).unwrap();
    s.apply_snapshot(&mut d, snap_of(20, 2)).unwrap();
    assert!(!s.install_prepared(&mut d, stale).unwrap());
    assert_eq!(tmp_files(&d), Vec::<String>::new());
    let s = open(&mut d);
    assert_eq!(s.snapshot().unwrap(), snap_of(20, 2));
    assert_eq!(s.first_index(), LogIndex(21));
}

#[test]
fn a_prepared_snapshot_beyond_the_log_is_refused_and_its_file_goes() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &(1..=3).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    let prepared = prepare_snapshot(&mut d, snap_of(5, 1)).unwrap();
    assert!(matches!(
        s.install_prepared(&mut d, prepared),
        Err(Error::Invalid(_))
    ));
    assert_eq!(tmp_files(&d), Vec::<String>::new());
    assert_eq!(s.first_index(), LogIndex(1));
    assert!(matches!(
        s.compact(&mut d, snap_of(5, 1)),
        Err(Error::Invalid(_))
    ));
    assert_eq!(tmp_files(&d), Vec::<String>::new());
}

#[test]
fn an_interrupted_prepare_leaves_a_tmp_file_that_open_removes() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    s.append(&mut d, &(1..=5).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    s.compact(&mut d, snap_of(2, 1)).unwrap();
    // Prepared and never installed; another one cut short by the crash, its name durable.
    let _never = prepare_snapshot(&mut d, snap_of(3, 1)).unwrap();
    let name = format!("{SNAPSHOT_FILE}.{:020}.tmp", 4);
    d.create(&name).unwrap();
    d.append(&name, b"half a snapsh").unwrap();
    d.sync_dir().unwrap();
    drop(s);
    d.crash(|_, n| n / 2);
    assert_eq!(tmp_files(&d).len(), 2);
    let s = open(&mut d);
    assert_eq!(tmp_files(&d), Vec::<String>::new());
    assert_eq!(s.snapshot().unwrap(), snap_of(2, 1));
    assert_eq!(all(&s), (3..=5).map(|i| e(i, 1)).collect::<Vec<_>>());
}

/// The KV server's way: the snapshot file is written on another thread through its own
/// `StdDisk` of the directory while the storage keeps appending and syncing; the install is a
/// rename.
#[test]
fn a_snapshot_prepared_on_a_second_handle_while_the_first_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 1, 1, small()).unwrap();
    s.append(&mut d, &(1..=20).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    let len = 3 * SNAPSHOT_CHUNK_BYTES + 17;
    let prepared = std::thread::scope(|scope| {
        let path = dir.path();
        let writer = scope.spawn(move || {
            let mut other = StdDisk::new(path).unwrap();
            prepare_snapshot(&mut other, big_snap(15, 1, len, 5)).unwrap()
        });
        for i in 21..=80 {
            s.append(&mut d, &[e(i, 2)]).unwrap();
            if i % 7 == 0 {
                s.sync(&mut d).unwrap();
            }
        }
        writer.join().unwrap()
    });
    assert!(s.segment_count() > 3, "segments rolled meanwhile");
    assert!(s.install_prepared(&mut d, prepared).unwrap());
    assert_eq!(s.first_index(), LogIndex(16));
    s.append(&mut d, &[e(81, 2)]).unwrap();
    s.sync(&mut d).unwrap();
    let want: Vec<Entry> = (16..=20)
        .map(|i| e(i, 1))
        .chain((21..=81).map(|i| e(i, 2)))
        .collect();
    assert_eq!(all(&s), want);
    drop((s, d));
    let mut d = StdDisk::new(dir.path()).unwrap();
    let s = DurableStorage::open(&mut d, 1, 1, small()).unwrap();
    assert_eq!(all(&s), want);
    assert_eq!(s.log_bytes(), want.iter().map(per_entry).sum::<u64>());
    let got = s.snapshot().unwrap();
    assert_eq!(got.meta.index, LogIndex(15));
    assert!(got.data == pattern(len, 5));
    assert_eq!(tmp_files(&d), Vec::<String>::new());
}

#[test]
fn log_bytes_is_the_summed_size_through_every_change() {
    let mut d = MemDisk::new();
    let mut s = open(&mut d);
    let check = |s: &DurableStorage, what: &str| {
        assert_eq!(s.log_bytes(), summed_log_bytes(s), "after {what}");
    };
    check(&s, "open");
    s.append(&mut d, &(1..=12).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    check(&s, "append");
    s.append(&mut d, &[e(9, 2), e(10, 2)]).unwrap();
    check(&s, "a conflicting append");
    s.sync(&mut d).unwrap();
    s.compact(&mut d, snap_of(3, 1)).unwrap();
    check(&s, "compact");
    let prepared = prepare_snapshot(&mut d, snap_of(6, 1)).unwrap();
    s.append(&mut d, &[e(11, 2)]).unwrap();
    check(&s, "append");
    assert!(s.install_prepared(&mut d, prepared).unwrap());
    check(&s, "install");
    assert!(s.log_bytes() > 0);
    drop(s);
    let mut s = open(&mut d);
    check(&s, "reopen");
    s.append(&mut d, &[e(8, 3)]).unwrap();
    check(&s, "truncating append");
    s.apply_snapshot(&mut d, snap_of(30, 3)).unwrap();
    check(&s, "apply_snapshot");
    assert_eq!(s.log_bytes(), 0);
    s.append(&mut d, &[e(31, 3)]).unwrap();
    check(&s, "append after apply_snapshot");
    s.sync(&mut d).unwrap();
    d.crash(|_, _| 0);
    check(&open(&mut d), "crash");
}

/// A disk that fails (as if the machine stopped) after a number of writing operations.
struct StopAfter<'a> {
    disk: &'a mut MemDisk,
    left: usize,
}

impl StopAfter<'_> {
    fn step(&mut self, op: &'static str, name: &str) -> Result<(), DiskError> {
        if self.left == 0 {
            return Err(DiskError::Other {
                op,
                name: name.to_string(),
                reason: "stopped".into(),
            });
        }
        self.left -= 1;
        Ok(())
    }
}

impl Disk for StopAfter<'_> {
    fn list(&self) -> Result<Vec<String>, DiskError> {
        self.disk.list()
    }
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, DiskError> {
        self.disk.read(name)
    }
    fn create(&mut self, name: &str) -> Result<(), DiskError> {
        self.step("create", name)?;
        self.disk.create(name)
    }
    fn append(&mut self, name: &str, bytes: &[u8]) -> Result<(), DiskError> {
        self.step("append", name)?;
        self.disk.append(name, bytes)
    }
    fn truncate(&mut self, name: &str, len: u64) -> Result<(), DiskError> {
        self.step("truncate", name)?;
        self.disk.truncate(name, len)
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<(), DiskError> {
        self.step("rename", from)?;
        self.disk.rename(from, to)
    }
    fn remove(&mut self, name: &str) -> Result<(), DiskError> {
        self.step("remove", name)?;
        self.disk.remove(name)
    }
    fn sync(&mut self, name: &str) -> Result<(), DiskError> {
        self.step("sync", name)?;
        self.disk.sync(name)
    }
    fn sync_dir(&mut self) -> Result<(), DiskError> {
        self.step("sync dir", ".")?;
        self.disk.sync_dir()
    }
}

/// The snapshot operations, stopped after every one of their disk operations, then crashed in
/// every way `MemDisk` knows (any prefix of the unsynced directory operations; none, half or
/// all of the unsynced bytes): the storage opens, on the old snapshot and its log or the new
/// snapshot and the rest of the log, with no temporary file left.
#[test]
fn a_crash_at_any_step_of_a_snapshot_leaves_the_old_or_the_new_one() {
    #[derive(Debug, Clone, Copy)]
    enum SnapOp {
        Compact,
        /// A leader's snapshot at an index (it replaces the whole log, even entries after it).
        Apply(u64),
        PrepareAppendInstall,
    }
    // Entries 1..=12 (term 2 from 8), synced, a vote; compacted to 3 (legacy file or not).
    let setup = |legacy: bool| {
        let mut d = MemDisk::new();
        let mut s = open(&mut d);
        let log: Vec<Entry> = (1..=12).map(|i| e(i, if i < 8 { 1 } else { 2 })).collect();
        s.append(&mut d, &log).unwrap();
        s.set_hard_state(
            &mut d,
            HardState {
                term: Term(2),
                vote: Some(NodeId(1)),
                commit: LogIndex(10),
            },
        )
        .unwrap();
        s.sync(&mut d).unwrap();
        if legacy {
            drop(s);
            write_legacy_snapshot(&mut d, &snap_of(3, 1));
        } else {
            s.compact(&mut d, snap_of(3, 1)).unwrap();
        }
        d
    };
    let expected = |i: u64| e(i, if i < 8 { 1 } else { 2 });
    for legacy in [false, true] {
        for op in [
            SnapOp::Compact,
            SnapOp::Apply(9),
            SnapOp::Apply(20),
            SnapOp::PrepareAppendInstall,
        ] {
            let new_index = match op {
                SnapOp::Apply(at) => at,
                _ => 9,
            };
            let mut steps = 0;
            loop {
                let mut d = setup(legacy);
                let mut s = open(&mut d);
                let mut stop = StopAfter {
                    disk: &mut d,
                    left: steps,
                };
                let result = match op {
                    SnapOp::Compact => s.compact(&mut stop, snap_of(9, 2)),
                    SnapOp::Apply(at) => s.apply_snapshot(&mut stop, snap_of(at, 3)),
                    SnapOp::PrepareAppendInstall => prepare_snapshot(&mut stop, snap_of(9, 2))
                        .and_then(|p| {
                            s.append(&mut stop, &[expected(13)])?;
                            s.install_prepared(&mut stop, p).map(|_| ())
                        }),
                };
                if result.is_ok() {
                    break;
                }
                drop(s);
                let what = format!("{op:?} (legacy {legacy}) stopped after {steps} steps");
                for keep_dir in 0..=d.unsynced_dir_ops() {
                    for keep_bytes in [0, 1, 2] {
                        let mut c = d.clone();
                        c.crash_keeping(keep_dir, |_, n| n * keep_bytes / 2);
                        let what = format!("{what}, {keep_dir} dir ops, {keep_bytes}/2 bytes");
                        let s = DurableStorage::open(&mut c, 7, 1, small())
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        let snapshot = s.snapshot().unwrap();
                        let at = snapshot.meta.index.0;
                        assert!(at == 3 || at == new_index, "{what}: snapshot at {at}");
                        assert_eq!(snapshot, snap_of(at, snapshot.meta.term.0), "{what}");
                        // The log is a prefix of the one it had (with the entry appended meanwhile)
                        // that keeps everything the operation does not drop: a leader's snapshot
                        // drops the whole log, and its superseding segment (written first) what
                        // follows its index.
                        let log = all(&s);
                        let had: Vec<Entry> = (at + 1..=13).map(expected).collect();
                        let keeps = match op {
                            SnapOp::Apply(i) if at == i => 0,
                            SnapOp::Apply(i) => i.min(12) - at,
                            _ => 12 - at,
                        };
                        assert!(had.starts_with(&log), "{what}: {log:?}");
                        assert!(log.len() as u64 >= keeps, "{what}: {log:?}");
                        if matches!(op, SnapOp::Apply(i) if at == i) {
                            assert_eq!(log, vec![], "{what}: the old log after the new snapshot");
                        } else if !matches!(op, SnapOp::PrepareAppendInstall) {
                            assert!(log.len() as u64 <= 12 - at.min(12), "{what}: {log:?}");
                        }
                        assert_eq!(s.hard_state().term, Term(2), "{what}");
                        assert_eq!(s.log_bytes(), summed_log_bytes(&s), "{what}");
                        assert_eq!(tmp_files(&c), Vec::<String>::new(), "{what}");
                        if c.list().unwrap().contains(&SNAPSHOT_FILE.to_string()) {
                            assert!(
                                !c.list()
                                    .unwrap()
                                    .contains(&LEGACY_SNAPSHOT_FILE.to_string()),
                                "{what}"
                            );
                        }
                    }
                }
                steps += 1;
                assert!(steps < 100, "{op:?} never completes");
            }
            assert!(steps > 4, "{op:?} completed in {steps} steps");
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` entries of `term` starting `back` entries before the end.
    Append {
        back: u64,
        n: u64,
        term_bump: bool,
    },
    Sync,
    /// Compact at a fraction of the log.
    Compact {
        at_percent: u64,
    },
    /// Prepare a snapshot at a fraction of the log, to install later.
    Prepare {
        at_percent: u64,
    },
    /// Install the prepared snapshot, if any.
    Install,
    /// Install a leader's snapshot at a fraction of the log or up to 3 entries beyond it.
    ApplySnapshot {
        at_percent: u64,
    },
    /// A new term and vote (written durably at once, after the log).
    Vote,
    /// Crash keeping `keep_percent` of each file's unsynced tail and `keep_dir_percent` of the
    /// unsynced directory operations, then reopen.
    Crash {
        keep_percent: u64,
        keep_dir_percent: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4u64, 1..5u64, any::<bool>()).prop_map(|(back, n, term_bump)| Op::Append { back, n, term_bump }),
        2 => Just(Op::Sync),
        1 => Just(Op::Vote),
        1 => (0..100u64).prop_map(|at_percent| Op::Compact { at_percent }),
        1 => (0..100u64).prop_map(|at_percent| Op::Prepare { at_percent }),
        1 => Just(Op::Install),
        1 => (0..100u64).prop_map(|at_percent| Op::ApplySnapshot { at_percent }),
        2 => (0..100u64, 0..=100u64).prop_map(|(keep_percent, keep_dir_percent)| Op::Crash { keep_percent, keep_dir_percent }),
    ]
}

/// The model: the log as a map index -> entry, plus the snapshot index.
#[derive(Clone, Debug, PartialEq)]
struct Model {
    snap: u64,
    snap_term: u64,
    log: Vec<Entry>,
}

impl Model {
    fn last(&self) -> u64 {
        self.snap + self.log.len() as u64
    }
    fn get(&self, i: u64) -> Option<&Entry> {
        if i <= self.snap {
            return None;
        }
        self.log.get((i - self.snap - 1) as usize)
    }
}

proptest! {

    #[test]
    fn storage_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut d = MemDisk::new();
        let mut s = open(&mut d);
        let mut cur = Model { snap: 0, snap_term: 0, log: vec![] };
        let mut synced = cur.clone();
        let mut history = vec![cur.clone()];
        let mut hard_state = HardState::default();
        let mut term = 1;
        let mut prepared: Option<(PreparedSnapshot, Entry)> = None;
        for op in ops {
            match op {
                Op::Append { back, n, term_bump } => {
                    if term_bump { term += 1; }
                    let start = (cur.last() + 1).saturating_sub(back).max(cur.snap + 1);
                    let entries: Vec<_> = (start..start + n).map(|i| e(i, term)).collect();
                    s.append(&mut d, &entries).unwrap();
                    if start <= cur.last() {
                        // Suffix truncation is its own step: a crash may keep the truncation
                        // without the new entries (Raft only truncates uncommitted entries).
                        cur.log.truncate((start - cur.snap - 1) as usize);
                        history.push(cur.clone());
                    }
                    cur.log.extend(entries);
                    history.push(cur.clone());
                }
                Op::Vote => {
                    hard_state.term = Term(hard_state.term.0 + 1);
                    hard_state.vote = Some(NodeId(hard_state.term.0 % 3 + 1));
                    s.set_hard_state(&mut d, hard_state).unwrap();
                    // A term/vote change syncs the log first.
                    synced = cur.clone();
                    history = vec![cur.clone()];
                }
                Op::Sync => {
                    s.sync(&mut d).unwrap();
                    synced = cur.clone();
                    history = vec![cur.clone()];
                }
                Op::Compact { at_percent } => {
                    if cur.last() > cur.snap {
                        let at = cur.snap + 1 + (cur.last() - cur.snap - 1) * at_percent / 100;
                        let t = cur.get(at).unwrap().term.0;
                        s.compact(&mut d, snap_of(at, t)).unwrap();
                        // Compaction syncs everything first.
                        cur.log.drain(..(at - cur.snap) as usize);
                        cur.snap = at;
                        cur.snap_term = t;
                        synced = cur.clone();
                        history = vec![cur.clone()];
                    }
                }
                Op::Prepare { at_percent } => {
                    if cur.last() > cur.snap {
                        let at = cur.snap + 1 + (cur.last() - cur.snap - 1) * at_percent / 100;
                        let t = cur.get(at).unwrap().term.0;
                        // A new preparation replaces an older one.
                        if let Some((old, _)) = prepared.take() {
                            old.discard(&mut d).unwrap();
                        }
                        let p = shoal_storage::prepare_snapshot(&mut d, snap_of(at, t)).unwrap();
                        prepared = Some((p, cur.get(at).unwrap().clone()));
                    }
                }
                Op::Install => {
                    if let Some((p, entry)) = prepared.take() {
                        let at = entry.index.0;
                        if at <= cur.snap {
                            prop_assert!(!s.install_prepared(&mut d, p).unwrap());
                        } else if at > cur.last() {
                            // Truncated below it since (Raft snapshots committed entries only,
                            // which are never truncated; the storage refuses anyway).
                            prop_assert!(s.install_prepared(&mut d, p).is_err());
                        } else if cur.get(at) != Some(&entry) {
                            // Replaced since: no longer a snapshot of this log.
                            p.discard(&mut d).unwrap();
                        } else {
                            prop_assert!(s.install_prepared(&mut d, p).unwrap());
                            cur.log.drain(..(at - cur.snap) as usize);
                            cur.snap = at;
                            cur.snap_term = entry.term.0;
                            synced = cur.clone();
                            history = vec![cur.clone()];
                        }
                        prop_assert_eq!(d.list().unwrap().iter().filter(|n| n.ends_with(".tmp")).count(), 0);
                    }
                }
                Op::ApplySnapshot { at_percent } => {
                    let at = cur.snap + 1 + (cur.last() + 3 - cur.snap - 1) * at_percent / 100;
                    term += 1;
                    s.apply_snapshot(&mut d, snap_of(at, term)).unwrap();
                    cur = Model { snap: at, snap_term: term, log: vec![] };
                    synced = cur.clone();
                    history = vec![cur.clone()];
                }
                Op::Crash { keep_percent, keep_dir_percent } => {
                    prepared = None;
                    let keep_dir = d.unsynced_dir_ops() * keep_dir_percent as usize / 100;
                    d.crash_keeping(keep_dir, |_, n| n * keep_percent as usize / 100);
                    s = open(&mut d);
                    prop_assert_eq!(d.list().unwrap().iter().filter(|n| n.ends_with(".tmp")).count(), 0);
                    let got = Model {
                        snap: s.first_index().0 - 1,
                        snap_term: s.term(s.first_index().prev()).unwrap().0,
                        log: all(&s),
                    };
                    prop_assert_eq!(got.snap, synced.snap);
                    prop_assert_eq!(got.snap_term, synced.snap_term);
                    if got.snap > 0 {
                        prop_assert_eq!(s.snapshot().unwrap(), snap_of(got.snap, got.snap_term));
                    }
                    prop_assert_eq!(
                        (s.hard_state().term, s.hard_state().vote),
                        (hard_state.term, hard_state.vote)
                    );
                    // The recovered log is a prefix of a state the log had since the last
                    // sync, and keeps every entry that all those states share (nothing
                    // acknowledged and not since truncated is lost).
                    let is_prefix = history
                        .iter()
                        .any(|h| h.log.len() >= got.log.len() && h.log[..got.log.len()] == got.log[..]);
                    prop_assert!(is_prefix, "recovered {:?} is no prefix of {:?}", got.log, history);
                    let shared = history
                        .iter()
                        .map(|h| h.log.iter().zip(&synced.log).take_while(|(a, b)| a == b).count())
                        .min()
                        .unwrap_or(0);
                    prop_assert!(got.log.len() >= shared, "lost synced entries: {:?}", got.log);
                    cur = got;
                    synced = cur.clone();
                    history = vec![cur.clone()];
                    term = term.max(cur.log.last().map_or(0, |e| e.term.0)) + 1;
                }
            }
            prop_assert_eq!(s.log_bytes(), summed_log_bytes(&s));
        }
        s.sync(&mut d).unwrap();
        let s = open(&mut d);
        prop_assert_eq!(all(&s), cur.log);
    }
}

/// `install_prepared_releasing` hands back exactly the entries it dropped, in order.
#[test]
fn installing_a_prepared_snapshot_hands_back_the_dropped_entries() {
    let mut d = MemDisk::default();
    let mut s = open(&mut d);
    let entries: Vec<Entry> = (1..=10).map(|i| e(i, 1)).collect();
    s.append(&mut d, &entries).unwrap();
    s.sync(&mut d).unwrap();
    let prepared = prepare_snapshot(&mut d, snap_of(8, 1)).unwrap();
    let dropped = s
        .install_prepared_releasing(&mut d, prepared)
        .unwrap()
        .unwrap();
    assert_eq!(dropped, entries[..8].to_vec());
    assert_eq!(all(&s), entries[8..].to_vec());
    assert_eq!(s.log_bytes(), summed_log_bytes(&s));
    // A superseded one hands back nothing and installs nothing.
    let prepared = prepare_snapshot(&mut d, snap_of(5, 1)).unwrap();
    assert_eq!(
        s.install_prepared_releasing(&mut d, prepared).unwrap(),
        None
    );
    assert_eq!(all(&s), entries[8..].to_vec());
}
