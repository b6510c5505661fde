//! The simulator's driver of a [`Replica`]: the same pipeline as the tokio driver's, with every
//! wait turned into an event of the deterministic simulator, so that a crash can land between
//! any two steps.
//!
//! * The fsync of a `Ready` completes after a simulated latency (a timer): a crash before it
//!   loses or tears the unsynced writes, and nothing that depends on them was sent or applied.
//! * A snapshot job runs as two later events, as the tokio driver's thread does: *prepare*
//!   (serialize, write and fsync the temporary file) and *install* (rename it into place, drop
//!   the log). Crashes land before the prepare, between prepare and install, and after.
//!
//! A simulated node owns a [`SimPipeline`] next to its replica, calls [`SimPipeline::drive`]
//! after feeding the replica anything, and hands its timers with a pipeline token to
//! [`SimPipeline::on_timer`]. Tokens at or above [`TOKEN_BASE`] are the pipeline's.

use std::time::Duration;

use shoal_raft::{Message, Ready};
use shoal_sim::rand::Rng;
use shoal_sim::Ctx;
use shoal_storage::PreparedSnapshot;

use crate::{Error, Replica, SnapshotData, SnapshotJob, StateMachine, Unsynced};

/// Timer tokens from here up belong to the pipeline; a node's own timers stay below.
pub const TOKEN_BASE: u64 = 1 << 60;
const TOKEN_SYNC: u64 = TOKEN_BASE;
const TOKEN_PREPARE: u64 = TOKEN_BASE + 1;
const TOKEN_INSTALL: u64 = TOKEN_BASE + 2;

/// Simulated fsync latency of a `Ready`'s writes, in microseconds (exclusive upper bound).
const SYNC_LATENCY_US: std::ops::Range<u64> = 200..2_000;
/// Simulated time to serialize and write a snapshot off the loop, in microseconds.
const PREPARE_LATENCY_US: std::ops::Range<u64> = 1_000..20_000;
/// Simulated delay between a prepared snapshot and its install on the loop, in microseconds.
const INSTALL_LATENCY_US: std::ops::Range<u64> = 100..2_000;

/// Where the snapshot pipeline of a node stands (for tests that crash at every step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStage {
    /// No job.
    Idle,
    /// A job was handed out; its file is not written yet.
    Preparing,
    /// Its file is written and fsynced under a temporary name; not installed yet.
    Prepared,
}

/// What a simulation may want to watch (invariant checkers): called by the pipeline at the
/// moments the corresponding state changes.
pub trait Observer {
    /// The writes of `ready` (a received snapshot, entries, hard state) were just made, not
    /// yet durable. `leader_term`: the term this node leads, if it does.
    fn written(&mut self, ctx_node: shoal_sim::NodeId, leader_term: Option<u64>, ready: &Ready) {
        let _ = (ctx_node, leader_term, ready);
    }
    /// `ready`'s writes are durable and its committed entries are about to be applied, while
    /// the node's term is `term`; entries at or below `applied` (the replica's applied index,
    /// or the index of the snapshot `ready` restores if higher) are skipped.
    fn applying(&mut self, ctx_node: shoal_sim::NodeId, term: u64, applied: u64, ready: &Ready) {
        let _ = (ctx_node, term, applied, ready);
    }
    /// The node's own snapshot at `index` (of `term`) was installed and the log before it
    /// dropped.
    fn compacted(&mut self, ctx_node: shoal_sim::NodeId, index: u64, term: u64) {
        let _ = (ctx_node, index, term);
    }
}

/// An observer that watches nothing.
#[derive(Debug, Default)]
pub struct NoObserver;
impl Observer for NoObserver {}

enum Job<D> {
    Idle,
    Preparing(SnapshotJob<D>),
    Prepared(Result<PreparedSnapshot, shoal_storage::Error>),
}

/// The driver state of one simulated replica: the `Ready` waiting for its fsync and the
/// snapshot job in flight. Lost with the node when it crashes, as a process's memory is.
pub struct SimPipeline<D, M> {
    syncing: Option<Unsynced>,
    job: Job<D>,
    /// How a Raft message travels: (destination node, the simulation's message). A closure,
    /// so that a node can route by a directory of its own (a replica group's peers).
    route: Box<dyn Fn(Message) -> (shoal_sim::NodeId, M)>,
    observer: Box<dyn Observer>,
}

