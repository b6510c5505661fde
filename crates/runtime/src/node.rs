//! The Raft node driver: one [`RawNode`] on tokio, with the TCP [`Transport`], durable storage
//! on a real directory ([`DurableStorage`] over [`StdDisk`]) and a ticker.
//!
//! The driver is one task that owns the `RawNode`. It waits for a tick, a peer message or a
//! command from a [`NodeHandle`], feeds it to the node, then carries out every `Ready` in the
//! order of DESIGN.md §4:
//!
//! 1. send `messages` (they promise nothing unpersisted);
//! 2. persist the received snapshot, the entries and the hard state, then fsync once;
//! 3. send `persisted_messages` (votes, append acknowledgements: they promise step 2);
//! 4. restore the state machine from the snapshot, apply committed entries, answer proposals;
//! 5. persist our own snapshot (`compact`) and drop the log before it;
//! 6. answer safe reads; 7. `advance`.
//!
//! Durability is a barrier: `persisted_messages` are sent, and committed entries applied, only
//! after the fsync that covers them returned.
//! A storage error stops the node (a failed fsync leaves the file in an unknown state, so
//! retrying it could lie about durability).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shoal_raft::{
    Config as RaftConfig, EntryKind, LogIndex, Message, NodeId, RawNode, Ready, Role, Snapshot,
    Status, Storage as _, Term,
};
use shoal_storage::{DurableStorage, StdDisk, StorageConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn, Instrument};

use crate::transport::{ClientAcceptor, Inbound, Transport, TransportConfig, TransportError};

/// Default [`NodeConfig::tick_interval`]: the wall-clock length of one Raft tick.
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_millis(50);
/// Default [`NodeConfig::command_queue_len`]: requests from handles waiting for the driver.
pub const DEFAULT_COMMAND_QUEUE_LEN: usize = 1024;
/// Default [`NodeConfig::max_pending_proposals`]: proposals waiting to be applied.
pub const DEFAULT_MAX_PENDING_PROPOSALS: usize = 10_000;
/// Default [`NodeConfig::max_pending_reads`]: read-index requests waiting to be safe.
pub const DEFAULT_MAX_PENDING_READS: usize = 10_000;
/// Default [`NodeConfig::read_timeout_ticks`]: a read-index request not answered within this
/// many ticks (its forwarded request or a heartbeat was lost) fails, so none waits forever.
pub const DEFAULT_READ_TIMEOUT_TICKS: u64 = 100;
/// Default [`NodeConfig::snapshot_every`]: applied entries between two snapshots.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10_000;
/// Peer messages stepped (and commands taken) per wake-up before the `Ready` is handled, so
/// that many proposals or appends share one fsync.
pub const MAX_EVENTS_PER_READY: usize = 256;

/// The replicated state machine the driver applies committed entries to.
///
/// It runs inside the driver task: keep `apply` short. To query it from elsewhere, share its
/// state (e.g. behind a mutex) between the implementation and the querying code.
pub trait StateMachine: Send + 'static {
    /// Applies the command committed at `index` (called once per index, in order, from
    /// `snapshot index + 1` on after every start).
    fn apply(&mut self, index: LogIndex, command: &[u8]);
    /// The state as of the last applied index, for a snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the whole state with a snapshot's (`data` from [`StateMachine::snapshot`] of
    /// some node). An error stops the node: the snapshot is durable but unusable.
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String>;
}

/// Configuration of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node.
    pub id: NodeId,
    /// The cluster; recorded in the data directory and checked in every handshake.
    pub cluster_id: u64,
    /// Every voter's id and address, this node included.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Directory of this node's log, hard state and snapshot.
    pub data_dir: PathBuf,
    /// Wall-clock length of one Raft tick.
    pub tick_interval: Duration,
    /// Election timeout in ticks (randomized by the core in `[election_tick, 2 * election_tick)`).
    pub election_tick: u32,
    /// Heartbeat interval in ticks.
    pub heartbeat_tick: u32,
    /// Requests from handles buffered for the driver.
    pub command_queue_len: usize,
    /// Proposals waiting to be applied; more are refused.
    pub max_pending_proposals: usize,
    /// Read-index requests waiting; more are refused.
    pub max_pending_reads: usize,
    /// Ticks after which an unanswered read-index request fails with [`ProposeError::Busy`].
    pub read_timeout_ticks: u64,
    /// Take a snapshot (and compact the log) after this many applied entries; `None`: never.
    pub snapshot_every: Option<u64>,
    /// Limits of the transport (its ids, cluster and peers are taken from this config).
    pub transport: TransportConfig,
}

