//! The MapReduce workload of `shoal sim --workload mr`: the coordinator's event machine
//! ([`JobMachine`], the code `shoal mr coordinator` runs) and workers running the real app's
//! map and reduce functions on in-memory inputs, under crashes, pauses, lost map output and
//! links that drop, delay, duplicate and partition.
//!
//! **The world.** Node 0 is the coordinator: it turns simulated messages into the machine's
//! [`Event`]s and carries out its [`Action`]s, and commits reduce outputs into its simulated
//! disk as the tokio driver does into the output directory (fetch into `.mr-out-<r>-a<k>.tmp`,
//! fsync, rename to `mr-out-<r>`, fsync the directory). Nodes 1..=[`MR_WORKERS`] are workers.
//! Control messages travel on *connections*: each message carries its connection and a
//! sequence number, and a gap (a message lost or reordered) breaks the connection as TCP
//! would (both sides see it closed, the worker reconnects and registers again under a new
//! id). Map outputs live in the worker's memory and are served to reducers on request
//! (`MrMsg::Fetch`); a crash loses them, and so does the "lose map output" fault (a worker
//! whose disk lost its intermediate files).
//!
//! **The run.** For `duration`, the sim's nemesis partitions and changes the network model
//! (loss, delay, reordering, duplication) over every node, and a fault loop of this module
//! crashes and restarts workers, pauses and resumes them, and drops workers' map outputs;
//! then everything is healed and the job must end within [`MR_SETTLE_LIMIT`].
//!
//! **The invariants.** After every event: every `mr-out-<r>` visible on the coordinator's disk
//! holds exactly the expected bytes of partition `r` (a file never appears partial or wrong),
//! and no reduce output is committed twice with different bytes. At the end: the job is done,
//! every `mr-out-<r>` is in place, no temporary file is left, and the outputs together equal
//! the sequential reference: [`shoal_mr::seq::run_sequential`] (the `shoal mr seq` engine,
//! with its own map/sort/spill/merge code) run on the same inputs. That reference run is the
//! only real I/O of the lab (temporary files, outside the simulated world: it does not touch
//! the run's randomness or trace).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_mr::app::{App, Emit, MapInput};
use shoal_mr::coordinator::{
    Action, CommitError, ConnId, CoordinatorConfig, Event, JobEnd, JobMachine,
};
use shoal_sim::rand::{Rng, SeedableRng};
use shoal_sim::{
    ChaCha8Rng, Ctx, Failure, FsyncId, NemesisConfig, NetConfig, Node, NodeId, Sim, SimConfig,
    TimerId,
};
use shoal_wire::mr::{
    AppSpec, AttemptRef, FileKey, JobSpec, MapOutputLocation, SplitSpec, TaskKind, ToCoordinator,
    ToWorker,
};

use crate::workload::{Report, Workload};

/// Workers in the job.
pub const MR_WORKERS: u32 = 4;
/// The coordinator's tick (as `shoal mr coordinator`'s).
pub const MR_TICK: Duration = Duration::from_millis(100);
/// Worker silence before it is lost; attempt runtime before it is duplicated.
pub const MR_TASK_TIMEOUT: Duration = Duration::from_secs(2);
/// A worker that hears nothing from the coordinator for this long reconnects.
pub const MR_COORDINATOR_TIMEOUT: Duration = Duration::from_secs(3);
/// A fetch (map output by a reducer, reduce output by the coordinator) with no answer within
/// this time failed.
pub const MR_FETCH_TIMEOUT: Duration = Duration::from_secs(1);
/// A reducer tries a map output this many times before it reports a fetch failure.
pub const MR_FETCH_TRIES: u32 = 3;
/// After healing, the job must end within this (virtual) time.
pub const MR_SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Failures of one task that fail the job: high, because under this nemesis commits fail
/// for a long while (every fetch of a reduce output over a lossy link) without any bug.
pub const MR_MAX_ATTEMPTS: u32 = 1_000;
/// Target bytes of one map task's split.
pub const MR_SPLIT_BYTES: usize = 150;

/// The messages of the MapReduce world.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MrMsg {
    /// Worker → coordinator: the `seq`th message on connection `conn`.
    Up {
        /// The connection.
        conn: ConnId,
        /// Its position on the connection, from 0.
        seq: u64,
        /// The message.
        msg: ToCoordinator,
    },
    /// Coordinator → worker: the `seq`th message on connection `conn`.
    Down {
        /// The connection.
        conn: ConnId,
        /// Its position on the connection, from 0.
        seq: u64,
        /// The message.
        msg: ToWorker,
    },
    /// The connection broke or was closed by the sender (a TCP reset).
    Reset {
        /// The connection.
        conn: ConnId,
    },
    /// Shuffle: "send me this file".
    Fetch {
        /// Request id (chosen by the requester).
        id: u64,
        /// The file.
        key: FileKey,
    },
    /// Shuffle: the file, or `None` if this worker does not have it.
    FetchReply {
        /// The request's id.
        id: u64,
        /// The bytes.
        data: Option<Vec<u8>>,
    },
}

type Msg = MrMsg;

/// The job's input: file name → contents, shared by every node (every worker sees every
/// input, as with a shared file system).
pub type Inputs = Arc<BTreeMap<String, Vec<u8>>>;

fn shuffle_addr(id: NodeId) -> String {
    format!("sim:{}", id.0)
}

