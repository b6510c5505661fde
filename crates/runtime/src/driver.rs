//! The tokio driver of a replica shell ([`shoal_replica::Replica`]): the one loop that both the
//! generic [`crate::node`] and the KV server ([`crate::kv::server`]) run.
//!
//! One task owns the service (and through it the replica). It waits for a tick, a peer
//! message, an event of the service (a command, a client request) or a finished snapshot,
//! takes whatever else is already waiting (up to [`MAX_EVENTS_PER_READY`], so that many
//! proposals and appends share one fsync), then carries out every `Ready` through the shell:
//! `write_ready`, send, `sync` (the durability barrier), `on_synced`, send the persisted
//! messages, start a snapshot job on a thread of its own if the shell handed one out. The
//! contract of a `Ready` is on `shoal_raft::Ready`.
//!
//! Snapshot jobs are serialized and written on a thread at a lower priority with its own
//! handle on the data directory; the loop only installs the prepared file (a rename and a
//! directory fsync) and frees the dropped log elsewhere. Serializing and writing tens of
//! megabytes in the loop used to stall every request for 100–200 ms.
//!
//! A storage error, or a committed entry or snapshot the state machine cannot use, stops the
//! loop with an error (one policy, the shell's).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use shoal_raft::{Message, MessageBody, NodeId};
use shoal_replica::{Replica, SnapshotData, SnapshotJob, StateMachine};
use shoal_storage::{PreparedSnapshot, StdDisk};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::metrics::GroupMetrics;
use crate::snapshot_stream::SnapshotEvent;
use crate::transport::{Inbound, Transport};

/// Default tick of every Shoal server: the wall-clock length of one Raft tick.
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_millis(25);
/// Peer messages and service events taken per wake-up before the `Ready` is carried out, so
/// that many requests and appends share one fsync.
pub const MAX_EVENTS_PER_READY: usize = 256;

/// What a service puts around its replica on the tokio driver.
pub(crate) trait Service: Send + 'static {
    /// The state machine the replica hosts.
    type Machine: StateMachine + Send + 'static;
    /// Who waits for a proposal or a read.
    type Tag: Send + 'static;
    /// What the service's own producers (handles, client connections) send the loop.
    type Event: Send + 'static;

    /// The replica.
    fn replica(&mut self) -> &mut Replica<Self::Machine, Self::Tag>;
    /// One tick of the clock (the replica's, and the service's own duties).
    fn tick(&mut self);
    /// The group label of this replica's metrics (0: the KV database's one group).
    fn metrics_group(&self) -> u64 {
        0
    }
    /// A message from peer `from` (proved by the transport's handshake).
    fn step(&mut self, from: u64, msg: Message) {
        let me = self.replica().status().id;
        // A message claiming another sender or addressed to another node is forged or
        // misrouted.
        if msg.from.0 != from || msg.to != me {
            warn!(conn_peer = from, msg_from = %msg.from, msg_to = %msg.to,
                kind = msg.body.name(), "dropping a message with a wrong sender or receiver");
            return;
        }
        let kind = msg.body.name();
        if let Err(e) = self.replica().step(msg) {
            debug!(from, kind, error = %e, "core refused a message");
        }
    }
    /// One event of the service. `false`: stop the loop.
    fn event(&mut self, event: Self::Event) -> bool;
    /// After the Readies of a wake-up: answer whoever the replica decided.
    fn answer(&mut self);
    /// The loop stops: tell everyone still waiting, and whoever sent `events` not yet taken.
    fn stop(&mut self, events: &mut mpsc::Receiver<Self::Event>);
    /// After the Readies of a wake-up: the peers (id → address) if they changed since last
    /// asked (a membership change), for the transport. `None`: unchanged.
    fn peers_changed(&mut self) -> Option<std::collections::BTreeMap<u64, std::net::SocketAddr>> {
        None
    }
}

type Prepared = Result<PreparedSnapshot, shoal_storage::Error>;

/// The loop's state besides the service.
pub(crate) struct Driver<S: Service> {
    pub(crate) service: S,
    pub(crate) disk: StdDisk,
    pub(crate) data_dir: PathBuf,
    pub(crate) transport: Transport<Message>,
    pub(crate) tick_interval: Duration,
}

enum Wake<E> {
    Tick,
    Peer(u64, Message),
    Event(E),
    SnapshotWritten(Prepared),
    SnapshotStream(SnapshotEvent),
    Stop,
}

