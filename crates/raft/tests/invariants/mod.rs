//! Raft's five safety properties (paper Figure 3), checked after every simulator event.
//!
//! Servers report what they do to a shared [`Journal`]: every entry they write to (or recover
//! from) their disk with the term of its predecessor, every overwrite of a written entry, and
//! every command they apply. [`Invariants::check`] drains it after each event and also looks at
//! the live state of the nodes that lead. Every check is incremental (maps keyed by index or
//! (index, term), cursors per leader), so the per-event cost is proportional to what changed.
//! Everything is in `BTreeMap`s: no hash-order iteration, no clocks.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use shoal_raft::{LogIndex, RawNode, Role};
use shoal_sim::Sim;
use shoal_storage::DurableStorage;

type SimId = shoal_sim::NodeId;

/// FNV-1a, 64 bits: a deterministic digest of a command.
pub fn digest(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One thing a server did, as reported by the driver.
#[derive(Debug, Clone)]
pub enum Obs {
    /// `node` wrote (or recovered at restart) the entry `index` of `term` with data digest
    /// `hash`; the entry before it in its log has term `prev_term` (the snapshot's term when
    /// `index` follows the snapshot, 0 at index 1).
    Entry {
        node: SimId,
        index: u64,
        term: u64,
        hash: u64,
        prev_term: u64,
    },
    /// `node` replaced its written entry `index` of term `old_term` while it was the leader of
    /// `leader_term` (the entry was not written back identically in the same batch).
    Overwrite {
        node: SimId,
        leader_term: u64,
        index: u64,
        old_term: u64,
    },
    /// `node` applied the entry `index` (of `term`, `None` when restored from a snapshot) with
    /// data digest `hash`, while its current term was `node_term`.
    Applied {
        node: SimId,
        index: u64,
        term: Option<u64>,
        hash: u64,
        node_term: u64,
    },
}

/// Shared between the servers (which push) and the checker (which drains).
pub type Journal = Rc<RefCell<Vec<Obs>>>;

/// A committed entry as first observed (applied by some node).
#[derive(Debug, Clone, Copy)]
struct Committed {
    index: u64,
    term: u64,
    hash: u64,
    /// The applying node's term at that moment: the entry was committed in a term at most
    /// this one (a node learns a commit from a leader whose term it has adopted).
    committed_by: u64,
    node: SimId,
}

/// What we know about one (node, term) leadership.
#[derive(Debug, Clone, Copy, Default)]
struct LeaderWatch {
    /// Last (index, term) of the leader's log at the previous check.
    last: (u64, u64),
    /// How many of [`Invariants::committed`] were already checked against this leader.
    checked: usize,
}

/// The checker's memory across events of one run.
#[derive(Default)]
pub struct Invariants {
    journal: Journal,
    /// term → the node seen leading it.
    leaders: BTreeMap<u64, SimId>,
    /// (index, term) → (data digest, predecessor's term, first node seen with it).
    entries: BTreeMap<(u64, u64), (u64, u64, SimId)>,
    /// index → (data digest, first node that applied it).
    applied: BTreeMap<u64, (u64, SimId)>,
    /// Committed entries in order of first observation (with their term known).
    committed: Vec<Committed>,
    /// (node, term) → its leadership so far.
    watches: BTreeMap<(SimId, u64), LeaderWatch>,
}

impl Invariants {
    pub fn new(journal: Journal) -> Invariants {
        Invariants {
            journal,
            ..Invariants::default()
        }
    }

    /// Checks all five properties against what happened since the previous call.
    pub fn check(&mut self, sim: &Sim<shoal_raft::Message>, ids: &[SimId]) -> Result<(), String> {
        let observed = std::mem::take(&mut *self.journal.borrow_mut());
        for obs in observed {
            match obs {
                Obs::Entry {
                    node,
                    index,
                    term,
                    hash,
                    prev_term,
                } => self.check_log_matching(node, index, term, hash, prev_term)?,
                Obs::Overwrite {
                    node,
                    leader_term,
                    index,
                    old_term,
                } => check_leader_never_overwrites(node, leader_term, index, old_term)?,
                Obs::Applied {
                    node,
                    index,
                    term,
                    hash,
                    node_term,
                } => self.check_state_machine_safety(node, index, term, hash, node_term)?,
            }
        }
        for &id in ids {
            let Some(raw) = sim.node::<crate::Server>(id).and_then(|s| s.raw.as_ref()) else {
                continue;
            };
            let st = raw.status();
            if st.role != Role::Leader {
                continue;
            }
            self.check_election_safety(id, st.term.0)?;
            self.check_leader_append_only(id, raw)?;
            self.check_leader_completeness(id, raw)?;
        }
        Ok(())
    }

    /// Election Safety (§5.2): at most one leader can be elected in a given term.
    fn check_election_safety(&mut self, node: SimId, term: u64) -> Result<(), String> {
        let first = *self.leaders.entry(term).or_insert(node);
        if first != node {
            return Err(format!(
                "election safety (§5.2): {first} and {node} both lead term {term}"
            ));
        }
        Ok(())
    }

    /// Leader Append-Only (§5.3): a leader never overwrites or deletes entries in its log, it
    /// only appends. Checked on the live log: the leader's last entry at the previous event is
    /// still there with the same term (unless compacted into a snapshot), and the log did not
    /// shrink. (Overwrites of written entries are caught by [`check_leader_never_overwrites`].)
    fn check_leader_append_only(
        &mut self,
        node: SimId,
        raw: &RawNode<DurableStorage>,
    ) -> Result<(), String> {
        let st = raw.status();
        let term = st.term.0;
        let last = st.last_index.0;
        let last_term = raw.log_term(st.last_index).map_or(0, |t| t.0);
        let watch = self.watches.entry((node, term)).or_default();
        let (pi, pt) = watch.last;
        if pi > 0 {
            if last < pi {
                return Err(format!(
                    "leader append-only (§5.3): {node}, leader of term {term}, shrank its log \
                     from last index {pi} to {last}"
                ));
            }
            if pi + 1 >= st.first_index.0 {
                let now = raw.log_term(LogIndex(pi)).map(|t| t.0);
                if now != Some(pt) {
                    return Err(format!(
                        "leader append-only (§5.3): {node}, leader of term {term}, had entry \
                         {pi} of term {pt}, now {now:?}"
                    ));
                }
            }
        }
        watch.last = (last, last_term);
        Ok(())
    }

    /// Log Matching (§5.3): if two logs contain an entry with the same index and term, then
    /// the logs are identical in all entries up through that index. Checked by induction on
    /// the index: every (index, term) ever written anywhere carries one command and one
    /// predecessor term, so two logs sharing it share the predecessor's (index, term) too.
    fn check_log_matching(
        &mut self,
        node: SimId,
        index: u64,
        term: u64,
        hash: u64,
        prev_term: u64,
    ) -> Result<(), String> {
        let (h, p, first) = *self
            .entries
            .entry((index, term))
            .or_insert((hash, prev_term, node));
        if h != hash {
            return Err(format!(
                "log matching (§5.3): entry {index} of term {term} holds different commands on \
                 {first} and {node}"
            ));
        }
        if p != prev_term {
            return Err(format!(
                "log matching (§5.3): entry {index} of term {term} follows an entry of term {p} \
                 on {first} but of term {prev_term} on {node}"
            ));
        }
        Ok(())
    }

    /// State Machine Safety (§5.4.3): if a server has applied a log entry at a given index to
    /// its state machine, no other server will ever apply a different log entry for the same
    /// index. Also records the entry as committed for [`Self::check_leader_completeness`].
    fn check_state_machine_safety(
        &mut self,
        node: SimId,
        index: u64,
        term: Option<u64>,
        hash: u64,
        node_term: u64,
    ) -> Result<(), String> {
        match self.applied.get(&index) {
            Some(&(h, first)) if h != hash => {
                return Err(format!(
                    "state machine safety (§5.4.3): {first} and {node} applied different \
                     commands at index {index} ({node} in term {node_term})"
                ));
            }
            Some(_) => {}
            None => {
                self.applied.insert(index, (hash, node));
                if let Some(term) = term {
                    self.committed.push(Committed {
                        index,
                        term,
                        hash,
                        committed_by: node_term,
                        node,
                    });
                }
            }
        }
        Ok(())
    }

    /// Leader Completeness (§5.4): if a log entry is committed in a given term, that entry is
    /// present in the logs of the leaders of all higher-numbered terms. An entry applied by a
    /// node in its term `u` was committed in a term `<= u`, so every leader of a term `> u`
    /// must hold it with the same term (or have compacted it into its snapshot).
    fn check_leader_completeness(
        &mut self,
        node: SimId,
        raw: &RawNode<DurableStorage>,
    ) -> Result<(), String> {
        let st = raw.status();
        let term = st.term.0;
        let watch = self.watches.entry((node, term)).or_default();
        for c in &self.committed[watch.checked..] {
            if c.committed_by >= term || c.index < st.first_index.0 {
                continue;
            }
            let has = raw.log_term(LogIndex(c.index)).map(|t| t.0);
            if has != Some(c.term) {
                return Err(format!(
                    "leader completeness (§5.4): {node}, leader of term {term}, lacks entry {} \
                     of term {} (digest {:016x}) that {} applied in term {}; it has {has:?}",
                    c.index, c.term, c.hash, c.node, c.committed_by
                ));
            }
        }
        watch.checked = self.committed.len();
        Ok(())
    }
}

/// Leader Append-Only (§5.3), on what reaches the disk: a leader never overwrites an entry of
/// its own term. (Entries of earlier terms may still be truncated in the Ready that follows
/// an election when the node was a follower in the Ready before, so only own-term entries are
/// certain violations here; the live check catches the rest.)
fn check_leader_never_overwrites(
    node: SimId,
    leader_term: u64,
    index: u64,
    old_term: u64,
) -> Result<(), String> {
    if old_term == leader_term {
        return Err(format!(
            "leader append-only (§5.3): {node}, leader of term {leader_term}, overwrote its \
             entry {index} of term {old_term}"
        ));
    }
    Ok(())
}
