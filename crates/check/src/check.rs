//! The search: Wing & Gong's algorithm with Lowe's just-in-time linearization and a cache.
//!
//! References: J. M. Wing and C. Gong, "Testing and verifying concurrent objects", JPDC 1993;
//! G. Lowe, "Testing for linearizability", CCPE 2017 (the linked list of call/return entries,
//! lifting an operation out when it is linearized, and the cache of (linearized set, state)
//! that prunes configurations already explored); A. Horn and D. Kroening, "Faster linearizability
//! checking via P-compositionality", FORTE 2015 (checking each key on its own).

use std::fmt;
use std::time::{Duration, Instant};

use ahash::{AHashMap, AHashSet, RandomState};

use crate::history::{ClientId, History, OpId, Operation, Outcome, Time};
use crate::model::Model;

/// How often (in search steps) the wall clock is read; a power of two.
const STEPS_PER_CLOCK_READ: u64 = 1024;

/// The hasher of every map in the search: fixed seeds, so runs are reproducible.
fn fixed_hasher() -> RandomState {
    RandomState::with_seeds(
        0x5348_4f41_4c5f_4348,
        0x4543_4b5f_4341_4348,
        0x0123_4567_89ab_cdef,
        0xfedc_ba98_7654_3210,
    )
}

/// The wall clock, read only to enforce [`Budget::time`].
#[allow(clippy::disallowed_methods)] // The budget is a wall-time limit asked for by the user; it
                                     // never influences a verdict other than turning it into Unknown.
fn now() -> Instant {
    Instant::now()
}

/// How much work a check may do before it gives up and answers [`Verdict::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Budget {
    /// Wall time for the whole check (every partition); `None` is unlimited.
    pub time: Option<Duration>,
    /// Search steps for the whole check; `None` is unlimited. Unlike time, a step budget gives
    /// the same answer on every machine, which is what a deterministic simulator wants.
    pub steps: Option<u64>,
    /// Memory for the search's bookkeeping (cache, interned states, transitions), estimated
    /// with [`Model::state_bytes`]; `None` is unlimited. A hard search can fill gigabytes within
    /// seconds, so long budgets need this limit.
    pub memory_bytes: Option<usize>,
}

impl Budget {
    /// No limit.
    pub fn unlimited() -> Self {
        Budget::default()
    }

    /// At most `time` of wall time.
    pub fn time(time: Duration) -> Self {
        Budget {
            time: Some(time),
            ..Budget::default()
        }
    }

    /// At most `steps` search steps (machine-independent).
    pub fn steps(steps: u64) -> Self {
        Budget {
            steps: Some(steps),
            ..Budget::default()
        }
    }

    /// The same budget with a memory limit.
    pub fn with_memory_bytes(self, memory_bytes: usize) -> Self {
        Budget {
            memory_bytes: Some(memory_bytes),
            ..self
        }
    }
}

/// Options of [`check_with_options`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// The work allowed.
    pub budget: Budget,
    /// Check each partition ([`Model::partition_key`]) on its own (default `true`). `false`
    /// checks the whole history as one, which must give the same verdict, only slower.
    pub partition_by_key: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            budget: Budget::unlimited(),
            partition_by_key: true,
        }
    }
}

/// The answer of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Some order of the operations, consistent with real time, is legal for the model.
    Linearizable,
    /// No such order exists; the explanation says where the search got stuck.
    NotLinearizable(Box<Explanation>),
    /// The budget ran out before the search finished: nothing is known.
    Unknown(UnknownReason),
}

impl Verdict {
    /// Whether the verdict is [`Verdict::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }

    /// Whether the verdict is [`Verdict::NotLinearizable`].
    pub fn is_violation(&self) -> bool {
        matches!(self, Verdict::NotLinearizable(_))
    }
}

/// Which limit of the [`Budget`] ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// [`Budget::time`].
    Time,
    /// [`Budget::steps`].
    Steps,
    /// [`Budget::memory_bytes`].
    Memory,
}

