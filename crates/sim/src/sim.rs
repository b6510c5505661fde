//! The simulator proper: nodes, the event queue, the virtual clock, and the driver loop.

use std::any::Any;
use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::fmt::{self, Debug};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::disk::{CrashPolicy, DiskError, SimDisk, SyncTarget};
use crate::history::{History, HistoryError, OpId, Operation};
use crate::net::{chance, Delay, DropReason, LinkStats, NetConfig, NodeStats, Partition};
use crate::time::{duration_nanos, SimTime};
use crate::trace::{format_tail, mix, FaultKind, FaultSummary, Trace, TraceEntry, TraceKind};

/// Identifies a node (server or client actor) in a simulation: ids are dense, from 0, in the
/// order nodes were added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl NodeId {
    /// "No node": used in traces for cluster-wide events.
    pub const NONE: NodeId = NodeId(u32::MAX);

    /// The id as an index into per-node vectors.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == NodeId::NONE {
            write!(f, "--")
        } else {
            write!(f, "n{}", self.0)
        }
    }
}

/// Identifies a timer set with [`Ctx::set_timer`], for [`Ctx::cancel_timer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId(pub u64);

/// Identifies an fsync issued with [`Ctx::fsync`] or [`Ctx::fsync_dir`]. Per node, ids
/// increase and fsyncs complete in id order, so "fsync N completed" implies every earlier one
/// did (group commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FsyncId(pub u64);

/// What a simulation's message type must be: cloneable (duplication), printable (traces) and
/// serializable (byte counters, and optionally delivery of the exact encoded frame).
pub trait Message: Clone + Debug + Serialize + DeserializeOwned + 'static {}

impl<T: Clone + Debug + Serialize + DeserializeOwned + 'static> Message for T {}

