//! Durability tests: restart, torn tails, corruption, truncation and compaction across
//! restarts, identity, group commit, and a property test against an in-memory model.

use proptest::prelude::*;
use shoal_raft::{
    Entry, EntryKind, HardState, LogIndex, NodeId, Snapshot, SnapshotMeta, Storage, Term,
};
use shoal_storage::{Disk, DurableStorage, Error, MemDisk, StdDisk, StorageConfig};

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

fn per_entry(e: &Entry) -> u64 {
    (e.data.len() + shoal_wire::raft::ENTRY_OVERHEAD_BYTES) as u64
}

/// `log_bytes` by its definition.
fn summed_log_bytes(s: &DurableStorage) -> u64 {
    all(s).iter().map(per_entry).sum()
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
    s.compact(&mut d, snap(3, 1)).unwrap();
    check(&s, "compact");
    s.append(&mut d, &[e(11, 2)]).unwrap();
    check(&s, "append");
    assert!(s.log_bytes() > 0);
    drop(s);
    let mut s = open(&mut d);
    check(&s, "reopen");
    s.append(&mut d, &[e(8, 3)]).unwrap();
    check(&s, "truncating append");
    s.apply_snapshot(&mut d, snap(30, 3)).unwrap();
    check(&s, "apply_snapshot");
    assert_eq!(s.log_bytes(), 0);
    s.append(&mut d, &[e(31, 3)]).unwrap();
    check(&s, "append after apply_snapshot");
    s.sync(&mut d).unwrap();
    d.crash(|_, _| 0);
    check(&open(&mut d), "crash");
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
                        s.compact(&mut d, snap(at, t)).unwrap();
                        // Compaction syncs everything first.
                        cur.log.drain(..(at - cur.snap) as usize);
                        cur.snap = at;
                        cur.snap_term = t;
                        synced = cur.clone();
                        history = vec![cur.clone()];
                    }
                }
                Op::Crash { keep_percent, keep_dir_percent } => {
                    let keep_dir = d.unsynced_dir_ops() * keep_dir_percent as usize / 100;
                    d.crash_keeping(keep_dir, |_, n| n * keep_percent as usize / 100);
                    s = open(&mut d);
                    let got = Model {
                        snap: s.first_index().0 - 1,
                        snap_term: s.term(s.first_index().prev()).unwrap().0,
                        log: all(&s),
                    };
                    prop_assert_eq!(got.snap, synced.snap);
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