/// Why a check answered [`Verdict::Unknown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownReason {
    /// The limit that ran out.
    pub exhausted: Exhausted,
    /// The partition being searched when the budget ran out (`None`: the whole history).
    pub partition: Option<String>,
    /// Partitions never finished (the one being searched included).
    pub unfinished_partitions: usize,
    /// Search steps done.
    pub steps: u64,
    /// Wall time spent.
    pub elapsed: Duration,
    /// The longest linearizable prefix found in that partition before the budget ran out.
    pub longest_prefix: usize,
    /// The number of operations of that partition.
    pub partition_ops: usize,
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} budget ran out after {} search steps and {:.3} s, while searching {} \
             (longest linearizable prefix found: {} of {} operations); {} partition(s) unfinished",
            match self.exhausted {
                Exhausted::Time => "time",
                Exhausted::Steps => "step",
                Exhausted::Memory => "memory",
            },
            self.steps,
            self.elapsed.as_secs_f64(),
            partition_name(self.partition.as_deref()),
            self.longest_prefix,
            self.partition_ops,
            self.unfinished_partitions
        )
    }
}

fn partition_name(partition: Option<&str>) -> String {
    match partition {
        Some(key) => format!("key {key:?}"),
        None => "the whole history".to_string(),
    }
}

/// One operation as shown in an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpSummary {
    /// Its id in the history.
    pub id: OpId,
    /// Who invoked it.
    pub client: ClientId,
    /// Input and output, from [`Model::describe_op`].
    pub description: String,
    /// When it was invoked.
    pub invoked_at: Time,
    /// When it returned; `None` for an unknown outcome.
    pub returned_at: Option<Time>,
}

impl fmt::Display for OpSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let returned = match self.returned_at {
            Some(at) => at.to_string(),
            None => "?".to_string(),
        };
        write!(
            f,
            "{} client {} [{}, {}] {}",
            self.id, self.client, self.invoked_at, returned, self.description
        )
    }
}

/// Why a history is not linearizable: the longest linearizable prefix the search found, and the
/// operation that could not be placed after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The failing partition's key (`None`: the history was checked as one partition).
    pub partition: Option<String>,
    /// Every operation of the failing partition, in invocation order.
    pub ops: Vec<OpSummary>,
    /// The longest linearizable prefix found, in linearization order.
    pub prefix: Vec<OpId>,
    /// The model's state after the prefix ([`Model::describe_state`]).
    pub state_after_prefix: String,
    /// The operation that must take effect before it returns but cannot: the one of the
    /// remaining operations that returns first.
    pub blocked: OpId,
    /// The operations involved: those that could come next after the prefix (invoked before
    /// `blocked` returned), `blocked` included. None of them is legal in `state_after_prefix`.
    pub involved: Vec<OpId>,
}

impl Explanation {
    /// The summary of operation `id`, if it belongs to the failing partition.
    pub fn op(&self, id: OpId) -> Option<&OpSummary> {
        self.ops
            .binary_search_by_key(&id, |op| op.id)
            .ok()
            .and_then(|i| self.ops.get(i))
    }
}

/// How many prefix operations the text explanation lists (the HTML shows all).
const PREFIX_OPS_SHOWN: usize = 10;

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "partition: {} ({} operations)",
            partition_name(self.partition.as_deref()),
            self.ops.len()
        )?;
        writeln!(
            f,
            "longest linearizable prefix: {} of {} operations; state after it: {}",
            self.prefix.len(),
            self.ops.len(),
            self.state_after_prefix
        )?;
        let blocked = self
            .op(self.blocked)
            .map_or_else(|| self.blocked.to_string(), ToString::to_string);
        writeln!(
            f,
            "operation that cannot be linearized before it returns: {blocked}"
        )?;
        writeln!(
            f,
            "operations that could come next, none legal in that state ({}):",
            self.involved.len()
        )?;
        for id in &self.involved {
            if let Some(op) = self.op(*id) {
                writeln!(f, "  {op}")?;
            }
        }
        let skipped = self.prefix.len().saturating_sub(PREFIX_OPS_SHOWN);
        writeln!(f, "end of the prefix, in linearization order:")?;
        if skipped > 0 {
            writeln!(f, "  ... {skipped} earlier operations")?;
        }
        for (i, id) in self.prefix.iter().enumerate().skip(skipped) {
            if let Some(op) = self.op(*id) {
                writeln!(f, "  {}. {op}", i + 1)?;
            }
        }
        Ok(())
    }
}