/// A sans-IO state machine the simulator drives: a server, or a client actor.
///
/// Every handler gets a [`Ctx`] to read the clock and its RNG, send messages, set timers,
/// use its disk and record client history. Handlers must not do I/O of their own.
pub trait Node<M: Message>: 'static {
    /// Called once per boot — the first start and every restart after a crash. A restarted
    /// node is a fresh value from the factory: it must recover from `ctx.disk()`.
    fn on_start(&mut self, ctx: &mut Ctx<'_, M>);

    /// A message from `from` arrived.
    fn on_message(&mut self, ctx: &mut Ctx<'_, M>, from: NodeId, msg: M);

    /// A timer set with [`Ctx::set_timer`] fired; `token` is the one given then.
    fn on_timer(&mut self, ctx: &mut Ctx<'_, M>, token: u64);

    /// An fsync issued with [`Ctx::fsync`] / [`Ctx::fsync_dir`] completed: what it covered is
    /// durable, and so is what every earlier fsync of this node covered.
    fn on_fsync_complete(&mut self, ctx: &mut Ctx<'_, M>, fsync: FsyncId) {
        let _ = (ctx, fsync);
    }
}

/// Object-safe wrapper adding downcasting, so tests can inspect their concrete node types.
trait NodeObj<M: Message>: Node<M> {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<M: Message, T: Node<M>> NodeObj<M> for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

type Factory<M> = Box<dyn FnMut(NodeId) -> Box<dyn NodeObj<M>>>;

/// A test's say on each message put on the wire: `(from, to, message) -> deliver?`.
/// Returning false drops the message ([`DropReason::Filtered`]).
pub type MessageFilter<M> = Box<dyn FnMut(NodeId, NodeId, &M) -> bool>;

/// Default number of trace entries kept for failure reports.
pub const DEFAULT_TRACE_TAIL_LEN: usize = 200;
/// Default shortest fsync.
pub const DEFAULT_FSYNC_MIN: Duration = Duration::from_micros(500);
/// Default fsync bound (exclusive).
pub const DEFAULT_FSYNC_MAX: Duration = Duration::from_millis(5);

/// Settings of one simulation.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Network model of every link at the start (change it later with [`Sim::set_net`]).
    pub net: NetConfig,
    /// What a crash keeps of unsynced disk writes.
    pub crash_policy: CrashPolicy,
    /// How long an fsync takes.
    pub fsync_latency: Delay,
    /// How many recent trace entries to keep for reports (the hash covers all of them).
    pub trace_tail_len: usize,
    /// Whether trace entries keep a clone of their message (for readable reports; costs a
    /// clone per send and delivery).
    pub trace_keep_messages: bool,
    /// Deliver each message by decoding the exact frame bytes the TCP transport would carry,
    /// instead of a clone. Slower (an allocation per message); catches encoding bugs.
    pub deliver_encoded: bool,
    /// Largest frame a message may encode to.
    pub max_frame_bytes: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            net: NetConfig::reliable(),
            crash_policy: CrashPolicy::default(),
            fsync_latency: Delay::Uniform {
                min: DEFAULT_FSYNC_MIN,
                max: DEFAULT_FSYNC_MAX,
            },
            trace_tail_len: DEFAULT_TRACE_TAIL_LEN,
            trace_keep_messages: true,
            deliver_encoded: false,
            max_frame_bytes: shoal_wire::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Errors of the simulator's API.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// No node has this id.
    #[error("no node {0}")]
    UnknownNode(NodeId),
    /// The node is crashed.
    #[error("node {0} is down")]
    NodeDown(NodeId),
    /// The node is up (restart of a running node).
    #[error("node {0} is up")]
    NodeUp(NodeId),
    /// The node is not of the requested type.
    #[error("node {0} is not a {1}")]
    WrongType(NodeId, &'static str),
    /// A disk operation failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The history holds other types than requested.
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// A fault or control action, applied now with the matching [`Sim`] method or later with
/// [`Sim::schedule`].
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    /// Crash the node (no-op if down).
    Crash(NodeId),
    /// Restart the node from its factory and surviving disk (no-op if up).
    Restart(NodeId),
    /// Apply a partition shape.
    Partition(Partition),
    /// Reconnect every link (network config unchanged).
    Heal,
    /// Pause the node (see [`Sim::pause`]).
    Pause(NodeId),
    /// Resume the node (see [`Sim::resume`]).
    Resume(NodeId),
    /// Set every link's network model.
    SetNet(NetConfig),
    /// Set one directed link's network model.
    SetLink {
        /// Sender side.
        from: NodeId,
        /// Receiver side.
        to: NodeId,
        /// The model.
        config: NetConfig,
    },
}

// ---------------------------------------------------------------------------------------------
// Event queue

enum Payload<M> {
    Value(M),
    Encoded(Vec<u8>),
}

enum EventKind<M> {
    Start {
        node: NodeId,
        incarnation: u32,
    },
    Deliver {
        from: NodeId,
        to: NodeId,
        to_incarnation: u32,
        bytes: u32,
        msg_hash: u32,
        payload: Payload<M>,
    },
    Timer {
        node: NodeId,
        incarnation: u32,
        id: u64,
        token: u64,
    },
    Fsync {
        node: NodeId,
        incarnation: u32,
        id: u64,
    },
    Control(Control),
    Nemesis {
        generation: u64,
    },
}

struct Event<M> {
    at: u64,
    seq: u64,
    kind: EventKind<M>,
}

impl<M> PartialEq for Event<M> {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.seq == other.seq
    }
}
impl<M> Eq for Event<M> {}
impl<M> PartialOrd for Event<M> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<M> Ord for Event<M> {
    /// Reversed so that `BinaryHeap` (a max-heap) pops the earliest event; ties by insertion.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .cmp(&self.at)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

// ---------------------------------------------------------------------------------------------
// Per-node and per-link state kept by the simulator

/// RNG stream domains: each purpose draws from its own stream so that, e.g., a node using
/// more randomness does not shift the network's choices.
const STREAM_LINK: u64 = 1;
const STREAM_NODE: u64 = 2;
const STREAM_SIM_NODE: u64 = 3;
pub(crate) const STREAM_NEMESIS: u64 = 4;

pub(crate) fn stream_rng(seed: u64, domain: u64, a: u64, b: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(mix(seed, domain), a), b))
}

struct Slot<M> {
    up: bool,
    incarnation: u32,
    /// The node's own RNG (reseeded per incarnation).
    rng: ChaCha8Rng,
    /// The simulator's RNG for this node's disk (fsync latency, crash damage).
    sim_rng: ChaCha8Rng,
    disk: SimDisk,
    live_timers: BTreeSet<u64>,
    fsyncs_issued: u64,
    fsyncs_done: u64,
    last_fsync_done_at: u64,
    pending_fsyncs: VecDeque<(u64, SyncTarget)>,
    /// Messages held behind fsyncs: (fsync id they wait for, destination, message).
    held: VecDeque<(u64, NodeId, M)>,
    /// Paused (SIGSTOP): events for the node wait in `stash` until it resumes.
    paused: bool,
    stash: Vec<Event<M>>,
}

struct Link {
    config: NetConfig,
    connected: bool,
    rng: ChaCha8Rng,
    stats: LinkStats,
}

pub(crate) struct Core<M: Message> {
    seed: u64,
    now: u64,
    next_seq: u64,
    next_timer_id: u64,
    queue: BinaryHeap<Event<M>>,
    slots: Vec<Slot<M>>,
    links: Vec<Vec<Link>>,
    net_default: NetConfig,
    config: SimConfig,
    pub(crate) trace: Trace<M>,
    history: History,
    scratch: Vec<u8>,
    events_processed: u64,
    filter: Option<MessageFilter<M>>,
}

impl<M: Message> Core<M> {
    fn push(&mut self, at: u64, kind: EventKind<M>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Event { at, seq, kind });
    }

    pub(crate) fn now(&self) -> SimTime {
        SimTime::from_nanos(self.now)
    }

    fn record(&mut self, node: NodeId, kind: TraceKind, msg_hash: u32, msg: Option<&M>) {
        let now = self.now();
        self.trace.record(now, node, kind, msg_hash, msg);
    }

    pub(crate) fn control_note(&mut self, action: String) {
        tracing::debug!(at = %self.now(), "{action}");
        self.record(NodeId::NONE, TraceKind::Control { action }, 0, None);
    }

    /// Counts a fault for the run's [`FaultSummary`] (not hashed: the trace event that goes
    /// with it is).
    fn fault(&mut self, kind: FaultKind, target: String) {
        let now = self.now();
        self.trace.record_fault(now, kind, target);
    }

    /// A send from a running node: held behind pending fsyncs unless `bypass_barrier`.
    fn send(&mut self, from: NodeId, to: NodeId, msg: M, bypass_barrier: bool) {
        let slot = &mut self.slots[from.index()];
        if !bypass_barrier && slot.fsyncs_issued > slot.fsyncs_done {
            let barrier = slot.fsyncs_issued;
            self.record(from, TraceKind::Held { to }, 0, Some(&msg));
            self.slots[from.index()].held.push_back((barrier, to, msg));
            return;
        }
        self.transmit(from, to, msg);
    }

    /// Puts a message on the wire: counts it, then drops, delays or duplicates it.
    fn transmit(&mut self, from: NodeId, to: NodeId, msg: M) {
        if to.index() >= self.slots.len() {
            self.record(
                from,
                TraceKind::Drop {
                    to,
                    reason: DropReason::UnknownDestination,
                },
                0,
                Some(&msg),
            );
            return;
        }
        self.scratch.clear();
        if let Err(e) =
            shoal_wire::encode_frame(&msg, self.config.max_frame_bytes, &mut self.scratch)
        {
            tracing::error!(%from, %to, error = %e, "message cannot be encoded; dropped");
            self.links[from.index()][to.index()].stats.msgs_dropped += 1;
            self.record(
                from,
                TraceKind::Drop {
                    to,
                    reason: DropReason::EncodeFailed,
                },
                0,
                Some(&msg),
            );
            return;
        }
        let bytes = self.scratch.len() as u32;
        let msg_hash = u32::from_le_bytes([
            self.scratch[4],
            self.scratch[5],
            self.scratch[6],
            self.scratch[7],
        ]);
        let filtered = match self.filter.as_mut() {
            Some(f) => !f(from, to, &msg),
            None => false,
        };
        let to_up = self.slots[to.index()].up;
        let to_incarnation = self.slots[to.index()].incarnation;
        let link = &mut self.links[from.index()][to.index()];
        link.stats.msgs_sent += 1;
        link.stats.bytes_sent += u64::from(bytes);
        let drop_reason = if !link.connected {
            Some(DropReason::Partitioned)
        } else if filtered {
            Some(DropReason::Filtered)
        } else if chance(&mut link.rng, link.config.loss_probability) {
            Some(DropReason::Lost)
        } else if !to_up {
            Some(DropReason::DestinationDown)
        } else {
            None
        };
        if let Some(reason) = drop_reason {
            link.stats.msgs_dropped += 1;
            self.record(from, TraceKind::Drop { to, reason }, msg_hash, Some(&msg));
            return;
        }
        let duplicate = chance(&mut link.rng, link.config.duplicate_probability);
        let delay_nanos = link.config.sample_delay_nanos(&mut link.rng);
        let second_delay = if duplicate {
            link.stats.msgs_duplicated += 1;
            Some(link.config.sample_delay_nanos(&mut link.rng))
        } else {
            None
        };
        self.record(
            from,
            TraceKind::Send {
                to,
                bytes,
                delay_nanos,
                copies: if duplicate { 2 } else { 1 },
            },
            msg_hash,
            Some(&msg),
        );
        let now = self.now;
        if let Some(second) = second_delay {
            let payload = self.payload(msg.clone());
            self.push(
                now.saturating_add(second),
                EventKind::Deliver {
                    from,
                    to,
                    to_incarnation,
                    bytes,
                    msg_hash,
                    payload,
                },
            );
        }
        let payload = self.payload(msg);
        self.push(
            now.saturating_add(delay_nanos),
            EventKind::Deliver {
                from,
                to,
                to_incarnation,
                bytes,
                msg_hash,
                payload,
            },
        );
    }

    fn payload(&self, msg: M) -> Payload<M> {
        if self.config.deliver_encoded {
            Payload::Encoded(self.scratch.clone())
        } else {
            Payload::Value(msg)
        }
    }

    fn set_timer(&mut self, node: NodeId, after: Duration, token: u64) -> TimerId {
        let id = self.next_timer_id;
        self.next_timer_id += 1;
        let slot = &mut self.slots[node.index()];
        slot.live_timers.insert(id);
        let incarnation = slot.incarnation;
        let at = self.now.saturating_add(duration_nanos(after));
        self.push(
            at,
            EventKind::Timer {
                node,
                incarnation,
                id,
                token,
            },
        );
        TimerId(id)
    }

    fn issue_fsync(&mut self, node: NodeId, target: SyncTarget) -> FsyncId {
        let latency = self.sample_fsync_nanos(node);
        let slot = &mut self.slots[node.index()];
        slot.fsyncs_issued += 1;
        let id = slot.fsyncs_issued;
        slot.pending_fsyncs.push_back((id, target));
        let at = self
            .now
            .saturating_add(latency)
            .max(slot.last_fsync_done_at);
        slot.last_fsync_done_at = at;
        let incarnation = slot.incarnation;
        self.push(
            at,
            EventKind::Fsync {
                node,
                incarnation,
                id,
            },
        );
        FsyncId(id)
    }

    fn sample_fsync_nanos(&mut self, node: NodeId) -> u64 {
        let cfg = NetConfig::reliable().with_delay(self.config.fsync_latency);
        cfg.sample_delay_nanos(&mut self.slots[node.index()].sim_rng)
    }

    fn set_connected(&mut self, from: NodeId, to: NodeId, connected: bool) {
        if let Some(link) = self
            .links
            .get_mut(from.index())
            .and_then(|row| row.get_mut(to.index()))
        {
            link.connected = connected;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ctx

/// What a node's handler may touch: the clock, its RNG, the network, its timers, its disk,
/// and the client history. Everything it does takes effect in simulated time.
pub struct Ctx<'a, M: Message> {
    core: &'a mut Core<M>,
    id: NodeId,
}

impl<'a, M: Message> Ctx<'a, M> {
    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Current virtual time.
    pub fn now(&self) -> SimTime {
        self.core.now()
    }

    /// How many times this node has crashed before this boot.
    pub fn incarnation(&self) -> u32 {
        self.core.slots[self.id.index()].incarnation
    }

    /// Number of nodes in the simulation (ids are `0..node_count`).
    pub fn node_count(&self) -> usize {
        self.core.slots.len()
    }

    /// This node's deterministic RNG (its own stream, reseeded on every boot).
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.core.slots[self.id.index()].rng
    }

    /// Sends `msg` to `to`. If this node has fsyncs in flight, the message is held until they
    /// have all completed ("persist is a barrier": a message never overtakes the durability
    /// of state written before it was sent), and is lost if the node crashes first.
    pub fn send(&mut self, to: NodeId, msg: M) {
        self.core.send(self.id, to, msg, false);
    }

    /// Sends `msg` at once, even if fsyncs are in flight. Only for messages that do not
    /// depend on unsynced state (e.g. a leader's appends to followers, a heartbeat).
    pub fn send_now(&mut self, to: NodeId, msg: M) {
        self.core.send(self.id, to, msg, true);
    }

    /// Fires `on_timer(token)` after `after`, unless cancelled or the node crashes first.
    pub fn set_timer(&mut self, after: Duration, token: u64) -> TimerId {
        self.core.set_timer(self.id, after, token)
    }

    /// Cancels a timer; false if it already fired or was cancelled.
    pub fn cancel_timer(&mut self, timer: TimerId) -> bool {
        self.core.slots[self.id.index()]
            .live_timers
            .remove(&timer.0)
    }

    /// This node's disk. Writes are visible at once and durable only after an fsync.
    pub fn disk(&mut self) -> &mut SimDisk {
        &mut self.core.slots[self.id.index()].disk
    }

    /// Starts an fsync of the file's data written so far; it completes (and
    /// [`Node::on_fsync_complete`] runs) after the configured fsync latency.
    pub fn fsync(&mut self, name: &str) -> Result<FsyncId, DiskError> {
        let target = self.core.slots[self.id.index()]
            .disk
            .begin_file_sync(name)?;
        Ok(self.core.issue_fsync(self.id, target))
    }

    /// Starts an fsync of the directory: every create, rename and remove so far becomes
    /// durable when it completes.
    pub fn fsync_dir(&mut self) -> FsyncId {
        let target = self.core.slots[self.id.index()].disk.begin_dir_sync();
        self.core.issue_fsync(self.id, target)
    }

    /// Whether fsyncs issued by this node are still in flight.
    pub fn fsync_pending(&self) -> bool {
        let slot = &self.core.slots[self.id.index()];
        slot.fsyncs_issued > slot.fsyncs_done
    }

    /// Records the invocation of a client operation in the history, at the current time.
    pub fn invoke<I: Debug + Clone + 'static>(&mut self, input: I) -> OpId {
        let now = self.core.now();
        let text = format!("{input:?}");
        let op = self.core.history.invoke(self.id, now, Box::new(input));
        self.core.record(
            self.id,
            TraceKind::Invoke {
                op: op.0,
                input: text,
            },
            0,
            None,
        );
        op
    }

    /// Records the return of operation `op` with `output`. False (and nothing recorded) if
    /// `op` is not an open operation of this node.
    pub fn complete<O: Debug + Clone + 'static>(&mut self, op: OpId, output: O) -> bool {
        let now = self.core.now();
        let text = format!("{output:?}");
        let ok = self
            .core
            .history
            .complete(self.id, op, now, Box::new(output));
        if ok {
            self.core.record(
                self.id,
                TraceKind::Return {
                    op: op.0,
                    output: text,
                },
                0,
                None,
            );
        } else {
            tracing::warn!(node = %self.id, op = op.0, "complete() of an unknown or closed operation");
        }
        ok
    }

    /// Adds a note to the trace (it counts in the trace hash). Costs a string: keep notes
    /// for rare, interesting events (became leader, applied snapshot).
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        self.core.record(self.id, TraceKind::Note { text }, 0, None);
    }
}

