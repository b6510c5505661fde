//! Handler tests: one input to one node, and the exact outputs it must produce.

use shoal_raft::{
    Config, Entry, EntryKind, Error, HardState, LogIndex, MemStorage, Message, MessageBody, NodeId,
    ProgressState, RawNode, RejectHint, Role, Term,
};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        term: Term(term),
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data: vec![index as u8],
    }
}

/// Node 1 of {1,2,3} with the given log and hard state.
fn node_with(log: &[(u64, u64)], term: u64, cfg: impl FnOnce(&mut Config)) -> RawNode<MemStorage> {
    let mut s = MemStorage::new();
    let entries: Vec<Entry> = log.iter().map(|&(i, t)| entry(i, t)).collect();
    s.append(&entries);
    s.set_hard_state(HardState {
        term: Term(term),
        vote: None,
        commit: LogIndex(0),
    });
    let mut c = Config::new(NodeId(1), vec![NodeId(1), NodeId(2), NodeId(3)]);
    c.pre_vote = false;
    cfg(&mut c);
    RawNode::new(c, s).unwrap()
}

fn msg(from: u64, term: u64, body: MessageBody) -> Message {
    Message {
        from: NodeId(from),
        to: NodeId(1),
        term: Term(term),
        body,
    }
}

/// Persists and returns (immediate, after-persist) messages.
fn drain(n: &mut RawNode<MemStorage>) -> (Vec<Message>, Vec<Message>) {
    let rd = n.ready();
    n.storage_mut().append(&rd.entries);
    if let Some(hs) = rd.hard_state {
        n.storage_mut().set_hard_state(hs);
    }
    let out = (rd.messages, rd.persisted_messages);
    n.advance();
    out
}

fn make_leader(n: &mut RawNode<MemStorage>) {
    n.campaign();
    let term = n.status().term.0;
    drain(n);
    n.step(msg(
        2,
        term,
        MessageBody::RequestVoteResponse {
            pre_vote: false,
            granted: true,
        },
    ))
    .unwrap();
    assert_eq!(n.status().role, Role::Leader);
}

#[test]
fn vote_granted_to_up_to_date_candidate_after_persisting() {
    let mut n = node_with(&[(1, 1)], 1, |_| {});
    n.step(msg(
        2,
        2,
        MessageBody::RequestVote {
            pre_vote: false,
            last_log_index: LogIndex(1),
            last_log_term: Term(1),
            leadership_transfer: false,
        },
    ))
    .unwrap();
    let rd = n.ready();
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: Term(2),
            vote: Some(NodeId(2)),
            commit: LogIndex(0)
        })
    );
    assert!(rd.messages.is_empty(), "a vote waits for persistence");
    assert_eq!(
        rd.persisted_messages,
        vec![Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(2),
            body: MessageBody::RequestVoteResponse {
                pre_vote: false,
                granted: true
            }
        }]
    );
}

#[test]
fn vote_refused_to_stale_log_and_to_second_candidate() {
    let mut n = node_with(&[(1, 1), (2, 2)], 2, |_| {});
    // §5.4.1: candidate's last term 1 < ours 2.
    n.step(msg(
        2,
        3,
        MessageBody::RequestVote {
            pre_vote: false,
            last_log_index: LogIndex(5),
            last_log_term: Term(1),
            leadership_transfer: false,
        },
    ))
    .unwrap();
    let (_, after) = drain(&mut n);
    assert_eq!(
        after[0].body,
        MessageBody::RequestVoteResponse {
            pre_vote: false,
            granted: false
        }
    );
    // Grant 3, then refuse 2 in the same term.
    let up = |from| {
        msg(
            from,
            3,
            MessageBody::RequestVote {
                pre_vote: false,
                last_log_index: LogIndex(2),
                last_log_term: Term(2),
                leadership_transfer: false,
            },
        )
    };
    n.step(up(3)).unwrap();
    n.step(up(2)).unwrap();
    let (_, after) = drain(&mut n);
    let granted: Vec<_> = after
        .iter()
        .map(|m| {
            (
                m.to.0,
                matches!(
                    m.body,
                    MessageBody::RequestVoteResponse { granted: true, .. }
                ),
            )
        })
        .collect();
    assert_eq!(granted, vec![(3, true), (2, false)]);
}