/// Checks `history` against `model` within `budget`, partitioning by key.
pub fn check<M: Model>(
    model: &M,
    history: &History<M::Input, M::Output>,
    budget: Budget,
) -> Verdict {
    check_with_options(
        model,
        history,
        &CheckOptions {
            budget,
            ..CheckOptions::default()
        },
    )
}

/// Checks `history` against `model` with explicit options.
pub fn check_with_options<M: Model>(
    model: &M,
    history: &History<M::Input, M::Output>,
    options: &CheckOptions,
) -> Verdict {
    let mut meter = Meter::new(options.budget);
    let mut searches: Vec<(Option<String>, Vec<usize>, Search<'_, M>)> =
        partition(model, history, options.partition_by_key)
            .into_iter()
            .map(|(key, op_ids)| {
                let ops = op_ids.iter().map(|&i| &history.ops()[i]).collect();
                (key, op_ids, Search::new(model, ops))
            })
            .collect();
    // Partitions are searched in rounds of growing step slices, so that a violation in any
    // partition is found about as soon as if each had its own core, and one hard partition does
    // not hide an easy violation in another. Deterministic: the order is the keys' order.
    let mut slice = FIRST_SLICE_STEPS;
    while !searches.is_empty() {
        let unfinished = searches.len();
        let mut finished = vec![false; searches.len()];
        for (index, (key, op_ids, search)) in searches.iter_mut().enumerate() {
            match search.resume(&mut meter, slice) {
                None => {}
                Some(SearchOutcome::Linearizable) => {
                    tracing::debug!(partition = ?key, ops = op_ids.len(), "partition linearizable");
                    meter.bytes = meter.bytes.saturating_sub(search.bytes);
                    finished[index] = true;
                }
                Some(SearchOutcome::OutOfBudget(exhausted)) => {
                    tracing::debug!(partition = ?key, steps = meter.steps, "budget ran out");
                    return Verdict::Unknown(UnknownReason {
                        exhausted,
                        partition: key.clone(),
                        unfinished_partitions: unfinished - finished.iter().filter(|f| **f).count(),
                        steps: meter.steps,
                        elapsed: meter.elapsed(),
                        longest_prefix: search.best.len(),
                        partition_ops: op_ids.len(),
                    });
                }
                Some(SearchOutcome::Violation) => {
                    tracing::debug!(partition = ?key, prefix = search.best.len(), "violation");
                    let key = key.clone();
                    return Verdict::NotLinearizable(Box::new(search.explain(key, op_ids)));
                }
            }
        }
        // Drop finished partitions (and their memory) once per round: O(partitions).
        let mut index = 0;
        searches.retain(|_| {
            index += 1;
            !finished[index - 1]
        });
        slice = slice.saturating_mul(2);
    }
    Verdict::Linearizable
}

/// Estimated bookkeeping per interned state beyond [`Model::state_bytes`] (vector slot, chain
/// link, hash table entry).
const STATE_OVERHEAD_BYTES: usize = 48;
/// Estimated bytes per memoized transition (hash table entry and successor ids).
const TRANSITION_BYTES: usize = 32;
/// Estimated bytes per cache entry beyond its key (allocation header, hash table slot).
const CACHE_ENTRY_OVERHEAD_BYTES: usize = 64;

/// The steps a partition's search gets in the first round; each round doubles it.
const FIRST_SLICE_STEPS: u64 = 4096;

/// Groups the operations that take part (all but discarded ones) by partition key, in key order.
/// If any operation has no key, or partitioning is off, there is one partition, named `None`.
fn partition<M: Model>(
    model: &M,
    history: &History<M::Input, M::Output>,
    by_key: bool,
) -> Vec<(Option<String>, Vec<usize>)> {
    let live = history
        .ops()
        .iter()
        .enumerate()
        .filter(|(_, op)| !matches!(op.outcome, Outcome::Discarded));
    if by_key {
        let mut groups: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
        let mut all_keyed = true;
        for (i, op) in live.clone() {
            match model.partition_key(&op.input) {
                Some(key) => groups.entry(key).or_default().push(i),
                None => {
                    all_keyed = false;
                    break;
                }
            }
        }
        if all_keyed {
            return groups.into_iter().map(|(k, v)| (Some(k), v)).collect();
        }
    }
    let all: Vec<usize> = live.map(|(i, _)| i).collect();
    if all.is_empty() {
        Vec::new()
    } else {
        vec![(None, all)]
    }
}

/// Counts search steps and enforces the budget.
struct Meter {
    budget: Budget,
    started: Instant,
    steps: u64,
    /// Estimated bytes held by the searches still running.
    bytes: usize,
}

impl Meter {
    fn new(budget: Budget) -> Self {
        Meter {
            budget,
            started: now(),
            steps: 0,
            bytes: 0,
        }
    }

    /// Counts one step; `Some` when the budget is exhausted.
    fn tick(&mut self) -> Option<Exhausted> {
        self.steps += 1;
        if self.budget.steps.is_some_and(|max| self.steps > max) {
            return Some(Exhausted::Steps);
        }
        if self.budget.memory_bytes.is_some_and(|max| self.bytes > max) {
            return Some(Exhausted::Memory);
        }
        if self.steps & (STEPS_PER_CLOCK_READ - 1) == 0 {
            if let Some(time) = self.budget.time {
                if now().duration_since(self.started) > time {
                    return Some(Exhausted::Time);
                }
            }
        }
        None
    }

    fn elapsed(&self) -> Duration {
        now().duration_since(self.started)
    }
}

enum SearchOutcome {
    Linearizable,
    /// No linearization: the longest prefix found is in `Search::best`.
    Violation,
    OutOfBudget(Exhausted),
}

const NIL: u32 = u32::MAX;

/// An entry of Lowe's doubly linked list of call and return events.
#[derive(Clone, Copy)]
struct Node {
    prev: u32,
    next: u32,
    op: u32,
    is_call: bool,
    /// The return node of a call node.
    ret: u32,
}

struct Frame {
    call: u32,
    prev_state: u32,
    successor: usize,
    /// Taken as a forced move: if it fails, its configuration fails (no alternative to try).
    forced: bool,
}

/// What `Search::find_forced` found.
enum Forced {
    None,
    Take(u32),
    Fails,
}

/// The search over one partition.
struct Search<'a, M: Model> {
    model: &'a M,
    ops: Vec<&'a Operation<M::Input, M::Output>>,
    /// Interned states: the search handles `u32` ids, the cache stores ids.
    states: Vec<M::State>,
    /// State hash -> the last state id with that hash; `state_chain` links ids of equal hash.
    /// (States are stored once, in `states`: they can be large.)
    state_buckets: AHashMap<u64, u32>,
    state_chain: Vec<u32>,
    hasher: RandomState,
    /// (state, op) -> range of `successor_pool`.
    transitions: AHashMap<(u32, u32), (u32, u32)>,
    successor_pool: Vec<u32>,
    scratch: Vec<M::State>,
    /// Position of each op's call and return node in the event order.
    call_pos: Vec<u32>,
    return_pos: Vec<u32>,
    /// [`Model::is_read_only`] of each operation.
    read_only: Vec<bool>,
    // The search's position, kept between slices (see `resume`).
    nodes: Vec<Node>,
    /// The cache key being built: the linearized set's bits, then the state id in the last word.
    key: Vec<u64>,
    /// (linearized set, state) pairs already explored (Lowe's cache).
    cache: AHashSet<Box<[u64]>>,
    stack: Vec<Frame>,
    /// The longest linearizable prefix found, and the state after it.
    best: Vec<u32>,
    best_state: u32,
    state: u32,
    cur: u32,
    first_successor: usize,
    /// Whether the current configuration is new and must be scanned for a forced move.
    scan_forced: bool,
    /// Estimated bytes of bookkeeping held (also added to the meter).
    bytes: usize,
}

