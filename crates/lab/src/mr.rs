//! The MapReduce workload of `shoal sim --workload mr`: the coordinator's event machine
//! ([`JobMachine`], the code `shoal mr coordinator` runs) and workers running a real app's
//! map and reduce functions on in-memory inputs, under crashes, pauses, lost map output and
//! links that drop, delay, duplicate and partition.
//!
//! **The apps** ([`MrApp`], one per seed in turn, or one chosen): `wordcount`, `indexer`,
//! `grep` (a pattern drawn per seed), `sort` (lines) and `terasort` (the sort app on 100-byte
//! TeraSort records) — every built-in app that needs no external state. The job's
//! [`AppSpec`] is what `shoal mr coordinator` would send: for the sort apps it carries the
//! range partitioner's cut points, placed by `shoal-mr`'s own sampler
//! ([`shoal_mr::apps::sort::sample_cut_points`]) from the input files before the maps run;
//! each worker builds its app from the spec it is welcomed with ([`shoal_mr::app::build_app`]),
//! as `shoal mr worker` does. The inputs are real files in a temporary directory (a shared
//! file system): the sampler and `grep`'s line numbering read them; everything else reads the
//! same bytes from memory.
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
//! and no reduce output is committed twice with different bytes. At the instant the
//! coordinator declares the job done (no further event is processed): the driver saw the
//! directory fsync of every reduce's rename complete (the job ends only once every reduce is
//! committed), no temporary file is visible, and then the coordinator's disk is crashed — all
//! unsynced data lost, or in half the seeds the sim's model of a disk that wrote back a random
//! prefix and tore the last write — and every `mr-out-<r>` must still hold exactly its bytes:
//! "done" means durable. The outputs together equal the sequential reference:
//! [`shoal_mr::seq::run_sequential`] (the `shoal mr seq` engine, with its own
//! map/sort/spill/merge code) run on the same input files with the same app, split by
//! partition; for the sort apps each output is in order and every record of `mr-out-<i>` is
//! below every record of `mr-out-<i+1>`. The input files and that reference run are the only
//! real I/O of the lab (outside the simulated world: they do not touch the run's randomness
//! or trace).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_mr::app::{App, AppConfig, Emit, MapInput};
use shoal_mr::apps::sort::{SortConfig, SortFormat, TERASORT_KEY_BYTES, TERASORT_RECORD_BYTES};
use shoal_mr::coordinator::{
    Action, CommitError, ConnId, CoordinatorConfig, Event, JobEnd, JobMachine,
};
use shoal_sim::rand::{Rng, SeedableRng};
use shoal_sim::{
    ChaCha8Rng, CrashPolicy, Ctx, Failure, FsyncId, NemesisConfig, NetConfig, Node, NodeId, Sim,
    SimConfig, TimerId,
};
use shoal_wire::mr::{
    AppSpec, AttemptRef, FileKey, JobSpec, MapOutputLocation, SortSpec, SplitSpec, TaskKind,
    ToCoordinator, ToWorker,
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
/// TeraSort records per map task's split (`terasort`).
pub const MR_SPLIT_RECORDS: usize = 3;

/// The app a run of the workload runs: every built-in app that needs no external state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MrApp {
    /// `wordcount` (its combiner-free map here: the pairs go to the reducers as emitted).
    WordCount,
    /// `indexer`: word → the inputs holding it.
    Indexer,
    /// `grep` with a pattern drawn per seed (its line numbers read the input files).
    Grep,
    /// `sort --format lines`: every line, in byte order across the outputs.
    Sort,
    /// `sort --format terasort`: 100-byte records ordered by their 10-byte keys.
    TeraSort,
}

impl MrApp {
    /// Every app, in the order seeds take them ([`MrApp::for_seed`]).
    pub const ALL: [MrApp; 5] = [
        MrApp::WordCount,
        MrApp::Indexer,
        MrApp::Grep,
        MrApp::Sort,
        MrApp::TeraSort,
    ];