#[test]
fn append_rejection_carries_conflict_term_and_first_index() {
    // Follower log: terms 1,1,2,2,2 ; leader says prev (5, term 3).
    let mut n = node_with(&[(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)], 3, |_| {});
    n.step(msg(
        2,
        3,
        MessageBody::AppendEntries {
            prev_log_index: LogIndex(5),
            prev_log_term: Term(3),
            entries: vec![],
            leader_commit: LogIndex(0),
        },
    ))
    .unwrap();
    let (_, after) = drain(&mut n);
    assert_eq!(
        after[0].body,
        MessageBody::AppendEntriesResponse {
            index: LogIndex(5),
            reject: Some(RejectHint {
                conflict_term: Some(Term(2)),
                conflict_index: LogIndex(3)
            })
        }
    );
    // Too short a log: no term, last index + 1.
    n.step(msg(
        2,
        3,
        MessageBody::AppendEntries {
            prev_log_index: LogIndex(9),
            prev_log_term: Term(3),
            entries: vec![],
            leader_commit: LogIndex(0),
        },
    ))
    .unwrap();
    let (_, after) = drain(&mut n);
    assert_eq!(
        after[0].body,
        MessageBody::AppendEntriesResponse {
            index: LogIndex(9),
            reject: Some(RejectHint {
                conflict_term: None,
                conflict_index: LogIndex(6)
            })
        }
    );
}

#[test]
fn append_truncates_conflicting_suffix_and_commits_min() {
    let mut n = node_with(&[(1, 1), (2, 1), (3, 1)], 2, |_| {});
    n.step(msg(
        2,
        2,
        MessageBody::AppendEntries {
            prev_log_index: LogIndex(1),
            prev_log_term: Term(1),
            entries: vec![entry(2, 2)],
            leader_commit: LogIndex(9),
        },
    ))
    .unwrap();
    let rd = n.ready();
    assert_eq!(rd.entries, vec![entry(2, 2)]);
    assert_eq!(
        rd.hard_state.unwrap().commit,
        LogIndex(2),
        "min(leaderCommit, last new)"
    );
    assert_eq!(
        rd.persisted_messages[0].body,
        MessageBody::AppendEntriesResponse {
            index: LogIndex(2),
            reject: None
        }
    );
    // Committed entries are handed out only once durable: 1 is, the new 2 is not yet.
    assert_eq!(
        rd.committed_entries
            .iter()
            .map(|e| e.index.0)
            .collect::<Vec<_>>(),
        vec![1]
    );
    n.storage_mut().append(&rd.entries);
    n.advance();
    assert_eq!(n.status().last_index, LogIndex(2));
    let rd = n.ready();
    assert_eq!(
        rd.committed_entries
            .iter()
            .map(|e| e.index.0)
            .collect::<Vec<_>>(),
        vec![2]
    );
}

/// Figure 8: a leader never commits an entry of an earlier term by counting replicas; only
/// its current-term no-op, which commits the earlier one with it.
#[test]
fn figure_8_leader_commits_only_current_term_entries_by_counting() {
    let mut n = node_with(&[(1, 1), (2, 2)], 2, |_| {});
    make_leader(&mut n);
    let term = n.status().term.0;
    assert_eq!(term, 3);
    assert_eq!(n.status().last_index, LogIndex(3), "no-op appended");
    drain(&mut n);
    // Followers acknowledge index 2 (of term 2): a majority holds it, but it must not commit.
    for f in [2, 3] {
        n.step(msg(
            f,
            term,
            MessageBody::AppendEntriesResponse {
                index: LogIndex(2),
                reject: None,
            },
        ))
        .unwrap();
    }
    assert_eq!(n.status().commit, LogIndex(0));
    // One follower acknowledges the no-op: now 3 (and so 1, 2) commit.
    n.step(msg(
        2,
        term,
        MessageBody::AppendEntriesResponse {
            index: LogIndex(3),
            reject: None,
        },
    ))
    .unwrap();
    assert_eq!(n.status().commit, LogIndex(3));
}