impl NodeConfig {
    /// A configuration with every limit at its default.
    pub fn new(
        id: NodeId,
        cluster_id: u64,
        peers: BTreeMap<u64, SocketAddr>,
        data_dir: PathBuf,
    ) -> NodeConfig {
        NodeConfig {
            id,
            cluster_id,
            transport: TransportConfig::new(id.0, cluster_id, peers.clone()),
            peers,
            data_dir,
            tick_interval: DEFAULT_TICK_INTERVAL,
            election_tick: shoal_raft::DEFAULT_ELECTION_TICK,
            heartbeat_tick: shoal_raft::DEFAULT_HEARTBEAT_TICK,
            command_queue_len: DEFAULT_COMMAND_QUEUE_LEN,
            max_pending_proposals: DEFAULT_MAX_PENDING_PROPOSALS,
            max_pending_reads: DEFAULT_MAX_PENDING_READS,
            read_timeout_ticks: DEFAULT_READ_TIMEOUT_TICKS,
            snapshot_every: Some(DEFAULT_SNAPSHOT_EVERY),
        }
    }
}

/// Errors of a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The durable storage failed or refused to open (wrong node or cluster, corruption).
    #[error("storage in {dir}")]
    Storage {
        /// The data directory.
        dir: String,
        /// The cause.
        #[source]
        source: shoal_storage::Error,
    },
    /// The data directory cannot be used at all: another process holds it, or it is not a
    /// Shoal data directory (the message names the directory).
    #[error(transparent)]
    DataDir(shoal_storage::Error),
    /// The Raft core refused its configuration or state.
    #[error("raft: {0}")]
    Raft(#[from] shoal_raft::Error),
    /// The transport failed to start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The configuration is unusable.
    #[error("invalid node config: {0}")]
    InvalidConfig(String),
    /// The driver task panicked (a bug).
    #[error("node driver panicked: {0}")]
    DriverPanicked(String),
    /// The state machine could not restore a snapshot.
    #[error("state machine refused the snapshot at {index}: {reason}")]
    Restore {
        /// The snapshot's index.
        index: LogIndex,
        /// Why.
        reason: String,
    },
}

/// Why a proposal or read was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; ask `leader` if known.
    #[error("not the leader (leader: {})", crate::ready::leader_text(*.leader))]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// The proposal was accepted but another leader overwrote its log slot: it will never
    /// apply. The client may retry.
    #[error("proposal at {index} lost to a new leader")]
    Lost {
        /// The slot it had.
        index: LogIndex,
    },
    /// A limit was reached or the core refused; retry later.
    #[error("busy: {0}")]
    Busy(String),
    /// The node stopped.
    #[error("node stopped")]
    Stopped,
}

/// Where a proposal landed in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposed {
    /// Its index.
    pub index: LogIndex,
    /// The leader's term when it was appended.
    pub term: Term,
}

type Reply<T> = oneshot::Sender<Result<T, ProposeError>>;

enum Command {
    Propose {
        data: Vec<u8>,
        wait_applied: bool,
        reply: Reply<Proposed>,
    },
    ReadIndex {
        reply: Reply<LogIndex>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Shutdown,
}

/// A cloneable handle to a running node.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
}

