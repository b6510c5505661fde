//! Membership changes (Raft thesis §4): the quorum rules of a possibly joint configuration,
//! and the validation that turns requested [`ConfChangeStep`]s into the next [`Membership`].
//!
//! A configuration entry takes effect as soon as a node **appends** it, committed or not
//! (Raft thesis §4.1), and a truncated one takes its membership with it. (Taking effect on
//! apply, as etcd does, was tried first: the membership simulation found a split brain — a
//! removed server that restarted knew its snapshot's old membership, not the committed
//! entries after it in its own log, and won an election with another stale server's vote
//! while the real membership had elected a leader in the same term.) Safety then rests on
//! two rules the leader enforces at proposal time ([`crate::Error::ConfChangeInFlight`]):
//! one change in flight at a time (the previous one committed), and none before the leader
//! has committed an entry of its own term (the 2015 single-server-change bug, see
//! `docs/raft.md`).

use std::collections::BTreeMap;

use crate::{ConfChangeStep, Error, LogIndex, Membership, NodeId};

/// The outcome of an election (or of any yes/no poll) so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VoteResult {
    Won,
    Lost,
    Pending,
}

/// A majority poll over one set of voters; an empty set agrees with anything (it is the
/// outgoing half of a configuration that is not joint).
fn majority_vote(voters: &[NodeId], votes: &BTreeMap<NodeId, bool>) -> VoteResult {
    if voters.is_empty() {
        return VoteResult::Won;
    }
    let q = voters.len() / 2 + 1;
    let yes = voters
        .iter()
        .filter(|v| votes.get(v) == Some(&true))
        .count();
    let no = voters
        .iter()
        .filter(|v| votes.get(v) == Some(&false))
        .count();
    if yes >= q {
        VoteResult::Won
    } else if voters.len() - no < q {
        VoteResult::Lost
    } else {
        VoteResult::Pending
    }
}