    /// The name `shoal sim --workload mr --app` takes.
    pub fn name(self) -> &'static str {
        match self {
            MrApp::WordCount => "wordcount",
            MrApp::Indexer => "indexer",
            MrApp::Grep => "grep",
            MrApp::Sort => "sort",
            MrApp::TeraSort => "terasort",
        }
    }

    /// The app of [`MrApp::name`], if any.
    pub fn parse(name: &str) -> Option<MrApp> {
        MrApp::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The app a seed runs when none is chosen: each in turn (seed modulo 5).
    pub fn for_seed(seed: u64) -> MrApp {
        MrApp::ALL[(seed % MrApp::ALL.len() as u64) as usize]
    }

    /// The sort app's record format, for the sort apps.
    fn sort_format(self) -> Option<SortFormat> {
        match self {
            MrApp::Sort => Some(SortFormat::Lines),
            MrApp::TeraSort => Some(SortFormat::Terasort),
            _ => None,
        }
    }

    /// The sort key of one output record (without its `\n`): the sort apps' record key, else
    /// the `key` of a `key value` line.
    fn output_key(self, record: &[u8]) -> &[u8] {
        match self.sort_format() {
            Some(format) => format.key(record),
            None => record.split(|&b| b == b' ').next().unwrap_or(record),
        }
    }

    /// The output's records, each with its terminator (`\n`, or none for TeraSort's).
    fn output_records(self, bytes: &[u8]) -> Vec<&[u8]> {
        match self {
            MrApp::TeraSort => bytes.chunks(TERASORT_RECORD_BYTES).collect(),
            _ => bytes.split_inclusive(|&b| b == b'\n').collect(),
        }
    }

    /// The record without its `\n` (what [`MrApp::output_key`] reads).
    fn record_body(self, record: &[u8]) -> &[u8] {
        match self {
            MrApp::TeraSort => record,
            _ => record.strip_suffix(b"\n").unwrap_or(record),
        }
    }
}

/// A bug to plant in the simulated coordinator's commit path, to prove that the end-of-run
/// checks catch what they claim to (tests only; `None` in every real run).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sabotage {
    /// The driver as it should be.
    #[default]
    None,
    /// Reports a rename as done before the directory fsync completes (the output's name is
    /// not durable when the job may end).
    PlacedBeforeDirSync,
    /// Reports a fetched output as durable without fsyncing its data.
    FetchedWithoutFsync,
}

/// What one run of [`run_mr_with`] does beyond its seed and duration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MrOptions {
    /// The app; `None` takes [`MrApp::for_seed`].
    pub app: Option<MrApp>,
    /// A planted bug (tests of the checks only).
    #[doc(hidden)]
    pub sabotage: Sabotage,
}

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

/// The job's input, shared by every node (every worker sees every input, as with a shared
/// file system): file name → contents, also written as real files under one temporary
/// directory for the code that reads inputs by path (the sort sampler, `grep`'s line
/// numbers, the sequential reference). Removed when dropped.
pub struct SharedInputs {
    /// File name (as the job names it: a split's path) → contents.
    pub files: BTreeMap<String, Vec<u8>>,
    dir: tempfile::TempDir,
}