impl NodeHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Appends `data` to the leader's log and returns its slot at once (not yet committed).
    pub async fn propose(&self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        self.call(|reply| Command::Propose {
            data,
            wait_applied: false,
            reply,
        })
        .await
    }

    /// Like [`NodeHandle::propose`], but returns once this node applied the entry (so it is
    /// committed, hence durable on a majority). Never returns if this node is cut off before
    /// it learns the outcome: callers bound it with a timeout.
    pub async fn propose_and_wait(&self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        self.call(|reply| Command::Propose {
            data,
            wait_applied: true,
            reply,
        })
        .await
    }

    /// A linearizable read point (thesis §6.4): returns an index that this node has applied
    /// and that covers every write acknowledged before the call. A follower forwards the
    /// request to its leader; fails after `read_timeout_ticks` if no answer comes.
    pub async fn read_index(&self) -> Result<LogIndex, ProposeError> {
        self.call(|reply| Command::ReadIndex { reply }).await
    }

    /// The node's Raft status.
    pub async fn status(&self) -> Result<Status, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Status { reply: tx })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)
    }

    /// Asks the node to stop after the `Ready` in progress; see [`Node::wait`].
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }
}

/// A running node: its handle, the client connections its listener accepted, and its task.
pub struct Node {
    /// Handle for proposals, reads and status.
    pub handle: NodeHandle,
    clients: Option<ClientAcceptor>,
    task: Option<JoinHandle<Result<(), NodeError>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

impl Node {
    /// Opens the data directory (refusing one of another node or cluster), restores the state
    /// machine from the latest snapshot, starts the transport on `listener` and the driver.
    pub async fn start<SM: StateMachine>(
        config: NodeConfig,
        listener: TcpListener,
        mut state_machine: SM,
    ) -> Result<Node, NodeError> {
        if !config.peers.contains_key(&config.id.0) {
            return Err(NodeError::InvalidConfig(format!(
                "node {} is not in the peer list",
                config.id
            )));
        }
        if config.tick_interval.is_zero() {
            return Err(NodeError::InvalidConfig(
                "tick_interval must be positive".into(),
            ));
        }
        let dir = config.data_dir.display().to_string();
        let storage_err = |source| NodeError::Storage {
            dir: dir.clone(),
            source,
        };
        let mut disk = StdDisk::new(&config.data_dir)
            .map_err(|e| storage_err(shoal_storage::Error::Disk(e)))?;
        // The open takes the directory's lock, held by `disk` (kept by the driver).
        let storage = DurableStorage::open(
            &mut disk,
            config.cluster_id,
            config.id.0,
            StorageConfig::default(),
        )
        .map_err(|e| {
            if e.is_about_directory() {
                NodeError::DataDir(e)
            } else {
                storage_err(e)
            }
        })?;
        let snapshot = storage.snapshot().map_err(shoal_raft::Error::from)?;
        if snapshot.meta.index > LogIndex(0) {
            state_machine
                .restore(&snapshot)
                .map_err(|reason| NodeError::Restore {
                    index: snapshot.meta.index,
                    reason,
                })?;
        }
        let mut raft_config = RaftConfig::new(
            config.id,
            config.peers.keys().copied().map(NodeId).collect(),
        );
        raft_config.election_tick = config.election_tick;
        raft_config.heartbeat_tick = config.heartbeat_tick;
        raft_config.applied = snapshot.meta.index;
        raft_config.rng_seed = crate::ready::election_seed(config.id.0);
        let raw = RawNode::new(raft_config, storage)?;
        let status = raw.status();
        info!(node = %config.id, term = %status.term, commit = %status.commit,
            last_index = %status.last_index, snapshot = %snapshot.meta.index, "node restored");

        let mut tc = config.transport.clone();
        tc.node_id = config.id.0;
        tc.cluster_id = config.cluster_id;
        tc.peers = config.peers.clone();
        let (transport, inbound, clients) = Transport::start(tc, listener)?;
        let (tx, rx) = mpsc::channel(config.command_queue_len.max(1));
        let span = tracing::info_span!("node", node = %config.id);
        let driver = NodeDriver {
            config,
            raw,
            disk,
            transport,
            state_machine,
            commands: rx,
            pending_proposals: BTreeMap::new(),
            pending_reads: BTreeMap::new(),
            ticks: 0,
            next_read_id: 0,
            applied: snapshot.meta.index,
        };
        let task = tokio::spawn(driver.run(inbound).instrument(span));
        Ok(Node {
            handle: NodeHandle { commands: tx },
            clients: Some(clients),
            task: Some(task),
        })
    }