impl<'a, M: Model> Search<'a, M> {
    fn new(model: &'a M, ops: Vec<&'a Operation<M::Input, M::Output>>) -> Self {
        let words = ops.len().div_ceil(64);
        let mut search = Search {
            model,
            states: Vec::new(),
            state_buckets: AHashMap::with_hasher(fixed_hasher()),
            state_chain: Vec::new(),
            hasher: fixed_hasher(),
            transitions: AHashMap::with_hasher(fixed_hasher()),
            successor_pool: Vec::new(),
            scratch: Vec::new(),
            call_pos: vec![0; ops.len()],
            return_pos: vec![0; ops.len()],
            read_only: ops
                .iter()
                .map(|op| model.is_read_only(&op.input, op.output()))
                .collect(),
            ops,
            nodes: Vec::new(),
            key: vec![0u64; words + 1],
            cache: AHashSet::with_hasher(fixed_hasher()),
            stack: Vec::new(),
            best: Vec::new(),
            best_state: 0,
            state: 0,
            cur: NIL,
            first_successor: 0,
            scan_forced: true,
            bytes: 0,
        };
        let mut unmetered = Meter::new(Budget::unlimited());
        search.intern(model.init(), &mut unmetered);
        search.nodes = search.build_list();
        search.cur = search.nodes[0].next;
        search
    }