impl SharedInputs {
    /// Writes `files` into a fresh temporary directory.
    pub fn write(files: BTreeMap<String, Vec<u8>>) -> Result<SharedInputs, String> {
        let dir = tempfile::tempdir()
            .map_err(|e| format!("inputs: no temporary directory (is $TMPDIR writable?): {e}"))?;
        for (name, bytes) in &files {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes)
                .map_err(|e| format!("inputs: writing {}: {e}", path.display()))?;
        }
        Ok(SharedInputs { files, dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The real path of input `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The inputs as every node holds them.
pub type Inputs = Arc<SharedInputs>;

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
    /// Reduce tasks whose output's rename this driver saw made durable (the directory fsync
    /// after it completed) and reported placed.
    placed: BTreeSet<u32>,
    reduces: u32,
    sabotage: Sabotage,
    /// How the job ended, once it has.
    pub ended: Option<JobEnd>,
    /// When the job ended done: the reduce tasks whose placement had not been made durable
    /// by then (must be none: the job is done only once every reduce is committed).
    pub unplaced_at_done: Vec<u32>,
}

impl MrCoordinator {
    fn new(
        config: CoordinatorConfig,
        spec: JobSpec,
        splits: Vec<SplitSpec>,
        sabotage: Sabotage,
    ) -> Self {
        MrCoordinator {
            reduces: config.reduces,
            machine: JobMachine::new(config, spec, splits),
            conns: BTreeMap::new(),
            closed: BTreeSet::new(),
            fetches: BTreeMap::new(),
            next_fetch: 0,
            syncing: BTreeMap::new(),
            placed: BTreeSet::new(),
            sabotage,
            ended: None,
            unplaced_at_done: Vec::new(),
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
                    Ok(()) if self.sabotage == Sabotage::PlacedBeforeDirSync => {
                        ctx.fsync_dir();
                        self.placed.insert(attempt.task);
                        return Some(Event::Placed {
                            attempt,
                            result: Ok(()),
                        });
                    }
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
                // Fetches still running stop: an answer arriving later is not written.
                for (_, (_, timer)) in std::mem::take(&mut self.fetches) {
                    ctx.cancel_timer(timer);
                }
                if end == JobEnd::Done {
                    self.unplaced_at_done = (0..self.reduces)
                        .filter(|r| !self.placed.contains(r))
                        .collect();
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
                if written.is_ok() && self.sabotage == Sabotage::FetchedWithoutFsync {
                    let result = Ok(());
                    return self.handle(ctx, Event::Fetched { attempt, result });
                }
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
                self.placed.insert(attempt.task);
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
    /// Built from the job's [`AppSpec`] when welcomed, as `shoal mr worker` builds it.
    app: Option<Arc<dyn App>>,
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
    /// The app of the job's spec could not be built (a bug of the workload or of the spec's
    /// journey: every spec it sends is valid).
    pub app_error: Option<String>,
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
    fn new(inputs: Inputs) -> Self {
        MrWorker {
            app: None,
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
            app_error: None,
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
                let known = self.job.as_ref().is_some_and(|j| j.job_id == job.job_id);
                if !known || self.app.is_none() {
                    match app_from_spec(&job.app) {
                        Ok(app) => self.app = Some(app),
                        Err(e) => {
                            self.app_error = Some(e);
                            self.exited = true;
                            self.conn = None;
                            return;
                        }
                    }
                }
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
        let (Some(reduces), Some(app)) = (self.job.as_ref().map(|j| j.reduces), self.app.clone())
        else {
            return;
        };
        let report = match self.task.take() {
            Some(Task::Map { attempt, split }) => self.run_map(&*app, attempt, &split, reduces),
            Some(Task::Reduce {
                attempt, fetched, ..
            }) => self.run_reduce(&*app, attempt, fetched),
            None => return,
        };
        self.set_task(None);
        self.up(ctx, report);
        self.up(ctx, ToCoordinator::RequestTask);
    }

    fn run_map(
        &mut self,
        app: &dyn App,
        attempt: AttemptRef,
        split: &SplitSpec,
        reduces: u32,
    ) -> ToCoordinator {
        let name = split.path.to_string_lossy().into_owned();
        let contents = self.inputs.files.get(&name).and_then(|bytes| {
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
            app,
            reduces,
            parts: vec![Vec::new(); reduces as usize],
        };
        // The name as the job gives it; the path the real file (grep numbers lines from it).
        let path = self.inputs.path(&name);
        let input = MapInput {
            name: &name,
            path: &path,
            offset: split.offset,
            contents,
        };
        if let Err(e) = app.map_input(&input, &mut collect) {
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
                // By key, equal keys in the order emitted (stable), as the task engine's
                // sort buffer: the sort apps' equal keys keep their input order.
                part.sort_by(|a, b| a.0.cmp(&b.0));
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
        app: &dyn App,
        attempt: AttemptRef,
        fetched: BTreeMap<u32, Vec<u8>>,
    ) -> ToCoordinator {
        // Key → values, each key's values by map task then in emitted order (the merge of
        // the task engine breaks ties by source the same way).
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
        let reduced = if app.reduces_whole_task() {
            // The sort apps: every record of the task, sorted by key, in one call.
            let mut records = groups
                .iter()
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.as_slice(), v.as_slice())));
            app.reduce_task_stream(&mut records, &mut out)
                .map_err(|e| format!("{e:#}"))
        } else {
            let mut value = Vec::new();
            groups.iter().try_for_each(|(key, values)| {
                value.clear();
                let mut iter = values.iter().map(Vec::as_slice);
                app.reduce(key, &mut iter, &mut value)
                    .map_err(|e| format!("{e:#}"))?;
                out.extend_from_slice(key);
                out.push(b' ');
                out.extend_from_slice(&value);
                out.push(b'\n');
                Ok::<(), String>(())
            })
        };
        if let Err(error) = reduced {
            return ToCoordinator::TaskFailed { attempt, error };
        }
        let records = app.output_records(&out);
        self.reduce_outputs
            .insert((attempt.task, attempt.attempt), out);
        ToCoordinator::TaskDone {
            attempt,
            counters: BTreeMap::from([("reduce.output.records".to_string(), records)]),
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

/// Patterns `grep` runs with (one per seed): words, anchors, a case-insensitive match,
/// non-ASCII letters, and one that matches empty lines.
pub const GREP_PATTERNS: &[&str] = &["fish", "^the ", "(?i)map", "é|ï", "zzz$", "^$", "s\\b"];

/// Pieces the `sort` app's lines are made of: bytes on both sides of every ASCII class, tabs,
/// carriage returns, a UTF-8 letter and a byte that is never UTF-8 (ordered by bytes).
const SORT_PIECES: &[&[u8]] = &[
    b"a",
    b"b",
    b"ab",
    b"B",
    b"Z",
    b" ",
    b"\t",
    b"0",
    b"9",
    b"~",
    b"\r",
    b"shoal",
    b"\xc3\xa9",
    b"\xff",
];

/// Bytes TeraSort keys are drawn from (few, so that keys share long prefixes): the lowest and
/// highest byte, a newline, a space and letters.
const TERASORT_KEY_ALPHABET: &[u8] = &[0x00, b'\n', b' ', b'A', b'B', 0x7f, 0xff];

/// Generates the inputs of one run of `app`: 2 to 4 files.
pub fn generate_inputs(app: MrApp, rng: &mut ChaCha8Rng) -> BTreeMap<String, Vec<u8>> {
    match app {
        MrApp::WordCount | MrApp::Indexer | MrApp::Grep => generate_text(rng),
        MrApp::Sort => generate_sort_lines(rng),
        MrApp::TeraSort => generate_terasort(rng),
    }
}

/// Text: 2 to 4 files of 10 to 60 lines of 0 to 9 words.
fn generate_text(rng: &mut ChaCha8Rng) -> BTreeMap<String, Vec<u8>> {
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

/// Lines to sort: 2 to 4 files of 5 to 60 lines of 0 to 6 [`SORT_PIECES`], one line in six
/// a copy of an earlier one (equal keys), and a file in four without its last newline.
fn generate_sort_lines(rng: &mut ChaCha8Rng) -> BTreeMap<String, Vec<u8>> {
    let files = rng.gen_range(2..=4);
    let mut earlier: Vec<Vec<u8>> = Vec::new();
    (0..files)
        .map(|f| {
            let mut text = Vec::new();
            for _ in 0..rng.gen_range(5..=60) {
                let line = if !earlier.is_empty() && rng.gen_bool(1.0 / 6.0) {
                    earlier[rng.gen_range(0..earlier.len())].clone()
                } else {
                    let pieces = rng.gen_range(0..=6);
                    (0..pieces)
                        .flat_map(|_| SORT_PIECES[rng.gen_range(0..SORT_PIECES.len())].to_vec())
                        .collect()
                };
                text.extend_from_slice(&line);
                text.push(b'\n');
                earlier.push(line);
            }
            if rng.gen_bool(0.25) {
                text.pop();
            }
            (format!("lines-{f}.txt"), text)
        })
        .collect()
}

/// TeraSort records: 2 to 4 files of 2 to 20 records of 100 bytes, keys from
/// [`TERASORT_KEY_ALPHABET`] (one in five a copy of an earlier key: equal keys with different
/// records, whose order must follow the input's), the rest any bytes.
fn generate_terasort(rng: &mut ChaCha8Rng) -> BTreeMap<String, Vec<u8>> {
    let files = rng.gen_range(2..=4);
    let mut keys: Vec<[u8; TERASORT_KEY_BYTES]> = Vec::new();
    (0..files)
        .map(|f| {
            let mut data = Vec::new();
            for _ in 0..rng.gen_range(2..=20) {
                let key = if !keys.is_empty() && rng.gen_bool(0.2) {
                    keys[rng.gen_range(0..keys.len())]
                } else {
                    let mut key = [0u8; TERASORT_KEY_BYTES];
                    for b in &mut key {
                        *b = TERASORT_KEY_ALPHABET[rng.gen_range(0..TERASORT_KEY_ALPHABET.len())];
                    }
                    key
                };
                keys.push(key);
                data.extend_from_slice(&key);
                data.extend((TERASORT_KEY_BYTES..TERASORT_RECORD_BYTES).map(|_| rng.gen::<u8>()));
            }
            (format!("records-{f}.dat"), data)
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

/// Cuts every input into splits of `per_split` records of `record_bytes` (the last split of
/// a file may hold fewer): never a record cut in two.
pub fn plan_record_splits(
    inputs: &BTreeMap<String, Vec<u8>>,
    record_bytes: usize,
    per_split: usize,
) -> Vec<SplitSpec> {
    let step = record_bytes.max(1) * per_split.max(1);
    let mut splits = Vec::new();
    for (name, bytes) in inputs {
        let mut start = 0;
        while start < bytes.len() {
            let end = (start + step).min(bytes.len());
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

/// The splits of `app`'s inputs.
fn plan_app_splits(app: MrApp, inputs: &BTreeMap<String, Vec<u8>>) -> Vec<SplitSpec> {
    match app {
        MrApp::TeraSort => plan_record_splits(inputs, TERASORT_RECORD_BYTES, MR_SPLIT_RECORDS),
        _ => plan_splits(inputs),
    }
}

/// The job's app as `shoal mr coordinator` describes it to workers: `grep` with a pattern
/// drawn from [`GREP_PATTERNS`]; the sort apps with their format and the cut points that
/// `shoal-mr`'s sampler places from the input files (over the job's own splits), before any
/// map runs.
pub fn app_spec(
    app: MrApp,
    rng: &mut ChaCha8Rng,
    inputs: &SharedInputs,
    splits: &[SplitSpec],
    reduces: u32,
) -> Result<AppSpec, String> {
    let mut spec = AppSpec {
        name: app.name().to_string(),
        pattern: None,
        mapper: None,
        reducer: None,
        shipped: Vec::new(),
        sort: None,
    };
    if app == MrApp::Grep {
        spec.pattern = Some(GREP_PATTERNS[rng.gen_range(0..GREP_PATTERNS.len())].to_string());
    }
    if let Some(format) = app.sort_format() {
        let real: Vec<shoal_mr::split::InputSplit> = splits
            .iter()
            .map(|s| shoal_mr::split::InputSplit {
                path: inputs.path(&s.path.to_string_lossy()),
                offset: s.offset,
                len: s.len,
            })
            .collect();
        let partitioner = shoal_mr::apps::sort::sample_cut_points(&real, format, reduces)
            .map_err(|e| format!("sampling the sort's cut points: {e:#}"))?;
        spec.name = "sort".to_string();
        spec.sort = Some(SortSpec {
            format: format.name().to_string(),
            cut_points: partitioner.cuts().to_vec(),
        });
    }
    Ok(spec)
}

/// Builds the app of a job's spec as `shoal mr worker` does (the same conversion to
/// [`AppConfig`] and [`shoal_mr::app::build_app`]). The simulator runs no app that ships
/// files or runs commands.
pub fn app_from_spec(spec: &AppSpec) -> Result<Arc<dyn App>, String> {
    if spec.name == "stream" || !spec.shipped.is_empty() {
        return Err(format!(
            "app `{}`: the simulator runs no external commands or shipped files",
            spec.name
        ));
    }
    let sort = match &spec.sort {
        None => None,
        Some(s) => Some(SortConfig {
            format: SortFormat::parse(&s.format).map_err(|e| format!("{e:#}"))?,
            cut_points: s.cut_points.clone(),
        }),
    };
    let config = AppConfig {
        name: spec.name.clone(),
        pattern: spec.pattern.clone(),
        mapper: None,
        reducer: None,
        shipped: Vec::new(),
        sort,
    };
    shoal_mr::app::build_app(&config, Path::new("."))
        .map_err(|e| format!("cannot build app {}: {e:#}", spec.name))
}

/// `bytes` with every occurrence of `from` removed.
fn remove_all(bytes: &[u8], from: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return bytes.to_vec();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(from) {
            i += from.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The sequential reference: `shoal mr seq`'s engine ([`shoal_mr::seq::run_sequential`]) with
/// `app` (built from the job's spec) on the input files; its output, split by partition with
/// the app's partitioner. The engine names inputs by their paths, the job by their names: the
/// input directory is removed from its output (`grep`'s keys, `indexer`'s lists).
pub fn sequential_reference(
    kind: MrApp,
    app: &dyn App,
    inputs: &SharedInputs,
    reduces: u32,
) -> Result<Vec<Vec<u8>>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("reference: no temporary directory: {e}"))?;
    let paths: Vec<PathBuf> = inputs.files.keys().map(|n| inputs.path(n)).collect();
    let out = dir.path().join("seq-out");
    shoal_mr::seq::run_sequential(app, &paths, &out)
        .map_err(|e| format!("reference: the sequential run failed: {e:#}"))?;
    let mut all = std::fs::read(&out).map_err(|e| format!("reference: reading its output: {e}"))?;
    if kind.sort_format().is_none() {
        let prefix = format!("{}/", inputs.dir().display());
        all = remove_all(&all, prefix.as_bytes());
    }
    let mut parts = vec![Vec::new(); reduces as usize];
    for record in kind.output_records(&all) {
        let key = kind.output_key(kind.record_body(record));
        let r = app.partition(key, reduces) as usize;
        match parts.get_mut(r) {
            Some(part) => part.extend_from_slice(record),
            None => return Err(format!("reference: partition {r} of {reduces}?")),
        }
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
            let at = first_difference(got, want);
            return Err(format!(
                "{name} is visible with {} bytes that differ from the reference's {} bytes of \
                 this partition (a partial or wrong output) from byte {at}: {:?} where the \
                 reference has {:?}",
                got.len(),
                want.len(),
                String::from_utf8_lossy(&got[at..got.len().min(at + 24)]),
                String::from_utf8_lossy(&want[at.min(want.len())..want.len().min(at + 24)])
            ));
        }
    }
    Ok(())
}

/// The offset of the first byte where `a` and `b` differ (the shorter length if one is a
/// prefix of the other).
fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// After every event: no worker failed to build the job's app.
fn check_workers(sim: &Sim<Msg>, workers: &[NodeId]) -> Result<(), String> {
    for &w in workers {
        if let Some(e) = sim.node::<MrWorker>(w).and_then(|w| w.app_error.as_ref()) {
            return Err(format!("{w} could not build the job's app: {e}"));
        }
    }
    Ok(())
}

/// The sort apps' total order: within each output, records by key; across outputs, every key
/// of `mr-out-<i>` below every key of `mr-out-<j>` for `i < j` (equal keys share one output).
pub fn check_total_order(kind: MrApp, outputs: &[Vec<u8>]) -> Result<(), String> {
    let mut last: Option<(usize, &[u8])> = None;
    for (r, bytes) in outputs.iter().enumerate() {
        for record in kind.output_records(bytes) {
            let key = kind.output_key(kind.record_body(record));
            match last {
                Some((lr, lk)) if lr == r && key < lk => {
                    return Err(format!(
                        "mr-out-{r} is not in order: {:?} after {:?}",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(lk)
                    ))
                }
                Some((lr, lk)) if lr < r && key <= lk => {
                    return Err(format!(
                        "the outputs are not in total order: mr-out-{r} holds {:?}, not above \
                         {:?} of mr-out-{lr}",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(lk)
                    ))
                }
                _ => {}
            }
            last = Some((r, key));
        }
    }
    Ok(())
}

/// The mr workload for `seed`, its app chosen by the seed: see the module's documentation.
pub fn run_mr(seed: u64, duration: Duration) -> Report {
    run_mr_with(seed, duration, MrOptions::default())
}

/// The mr workload for `seed` with `options` (an app chosen, or a planted bug).
pub fn run_mr_with(seed: u64, duration: Duration, options: MrOptions) -> Report {
    let kind = options.app.unwrap_or(MrApp::for_seed(seed));
    let mut report = crate::workload::catching(Workload::Mr, seed, duration, || {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d72_7369_6d00);
        let files = generate_inputs(kind, &mut rng);
        let reduces = rng.gen_range(1..=4);
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
            app: Some(kind.name()),
            trace_hash: sim.trace_hash(),
            outcome,
        };
        let inputs = match SharedInputs::write(files) {
            Ok(i) => Arc::new(i),
            Err(e) => return fail(&sim, 0, 0, Err(Failure::new(e))),
        };
        let splits = plan_app_splits(kind, &inputs.files);
        let prepared = app_spec(kind, &mut rng, &inputs, &splits, reduces).and_then(|spec| {
            let app = app_from_spec(&spec)?;
            let expected = sequential_reference(kind, &*app, &inputs, reduces)?;
            Ok((spec, expected))
        });
        let (job_app, expected) = match prepared {
            Ok(p) => p,
            Err(e) => return fail(&sim, 0, 0, Err(Failure::new(e))),
        };
        let config = CoordinatorConfig {
            maps: splits.len() as u32,
            reduces,
            task_timeout: MR_TASK_TIMEOUT,
            max_attempts: MR_MAX_ATTEMPTS,
            backup_tasks: rng.gen_bool(0.5),
        };
        let spec = JobSpec {
            job_id: seed.max(1),
            app: job_app,
            reduces,
            memory_bytes: 1 << 20,
            heartbeat_interval_ms: (MR_TASK_TIMEOUT / 4).as_millis() as u64,
        };
        let sabotage = options.sabotage;
        let coordinator = sim.add_node(move |_| {
            MrCoordinator::new(config.clone(), spec.clone(), splits.clone(), sabotage)
        });
        let workers: Vec<NodeId> = (0..MR_WORKERS)
            .map(|_| {
                let inputs = inputs.clone();
                sim.add_node(move |_| MrWorker::new(inputs.clone()))
            })
            .collect();
        let world = World {
            kind,
            coordinator,
            workers: &workers,
            expected: &expected,
        };
        let mut attempts = 0;
        let outcome = mr_body(&mut sim, &mut rng, &world, duration, &mut attempts);
        // (Counted before the final crash of the coordinator, if the run got that far.)
        if let Some(c) = sim.node::<MrCoordinator>(coordinator) {
            attempts = c.attempts();
        }
        let committed = sim
            .disk(coordinator)
            .map_or(0, |d| d.list_prefix("mr-out-").len() as u64);
        fail(&sim, committed, attempts, outcome)
    });
    report.app = Some(kind.name());
    report
}

/// What the checks of one run know.
struct World<'a> {
    kind: MrApp,
    coordinator: NodeId,
    workers: &'a [NodeId],
    expected: &'a [Vec<u8>],
}

impl World<'_> {
    fn ended(&self, sim: &Sim<Msg>) -> Option<JobEnd> {
        sim.node::<MrCoordinator>(self.coordinator)
            .and_then(|c| c.ended.clone())
    }

    /// Runs for up to `span`, checking the outputs and workers after every event; stops at
    /// once after the event in which the job ended (returns true then).
    fn watch(&self, sim: &mut Sim<Msg>, span: Duration) -> Result<bool, Failure> {
        let mut violation = None;
        let ended = sim.run_until_true(span, |sim| {
            match check_visible_outputs(sim, self.expected)
                .and_then(|()| check_workers(sim, self.workers))
            {
                Ok(()) => self.ended(sim).is_some(),
                Err(e) => {
                    violation = Some(e);
                    true
                }
            }
        });
        match violation {
            Some(v) => Err(sim.failure(v)),
            None => Ok(ended),
        }
    }
}

fn mr_body(
    sim: &mut Sim<Msg>,
    rng: &mut ChaCha8Rng,
    world: &World<'_>,
    duration: Duration,
    attempts: &mut u64,
) -> Result<(), Failure> {
    let (coordinator, workers) = (world.coordinator, world.workers);
    let mut all = vec![coordinator];
    all.extend_from_slice(workers);
    sim.start_nemesis(NemesisConfig {
        crashes: false,
        pauses: false,
        ..NemesisConfig::new(all)
    });
    let end = (sim.now() + duration).as_nanos();
    // Faults until the fault phase is over or the job ended (faults after that test nothing).
    let mut ended = false;
    while sim.now().as_nanos() < end {
        let step = Duration::from_millis(rng.gen_range(50..600));
        ended = world.watch(sim, step)?;
        if ended {
            break;
        }
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
    if !ended {
        sim.heal_all();
        let limit = (sim.now() + MR_SETTLE_LIMIT).as_nanos();
        while !ended {
            if sim.now().as_nanos() >= limit {
                return Err(sim.failure(format!(
                    "the job did not end within {MR_SETTLE_LIMIT:?} after healing"
                )));
            }
            ended = world.watch(sim, Duration::from_millis(200))?;
        }
    }
    // The instant the job ended: no event has run since.
    if let Some(end) = world.ended(sim).filter(|e| *e != JobEnd::Done) {
        return Err(sim.failure(format!("the job failed: {end:?}")));
    }
    let unplaced = sim
        .node::<MrCoordinator>(coordinator)
        .map(|c| c.unplaced_at_done.clone())
        .unwrap_or_default();
    if !unplaced.is_empty() {
        return Err(sim.failure(format!(
            "the job was declared done before the outputs of reduce tasks {unplaced:?} were \
             committed (their rename's directory fsync had not completed)"
        )));
    }
    let Some(disk) = sim.disk(coordinator) else {
        return Err(sim.failure("the coordinator has no disk"));
    };
    let left: Vec<String> = disk
        .list()
        .into_iter()
        .filter(|n| !n.starts_with("mr-out-"))
        .collect();
    if !left.is_empty() {
        return Err(sim.failure(format!("files left in the output directory: {left:?}")));
    }
    if let Some(c) = sim.node::<MrCoordinator>(coordinator) {
        *attempts = c.attempts();
    }
    // "Done" means durable: the coordinator's machine loses power right now.
    let policy = if rng.gen_bool(0.5) {
        CrashPolicy::LoseUnsynced
    } else {
        CrashPolicy::default()
    };
    sim.note(format!(
        "the job is done: crashing the coordinator's disk ({policy:?})"
    ));
    sim.crash_with(coordinator, policy);
    let Some(disk) = sim.disk(coordinator) else {
        return Err(sim.failure("the coordinator has no disk"));
    };
    let mut outputs = Vec::with_capacity(world.expected.len());
    for (r, want) in world.expected.iter().enumerate() {
        let name = out_name(r as u32);
        match disk.data(&name) {
            Ok(got) if got == want.as_slice() => outputs.push(got.to_vec()),
            Ok(got) => {
                return Err(sim.failure(format!(
                    "{name} is not durable when the job is done: after a crash of the \
                     coordinator's disk ({policy:?}) it holds {} bytes, the reference {} \
                     (the sequential reference's partition {r})",
                    got.len(),
                    want.len()
                )))
            }
            Err(e) => {
                return Err(sim.failure(format!(
                    "{name} is not durable when the job is done: gone after a crash of the \
                     coordinator's disk ({policy:?}): {e}"
                )))
            }
        }
    }
    if world.kind.sort_format().is_some() {
        check_total_order(world.kind, &outputs).map_err(|e| sim.failure(e))?;
    }
    Ok(())
}