    /// Takes the stream of client connections accepted on the node's listener (once).
    pub fn take_clients(&mut self) -> Option<ClientAcceptor> {
        self.clients.take()
    }

    /// Waits for the driver to stop (after [`NodeHandle::shutdown`] or a fatal error). Returns
    /// `Ok(())` at once if it was already waited for. Cancel-safe.
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let result = task.await;
        self.task = None;
        match result {
            Ok(r) => r,
            Err(e) => Err(NodeError::DriverPanicked(e.to_string())),
        }
    }
}

/// The driver loop's state (see the module docs). Each `Ready` is carried out in this order:
///
/// 1. send `messages` (they promise nothing unpersisted);
/// 2. persist the received `snapshot`, `entries` and `hard_state`, then fsync (group commit:
///    one sync covers everything written by this `Ready`);
/// 3. send `persisted_messages` (votes, append acknowledgements: they promise step 2);
/// 4. restore the state machine from the snapshot, apply `committed_entries` in order and
///    answer the proposals waiting for them;
/// 5. persist `compact` (our own snapshot) and drop the log before it;
/// 6. answer `read_states`;
/// 7. `advance`, then maybe ask the core for a new snapshot.
struct NodeDriver<SM> {
    config: NodeConfig,
    raw: RawNode<DurableStorage>,
    disk: StdDisk,
    transport: Transport<Message>,
    state_machine: SM,
    commands: mpsc::Receiver<Command>,
    /// Proposals waiting to be applied: index → (term it was appended in, reply).
    pending_proposals: BTreeMap<LogIndex, (Term, Reply<Proposed>)>,
    /// Read-index requests in flight: context id → (tick issued at, reply). Ids grow with
    /// time, so the first entry is the oldest.
    pending_reads: BTreeMap<u64, (u64, Reply<LogIndex>)>,
    /// Ticks since start.
    ticks: u64,
    next_read_id: u64,
    /// Last index applied to the state machine.
    applied: LogIndex,
}

enum Event {
    Tick,
    Peer(u64, Message),
    Command(Command),
    Stop,
}

impl<SM: StateMachine> NodeDriver<SM> {
    async fn run(mut self, mut inbound: Inbound<Message>) -> Result<(), NodeError> {
        // The ticker is the driver's only clock: Raft sees time only as ticks.
        let mut ticker = tokio::time::interval(self.config.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let event = tokio::select! {
                _ = ticker.tick() => Event::Tick,
                m = inbound.recv() => match m {
                    Some((from, msg)) => Event::Peer(from, msg),
                    None => Event::Stop,
                },
                c = self.commands.recv() => match c {
                    Some(c) => Event::Command(c),
                    None => Event::Stop,
                },
            };
            if !self.handle(event) {
                break Ok(());
            }
            // Take whatever else is already waiting, so that it shares one Ready (and fsync).
            let mut stop = false;
            for _ in 0..MAX_EVENTS_PER_READY {
                let event = match inbound.try_recv() {
                    Ok((from, msg)) => Event::Peer(from, msg),
                    Err(_) => match self.commands.try_recv() {
                        Ok(c) => Event::Command(c),
                        Err(_) => break,
                    },
                };
                if !self.handle(event) {
                    stop = true;
                    break;
                }
            }
            if let Err(e) = self.process_ready() {
                break Err(e);
            }
            if stop {
                break Ok(());
            }
        };
        match &result {
            Ok(()) => info!("node stopped"),
            Err(e) => {
                error!(error = %crate::ready::error_chain(e), "node stopped on a fatal error")
            }
        }
        self.fail_pending();
        self.transport.shutdown();
        result
    }