impl<S: Service> Driver<S>
where
    <S::Machine as StateMachine>::Snapshot: SnapshotData,
{
    /// Runs until `shutdown` completes, an event says stop, the transport closes, or a fatal
    /// error.
    pub(crate) async fn run(
        mut self,
        mut inbound: Inbound<Message>,
        mut events: mpsc::Receiver<S::Event>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), shoal_replica::Error> {
        // The ticker is the driver's only clock: Raft sees time only as ticks. A tick the loop
        // was too busy to take is taken late, never twice.
        let mut ticker = tokio::time::interval(self.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (snapshot_tx, mut snapshots) = mpsc::channel::<Prepared>(1);
        let mut metrics = GroupMetrics::new(self.service.metrics_group());
        // Snapshots streamed to and from this node (None once another driver took them).
        let mut streamed = self.transport.take_snapshot_events();
        tokio::pin!(shutdown);
        let result = loop {
            let wake = tokio::select! {
                _ = ticker.tick() => Wake::Tick,
                m = inbound.recv() => match m {
                    Some((from, msg)) => Wake::Peer(from, msg),
                    None => Wake::Stop,
                },
                e = events.recv() => match e {
                    Some(e) => Wake::Event(e),
                    None => Wake::Stop,
                },
                Some(s) = snapshots.recv() => Wake::SnapshotWritten(s),
                Some(ev) = next_streamed(&mut streamed) => Wake::SnapshotStream(ev),
                _ = &mut shutdown => Wake::Stop,
            };
            let mut stop = match self.wake(wake, &metrics) {
                Ok(go_on) => !go_on,
                Err(e) => break Err(e),
            };
            let mut taken = 1u64;
            // Take whatever else is already waiting, so that it shares one Ready (and fsync).
            for _ in 0..MAX_EVENTS_PER_READY {
                if stop {
                    break;
                }
                let wake = if let Ok((from, msg)) = inbound.try_recv() {
                    Wake::Peer(from, msg)
                } else if let Ok(e) = events.try_recv() {
                    Wake::Event(e)
                } else {
                    break;
                };
                // Peer messages and service events never fail.
                stop = matches!(self.wake(wake, &metrics), Ok(false));
                taken += 1;
            }
            metrics.ready_events.observe(taken as f64);
            if let Err(e) = self.process_ready(&snapshot_tx, &metrics) {
                break Err(e);
            }
            // A received snapshot Raft did not install (stale) is removed.
            let (replica, disk) = (self.service.replica(), &mut self.disk);
            if let Err(e) = replica.discard_received_snapshot(disk) {
                break Err(e);
            }
            metrics.observe(self.service.replica());
            self.service.answer();
            self.update_peers();
            if stop {
                break Ok(());
            }
        };
        self.service.stop(&mut events);
        self.transport.shutdown();
        result
    }

    /// Gives the transport the service's peers if they changed (a membership change).
    fn update_peers(&mut self) {
        if let Some(peers) = self.service.peers_changed() {
            if peers != self.transport.peers() {
                info!(peers = ?peers, "peers changed");
                self.transport.set_peers(&peers);
            }
        }
    }

    /// Feeds one wake-up to the service. `Ok(false)`: stop.
    fn wake(
        &mut self,
        wake: Wake<S::Event>,
        metrics: &GroupMetrics,
    ) -> Result<bool, shoal_replica::Error> {
        match wake {
            Wake::Tick => self.service.tick(),
            Wake::Peer(from, msg) => self.service.step(from, msg),
            Wake::Event(e) => return Ok(self.service.event(e)),
            Wake::SnapshotWritten(prepared) => self.install(prepared, metrics)?,
            Wake::SnapshotStream(SnapshotEvent::Received {
                from,
                message,
                file,
            }) => {
                // Stage the received file: if Raft installs the snapshot, the storage renames
                // it into place (see `snapshot_stream`).
                if let MessageBody::InstallSnapshot { snapshot } = &message.body {
                    let meta = snapshot.meta.clone();
                    let (replica, disk) = (self.service.replica(), &mut self.disk);
                    in_place(|| replica.stage_received_snapshot(disk, file, meta))?;
                }
                self.service.step(from, message)
            }
            Wake::SnapshotStream(SnapshotEvent::SendFailed { to, reason }) => {
                info!(to, %reason, "snapshot failed; reported to Raft");
                self.service
                    .replica()
                    .raw_mut()
                    .report_snapshot_failed(NodeId(to));
            }
            Wake::SnapshotStream(SnapshotEvent::Sent { to, bytes }) => {
                debug!(
                    to,
                    bytes, "snapshot delivered; Raft hears of it from the follower"
                );
            }
            Wake::Stop => return Ok(false),
        }
        Ok(true)
    }

    /// Carries out every `Ready` the replica has.
    fn process_ready(
        &mut self,
        snapshot_tx: &mpsc::Sender<Prepared>,
        metrics: &GroupMetrics,
    ) -> Result<(), shoal_replica::Error> {
        loop {
            // A membership change in this round: reach a new member with this Ready's sends.
            self.update_peers();
            let replica = self.service.replica();
            let Some(mut unsynced) = replica.take_ready() else {
                return Ok(());
            };
            let (disk, transport) = (&mut self.disk, &self.transport);
            if let Some(soft) = unsynced.soft_state() {
                let term = replica.raw().term();
                info!(role = %crate::ready::role_text(soft.role),
                    leader = %crate::ready::leader_text(soft.leader), term = term.0,
                    "role changed");
            }
            // Messages that promise nothing unpersisted go first: a leader's appends travel
            // while it writes and fsyncs its own copy.
            for m in std::mem::take(&mut unsynced.messages) {
                send(transport, m);
            }
            // Write and fsync with the worker thread handed over (writes of tens of kilobytes
            // fault pages in; the fsync waits for the disk); a Ready with nothing to persist
            // skips the hand-over, which costs a wake-up of another worker.
            if unsynced.needs_sync() {
                metrics.ready_entries.observe(unsynced.entries() as f64);
                let started = tokio::time::Instant::now();
                in_place(|| {
                    replica.write(disk, &unsynced)?;
                    replica.sync(disk)
                })?;
                metrics.wal_fsync.observe(started.elapsed().as_secs_f64());
            }
            let synced = replica.on_synced(disk, unsynced)?;
            for m in synced.messages {
                send(transport, m);
            }
            if let Some(job) = synced.snapshot {
                self.start_snapshot(job, snapshot_tx, metrics);
            }
        }
    }

    /// Serializes and writes a snapshot on a thread of its own, with its own handle on the
    /// data directory; the result comes back as a wake-up.
    fn start_snapshot(
        &mut self,
        job: SnapshotJob<<S::Machine as StateMachine>::Snapshot>,
        tx: &mpsc::Sender<Prepared>,
        metrics: &GroupMetrics,
    ) {
        let index = job.index();
        info!(index = index.0, "snapshot started");
        let dir = self.data_dir.clone();
        let tx = tx.clone();
        let (count, bytes, duration) = (
            metrics.snapshots.clone(),
            metrics.snapshot_bytes.clone(),
            metrics.snapshot_duration.clone(),
        );
        let work = move || {
            lower_this_threads_priority();
            let started = tokio::time::Instant::now();
            let result = StdDisk::new(&dir)
                .map_err(shoal_storage::Error::Disk)
                .and_then(|mut disk| job.prepare(&mut disk));
            if let Ok(prepared) = &result {
                count.inc();
                bytes.observe(prepared.data_bytes() as f64);
                duration.observe(started.elapsed().as_secs_f64());
            }
            // The server may have stopped meanwhile; the temporary file is removed at open.
            let _ = tx.blocking_send(result);
        };
        // A thread of its own (not the blocking pool), because it lowers its own priority.
        let spawned = std::thread::Builder::new()
            .name("shoal-snapshot".into())
            .spawn(work);
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the snapshot thread; snapshot skipped");
            self.service.replica().abandon_snapshot();
        }
    }

    /// Installs a snapshot written off the loop (a rename and a directory fsync).
    fn install(
        &mut self,
        prepared: Prepared,
        metrics: &GroupMetrics,
    ) -> Result<(), shoal_replica::Error> {
        let index = prepared.as_ref().ok().map(|p| p.meta().index);
        let (replica, disk) = (self.service.replica(), &mut self.disk);
        match in_place(|| replica.install_snapshot(disk, prepared))? {
            Some(dropped) => {
                metrics.snapshots_installed.inc();
                info!(
                    index = index.map_or(0, |i| i.0),
                    entries = dropped.len(),
                    "snapshot written, log compacted"
                );
                // Freeing a few hundred thousand entries takes milliseconds: not in the loop.
                tokio::task::spawn_blocking(move || drop(dropped));
            }
            None => debug!("snapshot written but superseded by a newer one: discarded"),
        }
        Ok(())
    }
}