fn node_of(shuffle_addr: &str) -> Option<NodeId> {
    shuffle_addr
        .strip_prefix("sim:")
        .and_then(|n| n.parse().ok())
        .map(NodeId)
}

fn since_start(ctx: &Ctx<'_, Msg>) -> Duration {
    Duration::from_nanos(ctx.now().as_nanos())
}

fn tmp_name(attempt: AttemptRef) -> String {
    format!(".mr-out-{}-a{}.tmp", attempt.task, attempt.attempt)
}

fn out_name(r: u32) -> String {
    format!("mr-out-{r}")
}

/// A connection whose next message is missing for this long (a later one arrived) broke: a
/// lost message, as a TCP connection that cannot retransmit times out.
pub const MR_GAP_TIMEOUT: Duration = Duration::from_secs(1);

/// The receiving side of a connection: delivers its messages in order, once each (the
/// simulated network may reorder and duplicate, TCP does not).
struct Inbox<T> {
    next: u64,
    held: BTreeMap<u64, T>,
    gap_since: Option<Duration>,
}

impl<T> Inbox<T> {
    fn new() -> Self {
        Inbox {
            next: 0,
            held: BTreeMap::new(),
            gap_since: None,
        }
    }

    /// Takes message `seq`; returns the messages now deliverable, in order.
    fn accept(&mut self, now: Duration, seq: u64, msg: T) -> Vec<T> {
        if seq >= self.next {
            self.held.entry(seq).or_insert(msg);
        }
        let mut ready = Vec::new();
        while let Some(m) = self.held.remove(&self.next) {
            ready.push(m);
            self.next += 1;
        }
        self.gap_since = match (self.held.is_empty(), ready.is_empty()) {
            (true, _) => None,
            (false, false) => Some(now),
            (false, true) => self.gap_since.or(Some(now)),
        };
        ready
    }

    /// A message has been missing for [`MR_GAP_TIMEOUT`]: it was lost.
    fn stalled(&self, now: Duration) -> bool {
        self.gap_since
            .is_some_and(|t| now.saturating_sub(t) >= MR_GAP_TIMEOUT)
    }
}

// ---------------------------------------------------------------------------------------------
// the coordinator

const TIMER_TICK: u64 = 0;
/// Timer tokens of fetch timeouts: this bit plus the fetch id.
const TIMER_FETCH: u64 = 1 << 62;

struct CoordConn {
    peer: NodeId,
    inbox: Inbox<ToCoordinator>,
    next_out: u64,
}

enum Syncing {
    Fetched(AttemptRef),
    Placed(AttemptRef),
}

/// The simulated coordinator: the [`JobMachine`] with connections and a disk.
pub struct MrCoordinator {
    machine: JobMachine,
    conns: BTreeMap<ConnId, CoordConn>,
    closed: BTreeSet<ConnId>,
    fetches: BTreeMap<u64, (AttemptRef, TimerId)>,
    next_fetch: u64,
    syncing: BTreeMap<FsyncId, Syncing>,
    /// How the job ended, once it has.
    pub ended: Option<JobEnd>,
}

impl MrCoordinator {
    fn new(config: CoordinatorConfig, spec: JobSpec, splits: Vec<SplitSpec>) -> Self {
        MrCoordinator {
            machine: JobMachine::new(config, spec, splits),
            conns: BTreeMap::new(),
            closed: BTreeSet::new(),
            fetches: BTreeMap::new(),
            next_fetch: 0,
            syncing: BTreeMap::new(),
            ended: None,
        }
    }

    /// Attempts started over all tasks.
    pub fn attempts(&self) -> u64 {
        self.machine.core().attempts_started()
    }

    fn handle(&mut self, ctx: &mut Ctx<'_, Msg>, event: Event) {
        // As the tokio driver: an event an action produced (a rename's result) is handled
        // after the rest of the batch, in order.
        let mut pending = VecDeque::from([event]);
        while let Some(event) = pending.pop_front() {
            let actions = self.machine.handle(since_start(ctx), event);
            for action in actions {
                if let Some(next) = self.act(ctx, action) {
                    pending.push_back(next);
                }
            }
        }
    }

    fn send(&mut self, ctx: &mut Ctx<'_, Msg>, conn: ConnId, msg: ToWorker) {
        if let Some(c) = self.conns.get_mut(&conn) {
            let seq = c.next_out;
            c.next_out += 1;
            ctx.send(c.peer, MrMsg::Down { conn, seq, msg });
        }
    }