    /// Feeds one event to the core. Returns false to stop.
    fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Tick => {
                self.raw.tick();
                self.ticks += 1;
                self.expire_reads();
            }
            Event::Peer(from, msg) => self.step(from, msg),
            Event::Command(Command::Shutdown) | Event::Stop => return false,
            Event::Command(c) => self.command(c),
        }
        true
    }

    fn step(&mut self, from: u64, msg: Message) {
        // The handshake proved `from`; a message claiming another sender or addressed to
        // another node is forged or misrouted.
        if msg.from.0 != from || msg.to != self.config.id {
            warn!(conn_peer = from, msg_from = %msg.from, msg_to = %msg.to,
                kind = msg.body.name(), "dropping a message with a wrong sender or receiver");
            return;
        }
        let kind = msg.body.name();
        if let Err(e) = self.raw.step(msg) {
            debug!(from, kind, error = %e, "core refused a message");
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Propose {
                data,
                wait_applied,
                reply,
            } => {
                if wait_applied && self.pending_proposals.len() >= self.config.max_pending_proposals
                {
                    // Forget waiters whose caller gave up before refusing a new one.
                    self.pending_proposals
                        .retain(|_, (_, reply)| !reply.is_closed());
                }
                if wait_applied && self.pending_proposals.len() >= self.config.max_pending_proposals
                {
                    let _ =
                        reply.send(Err(ProposeError::Busy("too many proposals waiting".into())));
                    return;
                }
                match self.raw.propose(data) {
                    Ok(index) => {
                        let proposed = Proposed {
                            index,
                            term: self.raw.status().term,
                        };
                        if wait_applied {
                            self.pending_proposals.insert(index, (proposed.term, reply));
                        } else {
                            let _ = reply.send(Ok(proposed));
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(propose_error(e)));
                    }
                }
            }
            Command::ReadIndex { reply } => {
                if self.pending_reads.len() >= self.config.max_pending_reads {
                    let _ = reply.send(Err(ProposeError::Busy("too many reads waiting".into())));
                    return;
                }
                let id = self.next_read_id;
                self.next_read_id += 1;
                match self.raw.read_index(id.to_le_bytes().to_vec()) {
                    Ok(()) => {
                        self.pending_reads.insert(id, (self.ticks, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(propose_error(e)));
                    }
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(self.raw.status());
            }
            Command::Shutdown => {}
        }
    }

    fn process_ready(&mut self) -> Result<(), NodeError> {
        while self.raw.has_ready() {
            let rd = self.raw.ready();
            self.carry_out(rd)?;
            self.raw.advance();
            self.maybe_snapshot();
        }
        Ok(())
    }

    fn carry_out(&mut self, mut rd: Ready) -> Result<(), NodeError> {
        if let Some(soft) = rd.soft_state {
            let term = self.raw.status().term;
            info!(role = %crate::ready::role_text(soft.role), leader = %crate::ready::leader_text(soft.leader), %term,
                "role changed");
            if soft.role != Role::Leader {
                // Reads in flight were issued to us as leader; they will never complete.
                for (_, (_, reply)) in std::mem::take(&mut self.pending_reads) {
                    let _ = reply.send(Err(ProposeError::NotLeader {
                        leader: soft.leader,
                    }));
                }
            }
        }
        // 1. Messages that promise nothing unpersisted.
        for m in std::mem::take(&mut rd.messages) {
            self.send(m);
        }
        // 2. Persist, then one fsync.
        self.persist(&rd)?;
        // 3. Messages that promise what step 2 made durable.
        for m in std::mem::take(&mut rd.persisted_messages) {
            self.send(m);
        }
        // 4. Apply.
        if let Some(snapshot) = &rd.snapshot {
            self.state_machine
                .restore(snapshot)
                .map_err(|reason| NodeError::Restore {
                    index: snapshot.meta.index,
                    reason,
                })?;
            self.applied = snapshot.meta.index;
            self.resolve_proposals_up_to(snapshot.meta.index, None);
        }
        for e in &rd.committed_entries {
            debug_assert_eq!(e.index, self.applied.next(), "entries apply in order");
            if e.kind == EntryKind::Normal {
                self.state_machine.apply(e.index, &e.data);
            }
            self.applied = e.index;
            self.resolve_proposals_up_to(e.index, Some(e.term));
        }
        // 5. Our own snapshot: persist it and compact the log.
        if let Some(snapshot) = rd.compact.take() {
            let index = snapshot.meta.index;
            let (storage, disk) = (self.raw.storage_mut(), &mut self.disk);
            crate::ready::in_place(|| storage.compact(disk, snapshot))
                .map_err(|e| self.storage_error(e))?;
            debug!(%index, "log compacted");
        }
        // 6. Reads that are now safe.
        for read in rd.read_states.drain(..) {
            let Ok(bytes) = <[u8; 8]>::try_from(read.context.as_slice()) else {
                continue;
            };
            if let Some((_, reply)) = self.pending_reads.remove(&u64::from_le_bytes(bytes)) {
                let _ = reply.send(Ok(read.index));
            }
        }
        Ok(())
    }

    fn persist(&mut self, rd: &Ready) -> Result<(), NodeError> {
        let result = crate::ready::persist_ready(self.raw.storage_mut(), &mut self.disk, rd);
        result.map_err(|e| self.storage_error(e))
    }

    fn storage_error(&self, source: shoal_storage::Error) -> NodeError {
        NodeError::Storage {
            dir: self.config.data_dir.display().to_string(),
            source,
        }
    }

    fn send(&mut self, m: Message) {
        crate::ready::send(&self.transport, m);
    }

    /// Answers the waiting proposals at or below `index`: applied if the entry there has the
    /// term they were appended in, lost otherwise.
    fn resolve_proposals_up_to(&mut self, index: LogIndex, term: Option<Term>) {
        while let Some(entry) = self.pending_proposals.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (at, (proposed_term, reply)) = entry.remove_entry();
            let result = if at == index && term == Some(proposed_term) {
                Ok(Proposed {
                    index: at,
                    term: proposed_term,
                })
            } else {
                // Replaced by entries of another leader, or skipped by a snapshot (which cannot
                // say whether our entry is inside it): report it lost; clients retry
                // idempotently (request ids, DESIGN.md §3).
                Err(ProposeError::Lost { index: at })
            };
            let _ = reply.send(result);
        }
    }

    /// Fails the read-index requests older than `read_timeout_ticks`.
    fn expire_reads(&mut self) {
        while let Some(entry) = self.pending_reads.first_entry() {
            if entry.get().0.saturating_add(self.config.read_timeout_ticks) > self.ticks {
                break;
            }
            let (_, reply) = entry.remove();
            let _ = reply.send(Err(ProposeError::Busy("read timed out".into())));
        }
    }

    fn maybe_snapshot(&mut self) {
        let Some(every) = self.config.snapshot_every else {
            return;
        };
        let first = self.raw.status().first_index;
        if self.applied.0 >= first.0.saturating_add(every) {
            let data = self.state_machine.snapshot();
            match self.raw.snapshot(self.applied, data) {
                Ok(()) => debug!(index = %self.applied, "snapshot requested"),
                Err(e) => debug!(error = %e, "snapshot refused"),
            }
        }
    }

    fn fail_pending(&mut self) {
        for (_, (_, reply)) in std::mem::take(&mut self.pending_proposals) {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
        for (_, (_, reply)) in std::mem::take(&mut self.pending_reads) {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::Propose { reply, .. } => {
                    let _ = reply.send(Err(ProposeError::Stopped));
                }
                Command::ReadIndex { reply } => {
                    let _ = reply.send(Err(ProposeError::Stopped));
                }
                Command::Status { .. } | Command::Shutdown => {}
            }
        }
    }
}

fn propose_error(e: shoal_raft::Error) -> ProposeError {
    match e {
        shoal_raft::Error::NotLeader { leader } => ProposeError::NotLeader { leader },
        other => ProposeError::Busy(other.to_string()),
    }
}