    fn intern(&mut self, state: M::State, meter: &mut Meter) -> u32 {
        let hash = self.hasher.hash_one(&state);
        let head = self.state_buckets.get(&hash).copied().unwrap_or(NIL);
        let mut id = head;
        while id != NIL {
            if self.states[id as usize] == state {
                return id;
            }
            id = self.state_chain[id as usize];
        }
        let id = u32::try_from(self.states.len()).unwrap_or(NIL);
        self.charge(meter, self.model.state_bytes(&state) + STATE_OVERHEAD_BYTES);
        self.states.push(state);
        self.state_chain.push(head);
        self.state_buckets.insert(hash, id);
        id
    }

    fn charge(&mut self, meter: &mut Meter, bytes: usize) {
        self.bytes += bytes;
        meter.bytes += bytes;
    }

    /// The successors of `state` by op `op`, as a range of `successor_pool`.
    fn successors(&mut self, state: u32, op: u32, meter: &mut Meter) -> (usize, usize) {
        if let Some(&(lo, hi)) = self.transitions.get(&(state, op)) {
            return (lo as usize, hi as usize);
        }
        let operation = self.ops[op as usize];
        let mut next = std::mem::take(&mut self.scratch);
        next.clear();
        self.model.step(
            &self.states[state as usize],
            &operation.input,
            operation.output(),
            &mut next,
        );
        let lo = self.successor_pool.len();
        for s in next.drain(..) {
            let id = self.intern(s, meter);
            if !self.successor_pool[lo..].contains(&id) {
                self.successor_pool.push(id);
            }
        }
        self.scratch = next;
        let hi = self.successor_pool.len();
        self.transitions.insert((state, op), (lo as u32, hi as u32));
        self.charge(meter, TRANSITION_BYTES + 4 * (hi - lo));
        (lo, hi)
    }

    /// Builds the event list sorted by time: calls before returns at equal times (equal times are
    /// concurrent), unknown returns after everything.
    fn build_list(&mut self) -> Vec<Node> {
        let mut events: Vec<(Time, bool, u32)> = Vec::with_capacity(self.ops.len() * 2);
        for (i, op) in self.ops.iter().enumerate() {
            let i = i as u32;
            events.push((op.invoked_at, false, i));
            events.push((op.returned_at().unwrap_or(Time::MAX), true, i));
        }
        events.sort_unstable();
        let mut nodes = Vec::with_capacity(events.len() + 1);
        nodes.push(Node {
            prev: NIL,
            next: if events.is_empty() { NIL } else { 1 },
            op: NIL,
            is_call: false,
            ret: NIL,
        });
        let mut ret_node = vec![NIL; self.ops.len()];
        for (pos, &(_, is_return, op)) in events.iter().enumerate() {
            let index = pos as u32 + 1;
            if is_return {
                ret_node[op as usize] = index;
                self.return_pos[op as usize] = pos as u32;
            } else {
                self.call_pos[op as usize] = pos as u32;
            }
            nodes.push(Node {
                prev: index - 1,
                next: if pos + 1 < events.len() {
                    index + 1
                } else {
                    NIL
                },
                op,
                is_call: !is_return,
                ret: NIL,
            });
        }
        for node in nodes.iter_mut().skip(1) {
            if node.is_call {
                node.ret = ret_node[node.op as usize];
            }
        }
        nodes
    }

