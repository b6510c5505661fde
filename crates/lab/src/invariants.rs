//! Raft's five safety properties (paper Figure 3), checked after every simulator event, for
//! every simulation that runs Raft (the bare Raft servers of [`crate::raft_node`], the KV
//! replicas of [`crate::kv_node`], whatever message type they exchange).
//!
//! Servers report what they do to a shared [`Journal`]: every entry they write to (or recover
//! from) their disk with the term of its predecessor, every overwrite of a written entry, and
//! every command they apply. [`Invariants::check`] drains it after each event and also looks at
//! the live state of the nodes that lead. Every check is incremental (maps keyed by index or
//! (index, term), cursors per leader), so the per-event cost is proportional to what changed.
//! Everything is in `BTreeMap`s: no hash-order iteration, no clocks.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use shoal_raft::{ConfChange, Entry, EntryKind, LogIndex, RawNode, Role, Storage};
use shoal_sim::{Message, Node, Sim};
use shoal_storage::DurableStorage;

type SimId = shoal_sim::NodeId;

/// A simulated server hosting one Raft group: how the checker reads a node's live Raft state
/// (its role, term and log) without knowing the node's type or message type.
pub trait RaftHost {
    /// The running Raft core, `None` before the node started.
    fn raft(&self) -> Option<&RawNode<DurableStorage>>;
}

