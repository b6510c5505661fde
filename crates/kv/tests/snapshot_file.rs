//! A store restored from its snapshot *file*, decoded as the file is streamed
//! (`KvStore::restore_from` over the storage's chunk reader, as a server restores), equals the
//! store restored the old way from the whole snapshot in memory (`KvStore::restore`); the
//! file the store streams into (`KvStore::write_snapshot`) holds exactly `KvStore::snapshot`'s
//! bytes; and a damaged or truncated file is refused with the store left as it was.
//! (~2 s in debug.)

use proptest::prelude::*;
use shoal_kv::store::{KvStore, Limits};
use shoal_raft::{LogIndex, NodeId, SnapshotMeta, Term};
use shoal_storage::{
    check_snapshot_file, open_snapshot_data, prepare_snapshot_streaming, read_snapshot_file, Disk,
    MemDisk,
};
use shoal_wire::kv::{Expected, KvOp, KvRequest, KvResult};

#[derive(Debug, Clone)]
enum Op {
    Register,
    Put {
        client: usize,
        key: u8,
        value: Vec<u8>,
    },
    Delete {
        client: usize,
        key: u8,
    },
    Grant,
    PutLease {
        client: usize,
        key: u8,
        lease: usize,
    },
    Revoke {
        lease: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Register),
        6 => (any::<usize>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(client, key, value)| Op::Put { client, key, value }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(client, key)| Op::Delete { client, key }),
        1 => Just(Op::Grant),
        2 => (any::<usize>(), any::<u8>(), any::<usize>())
            .prop_map(|(client, key, lease)| Op::PutLease { client, key, lease }),
        1 => any::<usize>().prop_map(|lease| Op::Revoke { lease }),
    ]
}

/// A store built by applying `ops` (a small session table, so sessions also expire).
fn build(ops: &[Op]) -> KvStore {
    let mut s = KvStore::new(Limits {
        max_sessions: 3,
        ..Limits::default()
    });
    let mut sessions: Vec<(u64, u64)> = Vec::new(); // (session, last request)
    let mut leases: Vec<u64> = Vec::new();
    let request = |sessions: &mut Vec<(u64, u64)>, pick: usize| -> (u64, u64) {
        if sessions.is_empty() {
            return (0, 1);
        }
        let i = pick % sessions.len();
        sessions[i].1 += 1;
        sessions[i]
    };
    for (i, op) in ops.iter().enumerate() {
        let index = i as u64 + 1;
        let (client, req, op) = match op {
            Op::Register => (0, 1, KvOp::Register),
            Op::Put { client, key, value } => {
                let (c, r) = request(&mut sessions, *client);
                let op = KvOp::Put {
                    key: vec![*key % 16],
                    value: value.clone(),
                    expected: Expected::Any,
                };
                (c, r, op)
            }
            Op::Delete { client, key } => {
                let (c, r) = request(&mut sessions, *client);
                let op = KvOp::Delete {
                    key: vec![*key % 16],
                    expected: Expected::Any,
                };
                (c, r, op)
            }
            Op::Grant => (0, 1, KvOp::LeaseGrant { ttl_ms: 5_000 }),
            Op::PutLease { client, key, lease } => {
                let (c, r) = request(&mut sessions, *client);
                let lease = if leases.is_empty() {
                    7
                } else {
                    leases[lease % leases.len()]
                };
                let op = KvOp::PutLease {
                    key: vec![*key % 16, 1],
                    value: b"leased".to_vec(),
                    expected: Expected::Any,
                    lease,
                };
                (c, r, op)
            }
            Op::Revoke { lease } => {
                let id = leases
                    .get(lease % leases.len().max(1))
                    .copied()
                    .unwrap_or(3);
                (0, 1, KvOp::LeaseRevoke { id })
            }
        };
        let result = s.apply(
            index,
            &KvRequest {
                client,
                request: req,
                op,
                serializable: false,
            },
        );
        match result {
            KvResult::Registered { session } => sessions.push((session, 0)),
            KvResult::LeaseGranted { id, .. } => leases.push(id),
            _ => {}
        }
    }
    s
}

fn meta(index: u64) -> SnapshotMeta {
    SnapshotMeta {
        index: LogIndex(index),
        term: Term(2),
        voters: vec![NodeId(1), NodeId(2), NodeId(3)],
        learners: Vec::new(),
        voters_outgoing: Vec::new(),
        auto_leave: false,
    }
}

/// Streams `s` into a snapshot file of `disk`; returns the file's name.
fn write_file(disk: &mut MemDisk, s: &KvStore) -> String {
    let prepared =
        prepare_snapshot_streaming(disk, meta(s.applied().max(1)), s.snapshot_len(), |w| {
            s.write_snapshot(w)
        })
        .expect("snapshot written");
    prepared.file_name().to_string()
}