    /// Continues the search for at most `slice` steps; `None` when the slice ran out first.
    ///
    /// This is Lowe's loop (WGL): at a call entry, try to linearize that operation now; at a
    /// return entry, the operation should have been linearized already, so backtrack. Before
    /// that walk, each new configuration is scanned for a *forced* move (see `find_forced`).
    fn resume(&mut self, meter: &mut Meter, slice: u64) -> Option<SearchOutcome> {
        let words = self.key.len() - 1;
        for _ in 0..slice {
            if self.nodes[0].next == NIL {
                return Some(SearchOutcome::Linearizable);
            }
            if let Some(exhausted) = meter.tick() {
                return Some(SearchOutcome::OutOfBudget(exhausted));
            }
            if self.scan_forced {
                self.scan_forced = false;
                match self.find_forced(meter) {
                    Forced::None => {}
                    Forced::Take(call) => {
                        let op = self.nodes[call as usize].op;
                        self.key[op as usize / 64] |= 1u64 << (op % 64);
                        self.key[words] = u64::from(self.state);
                        self.push(call, self.state, 0, true, meter);
                        continue;
                    }
                    Forced::Fails => {
                        if !self.backtrack() {
                            return Some(SearchOutcome::Violation);
                        }
                        continue;
                    }
                }
            }
            debug_assert!(self.cur != NIL, "the last node is always a return");
            let node = self.nodes[self.cur as usize];
            if node.is_call {
                let (lo, hi) = self.successors(self.state, node.op, meter);
                let (word, bit) = (node.op as usize / 64, 1u64 << (node.op % 64));
                self.key[word] |= bit;
                let mut advanced = false;
                for k in self.first_successor..hi - lo {
                    let next_state = self.successor_pool[lo + k];
                    self.key[words] = u64::from(next_state);
                    if self.cache.contains(&self.key[..]) {
                        continue;
                    }
                    self.push(self.cur, next_state, k, false, meter);
                    advanced = true;
                    break;
                }
                self.first_successor = 0;
                if !advanced {
                    self.key[word] &= !bit;
                    self.cur = node.next;
                }
            } else {
                if self.ops[node.op as usize].returned_at().is_none() {
                    // Only unknown-outcome operations remain: they may never take effect.
                    return Some(SearchOutcome::Linearizable);
                }
                if !self.backtrack() {
                    return Some(SearchOutcome::Violation);
                }
            }
        }
        None
    }

    /// Looks for a forced move in the current configuration: a candidate operation (its call
    /// comes before any pending return) that is read-only ([`Model::is_read_only`]: it never
    /// changes any state) and legal now. Linearizing it next loses nothing: any linearization
    /// from here that places it later can move it to the front (its real-time predecessors are
    /// all linearized, it is legal now, and removing it from its later place changes no state),
    /// so if the configuration with it fails, this one fails too, and no other candidate needs
    /// trying. If that configuration is already in the cache,
    /// it was explored and failed, so this one fails now. A partial-order reduction that lets
    /// reads go first instead of being tried after every write order.
    fn find_forced(&mut self, meter: &mut Meter) -> Forced {
        let words = self.key.len() - 1;
        let mut cur = self.nodes[0].next;
        while cur != NIL {
            let node = self.nodes[cur as usize];
            if !node.is_call {
                break;
            }
            let (lo, hi) = self.successors(self.state, node.op, meter);
            if self.read_only[node.op as usize]
                && hi - lo == 1
                && self.successor_pool[lo] == self.state
            {
                let (word, bit) = (node.op as usize / 64, 1u64 << (node.op % 64));
                self.key[word] |= bit;
                self.key[words] = u64::from(self.state);
                let explored = self.cache.contains(&self.key[..]);
                self.key[word] &= !bit;
                return if explored {
                    Forced::Fails
                } else {
                    Forced::Take(cur)
                };
            }
            cur = node.next;
        }
        Forced::None
    }

    /// Linearizes the operation of call entry `call`, moving to `next_state`. The caller has set
    /// the operation's bit and the state word of `key`.
    fn push(
        &mut self,
        call: u32,
        next_state: u32,
        successor: usize,
        forced: bool,
        meter: &mut Meter,
    ) {
        self.cache.insert(self.key.clone().into_boxed_slice());
        self.charge(meter, self.key.len() * 8 + CACHE_ENTRY_OVERHEAD_BYTES);
        self.stack.push(Frame {
            call,
            prev_state: self.state,
            successor,
            forced,
        });
        lift(&mut self.nodes, call);
        self.state = next_state;
        if self.stack.len() > self.best.len() {
            self.best = self
                .stack
                .iter()
                .map(|f| self.nodes[f.call as usize].op)
                .collect();
            self.best_state = self.state;
        }
        self.cur = self.nodes[0].next;
        self.scan_forced = true;
    }