impl<D: SnapshotData, M: shoal_sim::Message> SimPipeline<D, M> {
    /// A pipeline sending Raft messages through `route`.
    pub fn new(route: impl Fn(Message) -> (shoal_sim::NodeId, M) + 'static) -> Self {
        SimPipeline {
            syncing: None,
            job: Job::Idle,
            route: Box::new(route),
            observer: Box::new(NoObserver),
        }
    }

    /// Watches the pipeline with `observer`.
    pub fn with_observer(mut self, observer: Box<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Where the snapshot pipeline stands.
    pub fn snapshot_stage(&self) -> SnapshotStage {
        match self.job {
            Job::Idle => SnapshotStage::Idle,
            Job::Preparing(_) => SnapshotStage::Preparing,
            Job::Prepared(_) => SnapshotStage::Prepared,
        }
    }

    /// Whether a `Ready` waits for its fsync.
    pub fn syncing(&self) -> bool {
        self.syncing.is_some()
    }

    fn send(&self, ctx: &mut Ctx<'_, M>, messages: Vec<Message>) {
        for m in messages {
            let (to, msg) = (self.route)(m);
            ctx.send(to, msg);
        }
    }

    /// Carries out the replica's next `Ready` up to its fsync: writes, sends what promises
    /// nothing, and sets the fsync's timer. Does nothing while a `Ready` waits for its fsync
    /// (the next is taken when it completes).
    pub fn drive<SM>(
        &mut self,
        ctx: &mut Ctx<'_, M>,
        replica: &mut Replica<SM, impl Sized>,
    ) -> Result<(), Error>
    where
        SM: StateMachine<Snapshot = D>,
    {
        if self.syncing.is_some() {
            return Ok(());
        }
        let Some(mut unsynced) = replica.write_ready(ctx.disk())? else {
            return Ok(());
        };
        let status = replica.status();
        let leader_term = (status.role == shoal_raft::Role::Leader).then_some(status.term.0);
        self.observer
            .written(ctx.id(), leader_term, &unsynced.ready);
        let messages = std::mem::take(&mut unsynced.messages);
        self.send(ctx, messages);
        self.syncing = Some(unsynced);
        let latency = Duration::from_micros(ctx.rng().gen_range(SYNC_LATENCY_US));
        ctx.set_timer(latency, TOKEN_SYNC);
        Ok(())
    }

    /// A timer fired. Returns `Ok(false)` if `token` is not the pipeline's (the node's own).
    pub fn on_timer<SM>(
        &mut self,
        ctx: &mut Ctx<'_, M>,
        replica: &mut Replica<SM, impl Sized>,
        token: u64,
    ) -> Result<bool, Error>
    where
        SM: StateMachine<Snapshot = D>,
    {
        match token {
            TOKEN_SYNC => {
                let Some(unsynced) = self.syncing.take() else {
                    return Ok(true);
                };
                replica.sync(ctx.disk())?;
                let term = replica.raw().term().0;
                let applied = unsynced
                    .ready
                    .snapshot
                    .as_ref()
                    .map_or(replica.applied().0, |s| {
                        replica.applied().0.max(s.meta.index.0)
                    });
                self.observer
                    .applying(ctx.id(), term, applied, &unsynced.ready);
                let synced = replica.on_synced(ctx.disk(), unsynced)?;
                self.send(ctx, synced.messages);
                if let Some(job) = synced.snapshot {
                    self.job = Job::Preparing(job);
                    let latency = Duration::from_micros(ctx.rng().gen_range(PREPARE_LATENCY_US));
                    ctx.set_timer(latency, TOKEN_PREPARE);
                }
            }
            TOKEN_PREPARE => {
                if let Job::Preparing(job) = std::mem::replace(&mut self.job, Job::Idle) {
                    // The tokio driver prepares on a thread with its own handle on the
                    // directory; here on the node's disk, in one event.
                    self.job = Job::Prepared(job.prepare(ctx.disk()));
                    let latency = Duration::from_micros(ctx.rng().gen_range(INSTALL_LATENCY_US));
                    ctx.set_timer(latency, TOKEN_INSTALL);
                }
            }
            TOKEN_INSTALL => {
                if let Job::Prepared(prepared) = std::mem::replace(&mut self.job, Job::Idle) {
                    let meta = prepared
                        .as_ref()
                        .ok()
                        .map(|p| (p.meta().index.0, p.meta().term.0));
                    let installed = replica.install_snapshot(ctx.disk(), prepared)?;
                    if let (Some(_), Some((index, term))) = (installed, meta) {
                        self.observer.compacted(ctx.id(), index, term);
                    }
                }
            }
            _ => return Ok(false),
        }
        self.drive(ctx, replica)?;
        Ok(true)
    }
}