/// Restores a fresh store from the file, streamed.
fn restore_file(disk: &MemDisk, name: &str, into: &mut KvStore) -> Result<(), String> {
    let (_, mut reader) = open_snapshot_data(disk, name).map_err(|e| e.to_string())?;
    into.restore_from(&mut reader).map_err(|e| e.to_string())
}

fn summary(s: &KvStore) -> (Vec<u8>, usize, usize, usize, usize) {
    (
        s.snapshot(),
        s.data_bytes(),
        s.len(),
        s.session_count(),
        s.lease_count(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_restore_from_the_file_equals_the_restore_from_memory(ops in proptest::collection::vec(op(), 0..120)) {
        let original = build(&ops);
        let mut disk = MemDisk::default();
        let name = write_file(&mut disk, &original);
        // The streamed file holds exactly the bytes of the in-memory snapshot.
        let bytes = original.snapshot();
        prop_assert_eq!(&read_snapshot_file(&disk, &name).unwrap().data, &bytes);
        prop_assert_eq!(original.snapshot_len(), bytes.len() as u64);

        let mut from_memory = KvStore::new(original.limits());
        from_memory.restore(&bytes).unwrap();
        let mut from_file = KvStore::new(original.limits());
        restore_file(&disk, &name, &mut from_file).unwrap();
        prop_assert_eq!(summary(&from_file), summary(&from_memory));
        prop_assert_eq!(summary(&from_file), summary(&original));

        // Both keep behaving alike: the same next write gives the same answer and state.
        let next = KvRequest {
            client: 0,
            request: 1,
            op: KvOp::Register,
            serializable: false,
        };
        let at = original.applied() + 1;
        prop_assert_eq!(from_file.apply(at, &next), from_memory.apply(at, &next));
        prop_assert_eq!(summary(&from_file), summary(&from_memory));
    }
}

/// A store spanning several chunks of the file (1 MiB each).
fn big_store() -> KvStore {
    let ops: Vec<Op> = (0..40u8)
        .map(|k| Op::Put {
            client: 0,
            key: k,
            value: vec![k; 90_000],
        })
        .chain((0..40u8).map(|k| Op::PutLease {
            client: 0,
            key: k,
            lease: 0,
        }))
        .collect();
    let mut ops = ops;
    ops.insert(0, Op::Grant);
    ops.insert(0, Op::Register);
    // Keys `k % 16` repeat: use distinct keys for the data.
    let mut s = build(&ops);
    for k in 0..40u32 {
        let req = KvRequest {
            client: 1,
            request: 1000 + u64::from(k),
            op: KvOp::Put {
                key: format!("big-{k}").into_bytes(),
                value: vec![k as u8; 90_000],
                expected: Expected::Any,
            },
            serializable: false,
        };
        let _ = s.apply(s.applied() + 1, &req);
    }
    s
}

#[test]
fn a_store_over_several_chunks_restores_from_its_file() {
    let original = big_store();
    assert!(original.data_bytes() > 3 << 20, "{}", original.data_bytes());
    let mut disk = MemDisk::default();
    let name = write_file(&mut disk, &original);
    let mut from_file = KvStore::new(original.limits());
    restore_file(&disk, &name, &mut from_file).unwrap();
    assert_eq!(summary(&from_file), summary(&original));
}

#[test]
fn a_damaged_or_truncated_file_is_refused_and_changes_nothing() {
    let original = big_store();
    let mut disk = MemDisk::default();
    let name = write_file(&mut disk, &original);
    let len = disk.read(&name).unwrap().unwrap().len();

    // A store holding something else, which a refused restore must leave as it was.
    let before = build(&[
        Op::Register,
        Op::Put {
            client: 0,
            key: 3,
            value: b"kept".to_vec(),
        },
    ]);

    // A flipped byte in the middle of the data (a later chunk: earlier chunks decode first).
    let mut damaged = disk.clone();
    damaged.corrupt(&name, len / 2);
    let e = check_snapshot_file(&damaged, &name)
        .unwrap_err()
        .to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
    let mut s = before.clone();
    let e = restore_file(&damaged, &name, &mut s).unwrap_err();
    assert!(e.contains("checksum mismatch"), "{e}");
    assert_eq!(summary(&s), summary(&before), "nothing changed");

    // The last bytes cut off.
    let mut cut = disk.clone();
    cut.truncate(&name, (len - 10) as u64).unwrap();
    assert!(check_snapshot_file(&cut, &name).is_err());
    let mut s = before.clone();
    let e = restore_file(&cut, &name, &mut s).unwrap_err();
    assert!(e.contains("end of the file"), "{e}");
    assert_eq!(summary(&s), summary(&before), "nothing changed");

    // A byte too many at the end.
    let mut long = disk.clone();
    long.append(&name, &[0]).unwrap();
    let e = check_snapshot_file(&long, &name).unwrap_err().to_string();
    assert!(e.contains("after the last chunk"), "{e}");
}
