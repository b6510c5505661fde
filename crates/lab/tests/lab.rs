//! The lab's own checks: the Figure-3 checker rejects what it must, and a workload's report is
//! a function of its seed and duration.

use std::time::Duration;

use shoal_lab::invariants::{Invariants, Journal, Obs};
use shoal_lab::{run_kv, run_raft};
use shoal_raft::MemStorage;
use shoal_sim::NodeId;

/// Checks `observations` with no live leader to look at.
fn check(observations: Vec<Obs>) -> Result<(), String> {
    let journal = Journal::default();
    let mut inv = Invariants::new(journal.clone());
    journal.borrow_mut().extend(observations);
    inv.check_nodes::<MemStorage>(std::iter::empty())
}

fn entry(node: u32, index: u64, term: u64, hash: u64, prev_term: u64) -> Obs {
    Obs::Entry {
        node: NodeId(node),
        index,
        term,
        hash,
        prev_term,
    }
}

fn applied(node: u32, index: u64, hash: u64) -> Obs {
    Obs::Applied {
        node: NodeId(node),
        index,
        term: Some(1),
        hash,
        node_term: 1,
    }
}

#[test]
fn consistent_observations_pass() {
    let ok = vec![
        entry(0, 1, 1, 7, 0),
        entry(1, 1, 1, 7, 0),
        entry(0, 2, 2, 8, 1),
        applied(0, 1, 7),
        applied(1, 1, 7),
        // A leader of term 3 replacing an entry of term 2 that it did not write itself.
        Obs::Overwrite {
            node: NodeId(2),
            leader_term: 3,
            index: 2,
            old_term: 2,
        },
    ];
    assert_eq!(check(ok), Ok(()));
}

#[test]
fn the_checker_rejects_each_kind_of_violation() {
    let same_entry_other_command = check(vec![entry(0, 3, 2, 7, 1), entry(1, 3, 2, 9, 1)]);
    assert!(
        same_entry_other_command
            .as_ref()
            .is_err_and(|e| e.starts_with("log matching")),
        "{same_entry_other_command:?}"
    );
    let same_entry_other_predecessor = check(vec![entry(0, 3, 2, 7, 1), entry(1, 3, 2, 7, 2)]);
    assert!(
        same_entry_other_predecessor
            .as_ref()
            .is_err_and(|e| e.starts_with("log matching")),
        "{same_entry_other_predecessor:?}"
    );
    let two_commands_at_one_index = check(vec![applied(0, 4, 1), applied(2, 4, 2)]);
    assert!(
        two_commands_at_one_index
            .as_ref()
            .is_err_and(|e| e.starts_with("state machine safety")),
        "{two_commands_at_one_index:?}"
    );
    let leader_overwrites_own_entry = check(vec![Obs::Overwrite {
        node: NodeId(1),
        leader_term: 4,
        index: 9,
        old_term: 4,
    }]);
    assert!(
        leader_overwrites_own_entry
            .as_ref()
            .is_err_and(|e| e.starts_with("leader append-only")),
        "{leader_overwrites_own_entry:?}"
    );
}

#[test]
fn a_workload_report_is_a_function_of_seed_and_duration() {
    let d = Duration::from_secs(3);
    for run in [run_raft, run_kv] {
        let a = run(4, d);
        assert!(a.outcome.is_ok(), "{:?}", a.outcome);
        assert!(a.events > 0 && a.ops > 0 && a.committed > 0, "{a:?}");
        assert!(a.faults.total() > 0, "the final heal at least: {a:?}");
        assert_eq!(a, run(4, d));
        assert_ne!(a.trace_hash, run(5, d).trace_hash);
    }
}

/// The checker counts each requested membership change once, however many servers apply it.
#[test]
fn membership_changes_are_counted_once_per_entry() {
    let journal = Journal::default();
    let mut inv = Invariants::new(journal.clone());
    journal.borrow_mut().extend([
        Obs::ConfChange {
            node: NodeId(0),
            index: 7,
            term: 2,
        },
        Obs::ConfChange {
            node: NodeId(1),
            index: 7,
            term: 2,
        },
        Obs::ConfChange {
            node: NodeId(1),
            index: 12,
            term: 3,
        },
    ]);
    inv.check_nodes::<MemStorage>(std::iter::empty())
        .expect("no violation");
    assert_eq!(inv.conf_changes_committed(), 2);
}

/// The raft workload changes the membership as a fault (and still passes): over three short
/// seeds some change commits, and only the raft workload reports the count.
#[test]
fn the_raft_workload_commits_membership_changes() {
    let d = Duration::from_secs(3);
    let mut changes = 0;
    for seed in 1..=3 {
        let r = run_raft(seed, d);
        assert!(r.outcome.is_ok(), "seed {seed}: {:?}", r.outcome);
        changes += r
            .membership_changes
            .expect("raft reports membership changes");
    }
    assert!(changes > 0, "no membership change committed in 3 seeds");
    assert_eq!(run_kv(1, d).membership_changes, None);
}