/// Thesis §4.3: in a joint configuration a decision needs a majority of both halves. Votes of
/// anyone who is not a voter (learners, strangers) are never counted.
pub(crate) fn vote_result(m: &Membership, votes: &BTreeMap<NodeId, bool>) -> VoteResult {
    if m.voters.is_empty() && m.voters_outgoing.is_empty() {
        return VoteResult::Lost; // a node that knows no voters never wins
    }
    match (
        majority_vote(&m.voters, votes),
        majority_vote(&m.voters_outgoing, votes),
    ) {
        (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
        (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
        _ => VoteResult::Pending,
    }
}

/// Whether the voters for which `yes` holds form a (joint) quorum.
pub(crate) fn has_quorum(m: &Membership, yes: impl Fn(NodeId) -> bool) -> bool {
    let votes: BTreeMap<NodeId, bool> = m.all_voters().into_iter().map(|v| (v, yes(v))).collect();
    vote_result(m, &votes) == VoteResult::Won
}

/// The highest index replicated on a majority of one voter set (`u64::MAX` for an empty set,
/// so that `min` ignores it).
fn majority_index(voters: &[NodeId], match_of: &impl Fn(NodeId) -> LogIndex) -> LogIndex {
    if voters.is_empty() {
        return LogIndex(u64::MAX);
    }
    let mut matches: Vec<LogIndex> = voters.iter().map(|&v| match_of(v)).collect();
    matches.sort_unstable_by(|a, b| b.cmp(a));
    matches[voters.len() / 2]
}

/// The highest index replicated on a (joint) quorum: the smaller of the two halves' indexes.
pub(crate) fn committed_index(m: &Membership, match_of: impl Fn(NodeId) -> LogIndex) -> LogIndex {
    if m.voters.is_empty() && m.voters_outgoing.is_empty() {
        return LogIndex(0);
    }
    majority_index(&m.voters, &match_of).min(majority_index(&m.voters_outgoing, &match_of))
}

/// Whether `m` is the single voter `id` (commits and reads need nobody else).
pub(crate) fn is_sole_voter(m: &Membership, id: NodeId) -> bool {
    m.voters == [id] && (m.voters_outgoing.is_empty() || m.voters_outgoing == [id])
}

/// The membership after `steps`, or why they are refused. Empty `steps` leaves a joint
/// configuration. A change that adds or removes at most one voter is applied directly (the
/// thesis's single-server change, §4.1); anything larger enters a joint configuration
/// (§4.3) that the leader leaves on its own once it is applied.
pub(crate) fn next_membership(
    cur: &Membership,
    steps: &[ConfChangeStep],
) -> Result<Membership, Error> {
    let bad = |why: String| Err(Error::InvalidConfChange(why));
    if steps.is_empty() {
        if !cur.is_joint() {
            return bad("not in a joint configuration: nothing to leave".into());
        }
        return Ok(Membership {
            voters: cur.voters.clone(),
            voters_outgoing: Vec::new(),
            learners: cur.learners.clone(),
            auto_leave: false,
        });
    }
    if cur.is_joint() {
        return bad(format!(
            "in the joint configuration {cur}: it must be left before another change"
        ));
    }
    let mut voters = cur.voters.clone();
    let mut learners = cur.learners.clone();
    let mut seen = Vec::new();
    for step in steps {
        let (ConfChangeStep::AddVoter(id)
        | ConfChangeStep::AddLearner(id)
        | ConfChangeStep::Promote(id)
        | ConfChangeStep::Remove(id)) = *step;
        if id.0 == 0 {
            return bad("node id 0 is reserved".into());
        }
        if seen.contains(&id) {
            return bad(format!("node {id} appears twice in one change"));
        }
        seen.push(id);
        let is_voter = voters.contains(&id);
        let is_learner = learners.contains(&id);
        match *step {
            ConfChangeStep::AddVoter(_) | ConfChangeStep::AddLearner(_) if is_voter => {
                return bad(format!("node {id} is already a voter"));
            }
            ConfChangeStep::AddVoter(_) | ConfChangeStep::AddLearner(_) if is_learner => {
                return bad(format!(
                    "node {id} is already a learner (promote it to make it a voter)"
                ));
            }
            ConfChangeStep::AddVoter(_) => voters.push(id),
            ConfChangeStep::AddLearner(_) => learners.push(id),
            ConfChangeStep::Promote(_) if !is_learner => {
                return bad(format!(
                    "node {id} is not a learner (only learners can be promoted)"
                ));
            }
            ConfChangeStep::Promote(_) => {
                learners.retain(|&l| l != id);
                voters.push(id);
            }
            ConfChangeStep::Remove(_) if !is_voter && !is_learner => {
                return bad(format!("node {id} is not a member"));
            }
            ConfChangeStep::Remove(_) => {
                voters.retain(|&v| v != id);
                learners.retain(|&l| l != id);
            }
        }
    }
    voters.sort();
    learners.sort();
    if voters.is_empty() {
        return bad("the change would remove the last voter".into());
    }
    let changed_voters = voters
        .iter()
        .filter(|v| !cur.voters.contains(v))
        .chain(cur.voters.iter().filter(|v| !voters.contains(v)))
        .count();
    if changed_voters <= 1 {
        Ok(Membership {
            voters,
            voters_outgoing: Vec::new(),
            learners,
            auto_leave: false,
        })
    } else {
        Ok(Membership {
            voters,
            voters_outgoing: cur.voters.clone(),
            learners,
            auto_leave: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<NodeId> {
        v.iter().map(|&i| NodeId(i)).collect()
    }

    fn joint(incoming: &[u64], outgoing: &[u64]) -> Membership {
        Membership {
            voters: ids(incoming),
            voters_outgoing: ids(outgoing),
            ..Membership::default()
        }
    }

    #[test]
    fn a_joint_quorum_needs_a_majority_of_both_halves() {
        let m = joint(&[1, 2, 3], &[3, 4, 5]);
        let yes = |v: &[u64]| has_quorum(&m, |n| v.contains(&n.0));
        assert!(!yes(&[1, 2]), "majority of the incoming only");
        assert!(!yes(&[4, 5]), "majority of the outgoing only");
        assert!(yes(&[1, 3, 4]));
        assert!(yes(&[2, 3, 5]));
        let matches = |n: NodeId| LogIndex([0, 9, 8, 5, 2, 1][n.0 as usize]);
        // Incoming {1:9, 2:8, 3:5} → 8; outgoing {3:5, 4:2, 5:1} → 2.
        assert_eq!(committed_index(&m, matches), LogIndex(2));
    }

    #[test]
    fn a_lost_half_loses_the_election() {
        let m = joint(&[1, 2, 3], &[1, 4, 5]);
        let votes: BTreeMap<_, _> = [(NodeId(4), false), (NodeId(5), false)].into();
        assert_eq!(vote_result(&m, &votes), VoteResult::Lost);
        let votes: BTreeMap<_, _> =
            [(NodeId(1), true), (NodeId(2), true), (NodeId(4), true)].into();
        assert_eq!(vote_result(&m, &votes), VoteResult::Won);
        let learner_votes: BTreeMap<_, _> = [(NodeId(1), true), (NodeId(9), true)].into();
        assert_eq!(
            vote_result(&joint(&[1, 2, 3], &[]), &learner_votes),
            VoteResult::Pending
        );
    }

    #[test]
    fn one_voter_changes_directly_two_go_through_a_joint_configuration() {
        let cur = Membership::of_voters(ids(&[1, 2, 3]));
        let m = next_membership(&cur, &[ConfChangeStep::AddVoter(NodeId(4))]).unwrap();
        assert_eq!(m.to_string(), "voters=(1,2,3,4)");
        let m = next_membership(
            &cur,
            &[
                ConfChangeStep::AddLearner(NodeId(4)),
                ConfChangeStep::AddLearner(NodeId(5)),
            ],
        )
        .unwrap();
        assert_eq!(m.to_string(), "voters=(1,2,3) learners=(4,5)");
        let m = next_membership(
            &cur,
            &[
                ConfChangeStep::AddVoter(NodeId(4)),
                ConfChangeStep::Remove(NodeId(1)),
            ],
        )
        .unwrap();
        assert_eq!(m.to_string(), "voters=(2,3,4)&&(1,2,3) autoleave");
        assert!(next_membership(&m, &[ConfChangeStep::Remove(NodeId(2))]).is_err());
        let left = next_membership(&m, &[]).unwrap();
        assert_eq!(left.to_string(), "voters=(2,3,4)");
    }

    #[test]
    fn impossible_changes_are_refused_with_the_reason() {
        let cur = Membership {
            voters: ids(&[1]),
            learners: ids(&[2]),
            ..Membership::default()
        };
        let err = |steps: &[ConfChangeStep]| next_membership(&cur, steps).unwrap_err().to_string();
        assert!(err(&[ConfChangeStep::Remove(NodeId(1))]).contains("last voter"));
        assert!(err(&[ConfChangeStep::AddVoter(NodeId(2))]).contains("promote it"));
        assert!(err(&[ConfChangeStep::Promote(NodeId(1))]).contains("not a learner"));
        assert!(err(&[ConfChangeStep::Remove(NodeId(7))]).contains("not a member"));
        assert!(err(&[]).contains("nothing to leave"));
        assert!(err(&[
            ConfChangeStep::AddLearner(NodeId(3)),
            ConfChangeStep::Remove(NodeId(3))
        ])
        .contains("twice"));
    }
}