    /// Carries out one action; an event to handle at once (a rename's result), if any.
    fn act(&mut self, ctx: &mut Ctx<'_, Msg>, action: Action) -> Option<Event> {
        match action {
            Action::Send { conn, msg } => self.send(ctx, conn, msg),
            Action::Close { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    ctx.send(c.peer, MrMsg::Reset { conn });
                }
                self.closed.insert(conn);
            }
            Action::Fetch {
                attempt,
                shuffle_addr,
            } => {
                let id = self.next_fetch;
                self.next_fetch += 1;
                let Some(node) = node_of(&shuffle_addr) else {
                    return Some(Event::Fetched {
                        attempt,
                        result: Err(CommitError::Retryable(format!(
                            "bad shuffle address {shuffle_addr}"
                        ))),
                    });
                };
                let key = FileKey::ReduceOutput {
                    reduce_task: attempt.task,
                    attempt: attempt.attempt,
                };
                ctx.send(node, MrMsg::Fetch { id, key });
                let timer = ctx.set_timer(MR_FETCH_TIMEOUT, TIMER_FETCH | id);
                self.fetches.insert(id, (attempt, timer));
            }
            Action::Place { attempt } => {
                let disk = ctx.disk();
                let tmp = tmp_name(attempt);
                match disk.rename(&tmp, &out_name(attempt.task)) {
                    Ok(()) => {
                        let fsync = ctx.fsync_dir();
                        self.syncing.insert(fsync, Syncing::Placed(attempt));
                    }
                    Err(e) => {
                        let _ = disk.remove(&tmp);
                        return Some(Event::Placed {
                            attempt,
                            result: Err(CommitError::Retryable(e.to_string())),
                        });
                    }
                }
            }
            Action::RemoveFetched { attempt } => {
                let _ = ctx.disk().remove(&tmp_name(attempt));
            }
            Action::Finish { end } => {
                let farewell = match &end {
                    JobEnd::Done => ToWorker::JobDone,
                    JobEnd::TaskFailed { error, .. } | JobEnd::Aborted { error, .. } => {
                        ToWorker::JobFailed {
                            reason: error.clone(),
                        }
                    }
                };
                let conns: Vec<ConnId> = self.conns.keys().copied().collect();
                for conn in conns {
                    self.send(ctx, conn, farewell.clone());
                }
                // As the tokio driver: temporary files go, and a failed job's outputs too.
                let failed = end != JobEnd::Done;
                let disk = ctx.disk();
                for name in disk.list() {
                    if name.starts_with(".mr-out-") || (failed && name.starts_with("mr-out-")) {
                        let _ = disk.remove(&name);
                    }
                }
                self.ended = Some(end);
            }
        }
        None
    }

    fn broken(&mut self, ctx: &mut Ctx<'_, Msg>, conn: ConnId, peer: NodeId) {
        self.conns.remove(&conn);
        self.closed.insert(conn);
        ctx.send(peer, MrMsg::Reset { conn });
        self.handle(ctx, Event::Closed { conn });
    }
}

