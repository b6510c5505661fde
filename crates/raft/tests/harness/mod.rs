//! A minimal deterministic cluster of `RawNode`s for tests: deliver, drop, reorder and
//! partition messages; crash and restart nodes from their `MemStorage`; check Raft's safety
//! properties (paper Figure 3) as the run goes. The real torture happens in the simulator;
//! this is just enough to exercise the core end to end.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use shoal_raft::{
    Config, Entry, EntryKind, LogIndex, MemStorage, Message, MessageBody, NodeId, RawNode,
    ReadState, Role, Storage, Term,
};

/// SplitMix64, for the harness's own choices (separate from the nodes' seeds).
#[derive(Clone)]
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x0123_4567_89ab_cdef)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Seeds to run: `SHOAL_SEED=S` replays one, `SHOAL_SEEDS=N` runs N (default `default_n`).
pub fn seeds(default_n: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SHOAL_SEED") {
        return vec![s.parse().expect("SHOAL_SEED must be a number")];
    }
    let n = std::env::var("SHOAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_n);
    (0..n).collect()
}

/// The replicated state machine of a test node: the commands applied, in order.
#[derive(Default, Clone)]
pub struct StateMachine {
    pub applied: Vec<(u64, Vec<u8>)>,
}

pub struct Node {
    pub raw: RawNode<MemStorage>,
    pub sm: StateMachine,
    pub last_applied: LogIndex,
    pub reads: Vec<ReadState>,
}

/// Builds a node's configuration from its id and the voters.
pub type ConfigFn = Box<dyn Fn(NodeId, &[NodeId]) -> Config>;

pub struct Cluster {
    pub ids: Vec<NodeId>,
    pub nodes: BTreeMap<NodeId, Node>,
    /// Storage of crashed nodes (only what was persisted survives).
    pub crashed: BTreeMap<NodeId, MemStorage>,
    pub queue: VecDeque<Message>,
    /// Directed links that drop everything.
    pub cut: BTreeSet<(NodeId, NodeId)>,
    pub config: ConfigFn,
    /// Messages handed to the network, by kind.
    pub sent: BTreeMap<&'static str, usize>,
    /// index -> (term, data) of every entry any node applied (state machine safety).
    pub applied_global: BTreeMap<u64, (Term, Vec<u8>)>,
    /// term -> leader (election safety).
    pub leaders: BTreeMap<Term, NodeId>,
    /// (leader, term) -> last index it had (leader append-only).
    leader_last: BTreeMap<(NodeId, Term), (LogIndex, Term)>,
    pub restart_count: u64,
    /// AppendEntries rejections sent (backtracking round trips).
    pub rejects: usize,
}

impl Cluster {
    pub fn new(n: u64) -> Cluster {
        Cluster::with_config(n, |id, voters| {
            let mut c = Config::new(id, voters.to_vec());
            c.rng_seed = id.0;
            c
        })
    }

    pub fn with_config(n: u64, config: impl Fn(NodeId, &[NodeId]) -> Config + 'static) -> Cluster {
        let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
        let mut c = Cluster {
            ids: ids.clone(),
            nodes: BTreeMap::new(),
            crashed: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            config: Box::new(config),
            sent: BTreeMap::new(),
            applied_global: BTreeMap::new(),
            leaders: BTreeMap::new(),
            leader_last: BTreeMap::new(),
            restart_count: 0,
            rejects: 0,
        };
        for id in ids {
            c.crashed.insert(id, MemStorage::new());
            c.restart(id);
        }
        c
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[&NodeId(id)]
    }

    pub fn raw(&mut self, id: u64) -> &mut RawNode<MemStorage> {
        &mut self.nodes.get_mut(&NodeId(id)).expect("node is up").raw
    }

    pub fn total_sent(&self) -> usize {
        self.sent.values().sum()
    }

    // ------------------------------------------------------------ faults

    pub fn crash(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.remove(&id) {
            self.crashed.insert(id, n.raw.storage().clone());
        }
    }

    pub fn restart(&mut self, id: NodeId) {
        let Some(storage) = self.crashed.remove(&id) else {
            return;
        };
        let snap = storage.snapshot().expect("mem snapshot");
        let sm = if snap.data.is_empty() {
            StateMachine::default()
        } else {
            StateMachine {
                applied: postcard::from_bytes(&snap.data).expect("snapshot decodes"),
            }
        };
        let mut cfg = (self.config)(id, &self.ids);
        cfg.applied = snap.meta.index;
        cfg.rng_seed = cfg.rng_seed.wrapping_add(self.restart_count * 7919);
        self.restart_count += 1;
        let raw = RawNode::new(cfg, storage).expect("node starts");
        self.nodes.insert(
            id,
            Node {
                raw,
                sm,
                last_applied: snap.meta.index,
                reads: Vec::new(),
            },
        );
    }