/// FNV-1a, 64 bits: a deterministic digest of a command.
pub fn digest(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One thing a server did, as reported by the driver (through a [`Recorder`]).
#[derive(Debug, Clone)]
pub enum Obs {
    /// `node` wrote (or recovered at restart) the entry `index` of `term` with data digest
    /// `hash`; the entry before it in its log has term `prev_term` (the snapshot's term when
    /// `index` follows the snapshot, 0 at index 1).
    Entry {
        /// The server.
        node: SimId,
        /// The entry's index.
        index: u64,
        /// The entry's term.
        term: u64,
        /// [`digest`] of the entry's data.
        hash: u64,
        /// The term of the entry before it in the server's log.
        prev_term: u64,
    },
    /// `node` replaced its written entry `index` of term `old_term` while it was the leader of
    /// `leader_term` (the entry was not written back identically in the same batch).
    Overwrite {
        /// The server.
        node: SimId,
        /// The term it leads.
        leader_term: u64,
        /// The overwritten entry's index.
        index: u64,
        /// The overwritten entry's term.
        old_term: u64,
    },
    /// `node` applied the entry `index` (of `term`, `None` when restored from a snapshot) with
    /// data digest `hash`, while its current term was `node_term`.
    Applied {
        /// The server.
        node: SimId,
        /// The entry's index.
        index: u64,
        /// The entry's term (`None`: restored from a snapshot, term unknown).
        term: Option<u64>,
        /// [`digest`] of the entry's data.
        hash: u64,
        /// The server's current term when it applied it.
        node_term: u64,
    },
    /// `node` applied the membership change requested at entry `index` of `term` (one a
    /// client proposed: the automatic leave of a joint configuration is not counted).
    ConfChange {
        /// The server.
        node: SimId,
        /// The entry's index.
        index: u64,
        /// The entry's term.
        term: u64,
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
    /// (index, term) of every requested membership change some server applied.
    conf_changes: BTreeSet<(u64, u64)>,
}

impl Invariants {
    /// A checker draining `journal` (give its clones to the servers' [`Recorder`]s).
    pub fn new(journal: Journal) -> Invariants {
        Invariants {
            journal,
            ..Invariants::default()
        }
    }

    /// Checks all five properties against what happened since the previous call, reading the
    /// live Raft state of the nodes `ids` (those that are up) of type `T`.
    pub fn check<M: Message, T: Node<M> + RaftHost>(
        &mut self,
        sim: &Sim<M>,
        ids: &[SimId],
    ) -> Result<(), String> {
        self.check_nodes(
            ids.iter()
                .filter_map(|&id| sim.node::<T>(id).and_then(|n| n.raft()).map(|r| (id, r))),
        )
    }

    /// [`Invariants::check`] over explicitly given live Raft cores (for drivers that are not a
    /// [`RaftHost`] of a [`Sim`]).
    pub fn check_nodes<'a, S: Storage + 'a>(
        &mut self,
        nodes: impl IntoIterator<Item = (SimId, &'a RawNode<S>)>,
    ) -> Result<(), String> {
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
                Obs::ConfChange { index, term, .. } => {
                    self.conf_changes.insert((index, term));
                }
            }
        }
        for (id, raw) in nodes {
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

    /// Requested membership changes committed so far: distinct configuration entries (the
    /// automatic leave of a joint configuration not counted) that some server applied, as
    /// drained by the last [`Invariants::check`].
    pub fn conf_changes_committed(&self) -> u64 {
        self.conf_changes.len() as u64
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
    fn check_leader_append_only<S: Storage>(
        &mut self,
        node: SimId,
        raw: &RawNode<S>,
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
    fn check_leader_completeness<S: Storage>(
        &mut self,
        node: SimId,
        raw: &RawNode<S>,
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

/// A driver's side of the journal: it mirrors the entries the server wrote to its disk (a
/// shadow of the stored log, kept in step with the writes and rebuilt from the disk at
/// restart) and reports writes, overwrites and applies. One per server incarnation.
#[derive(Debug, Default)]
pub struct Recorder {
    journal: Journal,
    /// index → term of every entry written to the disk since the snapshot.
    written: BTreeMap<u64, u64>,
    /// (index, term) of the last entry covered by the stored snapshot.
    snap: (u64, u64),
}

impl Recorder {
    /// A recorder reporting to `journal`.
    pub fn new(journal: Journal) -> Recorder {
        Recorder {
            journal,
            written: BTreeMap::new(),
            snap: (0, 0),
        }
    }

    /// Reports one observation.
    pub fn observe(&self, obs: Obs) {
        self.journal.borrow_mut().push(obs);
    }

    /// The term of the written entry `index` (the snapshot's for its last index).
    fn written_term(&self, index: u64) -> u64 {
        if index == self.snap.0 {
            self.snap.1
        } else {
            self.written.get(&index).copied().unwrap_or(0)
        }
    }

    /// At start: the storage recovered from the disk (its snapshot and the log after it) is
    /// checked like a written one (torn writes must not break it).
    pub fn recovered<S: Storage>(&mut self, me: SimId, storage: &S) -> Result<(), String> {
        let snap = storage
            .snapshot()
            .map_err(|e| format!("{me}: snapshot: {e}"))?;
        self.snapshot(snap.meta.index.0, snap.meta.term.0, true);
        let recovered = storage
            .entries(
                storage.first_index(),
                storage.last_index().next(),
                usize::MAX,
            )
            .map_err(|e| format!("{me}: recovered entries: {e}"))?;
        self.append(me, None, &recovered);
        Ok(())
    }

    /// Mirrors `storage.append(entries)` and reports it; `leader_term` is the node's term if
    /// it leads (for Leader Append-Only).
    pub fn append(&mut self, me: SimId, leader_term: Option<u64>, entries: &[Entry]) {
        let entries: Vec<_> = entries.iter().filter(|e| e.index.0 > self.snap.0).collect();
        let Some(head) = entries.first() else { return };
        let removed = self.written.split_off(&head.index.0);
        if let Some(lt) = leader_term {
            for (&i, &t) in &removed {
                let rewritten = entries.iter().any(|e| e.index.0 == i && e.term.0 == t);
                if !rewritten {
                    self.observe(Obs::Overwrite {
                        node: me,
                        leader_term: lt,
                        index: i,
                        old_term: t,
                    });
                }
            }
        }
        for e in entries {
            let prev_term = self.written_term(e.index.0 - 1);
            self.written.insert(e.index.0, e.term.0);
            self.observe(Obs::Entry {
                node: me,
                index: e.index.0,
                term: e.term.0,
                hash: digest(&e.data),
                prev_term,
            });
        }
    }

    /// Mirrors a snapshot install (`whole = true`: the log is replaced) or a compaction up to
    /// `index` (ignored if the stored snapshot is already newer).
    pub fn snapshot(&mut self, index: u64, term: u64, whole: bool) {
        if whole {
            self.written.clear();
        } else if index > self.snap.0 {
            self.written = self.written.split_off(&(index + 1));
        } else {
            return;
        }
        self.snap = (index, term);
    }

    /// Reports that `me` applied the committed entry `e` while its term was `node_term`.
    pub fn applied(&self, me: SimId, e: &Entry, node_term: u64) {
        self.observe(Obs::Applied {
            node: me,
            index: e.index.0,
            term: Some(e.term.0),
            hash: digest(&e.data),
            node_term,
        });
        if e.kind == EntryKind::ConfChange {
            let requested =
                postcard::from_bytes::<ConfChange>(&e.data).is_ok_and(|cc| !cc.steps.is_empty());
            if requested {
                self.observe(Obs::ConfChange {
                    node: me,
                    index: e.index.0,
                    term: e.term.0,
                });
            }
        }
    }
}

/// The replica shell's simulator driver reports to a recorder as it writes, applies and
/// compacts (the simulated servers hand it one per incarnation).
impl shoal_replica::sim::Observer for Recorder {
    fn written(&mut self, me: SimId, leader_term: Option<u64>, ready: &shoal_raft::Ready) {
        if let Some(s) = &ready.snapshot {
            self.snapshot(s.meta.index.0, s.meta.term.0, true);
        }
        self.append(me, leader_term, &ready.entries);
    }

    fn applying(&mut self, me: SimId, term: u64, applied: u64, ready: &shoal_raft::Ready) {
        for e in ready
            .committed_entries
            .iter()
            .filter(|e| e.index.0 > applied)
        {
            self.applied(me, e, term);
        }
    }

    fn compacted(&mut self, _me: SimId, index: u64, term: u64) {
        self.snapshot(index, term, false);
    }
}