    /// Undoes linearizations until a configuration with alternatives left; `false` when none is
    /// left (not linearizable). A forced move that failed fails its configuration too.
    fn backtrack(&mut self) -> bool {
        while let Some(frame) = self.stack.pop() {
            unlift(&mut self.nodes, frame.call);
            let op = self.nodes[frame.call as usize].op;
            self.key[op as usize / 64] &= !(1u64 << (op % 64));
            self.state = frame.prev_state;
            if frame.forced {
                continue;
            }
            self.cur = frame.call;
            self.first_successor = frame.successor + 1;
            self.scan_forced = false;
            return true;
        }
        false
    }

    fn explain(&self, partition: Option<String>, op_ids: &[usize]) -> Explanation {
        let prefix = &self.best;
        let state = self.best_state;
        let mut in_prefix = vec![false; self.ops.len()];
        for &op in prefix.iter() {
            in_prefix[op as usize] = true;
        }
        let remaining: Vec<u32> = (0..self.ops.len() as u32)
            .filter(|&op| !in_prefix[op as usize])
            .collect();
        let blocked = remaining
            .iter()
            .copied()
            .min_by_key(|&op| self.return_pos[op as usize])
            .unwrap_or(0);
        let blocked_return = self.return_pos[blocked as usize];
        let mut involved: Vec<u32> = remaining
            .iter()
            .copied()
            .filter(|&op| self.call_pos[op as usize] < blocked_return)
            .collect();
        involved.sort_by_key(|&op| op_ids[op as usize]);
        let ops = op_ids
            .iter()
            .zip(self.ops.iter())
            .map(|(&id, op)| OpSummary {
                id: OpId(id),
                client: op.client,
                description: self.model.describe_op(&op.input, op.output()),
                invoked_at: op.invoked_at,
                returned_at: op.returned_at(),
            })
            .collect();
        Explanation {
            partition,
            ops,
            prefix: prefix.iter().map(|&op| OpId(op_ids[op as usize])).collect(),
            state_after_prefix: self.model.describe_state(&self.states[state as usize]),
            blocked: OpId(op_ids[blocked as usize]),
            involved: involved
                .into_iter()
                .map(|op| OpId(op_ids[op as usize]))
                .collect(),
        }
    }
}

fn unlink(nodes: &mut [Node], i: u32) {
    let Node { prev, next, .. } = nodes[i as usize];
    nodes[prev as usize].next = next;
    if next != NIL {
        nodes[next as usize].prev = prev;
    }
}

fn relink(nodes: &mut [Node], i: u32) {
    let Node { prev, next, .. } = nodes[i as usize];
    nodes[prev as usize].next = i;
    if next != NIL {
        nodes[next as usize].prev = i;
    }
}

/// Takes a linearized operation's call and return entries out of the list (Lowe, §3).
fn lift(nodes: &mut [Node], call: u32) {
    let ret = nodes[call as usize].ret;
    unlink(nodes, call);
    unlink(nodes, ret);
}