    pub fn isolate(&mut self, id: NodeId) {
        for &o in &self.ids {
            if o != id {
                self.cut.insert((id, o));
                self.cut.insert((o, id));
            }
        }
    }

    /// Splits the cluster: nodes in different groups cannot talk.
    pub fn partition(&mut self, groups: &[&[u64]]) {
        self.cut.clear();
        for (i, a) in groups.iter().enumerate() {
            for (j, b) in groups.iter().enumerate() {
                if i != j {
                    for &x in a.iter() {
                        for &y in b.iter() {
                            self.cut.insert((NodeId(x), NodeId(y)));
                        }
                    }
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    // ------------------------------------------------------------ running

    /// Carries out every pending Ready of `id`, in the documented order.
    pub fn process(&mut self, id: NodeId) {
        for _ in 0..100 {
            let Some(node) = self.nodes.get_mut(&id) else {
                return;
            };
            if !node.raw.has_ready() {
                return;
            }
            let rd = node.raw.ready();
            let mut out = rd.messages;
            if let Some(s) = &rd.snapshot {
                node.raw.storage_mut().apply_snapshot(s.clone());
            }
            node.raw.storage_mut().append(&rd.entries);
            if let Some(hs) = rd.hard_state {
                node.raw.storage_mut().set_hard_state(hs);
            }
            out.extend(rd.persisted_messages);
            if let Some(s) = &rd.snapshot {
                node.sm.applied = postcard::from_bytes(&s.data).unwrap_or_default();
                node.last_applied = s.meta.index;
            }
            let mut applied_now = Vec::new();
            for e in &rd.committed_entries {
                assert_eq!(
                    e.index,
                    node.last_applied.next(),
                    "node {id} applies out of order"
                );
                node.last_applied = e.index;
                if e.kind == EntryKind::Normal {
                    node.sm.applied.push((e.index.0, e.data.clone()));
                }
                applied_now.push(e.clone());
            }
            if let Some(s) = &rd.compact {
                node.raw.storage_mut().compact(s.clone());
            }
            node.reads.extend(rd.read_states);
            node.raw.advance();
            for e in applied_now {
                self.record_applied(id, &e);
            }
            for m in out {
                self.send(m);
            }
            self.check_leader(id);
        }
        panic!("node {id} keeps producing Readys");
    }

    fn record_applied(&mut self, id: NodeId, e: &Entry) {
        // State Machine Safety (Figure 3): no two nodes apply different entries at an index.
        match self.applied_global.get(&e.index.0) {
            Some((t, d)) => assert!(
                *t == e.term && *d == e.data,
                "state machine safety: node {id} applied ({}, {:?}) at {} but another applied ({t}, {d:?})",
                e.term,
                e.data,
                e.index
            ),
            None => {
                self.applied_global
                    .insert(e.index.0, (e.term, e.data.clone()));
            }
        }
    }

    fn check_leader(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get(&id) else {
            return;
        };
        let st = node.raw.status();
        if st.role != Role::Leader {
            return;
        }
        // Election Safety: at most one leader per term.
        let prev = *self.leaders.entry(st.term).or_insert(id);
        assert_eq!(prev, id, "election safety: two leaders in term {}", st.term);
        // Leader Append-Only.
        let last = (
            st.last_index,
            node.raw.log_term(st.last_index).unwrap_or_default(),
        );
        match self.leader_last.get(&(id, st.term)) {
            Some(&(i, t)) => {
                assert!(st.last_index >= i, "leader append-only: log shrank");
                if i >= st.first_index {
                    assert_eq!(
                        node.raw.log_term(i),
                        Some(t),
                        "leader append-only: entry changed"
                    );
                }
            }
            None => {
                // Leader Completeness: a new leader holds every applied (so committed) entry.
                for (&idx, (t, _)) in self.applied_global.range(st.first_index.0..) {
                    assert_eq!(
                        node.raw.log_term(LogIndex(idx)),
                        Some(*t),
                        "leader completeness: leader {id} of term {} lacks committed entry {idx}",
                        st.term
                    );
                }
            }
        }
        self.leader_last.insert((id, st.term), last);
    }

    /// Log Matching (Figure 3) between every pair of live nodes.
    pub fn check_log_matching(&self) {
        let nodes: Vec<_> = self.nodes.iter().collect();
        for (i, (a_id, a)) in nodes.iter().enumerate() {
            for (b_id, b) in nodes.iter().skip(i + 1) {
                let (sa, sb) = (a.raw.status(), b.raw.status());
                let lo = sa.first_index.max(sb.first_index);
                let hi = sa.last_index.min(sb.last_index);
                let mut idx = hi;
                while idx >= lo && idx.0 > 0 {
                    if a.raw.log_term(idx) == b.raw.log_term(idx) {
                        let ea = a.raw.log_entries(lo, idx.next()).unwrap();
                        let eb = b.raw.log_entries(lo, idx.next()).unwrap();
                        assert_eq!(
                            ea, eb,
                            "log matching: {a_id} and {b_id} agree at {idx} but differ before"
                        );
                        break;
                    }
                    idx = idx.prev();
                }
            }
        }
    }

    pub fn send(&mut self, m: Message) {
        *self.sent.entry(m.body.name()).or_default() += 1;
        if let MessageBody::AppendEntriesResponse {
            reject: Some(_), ..
        } = m.body
        {
            self.rejects += 1;
        }
        if self.cut.contains(&(m.from, m.to)) {
            return;
        }
        self.queue.push_back(m);
    }

    /// Delivers one message (the one at `pos`) and processes the receiver.
    pub fn deliver_at(&mut self, pos: usize) {
        let Some(m) = self.queue.remove(pos) else {
            return;
        };
        let to = m.to;
        if self.cut.contains(&(m.from, m.to)) {
            return;
        }
        if let Some(n) = self.nodes.get_mut(&to) {
            let _ = n.raw.step(m);
            self.process(to);
        }
    }

    /// Processes every node and delivers until the network is quiet.
    pub fn stabilize(&mut self) {
        for _ in 0..100_000 {
            for id in self.ids.clone() {
                self.process(id);
            }
            if self.queue.is_empty() {
                return;
            }
            while !self.queue.is_empty() {
                self.deliver_at(0);
            }
        }
        panic!("network never went quiet");
    }

    pub fn tick_all(&mut self) {
        for id in self.ids.clone() {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.raw.tick();
            }
            self.process(id);
        }
    }

    /// Ticks and delivers until `pred` holds, at most `max_ticks` ticks.
    pub fn run_until(&mut self, max_ticks: u32, mut pred: impl FnMut(&Cluster) -> bool) -> bool {
        for _ in 0..max_ticks {
            self.stabilize();
            if pred(self) {
                return true;
            }
            self.tick_all();
        }
        self.stabilize();
        pred(self)
    }

    /// The live leader with the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.raw.status().role == Role::Leader)
            .max_by_key(|(_, n)| n.raw.status().term)
            .map(|(&id, _)| id)
    }

    /// Elects a leader (ticking until one appears).
    pub fn elect(&mut self) -> NodeId {
        assert!(
            self.run_until(1000, |c| c.leader().is_some()),
            "no leader elected"
        );
        self.leader().unwrap()
    }

    /// How many live nodes applied `data`.
    pub fn applied_count(&self, data: &[u8]) -> usize {
        self.nodes
            .values()
            .filter(|n| n.sm.applied.iter().any(|(_, d)| d == data))
            .count()
    }

    /// Proposes on the current leader and runs until `n` nodes applied it.
    pub fn one(&mut self, data: &[u8], n: usize) -> LogIndex {
        for _ in 0..20 {
            let leader = self.elect();
            if let Ok(idx) = self
                .nodes
                .get_mut(&leader)
                .unwrap()
                .raw
                .propose(data.to_vec())
            {
                if self.run_until(200, |c| c.applied_count(data) >= n) {
                    return idx;
                }
            }
        }
        panic!(
            "{:?} never applied on {n} nodes",
            String::from_utf8_lossy(data)
        );
    }

    /// The service at `id` snapshots everything it applied.
    pub fn snapshot(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node is up");
        let data = postcard::to_allocvec(&node.sm.applied).expect("encode");
        let at = node.last_applied;
        if at >= node.raw.status().first_index {
            node.raw.snapshot(at, data).expect("snapshot accepted");
        }
        self.process(id);
    }

    /// Drops every message in flight.
    pub fn drop_all(&mut self) {
        self.queue.clear();
    }

    /// Counts messages of one kind sent so far.
    pub fn count(&self, kind: &str) -> usize {
        self.sent.get(kind).copied().unwrap_or(0)
    }

    pub fn is_request(m: &Message) -> bool {
        !matches!(
            m.body,
            MessageBody::AppendEntriesResponse { .. }
                | MessageBody::RequestVoteResponse { .. }
                | MessageBody::HeartbeatResponse { .. }
                | MessageBody::ReadIndexResponse { .. }
        )
    }
}
