//! Membership changes as a fault (issue 15): the pieces every simulation that changes a Raft
//! cluster's membership shares — a small deterministic chooser ([`Choices`]), the newest
//! leader's membership ([`leader_membership`]), one random change proposed through it
//! ([`random_membership_change`]) and the end-of-run check that every member of the final
//! configuration applied a command ([`members_applied`]). `shoal sim --workload raft` and
//! `shoal-raft`'s `membership_nemesis` simulation test both use them.
//!
//! Servers are the simulator's [`Server`]s with Raft ids `1..=n` (see [`raft_id`]); the ones
//! outside the bootstrap membership start empty and join when a change adds them.

use shoal_raft::{ConfChangeStep, Membership, Message, NodeId, Role};
use shoal_sim::Sim;

#[cfg(doc)]
use crate::raft_node::raft_id;
use crate::raft_node::{server, sim_id, Server};

type SimId = shoal_sim::NodeId;

/// A tiny deterministic generator for a harness's own choices (a 64-bit LCG): it draws
/// nothing from the simulator's RNG, so adding choices does not shift the simulated run.
#[derive(Debug, Clone)]
pub struct Choices(pub u64);

impl Choices {
    /// A number in `0..n` (0 for `n = 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }

    fn pick(&mut self, v: &[NodeId]) -> NodeId {
        v[self.below(v.len() as u64) as usize]
    }
}

/// The membership of the newest leader among `ids` that is up, and that leader.
pub fn leader_membership(sim: &Sim<Message>, ids: &[SimId]) -> Option<(SimId, Membership)> {
    ids.iter()
        .filter_map(|&id| server(sim, id).map(|s| (id, s.status())))
        .filter(|(_, st)| st.role == Role::Leader)
        .max_by_key(|(_, st)| st.term)
        .map(|(id, st)| (id, st.membership))
}

/// One random membership change proposed on the newest leader among `ids` (Raft ids
/// `1..=ids.len()`): add a learner or a voter, promote a learner, remove a member (keeping at
/// least three voters), or two voter changes at once (a joint change). Refusals (one change
/// in flight, a learner behind, not the leader any more) are part of the game. Returns
/// whether the leader accepted it.
pub fn random_membership_change(sim: &mut Sim<Message>, ids: &[SimId], rng: &mut Choices) -> bool {
    let Some((leader, m)) = leader_membership(sim, ids) else {
        return false;
    };
    let all: Vec<NodeId> = (1..=ids.len() as u64).map(NodeId).collect();
    let outsiders: Vec<NodeId> = all.iter().copied().filter(|&x| !m.contains(x)).collect();
    let steps = match rng.below(10) {
        0..=2 if !outsiders.is_empty() => vec![ConfChangeStep::AddLearner(rng.pick(&outsiders))],
        3 if !outsiders.is_empty() => vec![ConfChangeStep::AddVoter(rng.pick(&outsiders))],
        4..=5 if !m.learners.is_empty() => vec![ConfChangeStep::Promote(rng.pick(&m.learners))],
        6 if !m.learners.is_empty() => vec![ConfChangeStep::Remove(rng.pick(&m.learners))],
        7 if m.voters.len() > 3 => vec![ConfChangeStep::Remove(rng.pick(&m.voters))],
        8..=9 if !m.learners.is_empty() && m.voters.len() >= 3 => vec![
            ConfChangeStep::Promote(rng.pick(&m.learners)),
            ConfChangeStep::Remove(rng.pick(&m.voters)),
        ],
        _ => return false,
    };
    matches!(
        sim.call::<Server, _>(leader, |s, ctx| s.propose_conf_change(ctx, steps.clone())),
        Ok(Ok(_))
    )
}

/// The members (voters and learners) of the newest leader's membership, as simulated nodes,
/// if every one of them is up and applied a command for which `is_cmd` holds; `None`
/// otherwise (no leader, or some member has not applied it yet).
pub fn members_applied(
    sim: &Sim<Message>,
    ids: &[SimId],
    is_cmd: impl Fn(&[u8]) -> bool,
) -> Option<Vec<SimId>> {
    let (_, m) = leader_membership(sim, ids)?;
    let members: Vec<SimId> = m.members().into_iter().map(sim_id).collect();
    members
        .iter()
        .all(|&id| server(sim, id).is_some_and(|s| s.applied().iter().any(|(_, d)| is_cmd(d))))
        .then_some(members)
}