#[test]
fn pipelining_respects_max_inflight() {
    let mut n = node_with(&[], 1, |c| c.max_inflight_appends = 2);
    make_leader(&mut n);
    let term = n.status().term.0;
    drain(&mut n);
    // Follower 2 acknowledges the no-op: replicate state.
    n.step(msg(
        2,
        term,
        MessageBody::AppendEntriesResponse {
            index: LogIndex(1),
            reject: None,
        },
    ))
    .unwrap();
    assert_eq!(
        n.progress(NodeId(2)).unwrap().state,
        ProgressState::Replicate
    );
    let mut appends_to_2 = 0;
    for i in 0..5 {
        n.propose(vec![i]).unwrap();
        let (now, _) = drain(&mut n);
        appends_to_2 += now.iter().filter(|m| m.to == NodeId(2)).count();
    }
    assert_eq!(
        appends_to_2, 2,
        "two appends in flight, then the window is full"
    );
    // An acknowledgement frees the window; the rest goes in one batched append.
    n.step(msg(
        2,
        term,
        MessageBody::AppendEntriesResponse {
            index: LogIndex(3),
            reject: None,
        },
    ))
    .unwrap();
    let (now, _) = drain(&mut n);
    let to2: Vec<_> = now.iter().filter(|m| m.to == NodeId(2)).collect();
    assert_eq!(to2.len(), 1);
    match &to2[0].body {
        MessageBody::AppendEntries { entries, .. } => {
            assert_eq!(
                entries.iter().map(|e| e.index.0).collect::<Vec<_>>(),
                vec![4, 5, 6]
            )
        }
        b => panic!("unexpected {b:?}"),
    }
}

#[test]
fn bad_input_is_rejected_without_panic() {
    let mut n = node_with(&[(1, 1)], 1, |_| {});
    // Unknown sender.
    let r = n.step(msg(9, 5, MessageBody::TimeoutNow));
    assert_eq!(r, Err(Error::UnknownNode(NodeId(9))));
    assert_eq!(n.status().term, Term(1));
    // Impossible indices from a leader.
    n.step(msg(
        2,
        1,
        MessageBody::AppendEntries {
            prev_log_index: LogIndex(u64::MAX),
            prev_log_term: Term(1),
            entries: vec![entry(7, 1)],
            leader_commit: LogIndex(u64::MAX),
        },
    ))
    .unwrap();
    n.step(msg(
        2,
        1,
        MessageBody::Heartbeat {
            commit: LogIndex(u64::MAX),
            read_context: None,
        },
    ))
    .unwrap();
    assert!(n.status().commit <= LogIndex(1));
    // Stale term: ignored (answered with our term so a stale leader learns it).
    n.step(msg(
        3,
        0,
        MessageBody::AppendEntries {
            prev_log_index: LogIndex(0),
            prev_log_term: Term(0),
            entries: vec![entry(1, 0)],
            leader_commit: LogIndex(1),
        },
    ))
    .unwrap();
    assert_eq!(n.status().last_index, LogIndex(1));
    // A response claiming more than the leader has.
    let mut l = node_with(&[], 1, |_| {});
    make_leader(&mut l);
    let t = l.status().term.0;
    l.step(msg(
        2,
        t,
        MessageBody::AppendEntriesResponse {
            index: LogIndex(1000),
            reject: None,
        },
    ))
    .unwrap();
    assert_eq!(l.progress(NodeId(2)).unwrap().match_index, LogIndex(0));
}

#[test]
fn snapshot_at_or_below_commit_is_ignored_and_matching_one_keeps_the_log() {
    let mut n = node_with(&[(1, 1), (2, 1), (3, 1), (4, 1)], 1, |_| {});
    let snap = |index: u64| shoal_raft::Snapshot {
        meta: shoal_raft::SnapshotMeta {
            index: LogIndex(index),
            term: Term(1),
            voters: vec![NodeId(1), NodeId(2), NodeId(3)],
            ..Default::default()
        },
        data: vec![],
    };
    n.step(msg(
        2,
        1,
        MessageBody::InstallSnapshot { snapshot: snap(2) },
    ))
    .unwrap();
    let rd = n.ready();
    assert!(rd.snapshot.is_none(), "matching snapshot: log kept");
    assert_eq!(n.status().commit, LogIndex(2));
    assert_eq!(n.status().last_index, LogIndex(4));
    n.advance();
    n.step(msg(
        2,
        1,
        MessageBody::InstallSnapshot { snapshot: snap(1) },
    ))
    .unwrap();
    let rd = n.ready();
    assert!(rd.snapshot.is_none());
    assert_eq!(
        rd.persisted_messages.last().unwrap().body,
        MessageBody::AppendEntriesResponse {
            index: LogIndex(2),
            reject: None
        }
    );
}
