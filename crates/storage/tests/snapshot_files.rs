//! Snapshots kept as files only (`StorageConfig::snapshot_data_in_memory = false`, the
//! runtime's mode): the storage holds the metadata, never the data; the data is read back
//! from the file chunk by chunk; a received file is installed by a rename (no second write);
//! a damaged snapshot file is refused at open. On a real directory (`StdDisk`). (<1 s.)

use std::io::Read;

use shoal_raft::{Entry, EntryKind, LogIndex, NodeId, Snapshot, SnapshotMeta, Storage, Term};
use shoal_storage::{
    open_snapshot_data, prepare_snapshot, prepare_snapshot_streaming, Disk, DurableStorage, Error,
    StdDisk, StorageConfig, SNAPSHOT_FILE,
};

fn files_only() -> StorageConfig {
    StorageConfig {
        snapshot_data_in_memory: false,
        ..StorageConfig::default()
    }
}

fn e(index: u64, term: u64) -> Entry {
    Entry {
        term: Term(term),
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data: format!("{index}/{term}").into_bytes(),
    }
}

fn meta(index: u64, term: u64) -> SnapshotMeta {
    SnapshotMeta {
        index: LogIndex(index),
        term: Term(term),
        voters: vec![NodeId(1), NodeId(2)],
        ..Default::default()
    }
}

/// Data over several 1 MiB chunks.
fn data(seed: u8) -> Vec<u8> {
    (0..2_500_000u32).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn a_compacted_snapshot_stays_in_its_file_and_reads_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 7, 1, files_only()).unwrap();
    let entries: Vec<_> = (1..=10).map(|i| e(i, 1)).collect();
    s.append(&mut d, &entries).unwrap();
    s.sync(&mut d).unwrap();
    // Streamed into its file (as a KV server's snapshot job does), then installed.
    let bytes = data(1);
    let prepared = prepare_snapshot_streaming(&mut d, meta(6, 1), bytes.len() as u64, |w| {
        // In pieces of odd sizes, as a serializer writes.
        for piece in bytes.chunks(77_777) {
            w.write_all(piece)?;
        }
        Ok(())
    })
    .unwrap();
    assert!(s.install_prepared(&mut d, prepared).unwrap());
    assert_eq!(
        s.snapshot().unwrap().data,
        Vec::<u8>::new(),
        "no data in memory"
    );
    assert_eq!(s.snapshot_metadata().unwrap(), meta(6, 1));
    assert!(read_all(s.snapshot_data(&d).unwrap()) == bytes);
    drop(s);
    drop(d);

    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 7, 1, files_only()).unwrap();
    assert_eq!(s.snapshot_metadata().unwrap(), meta(6, 1));
    assert_eq!(s.first_index(), LogIndex(7));
    let opened = s.take_opened_snapshot_data().expect("opened at open");
    assert!(
        read_all(opened) == bytes,
        "the restore at start reads the data"
    );
    assert!(s.take_opened_snapshot_data().is_none(), "once");
}

#[test]
fn a_streamed_snapshot_of_the_wrong_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    let e =
        prepare_snapshot_streaming(&mut d, meta(3, 1), 10, |w| w.write_all(b"short")).unwrap_err();
    assert!(
        e.to_string()
            .contains("wrote 5 snapshot bytes where it announced 10"),
        "{e}"
    );
    assert!(
        d.list()
            .unwrap()
            .iter()
            .all(|n| !n.starts_with(SNAPSHOT_FILE)),
        "its temporary file is removed"
    );
}

#[test]
fn a_received_file_is_installed_by_a_rename() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 7, 2, files_only()).unwrap();
    s.append(&mut d, &[e(1, 1), e(2, 1)]).unwrap();
    s.sync(&mut d).unwrap();
    // A file as the snapshot stream leaves it: whole, fsynced, checked, under its own name.
    let bytes = data(2);
    let prepared = prepare_snapshot(
        &mut d,
        Snapshot {
            meta: meta(40, 3),
            data: bytes.clone(),
        },
    )
    .unwrap();
    let received = "snapshot-recv.1.0".to_string();
    d.rename(prepared.file_name(), &received).unwrap();
    let inode = |name: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.path().join(name)).unwrap().ino()
    };
    let received_inode = inode(&received);

    s.stage_received_snapshot(&mut d, received.clone(), meta(40, 3))
        .unwrap();
    // Raft hands the snapshot with no data: it is in the file.
    s.apply_snapshot(
        &mut d,
        Snapshot {
            meta: meta(40, 3),
            data: Vec::new(),
        },
    )
    .unwrap();
    assert_eq!(
        inode(SNAPSHOT_FILE),
        received_inode,
        "renamed, not rewritten"
    );
    assert!(!dir.path().join(&received).exists());
    assert_eq!(s.first_index(), LogIndex(41));
    assert!(read_all(s.snapshot_data(&d).unwrap()) == bytes);

    // A staged file Raft did not install is removed.
    let stale = "snapshot-recv.1.1".to_string();
    std::fs::write(dir.path().join(&stale), b"whatever").unwrap();
    s.stage_received_snapshot(&mut d, stale.clone(), meta(30, 3))
        .unwrap();
    s.discard_staged_snapshot(&mut d).unwrap();
    assert!(!dir.path().join(&stale).exists());
}

#[test]
fn a_damaged_snapshot_file_is_refused_at_open_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = StdDisk::new(dir.path()).unwrap();
    let mut s = DurableStorage::open(&mut d, 7, 1, files_only()).unwrap();
    s.append(&mut d, &(1..=5).map(|i| e(i, 1)).collect::<Vec<_>>())
        .unwrap();
    s.sync(&mut d).unwrap();
    let prepared = prepare_snapshot(
        &mut d,
        Snapshot {
            meta: meta(4, 1),
            data: data(3),
        },
    )
    .unwrap();
    assert!(s.install_prepared(&mut d, prepared).unwrap());
    drop(s);
    drop(d);
    let path = dir.path().join(SNAPSHOT_FILE);
    let mut raw = std::fs::read(&path).unwrap();
    let at = raw.len() - 1000; // inside the last chunk
    raw[at] ^= 0x10;
    std::fs::write(&path, &raw).unwrap();

    let mut d = StdDisk::new(dir.path()).unwrap();
    match DurableStorage::open(&mut d, 7, 1, files_only()) {
        Err(Error::Corrupt { file, reason, .. }) => {
            assert_eq!(file, SNAPSHOT_FILE);
            assert!(reason.contains("checksum mismatch"), "{reason}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a damaged snapshot file was accepted"),
    }
    // The reader refuses the damaged chunk before handing out any of its bytes.
    let (_, mut r) = open_snapshot_data(&d, SNAPSHOT_FILE).unwrap();
    let mut sink = Vec::new();
    let err = r.read_to_end(&mut sink).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(
        sink.len(),
        2 << 20,
        "the two intact chunks before it, not the damaged one"
    );
}