// ---------------------------------------------------------------------------------------------
// Sim

struct NodeEntry<M: Message> {
    factory: Factory<M>,
    node: Option<Box<dyn NodeObj<M>>>,
}

thread_local! {
    /// Trace tail of the last `Sim` dropped while its thread panicked, for the seed harness.
    pub(crate) static PANIC_TRACE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Number of trace entries the panic hook keeps for the harness's report.
pub(crate) const PANIC_TRACE_TAIL: usize = 40;

/// A deterministic simulation of nodes exchanging messages of type `M`.
///
/// One seed drives every random choice; the same seed and the same calls give the same run,
/// event for event (compare [`Sim::trace_hash`]).
pub struct Sim<M: Message> {
    core: Core<M>,
    nodes: Vec<NodeEntry<M>>,
    pub(crate) nemesis: Option<crate::nemesis::NemesisState>,
}

impl<M: Message> Drop for Sim<M> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = format!(
                "seed {} at {} (trace hash {:016x}), last events:\n{}",
                self.core.seed,
                self.core.now(),
                self.core.trace.hash(),
                format_tail(self.core.trace.tail(), PANIC_TRACE_TAIL)
            );
            PANIC_TRACE.with(|p| *p.borrow_mut() = Some(text));
        }
    }
}

impl<M: Message> Sim<M> {
    /// A simulation with no nodes at time zero.
    pub fn new(seed: u64, config: SimConfig) -> Self {
        Sim {
            core: Core {
                seed,
                now: 0,
                next_seq: 0,
                next_timer_id: 0,
                queue: BinaryHeap::new(),
                slots: Vec::new(),
                links: Vec::new(),
                net_default: config.net,
                trace: Trace::new(config.trace_tail_len, config.trace_keep_messages),
                config,
                history: History::default(),
                scratch: Vec::with_capacity(256),
                events_processed: 0,
                filter: None,
            },
            nodes: Vec::new(),
            nemesis: None,
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.core.seed
    }

    /// Current virtual time.
    pub fn now(&self) -> SimTime {
        self.core.now()
    }

    /// Adds a node built by `factory` (called again on every restart, with the node's id).
    /// It boots — `on_start` runs — at the current time when the simulation next runs, so a
    /// whole cluster can be added before any node sends.
    pub fn add_node<T, F>(&mut self, mut factory: F) -> NodeId
    where
        T: Node<M>,
        F: FnMut(NodeId) -> T + 'static,
    {
        let id = NodeId(self.nodes.len() as u32);
        let seed = self.core.seed;
        self.nodes.push(NodeEntry {
            factory: Box::new(move |id| Box::new(factory(id))),
            node: None,
        });
        self.core.slots.push(Slot {
            up: false,
            incarnation: 0,
            rng: stream_rng(seed, STREAM_NODE, u64::from(id.0), 0),
            sim_rng: stream_rng(seed, STREAM_SIM_NODE, u64::from(id.0), 0),
            disk: SimDisk::new(),
            live_timers: BTreeSet::new(),
            fsyncs_issued: 0,
            fsyncs_done: 0,
            last_fsync_done_at: 0,
            pending_fsyncs: VecDeque::new(),
            held: VecDeque::new(),
            paused: false,
            stash: Vec::new(),
        });
        let n = self.nodes.len();
        let default = self.core.net_default;
        for (from, row) in self.core.links.iter_mut().enumerate() {
            row.push(Link {
                config: default,
                connected: true,
                rng: stream_rng(seed, STREAM_LINK, from as u64, u64::from(id.0)),
                stats: LinkStats::default(),
            });
        }
        self.core.links.push(
            (0..n)
                .map(|to| Link {
                    config: default,
                    connected: true,
                    rng: stream_rng(seed, STREAM_LINK, u64::from(id.0), to as u64),
                    stats: LinkStats::default(),
                })
                .collect(),
        );
        let now = self.core.now;
        self.core.push(
            now,
            EventKind::Start {
                node: id,
                incarnation: 0,
            },
        );
        id
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// All node ids.
    pub fn node_ids(&self) -> Vec<NodeId> {
        (0..self.nodes.len() as u32).map(NodeId).collect()
    }

    /// Whether the node is running.
    pub fn is_up(&self, id: NodeId) -> bool {
        self.core.slots.get(id.index()).is_some_and(|s| s.up)
    }

    /// The node as its concrete type, if it is running and of type `T`.
    pub fn node<T: Node<M>>(&self, id: NodeId) -> Option<&T> {
        self.nodes
            .get(id.index())?
            .node
            .as_ref()?
            .as_any()
            .downcast_ref::<T>()
    }

    /// Runs `f` on the running node `id` of type `T` with a [`Ctx`], as if it were a handler:
    /// how a test hands a node an external input (a client request, a proposal).
    pub fn call<T: Node<M>, R>(
        &mut self,
        id: NodeId,
        f: impl FnOnce(&mut T, &mut Ctx<'_, M>) -> R,
    ) -> Result<R, SimError> {
        let entry = self
            .nodes
            .get_mut(id.index())
            .ok_or(SimError::UnknownNode(id))?;
        let node = entry.node.as_mut().ok_or(SimError::NodeDown(id))?;
        let node = node
            .as_any_mut()
            .downcast_mut::<T>()
            .ok_or(SimError::WrongType(id, std::any::type_name::<T>()))?;
        let mut ctx = Ctx {
            core: &mut self.core,
            id,
        };
        Ok(f(node, &mut ctx))
    }

    /// The node's disk (it exists while the node is down too).
    pub fn disk(&self, id: NodeId) -> Option<&SimDisk> {
        self.core.slots.get(id.index()).map(|s| &s.disk)
    }

    /// The node's disk, mutable (for test setup).
    pub fn disk_mut(&mut self, id: NodeId) -> Option<&mut SimDisk> {
        self.core.slots.get_mut(id.index()).map(|s| &mut s.disk)
    }

    /// Persisted (durable) bytes of the node's disk.
    pub fn durable_bytes(&self, id: NodeId) -> u64 {
        self.disk(id).map_or(0, SimDisk::durable_bytes)
    }

    // ---- running -----------------------------------------------------------------------

    /// Processes the next event, if any; returns false when the queue is empty.
    pub fn step(&mut self) -> bool {
        match self.core.queue.pop() {
            Some(ev) => {
                self.process(ev);
                true
            }
            None => false,
        }
    }

    /// Processes every event up to and including `deadline`, then sets the clock to it.
    pub fn run_until(&mut self, deadline: SimTime) {
        let limit = deadline.as_nanos();
        while self.core.queue.peek().is_some_and(|ev| ev.at <= limit) {
            if let Some(ev) = self.core.queue.pop() {
                self.process(ev);
            }
        }
        self.core.now = self.core.now.max(limit);
    }

    /// Runs for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        let deadline = self.now() + duration;
        self.run_until(deadline);
    }

    /// Runs until `done(self)` holds (checked after every event) or `max` has passed.
    /// Returns whether `done` held.
    pub fn run_until_true(&mut self, max: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let limit = (self.now() + max).as_nanos();
        if done(self) {
            return true;
        }
        while self.core.queue.peek().is_some_and(|ev| ev.at <= limit) {
            if let Some(ev) = self.core.queue.pop() {
                self.process(ev);
            }
            if done(self) {
                return true;
            }
        }
        self.core.now = self.core.now.max(limit);
        false
    }

    /// Runs for `duration`, calling `check` after every event; stops at the first violation
    /// and returns it as a [`Failure`](crate::Failure) carrying the time and trace tail. How a
    /// test asserts invariants (e.g. Raft's safety properties) at every step.
    pub fn run_checked(
        &mut self,
        duration: Duration,
        mut check: impl FnMut(&Self) -> Result<(), String>,
    ) -> Result<(), crate::harness::Failure> {
        let limit = (self.now() + duration).as_nanos();
        check(self).map_err(|m| self.failure(m))?;
        while self.core.queue.peek().is_some_and(|ev| ev.at <= limit) {
            if let Some(ev) = self.core.queue.pop() {
                self.process(ev);
            }
            check(self).map_err(|m| self.failure(m))?;
        }
        self.core.now = self.core.now.max(limit);
        Ok(())
    }

    /// Installs a filter every message passes when it is put on the wire: after it is counted
    /// as sent and after the partition check, before random loss.
    /// Deterministic as long as the filter is. For targeted scenarios: "drop every append
    /// from n0 to n2", "lose the first vote reply". Replaces any previous filter.
    pub fn set_message_filter(&mut self, filter: impl FnMut(NodeId, NodeId, &M) -> bool + 'static) {
        self.core.filter = Some(Box::new(filter));
        self.core
            .control_note("message filter installed".to_string());
    }

    /// Removes the message filter.
    pub fn clear_message_filter(&mut self) {
        self.core.filter = None;
        self.core.control_note("message filter removed".to_string());
    }

    /// Events processed so far.
    pub fn events_processed(&self) -> u64 {
        self.core.events_processed
    }

    fn process(&mut self, ev: Event<M>) {
        debug_assert!(ev.at >= self.core.now, "event queue went back in time");
        self.core.now = ev.at;
        // A paused node handles nothing: its deliveries, timers and fsync completions wait.
        let target = match &ev.kind {
            EventKind::Deliver { to, .. } => Some(*to),
            EventKind::Timer { node, .. } | EventKind::Fsync { node, .. } => Some(*node),
            _ => None,
        };
        if let Some(node) = target {
            let slot = &mut self.core.slots[node.index()];
            if slot.paused {
                slot.stash.push(ev);
                return;
            }
        }
        self.core.events_processed += 1;
        match ev.kind {
            EventKind::Start { node, incarnation } => {
                let slot = &self.core.slots[node.index()];
                if slot.incarnation == incarnation && !slot.up {
                    self.boot(node);
                }
            }
            EventKind::Deliver {
                from,
                to,
                to_incarnation,
                bytes,
                msg_hash,
                payload,
            } => self.deliver(from, to, to_incarnation, bytes, msg_hash, payload),
            EventKind::Timer {
                node,
                incarnation,
                id,
                token,
            } => {
                let slot = &mut self.core.slots[node.index()];
                if slot.incarnation != incarnation || !slot.live_timers.remove(&id) {
                    return;
                }
                self.core.record(node, TraceKind::Timer { token }, 0, None);
                if let Some(n) = self.nodes[node.index()].node.as_mut() {
                    let mut ctx = Ctx {
                        core: &mut self.core,
                        id: node,
                    };
                    n.on_timer(&mut ctx, token);
                }
            }
            EventKind::Fsync {
                node,
                incarnation,
                id,
            } => self.complete_fsync(node, incarnation, id),
            EventKind::Control(c) => self.apply(c),
            EventKind::Nemesis { generation } => self.nemesis_step(generation),
        }
    }

    fn boot(&mut self, node: NodeId) {
        let entry = &mut self.nodes[node.index()];
        entry.node = Some((entry.factory)(node));
        let seed = self.core.seed;
        let slot = &mut self.core.slots[node.index()];
        slot.up = true;
        let incarnation = slot.incarnation;
        slot.rng = stream_rng(seed, STREAM_NODE, u64::from(node.0), u64::from(incarnation));
        self.core
            .record(node, TraceKind::Start { incarnation }, 0, None);
        if incarnation > 0 {
            self.core.fault(FaultKind::Restart, node.to_string());
        }
        tracing::debug!(%node, incarnation, at = %self.core.now(), "node boots");
        if let Some(n) = self.nodes[node.index()].node.as_mut() {
            let mut ctx = Ctx {
                core: &mut self.core,
                id: node,
            };
            n.on_start(&mut ctx);
        }
    }

    fn deliver(
        &mut self,
        from: NodeId,
        to: NodeId,
        to_incarnation: u32,
        bytes: u32,
        msg_hash: u32,
        payload: Payload<M>,
    ) {
        let slot = &self.core.slots[to.index()];
        if !slot.up || slot.incarnation != to_incarnation {
            self.core.links[from.index()][to.index()].stats.msgs_dropped += 1;
            self.core.record(
                to,
                TraceKind::DeliverDropped {
                    from,
                    reason: DropReason::DestinationDown,
                },
                msg_hash,
                None,
            );
            return;
        }
        let msg = match payload {
            Payload::Value(m) => m,
            Payload::Encoded(frame) => {
                match shoal_wire::decode_frame::<M>(&frame, self.core.config.max_frame_bytes) {
                    Ok(Some((m, _))) => m,
                    Ok(None) | Err(_) => {
                        tracing::error!(%from, %to, "frame does not decode; dropped");
                        self.core.links[from.index()][to.index()].stats.msgs_dropped += 1;
                        self.core.record(
                            to,
                            TraceKind::DeliverDropped {
                                from,
                                reason: DropReason::EncodeFailed,
                            },
                            msg_hash,
                            None,
                        );
                        return;
                    }
                }
            }
        };
        let stats = &mut self.core.links[from.index()][to.index()].stats;
        stats.msgs_delivered += 1;
        stats.bytes_delivered += u64::from(bytes);
        self.core
            .record(to, TraceKind::Deliver { from, bytes }, msg_hash, Some(&msg));
        if let Some(n) = self.nodes[to.index()].node.as_mut() {
            let mut ctx = Ctx {
                core: &mut self.core,
                id: to,
            };
            n.on_message(&mut ctx, from, msg);
        }
    }

    fn complete_fsync(&mut self, node: NodeId, incarnation: u32, id: u64) {
        let slot = &mut self.core.slots[node.index()];
        if slot.incarnation != incarnation {
            return;
        }
        let Some((front_id, target)) = slot.pending_fsyncs.pop_front() else {
            return;
        };
        debug_assert_eq!(front_id, id, "fsyncs complete in issue order");
        slot.disk.complete_sync(&target);
        slot.fsyncs_done = id;
        self.core
            .record(node, TraceKind::FsyncDone { fsync: id }, 0, None);
        // Release what waited for this fsync, in send order.
        loop {
            let slot = &mut self.core.slots[node.index()];
            if slot
                .held
                .front()
                .is_none_or(|(barrier, _, _)| *barrier > id)
            {
                break;
            }
            if let Some((_, to, msg)) = slot.held.pop_front() {
                self.core.transmit(node, to, msg);
            }
        }
        if let Some(n) = self.nodes[node.index()].node.as_mut() {
            let mut ctx = Ctx {
                core: &mut self.core,
                id: node,
            };
            n.on_fsync_complete(&mut ctx, FsyncId(id));
        }
    }

    // ---- faults --------------------------------------------------------------------------

    /// Crashes the node now: its state, timers, in-flight fsyncs and held messages are lost;
    /// its disk keeps what the crash policy says. No-op if it is down.
    pub fn crash(&mut self, id: NodeId) {
        let policy = self.core.config.crash_policy;
        self.crash_with(id, policy);
    }

    /// Crashes the node now with a specific crash policy for its disk (e.g.
    /// [`CrashPolicy::KeepAll`] for a process kill whose page cache survives, while the
    /// configured policy models power loss).
    pub fn crash_with(&mut self, id: NodeId, policy: CrashPolicy) {
        let Some(slot) = self.core.slots.get_mut(id.index()) else {
            return;
        };
        if !slot.up {
            return;
        }
        slot.up = false;
        slot.incarnation += 1;
        slot.paused = false;
        slot.stash.clear();
        slot.live_timers.clear();
        slot.pending_fsyncs.clear();
        slot.fsyncs_done = slot.fsyncs_issued;
        let held = std::mem::take(&mut slot.held);
        let detail = slot.disk.crash(policy, &mut slot.sim_rng);
        self.nodes[id.index()].node = None;
        for (_, to, msg) in held {
            self.core.record(
                id,
                TraceKind::Drop {
                    to,
                    reason: DropReason::SenderCrashed,
                },
                0,
                Some(&msg),
            );
        }
        tracing::debug!(node = %id, at = %self.core.now(), "node crashes: {detail}");
        self.core.record(id, TraceKind::Crash { detail }, 0, None);
        self.core.fault(FaultKind::Crash, id.to_string());
    }

    /// Restarts a crashed node now: a fresh value from its factory boots on its surviving
    /// disk (`on_start` runs immediately). No-op if it is up.
    pub fn restart(&mut self, id: NodeId) {
        if id.index() < self.nodes.len() && !self.is_up(id) {
            self.boot(id);
        }
    }

    /// Pauses a running node (like SIGSTOP, or a long GC pause): it keeps its state but
    /// handles nothing — messages, timers and fsync completions addressed to it wait — until
    /// [`Sim::resume`]. Other nodes see it as silent; it does not notice time passing. The
    /// classic way to make an old leader act on stale beliefs. No-op if down or paused.
    pub fn pause(&mut self, id: NodeId) {
        if let Some(slot) = self.core.slots.get_mut(id.index()) {
            if slot.up && !slot.paused {
                slot.paused = true;
                self.core.control_note(format!("pause {id}"));
                self.core.fault(FaultKind::Pause, id.to_string());
            }
        }
    }

    /// Resumes a paused node: everything that waited is handled now, in its original order.
    pub fn resume(&mut self, id: NodeId) {
        let Some(slot) = self.core.slots.get_mut(id.index()) else {
            return;
        };
        if !slot.paused {
            return;
        }
        slot.paused = false;
        let stash = std::mem::take(&mut slot.stash);
        self.core
            .control_note(format!("resume {id} ({} events waited)", stash.len()));
        self.core.fault(FaultKind::Resume, id.to_string());
        let now = self.core.now;
        for ev in stash {
            self.core.push(now, ev.kind);
        }
    }

    /// Whether the node is paused.
    pub fn is_paused(&self, id: NodeId) -> bool {
        self.core.slots.get(id.index()).is_some_and(|s| s.paused)
    }

    /// Sets every link's network model (and the model of links to nodes added later).
    pub fn set_net(&mut self, config: NetConfig) {
        self.core.net_default = config;
        for row in &mut self.core.links {
            for link in row {
                link.config = config;
            }
        }
        self.core.control_note(format!("set net {config:?}"));
        self.core.fault(FaultKind::NetChange, String::new());
    }

    /// Sets one directed link's network model.
    pub fn set_link(&mut self, from: NodeId, to: NodeId, config: NetConfig) {
        if let Some(link) = self
            .core
            .links
            .get_mut(from.index())
            .and_then(|r| r.get_mut(to.index()))
        {
            link.config = config;
        }
        self.core
            .control_note(format!("set link {from}->{to} {config:?}"));
        self.core
            .fault(FaultKind::LinkChange, format!("{from}->{to} set"));
    }

    /// Cuts the directed link `from -> to`.
    pub fn cut(&mut self, from: NodeId, to: NodeId) {
        self.core.set_connected(from, to, false);
        self.core.control_note(format!("cut {from}->{to}"));
        self.core
            .fault(FaultKind::LinkChange, format!("{from}->{to} cut"));
    }

    /// Reconnects the directed link `from -> to`.
    pub fn connect(&mut self, from: NodeId, to: NodeId) {
        self.core.set_connected(from, to, true);
        self.core.control_note(format!("connect {from}->{to}"));
        self.core
            .fault(FaultKind::LinkChange, format!("{from}->{to} connected"));
    }

    /// Whether `from -> to` is connected.
    pub fn is_connected(&self, from: NodeId, to: NodeId) -> bool {
        self.core
            .links
            .get(from.index())
            .and_then(|r| r.get(to.index()))
            .is_some_and(|l| l.connected)
    }

    /// Applies a partition shape (see [`Partition`]).
    pub fn apply_partition(&mut self, partition: &Partition) {
        let n = self.nodes.len() as u32;
        match partition {
            Partition::Isolate(x) => {
                for other in (0..n).map(NodeId) {
                    if other != *x {
                        self.core.set_connected(*x, other, false);
                        self.core.set_connected(other, *x, false);
                    }
                }
            }
            Partition::Groups(groups) => {
                let members: BTreeSet<NodeId> = groups.iter().flatten().copied().collect();
                for &a in &members {
                    for &b in &members {
                        if a != b {
                            let together = groups.iter().any(|g| g.contains(&a) && g.contains(&b));
                            self.core.set_connected(a, b, together);
                        }
                    }
                }
            }
            Partition::Ring(ring) => {
                let len = ring.len();
                for (i, &a) in ring.iter().enumerate() {
                    for (j, &b) in ring.iter().enumerate() {
                        if a != b {
                            let d = i.abs_diff(j);
                            let adjacent = d == 1 || d == len - 1;
                            self.core.set_connected(a, b, adjacent);
                        }
                    }
                }
            }
            Partition::OneWay { from, to } => self.core.set_connected(*from, *to, false),
        }
        self.core.control_note(format!("partition {partition:?}"));
        self.core
            .fault(FaultKind::Partition, format!("({partition})"));
    }

    /// Isolates one node (cuts all its links both ways).
    pub fn isolate(&mut self, id: NodeId) {
        self.apply_partition(&Partition::Isolate(id));
    }

    /// Splits the named nodes into groups that cannot talk across (see [`Partition::Groups`]).
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        self.apply_partition(&Partition::Groups(
            groups.iter().map(|g| g.to_vec()).collect(),
        ));
    }

    /// Reconnects every link. Network models, crashed nodes and scheduled faults are left as
    /// they are (see [`Sim::heal_all`] for a full heal).
    pub fn heal(&mut self) {
        for row in &mut self.core.links {
            for link in row {
                link.connected = true;
            }
        }
        self.core.control_note("heal".to_string());
        self.core.fault(FaultKind::Heal, String::new());
    }

    /// Applies a control action now.
    pub fn apply(&mut self, control: Control) {
        match control {
            Control::Crash(id) => self.crash(id),
            Control::Restart(id) => self.restart(id),
            Control::Partition(p) => self.apply_partition(&p),
            Control::Heal => self.heal(),
            Control::Pause(id) => self.pause(id),
            Control::Resume(id) => self.resume(id),
            Control::SetNet(c) => self.set_net(c),
            Control::SetLink { from, to, config } => self.set_link(from, to, config),
        }
    }

    /// Schedules a control action at virtual time `at` (now, if `at` is in the past).
    pub fn schedule(&mut self, at: SimTime, control: Control) {
        let at = at.as_nanos().max(self.core.now);
        self.core.push(at, EventKind::Control(control));
    }

    /// Schedules a control action `after` from now.
    pub fn schedule_after(&mut self, after: Duration, control: Control) {
        let at = self.now() + after;
        self.schedule(at, control);
    }

    pub(crate) fn schedule_nemesis_step(&mut self, at: SimTime, generation: u64) {
        self.core
            .push(at.as_nanos(), EventKind::Nemesis { generation });
    }

    pub(crate) fn control_note(&mut self, action: String) {
        self.core.control_note(action);
    }

    /// The network model the simulation started with.
    pub fn initial_net(&self) -> NetConfig {
        self.core.config.net
    }

    // ---- observation ---------------------------------------------------------------------

    /// Counters of the directed link `from -> to`.
    pub fn link_stats(&self, from: NodeId, to: NodeId) -> LinkStats {
        self.core
            .links
            .get(from.index())
            .and_then(|r| r.get(to.index()))
            .map(|l| l.stats)
            .unwrap_or_default()
    }

    /// Counters of one node, summed over its links.
    pub fn node_stats(&self, id: NodeId) -> NodeStats {
        let mut stats = NodeStats::default();
        for (from, row) in self.core.links.iter().enumerate() {
            for (to, link) in row.iter().enumerate() {
                if from == id.index() {
                    stats.outgoing.add(&link.stats);
                }
                if to == id.index() {
                    stats.incoming.add(&link.stats);
                }
            }
        }
        stats
    }

    /// Counters summed over every link.
    pub fn total_stats(&self) -> LinkStats {
        let mut total = LinkStats::default();
        for row in &self.core.links {
            for link in row {
                total.add(&link.stats);
            }
        }
        total
    }

    /// Hash of the whole trace so far: equal for equal runs.
    pub fn trace_hash(&self) -> u64 {
        self.core.trace.hash()
    }

    /// Number of trace entries so far.
    pub fn trace_len(&self) -> u64 {
        self.core.trace.len()
    }

    /// The most recent trace entries (up to `SimConfig::trace_tail_len`).
    pub fn trace_tail(&self) -> impl Iterator<Item = &TraceEntry<M>> {
        self.core.trace.tail().iter()
    }

    /// Every fault and repair applied so far (crashes, restarts, partitions, heals, pauses,
    /// network changes), counted over the whole run whatever the trace tail's length.
    pub fn fault_summary(&self) -> &FaultSummary {
        self.core.trace.faults()
    }

    /// The last `n` trace entries, one per line.
    pub fn format_trace_tail(&self, n: usize) -> String {
        format_tail(self.core.trace.tail(), n)
    }

    /// Adds a note from the test to the trace.
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        self.core
            .record(NodeId::NONE, TraceKind::Note { text }, 0, None);
    }

    /// The recorded client history, read as inputs `I` and outputs `O`.
    pub fn history<I: Clone + 'static, O: Clone + 'static>(
        &self,
    ) -> Result<Vec<Operation<I, O>>, SimError> {
        Ok(self.core.history.typed()?)
    }

    /// Number of client operations recorded.
    pub fn history_len(&self) -> usize {
        self.core.history.records.len()
    }

    /// A failure carrying `message`, this run's seed, time and trace tail: what a test closure
    /// run by the seed harness returns.
    pub fn failure(&self, message: impl Into<String>) -> crate::harness::Failure {
        crate::harness::Failure {
            message: message.into(),
            context: Some(format!(
                "at {} after {} events (trace hash {:016x}), last events:\n{}",
                self.now(),
                self.core.trace.len(),
                self.core.trace.hash(),
                format_tail(self.core.trace.tail(), crate::harness::REPORT_TRACE_TAIL)
            )),
        }
    }
}