/// Puts them back, in the reverse order (the list is only changed in stack order).
fn unlift(nodes: &mut [Node], call: u32) {
    let ret = nodes[call as usize].ret;
    relink(nodes, ret);
    relink(nodes, call);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::HistoryBuilder;
    use crate::models::{Register, RegisterInput as In, RegisterOutput as Out};

    fn write(v: &str) -> In {
        In::Write(v.to_string())
    }

    fn read(v: Option<&str>) -> Out {
        Out::Value(v.map(str::to_string))
    }

    #[test]
    fn empty_and_unknown_only_histories_are_linearizable() {
        let empty: History<In, Out> = HistoryBuilder::new().build();
        assert!(check(&Register, &empty, Budget::unlimited()).is_linearizable());
        let mut h = HistoryBuilder::new();
        h.invoke(1, write("1"), 0);
        h.invoke(2, In::Read, 0);
        assert!(check(&Register, &h.build(), Budget::unlimited()).is_linearizable());
    }

    #[test]
    fn stale_read_is_a_violation_with_an_explanation() {
        let mut h = HistoryBuilder::new();
        let w = h.invoke(1, write("1"), 0);
        h.complete(w, Out::Ok, 1).unwrap();
        let r = h.invoke(2, In::Read, 2);
        h.complete(r, read(None), 3).unwrap();
        let Verdict::NotLinearizable(e) = check(&Register, &h.build(), Budget::unlimited()) else {
            panic!("expected a violation");
        };
        assert_eq!(e.partition, None);
        assert_eq!(e.prefix, vec![w]);
        assert_eq!(e.state_after_prefix, "1");
        assert_eq!(e.blocked, r);
        assert_eq!(e.involved, vec![r]);
        let text = e.to_string();
        assert!(text.contains("read -> nil"), "{text}");
    }

    #[test]
    fn equal_times_are_concurrent() {
        // The write returns at 1 and the read is invoked at 1: either order is allowed.
        let mut h = HistoryBuilder::new();
        let w = h.invoke(1, write("1"), 0);
        h.complete(w, Out::Ok, 1).unwrap();
        let r = h.invoke(2, In::Read, 1);
        h.complete(r, read(None), 2).unwrap();
        assert!(check(&Register, &h.build(), Budget::unlimited()).is_linearizable());
    }

    #[test]
    fn unknown_outcome_may_apply_late_or_never() {
        // A write that timed out is seen by a read long after, then not seen... is a violation;
        // seen or never seen alone is fine.
        let build = |reads: &[Option<&str>]| {
            let mut h = HistoryBuilder::new();
            h.invoke(1, write("1"), 0);
            for (i, value) in reads.iter().enumerate() {
                let t = 10 + 2 * i as u64;
                let r = h.invoke(2, In::Read, t);
                h.complete(r, read(*value), t + 1).unwrap();
            }
            h.build()
        };
        let ok = |reads: &[Option<&str>]| check(&Register, &build(reads), Budget::unlimited());
        assert!(ok(&[None, None]).is_linearizable());
        assert!(ok(&[None, Some("1")]).is_linearizable());
        assert!(ok(&[Some("1"), None]).is_violation());
    }

    #[test]
    fn discarded_operations_are_ignored() {
        let mut h = HistoryBuilder::new();
        let w = h.invoke(1, write("1"), 0);
        h.discard(w).unwrap();
        let r = h.invoke(2, In::Read, 2);
        h.complete(r, read(Some("1")), 3).unwrap();
        assert!(check(&Register, &h.build(), Budget::unlimited()).is_violation());
    }

    #[test]
    fn an_exhausted_budget_says_unknown_never_linearizable() {
        let mut h = HistoryBuilder::new();
        for client in 0..6 {
            let w = h.invoke(client, write(&client.to_string()), 0);
            h.complete(w, Out::Ok, 100).unwrap();
        }
        let history = h.build();
        let Verdict::Unknown(reason) = check(&Register, &history, Budget::steps(3)) else {
            panic!("expected unknown");
        };
        assert_eq!(reason.exhausted, Exhausted::Steps);
        let Verdict::Unknown(reason) = check(
            &Register,
            &history,
            Budget::unlimited().with_memory_bytes(1),
        ) else {
            panic!("expected unknown");
        };
        assert_eq!(reason.exhausted, Exhausted::Memory);
        assert!(check(&Register, &history, Budget::unlimited()).is_linearizable());
    }

    #[test]
    fn verdicts_are_deterministic() {
        let text = "INFO  jepsen.util - 1\t:invoke\t:write\t1\n\
                    INFO  jepsen.util - 2\t:invoke\t:read\tnil\n\
                    INFO  jepsen.util - 1\t:ok\t:write\t1\n\
                    INFO  jepsen.util - 2\t:ok\t:read\t2\n";
        let history = crate::formats::jepsen_etcd::parse(text).unwrap();
        let first = check(&Register, &history, Budget::unlimited());
        assert!(first.is_violation());
        assert_eq!(first, check(&Register, &history, Budget::unlimited()));
    }
}