impl Node<Msg> for MrCoordinator {
    fn on_start(&mut self, ctx: &mut Ctx<'_, Msg>) {
        ctx.set_timer(MR_TICK, TIMER_TICK);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, Msg>, from: NodeId, msg: Msg) {
        match msg {
            MrMsg::Up { conn, seq, msg } => {
                if self.closed.contains(&conn) {
                    ctx.send(from, MrMsg::Reset { conn });
                    return;
                }
                let now = since_start(ctx);
                if let std::collections::btree_map::Entry::Vacant(e) = self.conns.entry(conn) {
                    e.insert(CoordConn {
                        peer: from,
                        inbox: Inbox::new(),
                        next_out: 0,
                    });
                    self.handle(ctx, Event::Connected { conn });
                }
                let ready = match self.conns.get_mut(&conn) {
                    Some(c) => c.inbox.accept(now, seq, msg),
                    None => return,
                };
                for msg in ready {
                    if !self.conns.contains_key(&conn) {
                        break; // closed by an earlier message
                    }
                    if msg == ToCoordinator::Heartbeat {
                        // As the tokio driver's connection task: answered at once.
                        self.send(ctx, conn, ToWorker::HeartbeatAck);
                    }
                    self.handle(ctx, Event::Message { conn, msg });
                }
            }
            MrMsg::Reset { conn } => {
                if let Some(c) = self.conns.get(&conn) {
                    let peer = c.peer;
                    self.broken(ctx, conn, peer);
                }
            }
            MrMsg::FetchReply { id, data } => {
                let Some((attempt, timer)) = self.fetches.remove(&id) else {
                    return;
                };
                ctx.cancel_timer(timer);
                let Some(data) = data else {
                    let result = Err(CommitError::Retryable(format!(
                        "worker {from} does not have the output of {attempt:?}"
                    )));
                    return self.handle(ctx, Event::Fetched { attempt, result });
                };
                let tmp = tmp_name(attempt);
                let disk = ctx.disk();
                let written = disk
                    .open_or_create(&tmp)
                    .and_then(|()| disk.truncate(&tmp, 0))
                    .and_then(|()| disk.write_at(&tmp, 0, &data));
                match written.and_then(|()| ctx.fsync(&tmp)) {
                    Ok(fsync) => {
                        self.syncing.insert(fsync, Syncing::Fetched(attempt));
                    }
                    Err(e) => {
                        let result = Err(CommitError::Retryable(e.to_string()));
                        self.handle(ctx, Event::Fetched { attempt, result });
                    }
                }
            }
            MrMsg::Down { .. } | MrMsg::Fetch { .. } => {}
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, Msg>, token: u64) {
        if token == TIMER_TICK {
            let now = since_start(ctx);
            let stalled: Vec<(ConnId, NodeId)> = self
                .conns
                .iter()
                .filter(|(_, c)| c.inbox.stalled(now))
                .map(|(id, c)| (*id, c.peer))
                .collect();
            for (conn, peer) in stalled {
                self.broken(ctx, conn, peer);
            }
            self.handle(ctx, Event::Tick);
            if self.ended.is_none() {
                ctx.set_timer(MR_TICK, TIMER_TICK);
            }
        } else if token & TIMER_FETCH != 0 {
            if let Some((attempt, _)) = self.fetches.remove(&(token & !TIMER_FETCH)) {
                let result = Err(CommitError::Retryable(format!(
                    "no answer to the fetch within {MR_FETCH_TIMEOUT:?}"
                )));
                self.handle(ctx, Event::Fetched { attempt, result });
            }
        }
    }

    fn on_fsync_complete(&mut self, ctx: &mut Ctx<'_, Msg>, fsync: FsyncId) {
        match self.syncing.remove(&fsync) {
            Some(Syncing::Fetched(attempt)) => {
                self.handle(
                    ctx,
                    Event::Fetched {
                        attempt,
                        result: Ok(()),
                    },
                );
            }
            Some(Syncing::Placed(attempt)) => {
                self.handle(
                    ctx,
                    Event::Placed {
                        attempt,
                        result: Ok(()),
                    },
                );
            }
            None => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the workers

const TIMER_HEARTBEAT: u64 = 1;
const TIMER_TASK: u64 = 2;
const TIMER_RECONNECT: u64 = 3;
const TIMER_FETCH_KIND: u64 = 4;
/// Timer tokens: the low 4 bits say which, the rest is a generation or a fetch id.
const TIMER_KIND_BITS: u64 = 4;

struct WorkerConn {
    id: ConnId,
    inbox: Inbox<ToWorker>,
    next_out: u64,
    welcomed: bool,
}

enum Task {
    Map {
        attempt: AttemptRef,
        split: SplitSpec,
    },
    Reduce {
        attempt: AttemptRef,
        inputs: Vec<MapOutputLocation>,
        /// Map task → its partition's bytes, once fetched.
        fetched: BTreeMap<u32, Vec<u8>>,
        /// Fetch id → (location index, tries so far).
        waiting: BTreeMap<u64, (usize, u32)>,
        /// All fetched: the reduce runs when the task timer fires.
        computing: bool,
    },
}

/// A simulated worker: the app's real map and reduce functions over in-memory inputs, the
/// shuffle served from memory.
pub struct MrWorker {
    app: Arc<dyn App>,
    inputs: Inputs,
    conn: Option<WorkerConn>,
    conns_opened: u64,
    last_heard: Duration,
    heartbeat: Duration,
    job: Option<JobSpec>,
    task: Option<Task>,
    /// Bumped whenever the task changes, so a stale task timer is recognised.
    task_generation: u64,
    next_fetch: u64,
    /// (map task, attempt) → one encoded run per partition.
    map_outputs: BTreeMap<(u32, u32), Vec<Vec<u8>>>,
    /// (reduce task, attempt) → the `mr-out` bytes.
    reduce_outputs: BTreeMap<(u32, u32), Vec<u8>>,
    /// The job ended (the coordinator said so).
    pub exited: bool,
}

/// Where the map engine's pairs go in the simulation: one list per partition.
struct Collect<'a> {
    app: &'a dyn App,
    reduces: u32,
    parts: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Emit for Collect<'_> {
    fn emit(&mut self, key: &[u8], value: &[u8]) {
        let r = self.app.partition(key, self.reduces) as usize;
        if let Some(part) = self.parts.get_mut(r) {
            part.push((key.to_vec(), value.to_vec()));
        }
    }

    fn counter(&mut self, _name: &str, _delta: u64) {}
}

impl MrWorker {
    fn new(app: Arc<dyn App>, inputs: Inputs) -> Self {
        MrWorker {
            app,
            inputs,
            conn: None,
            conns_opened: 0,
            last_heard: Duration::ZERO,
            heartbeat: MR_TASK_TIMEOUT / 4,
            job: None,
            task: None,
            task_generation: 0,
            next_fetch: 0,
            map_outputs: BTreeMap::new(),
            reduce_outputs: BTreeMap::new(),
            exited: false,
        }
    }

    /// The "lost map output" fault: the disk holding this worker's intermediate files lost
    /// them (the worker itself lives on). Returns how many map outputs were lost.
    pub fn lose_map_outputs(&mut self) -> usize {
        let n = self.map_outputs.len();
        self.map_outputs.clear();
        n
    }

    fn up(&mut self, ctx: &mut Ctx<'_, Msg>, msg: ToCoordinator) {
        if let Some(c) = &mut self.conn {
            let seq = c.next_out;
            c.next_out += 1;
            ctx.send(
                NodeId(0),
                MrMsg::Up {
                    conn: c.id,
                    seq,
                    msg,
                },
            );
        }
    }

    /// Opens a new connection and registers (a fresh id for the coordinator).
    fn connect(&mut self, ctx: &mut Ctx<'_, Msg>) {
        self.conns_opened += 1;
        let id = (u64::from(ctx.id().0) << 40)
            | (u64::from(ctx.incarnation()) << 24)
            | self.conns_opened;
        self.conn = Some(WorkerConn {
            id,
            inbox: Inbox::new(),
            next_out: 0,
            welcomed: false,
        });
        self.last_heard = since_start(ctx);
        let register = ToCoordinator::Register {
            name: format!("sim-worker-{}", ctx.id().0),
            shuffle_addr: shuffle_addr(ctx.id()),
        };
        self.up(ctx, register);
    }

    /// The connection is gone: the running task is abandoned (as `shoal mr worker` does when
    /// its session ends) and the worker reconnects after a short pause.
    fn lost_connection(&mut self, ctx: &mut Ctx<'_, Msg>, tell_coordinator: bool) {
        if let Some(c) = self.conn.take() {
            if tell_coordinator {
                ctx.send(NodeId(0), MrMsg::Reset { conn: c.id });
            }
        }
        self.set_task(None);
        let backoff = Duration::from_millis(ctx.rng().gen_range(50..300));
        ctx.set_timer(backoff, TIMER_RECONNECT);
    }

    fn set_task(&mut self, task: Option<Task>) {
        self.task = task;
        self.task_generation += 1;
    }

    fn task_timer(&mut self, ctx: &mut Ctx<'_, Msg>) {
        // Tasks take 0.1 to 1.5 s of virtual time, now and then 4 s (a straggler: backups and
        // duplicates), so that the job spans the fault phase.
        let ms = if ctx.rng().gen_bool(0.05) {
            4_000
        } else {
            ctx.rng().gen_range(100..1_500)
        };
        let token = TIMER_TASK | (self.task_generation << TIMER_KIND_BITS);
        ctx.set_timer(Duration::from_millis(ms), token);
    }

    fn fetch(&mut self, ctx: &mut Ctx<'_, Msg>, index: usize, tries: u32) {
        let Some(Task::Reduce {
            attempt,
            inputs,
            waiting,
            ..
        }) = &mut self.task
        else {
            return;
        };
        let loc = &inputs[index];
        let key = FileKey::MapOutput {
            map_task: loc.map_task,
            attempt: loc.attempt,
            partition: attempt.task,
        };
        let id = self.next_fetch;
        self.next_fetch += 1;
        waiting.insert(id, (index, tries + 1));
        // (An address that names no node gets no answer: the timeout reports it.)
        if let Some(node) = node_of(&loc.shuffle_addr) {
            ctx.send(node, MrMsg::Fetch { id, key });
        }
        ctx.set_timer(MR_FETCH_TIMEOUT, TIMER_FETCH_KIND | (id << TIMER_KIND_BITS));
    }

    fn fetch_answered(&mut self, ctx: &mut Ctx<'_, Msg>, id: u64, data: Option<Vec<u8>>) {
        let Some(Task::Reduce {
            attempt,
            inputs,
            fetched,
            waiting,
            computing,
        }) = &mut self.task
        else {
            return;
        };
        let Some((index, tries)) = waiting.remove(&id) else {
            return;
        };
        let loc = inputs[index].clone();
        let attempt = *attempt;
        match data {
            Some(bytes) => {
                fetched.insert(loc.map_task, bytes);
                if fetched.len() == inputs.len() && !*computing {
                    *computing = true;
                    self.task_timer(ctx);
                }
            }
            None if tries < MR_FETCH_TRIES => self.fetch(ctx, index, tries),
            None => {
                self.set_task(None);
                let error = format!(
                    "map output {}.{} not available from {} after {tries} tries",
                    loc.map_task, loc.attempt, loc.shuffle_addr
                );
                self.up(
                    ctx,
                    ToCoordinator::FetchFailed {
                        attempt,
                        map_task: loc.map_task,
                        map_attempt: loc.attempt,
                        error,
                    },
                );
                self.up(ctx, ToCoordinator::RequestTask);
            }
        }
    }

    fn on_control(&mut self, ctx: &mut Ctx<'_, Msg>, msg: ToWorker) {
        match msg {
            ToWorker::Welcome { job, .. } => {
                self.heartbeat = Duration::from_millis(job.heartbeat_interval_ms.max(10));
                self.job = Some(job);
                if let Some(c) = &mut self.conn {
                    c.welcomed = true;
                }
                self.up(ctx, ToCoordinator::RequestTask);
            }
            ToWorker::Map { attempt, split } => {
                self.set_task(Some(Task::Map { attempt, split }));
                self.task_timer(ctx);
            }
            ToWorker::Reduce { attempt, inputs } => {
                let n = inputs.len();
                self.set_task(Some(Task::Reduce {
                    attempt,
                    inputs,
                    fetched: BTreeMap::new(),
                    waiting: BTreeMap::new(),
                    computing: false,
                }));
                if n == 0 {
                    if let Some(Task::Reduce { computing, .. }) = &mut self.task {
                        *computing = true;
                    }
                    self.task_timer(ctx);
                }
                for index in 0..n {
                    self.fetch(ctx, index, 0);
                }
            }
            ToWorker::JobDone | ToWorker::JobFailed { .. } | ToWorker::Refused { .. } => {
                self.exited = true;
                self.conn = None;
                self.set_task(None);
            }
            ToWorker::HeartbeatAck => {}
            ToWorker::Discard { attempt } => match attempt.kind {
                TaskKind::Map => {
                    self.map_outputs.remove(&(attempt.task, attempt.attempt));
                }
                TaskKind::Reduce => {
                    self.reduce_outputs.remove(&(attempt.task, attempt.attempt));
                }
            },
        }
    }

    /// The task timer fired: run the task with the app's functions and report.
    fn finish_task(&mut self, ctx: &mut Ctx<'_, Msg>) {
        let Some(reduces) = self.job.as_ref().map(|j| j.reduces) else {
            return;
        };
        let report = match self.task.take() {
            Some(Task::Map { attempt, split }) => self.run_map(attempt, &split, reduces),
            Some(Task::Reduce {
                attempt, fetched, ..
            }) => self.run_reduce(attempt, fetched),
            None => return,
        };
        self.set_task(None);
        self.up(ctx, report);
        self.up(ctx, ToCoordinator::RequestTask);
    }

    fn run_map(&mut self, attempt: AttemptRef, split: &SplitSpec, reduces: u32) -> ToCoordinator {
        let name = split.path.to_string_lossy().into_owned();
        let contents = self.inputs.get(&name).and_then(|bytes| {
            let start = usize::try_from(split.offset).ok()?;
            let end = start.checked_add(usize::try_from(split.len).ok()?)?;
            bytes.get(start..end)
        });
        let Some(contents) = contents else {
            return ToCoordinator::TaskFailed {
                attempt,
                error: format!("cannot read split {split:?}"),
            };
        };
        let mut collect = Collect {
            app: &*self.app,
            reduces,
            parts: vec![Vec::new(); reduces as usize],
        };
        let input = MapInput {
            name: &name,
            path: &split.path,
            offset: split.offset,
            contents,
        };
        if let Err(e) = self.app.map_input(&input, &mut collect) {
            return ToCoordinator::TaskFailed {
                attempt,
                error: format!("{e:#}"),
            };
        }
        let mut records = 0u64;
        let runs = collect
            .parts
            .into_iter()
            .map(|mut part| {
                records += part.len() as u64;
                part.sort();
                postcard::to_allocvec(&part).unwrap_or_default()
            })
            .collect();
        self.map_outputs
            .insert((attempt.task, attempt.attempt), runs);
        ToCoordinator::TaskDone {
            attempt,
            counters: BTreeMap::from([("map.output.records".to_string(), records)]),
        }
    }

    fn run_reduce(
        &mut self,
        attempt: AttemptRef,
        fetched: BTreeMap<u32, Vec<u8>>,
    ) -> ToCoordinator {
        let mut groups: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
        for (map_task, bytes) in fetched {
            let Ok(pairs) = postcard::from_bytes::<Vec<(Vec<u8>, Vec<u8>)>>(&bytes) else {
                return ToCoordinator::TaskFailed {
                    attempt,
                    error: format!("map output of map task {map_task} is corrupt"),
                };
            };
            for (k, v) in pairs {
                groups.entry(k).or_default().push(v);
            }
        }
        let mut out = Vec::new();
        let mut value = Vec::new();
        for (key, values) in &groups {
            value.clear();
            let mut iter = values.iter().map(Vec::as_slice);
            if let Err(e) = self.app.reduce(key, &mut iter, &mut value) {
                return ToCoordinator::TaskFailed {
                    attempt,
                    error: format!("{e:#}"),
                };
            }
            out.extend_from_slice(key);
            out.push(b' ');
            out.extend_from_slice(&value);
            out.push(b'\n');
        }
        self.reduce_outputs
            .insert((attempt.task, attempt.attempt), out);
        ToCoordinator::TaskDone {
            attempt,
            counters: BTreeMap::from([("reduce.output.records".to_string(), groups.len() as u64)]),
        }
    }
}

impl Node<Msg> for MrWorker {
    fn on_start(&mut self, ctx: &mut Ctx<'_, Msg>) {
        self.connect(ctx);
        ctx.set_timer(self.heartbeat, TIMER_HEARTBEAT);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, Msg>, from: NodeId, msg: Msg) {
        match msg {
            MrMsg::Down { conn, seq, msg } => {
                let now = since_start(ctx);
                let ready = match &mut self.conn {
                    Some(c) if c.id == conn => c.inbox.accept(now, seq, msg),
                    _ => return,
                };
                for msg in ready {
                    if self.conn.as_ref().is_none_or(|c| c.id != conn) {
                        break; // the connection ended on an earlier message
                    }
                    self.last_heard = now;
                    self.on_control(ctx, msg);
                }
            }
            MrMsg::Reset { conn } => {
                if self.conn.as_ref().is_some_and(|c| c.id == conn) {
                    self.lost_connection(ctx, false);
                }
            }
            MrMsg::Fetch { id, key } => {
                // Served whatever the connection's state, as the shuffle server is.
                let data = match key {
                    FileKey::MapOutput {
                        map_task,
                        attempt,
                        partition,
                    } => self
                        .map_outputs
                        .get(&(map_task, attempt))
                        .and_then(|runs| runs.get(partition as usize).cloned()),
                    FileKey::ReduceOutput {
                        reduce_task,
                        attempt,
                    } => self.reduce_outputs.get(&(reduce_task, attempt)).cloned(),
                };
                ctx.send(from, MrMsg::FetchReply { id, data });
            }
            MrMsg::FetchReply { id, data } => self.fetch_answered(ctx, id, data),
            MrMsg::Up { .. } => {}
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, Msg>, token: u64) {
        if self.exited {
            return;
        }
        match token & ((1 << TIMER_KIND_BITS) - 1) {
            TIMER_HEARTBEAT => {
                ctx.set_timer(self.heartbeat, TIMER_HEARTBEAT);
                let Some(c) = &self.conn else { return };
                let now = since_start(ctx);
                let silent = now.saturating_sub(self.last_heard);
                if silent >= MR_COORDINATOR_TIMEOUT || c.inbox.stalled(now) {
                    return self.lost_connection(ctx, true);
                }
                if c.welcomed {
                    self.up(ctx, ToCoordinator::Heartbeat);
                }
            }
            TIMER_TASK if token >> TIMER_KIND_BITS == self.task_generation => {
                self.finish_task(ctx);
            }
            TIMER_RECONNECT if self.conn.is_none() => self.connect(ctx),
            TIMER_FETCH_KIND => {
                // No answer is like "not there": another try, or a report.
                self.fetch_answered(ctx, token >> TIMER_KIND_BITS, None);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the workload

/// Words the generated inputs are made of (a few non-ASCII ones: the app's UTF-8 rule).
const WORDS: &[&str] = &[
    "the",
    "a",
    "shoal",
    "of",
    "fish",
    "map",
    "reduce",
    "sort",
    "spill",
    "merge",
    "worker",
    "coordinator",
    "crash",
    "pause",
    "seed",
    "café",
    "naïve",
    "Ünïcode",
    "river",
    "stone",
    "x",
    "yy",
    "zzz",
    "The",
    "MAP",
    "fish's",
    "end",
];

/// Generates the inputs of one run: 2 to 4 files of 10 to 60 lines of 0 to 9 words.
pub fn generate_inputs(rng: &mut ChaCha8Rng) -> BTreeMap<String, Vec<u8>> {
    let files = rng.gen_range(2..=4);
    (0..files)
        .map(|f| {
            let mut text = Vec::new();
            for _ in 0..rng.gen_range(10..=60) {
                let words = rng.gen_range(0..10);
                let line: Vec<&str> = (0..words)
                    .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
                    .collect();
                text.extend_from_slice(
                    line.join(if rng.gen_bool(0.2) { ", " } else { " " })
                        .as_bytes(),
                );
                text.push(b'\n');
            }
            (format!("in-{f}.txt"), text)
        })
        .collect()
}

/// Cuts every input into splits of about [`MR_SPLIT_BYTES`], at line ends.
pub fn plan_splits(inputs: &BTreeMap<String, Vec<u8>>) -> Vec<SplitSpec> {
    let mut splits = Vec::new();
    for (name, bytes) in inputs {
        let mut start = 0;
        while start < bytes.len() {
            let at = (start + MR_SPLIT_BYTES).min(bytes.len());
            let end = match bytes[at..].iter().position(|&b| b == b'\n') {
                Some(i) => at + i + 1,
                None => bytes.len(),
            };
            splits.push(SplitSpec {
                path: PathBuf::from(name),
                offset: start as u64,
                len: (end - start) as u64,
            });
            start = end;
        }
    }
    splits
}

/// The sequential reference: `shoal mr seq`'s engine ([`shoal_mr::seq::run_sequential`]) on
/// the inputs written to a temporary directory; its output, split by partition.
pub fn sequential_reference(
    app: &dyn App,
    inputs: &BTreeMap<String, Vec<u8>>,
    reduces: u32,
) -> Result<Vec<Vec<u8>>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("reference: no temporary directory: {e}"))?;
    let mut paths = Vec::new();
    for (name, bytes) in inputs {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).map_err(|e| format!("reference: writing {name}: {e}"))?;
        paths.push(path);
    }
    let out = dir.path().join("seq-out");
    shoal_mr::seq::run_sequential(app, &paths, &out)
        .map_err(|e| format!("reference: the sequential run failed: {e:#}"))?;
    let all = std::fs::read(&out).map_err(|e| format!("reference: reading its output: {e}"))?;
    let mut parts = vec![Vec::new(); reduces as usize];
    for line in all.split_inclusive(|&b| b == b'\n') {
        let key = line.split(|&b| b == b' ').next().unwrap_or(line);
        parts[app.partition(key, reduces) as usize].extend_from_slice(line);
    }
    Ok(parts)
}

/// After every event: each `mr-out-<r>` on the coordinator's disk holds exactly partition
/// `r`'s expected bytes (never a partial or wrong file).
fn check_visible_outputs(sim: &Sim<Msg>, expected: &[Vec<u8>]) -> Result<(), String> {
    let Some(disk) = sim.disk(NodeId(0)) else {
        return Ok(());
    };
    for name in disk.list_prefix("mr-out-") {
        let r: Option<usize> = name.strip_prefix("mr-out-").and_then(|r| r.parse().ok());
        let Some(want) = r.and_then(|r| expected.get(r)) else {
            return Err(format!("unexpected output file {name}"));
        };
        let got = disk.data(&name).map_err(|e| format!("{name}: {e}"))?;
        if got != want.as_slice() {
            return Err(format!(
                "{name} is visible with {} bytes that differ from the reference's {} bytes of \
                 this partition (a partial or wrong output); first line: {:?}",
                got.len(),
                want.len(),
                String::from_utf8_lossy(got.split(|&b| b == b'\n').next().unwrap_or(b""))
            ));
        }
    }
    Ok(())
}

/// The mr workload for `seed`: see the module's documentation.
pub fn run_mr(seed: u64, duration: Duration) -> Report {
    crate::workload::catching(Workload::Mr, seed, duration, || {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d72_7369_6d00);
        let inputs = generate_inputs(&mut rng);
        let reduces = rng.gen_range(1..=4);
        let app: Arc<dyn App> = Arc::new(shoal_mr::apps::wordcount::WordCount);
        let mut sim: Sim<Msg> = Sim::new(
            seed,
            SimConfig {
                net: NetConfig::reliable(),
                ..SimConfig::default()
            },
        );
        let fail = |sim: &Sim<Msg>, committed: u64, attempts: u64, outcome| Report {
            workload: Workload::Mr,
            seed,
            duration,
            faults: sim.fault_summary().clone(),
            events: sim.events_processed(),
            sim_time: sim.now(),
            ops: attempts,
            committed,
            history_gave_up: None,
            membership_changes: None,
            trace_hash: sim.trace_hash(),
            outcome,
        };
        let expected = match sequential_reference(&*app, &inputs, reduces) {
            Ok(e) => e,
            Err(e) => return fail(&sim, 0, 0, Err(Failure::new(e))),
        };
        let splits = plan_splits(&inputs);
        let config = CoordinatorConfig {
            maps: splits.len() as u32,
            reduces,
            task_timeout: MR_TASK_TIMEOUT,
            max_attempts: MR_MAX_ATTEMPTS,
            backup_tasks: rng.gen_bool(0.5),
        };
        let spec = JobSpec {
            job_id: seed.max(1),
            app: AppSpec {
                name: app.name().to_string(),
                pattern: None,
                mapper: None,
                reducer: None,
                shipped: Vec::new(),
                sort: None,
            },
            reduces,
            memory_bytes: 1 << 20,
            heartbeat_interval_ms: (MR_TASK_TIMEOUT / 4).as_millis() as u64,
        };
        let coordinator =
            sim.add_node(move |_| MrCoordinator::new(config.clone(), spec.clone(), splits.clone()));
        let inputs: Inputs = Arc::new(inputs);
        let workers: Vec<NodeId> = (0..MR_WORKERS)
            .map(|_| {
                let (app, inputs) = (app.clone(), inputs.clone());
                sim.add_node(move |_| MrWorker::new(app.clone(), inputs.clone()))
            })
            .collect();
        let outcome = mr_body(
            &mut sim,
            &mut rng,
            coordinator,
            &workers,
            &expected,
            duration,
        );
        let attempts = sim
            .node::<MrCoordinator>(coordinator)
            .map_or(0, |c| c.attempts());
        let committed = sim
            .disk(coordinator)
            .map_or(0, |d| d.list_prefix("mr-out-").len() as u64);
        fail(&sim, committed, attempts, outcome)
    })
}

fn mr_body(
    sim: &mut Sim<Msg>,
    rng: &mut ChaCha8Rng,
    coordinator: NodeId,
    workers: &[NodeId],
    expected: &[Vec<u8>],
    duration: Duration,
) -> Result<(), Failure> {
    let mut all = vec![coordinator];
    all.extend_from_slice(workers);
    sim.start_nemesis(NemesisConfig {
        crashes: false,
        pauses: false,
        ..NemesisConfig::new(all)
    });
    let end = (sim.now() + duration).as_nanos();
    let ended = |sim: &Sim<Msg>| {
        sim.node::<MrCoordinator>(coordinator)
            .and_then(|c| c.ended.clone())
    };
    // Faults until the fault phase is over or the job ended (faults after that test nothing).
    while sim.now().as_nanos() < end && ended(sim).is_none() {
        let step = Duration::from_millis(rng.gen_range(50..600));
        sim.run_checked(step, |sim| check_visible_outputs(sim, expected))?;
        let w = workers[rng.gen_range(0..workers.len())];
        let back = Duration::from_millis(rng.gen_range(200..4_000));
        match rng.gen_range(0..4) {
            0 if sim.is_up(w) => {
                sim.crash(w);
                sim.schedule_after(back, shoal_sim::Control::Restart(w));
            }
            1 if sim.is_up(w) && !sim.is_paused(w) => {
                sim.pause(w);
                sim.schedule_after(back, shoal_sim::Control::Resume(w));
            }
            2 => {
                let lost = sim.call::<MrWorker, _>(w, |worker, _| worker.lose_map_outputs());
                if let Ok(n) = lost {
                    sim.note(format!("{w} lost its {n} map outputs"));
                }
            }
            _ => {}
        }
    }
    sim.heal_all();
    let limit = (sim.now() + MR_SETTLE_LIMIT).as_nanos();
    while ended(sim).is_none() {
        if sim.now().as_nanos() >= limit {
            return Err(sim.failure(format!(
                "the job did not end within {MR_SETTLE_LIMIT:?} after healing"
            )));
        }
        sim.run_checked(Duration::from_millis(200), |sim| {
            check_visible_outputs(sim, expected)
        })?;
    }
    if let Some(end) = ended(sim).filter(|e| *e != JobEnd::Done) {
        return Err(sim.failure(format!("the job failed: {end:?}")));
    }
    let Some(disk) = sim.disk(coordinator) else {
        return Err(sim.failure("the coordinator has no disk"));
    };
    for (r, want) in expected.iter().enumerate() {
        let name = out_name(r as u32);
        match disk.data(&name) {
            Ok(got) if got == want.as_slice() => {}
            Ok(got) => {
                return Err(sim.failure(format!(
                    "{name} differs from the sequential reference ({} bytes, {} expected)",
                    got.len(),
                    want.len()
                )))
            }
            Err(e) => return Err(sim.failure(format!("{name} missing after the job: {e}"))),
        }
    }
    let left: Vec<String> = disk
        .list()
        .into_iter()
        .filter(|n| !n.starts_with("mr-out-"))
        .collect();
    if !left.is_empty() {
        return Err(sim.failure(format!("files left in the output directory: {left:?}")));
    }
    Ok(())
}