/// Runs blocking disk work. On a multi-threaded runtime the worker thread is handed over for
/// the duration, so the transport's and the connections' tasks keep running during an fsync.
pub(crate) fn in_place<T>(op: impl FnOnce() -> T) -> T {
    let multi_thread = matches!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    if multi_thread {
        tokio::task::block_in_place(op)
    } else {
        op()
    }
}

/// The next event of the snapshot stream, or never if there is none to take.
async fn next_streamed(
    events: &mut Option<mpsc::Receiver<SnapshotEvent>>,
) -> Option<SnapshotEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands a message of the core to the transport: a snapshot to its own stream (read from the
/// snapshot file, beside the peer connection), everything else to the peer's queue.
fn send(transport: &Transport<Message>, m: Message) {
    if matches!(m.body, MessageBody::InstallSnapshot { .. }) && transport.streams_snapshots() {
        transport.send_snapshot(m);
        return;
    }
    let to = m.to.0;
    if let Err(e) = transport.send(to, m) {
        warn!(error = %e, "core addressed a message to an unknown server");
    }
}

/// Gives the calling thread a lower CPU priority (nice +10), so that serializing a snapshot
/// (tens of milliseconds of CPU on every server at about the same moment) yields to the
/// loops that answer requests instead of competing with them on a small machine. Best
/// effort: on failure the thread keeps its priority.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id, no memory is passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, 10) != 0 {
            debug!("could not lower the snapshot thread's priority");
        }
    }
}
