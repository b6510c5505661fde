//! The generic Raft node: any [`StateMachine`] hosted by the replica shell
//! ([`shoal_replica::Replica`]) on the tokio replica driver (the crate-private `driver`
//! module, `driver.rs`), with the TCP [`Transport`], durable storage on a real directory and a
//! ticker. Callers use a [`NodeHandle`]: propose, read-index, status, shutdown.
//!
//! The shell carries out every `Ready` (the contract, with its durability barrier, is stated
//! once on `shoal_raft::Ready`); this module adds only the handles' commands and their
//! answers. One error policy, the shell's: a storage error stops the node (a failed fsync
//! leaves the file in an unknown state, so retrying it could lie about durability), and so
//! does a stored or received snapshot the state machine cannot restore.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shoal_raft::{ConfChangeStep, LogIndex, Membership, NodeId, Status, Term};
use shoal_replica::{ConfChangeDone, Done, ReadFailure, Replica, ReplicaConfig, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, Instrument};

use crate::driver::{Driver, Service};
use crate::serving::{open_replica, OpenError, Opened};
use crate::transport::{ClientAcceptor, Transport, TransportConfig, TransportError};

/// Default [`NodeConfig::tick_interval`]: every Shoal server's tick.
pub use crate::driver::{DEFAULT_TICK_INTERVAL, MAX_EVENTS_PER_READY};
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
    /// some node, taken at `index`). An error stops the node: the snapshot is durable but
    /// unusable.
    fn restore(&mut self, index: LogIndex, data: &[u8]) -> Result<(), String>;
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
    /// Raft committed an entry the replica cannot use, or the replica failed otherwise.
    #[error(transparent)]
    Replica(shoal_replica::Error),
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
    /// Raft refused a membership change: `ConfChangeInFlight` and `LearnerBehind` (retry
    /// later), `InvalidConfChange` (the message says why).
    #[error("{0}")]
    ConfChange(shoal_raft::Error),
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
    ConfChange {
        steps: Vec<ConfChangeStep>,
        reply: Reply<Membership>,
    },
    Shutdown,
}

/// A cloneable handle to a running node.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    snapshot_progress: crate::snapshot_stream::SnapshotProgress,
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

    /// Proposes a membership change on the leader and returns the membership once the change
    /// is committed (and any joint configuration it entered was left). Raft's refusals come
    /// back as [`ProposeError::ConfChange`]; losing leadership first as
    /// [`ProposeError::NotLeader`] (the change may or may not take effect: ask the new leader's
    /// status).
    pub async fn conf_change(
        &self,
        steps: Vec<ConfChangeStep>,
    ) -> Result<Membership, ProposeError> {
        self.call(|reply| Command::ConfChange { steps, reply })
            .await
    }

    /// The snapshot sends under way from this node (bytes the follower acknowledged of the
    /// total, per follower), read without going through the node's loop.
    pub fn snapshot_sends(&self) -> Vec<crate::snapshot_stream::SnapshotSendStatus> {
        self.snapshot_progress.sends()
    }

    /// The snapshot stream's counters of this node (sends, receipts, refusals).
    pub fn snapshot_stats(&self) -> &crate::snapshot_stream::SnapshotStreamStats {
        self.snapshot_progress.stats()
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
        state_machine: SM,
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
        let Opened {
            disk,
            storage,
            raft: raft_config,
        } = open_replica(
            &config.data_dir,
            config.cluster_id,
            config.id.0,
            config.peers.keys().copied(),
            config.election_tick,
            config.heartbeat_tick,
        )
        .map_err(|e| match e {
            OpenError::DataDir(e) => NodeError::DataDir(e),
            OpenError::Storage(source) => storage_err(source),
        })?;
        let replica_config = ReplicaConfig {
            snapshot: SnapshotPolicy {
                log_bytes: None,
                entries: config.snapshot_every,
            },
            read_timeout_ticks: Some(config.read_timeout_ticks),
            fail_proposals_on_leadership_loss: false,
        };
        let replica = Replica::new(raft_config, storage, Hosted(state_machine), replica_config)
            .map_err(|e| match e {
                shoal_replica::Error::Storage(source) => storage_err(source),
                other => node_error(other),
            })?;
        let status = replica.status();
        info!(node = %config.id, term = %status.term, commit = %status.commit,
            last_index = %status.last_index, snapshot = %replica.applied(), "node restored");

        let mut tc = config.transport.clone();
        tc.node_id = config.id.0;
        tc.cluster_id = config.cluster_id;
        tc.peers = config.peers.clone();
        tc.snapshot.dir = Some(config.data_dir.clone());
        let (transport, inbound, clients) = Transport::start(tc, listener)?;
        let snapshot_progress = transport.snapshot_progress();
        let (tx, rx) = mpsc::channel(config.command_queue_len.max(1));
        let span = tracing::info_span!("node", node = %config.id);
        let driver = Driver {
            service: NodeService {
                replica,
                max_pending_proposals: config.max_pending_proposals,
                max_pending_reads: config.max_pending_reads,
            },
            disk,
            data_dir: config.data_dir.clone(),
            transport,
            tick_interval: config.tick_interval,
        };
        let data_dir = config.data_dir.display().to_string();
        let task = tokio::spawn(
            async move {
                let result = driver
                    .run(inbound, rx, std::future::pending())
                    .await
                    .map_err(|e| match e {
                        shoal_replica::Error::Storage(source) => NodeError::Storage {
                            dir: data_dir,
                            source,
                        },
                        other => node_error(other),
                    });
                match &result {
                    Ok(()) => info!("node stopped"),
                    Err(e) => {
                        error!(error = %crate::ready::error_chain(e), "node stopped on a fatal error")
                    }
                }
                result
            }
            .instrument(span),
        );
        Ok(Node {
            handle: NodeHandle {
                commands: tx,
                snapshot_progress,
            },
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

/// Who waits for the node: a proposal's, a read's or a membership change's reply.
enum Waiting {
    Proposal(Reply<Proposed>),
    Read(Reply<LogIndex>),
    ConfChange(Reply<Membership>),
}

impl Waiting {
    fn is_closed(&self) -> bool {
        match self {
            Waiting::Proposal(r) => r.is_closed(),
            Waiting::Read(r) => r.is_closed(),
            Waiting::ConfChange(r) => r.is_closed(),
        }
    }

    fn fail(self, e: ProposeError) {
        match self {
            Waiting::Proposal(r) => {
                let _ = r.send(Err(e));
            }
            Waiting::Read(r) => {
                let _ = r.send(Err(e));
            }
            Waiting::ConfChange(r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

/// A [`StateMachine`] as the replica shell hosts it.
struct Hosted<SM>(SM);

impl<SM: StateMachine> shoal_replica::StateMachine for Hosted<SM> {
    type Output = ();
    type Snapshot = Vec<u8>;

    fn apply(&mut self, index: LogIndex, command: &[u8]) -> Result<Option<()>, String> {
        self.0.apply(index, command);
        Ok(Some(()))
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.snapshot()
    }

    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> Result<(), String> {
        // This trait's machines restore from bytes (tests, demos, the Raft benchmark).
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes)
            .map_err(|e| format!("reading the snapshot: {e}"))?;
        self.0.restore(index, &bytes)
    }
}

/// The generic node as a service of the replica driver: commands from handles.
struct NodeService<SM: StateMachine> {
    replica: Replica<Hosted<SM>, Waiting>,
    max_pending_proposals: usize,
    max_pending_reads: usize,
}

impl<SM: StateMachine> Service for NodeService<SM> {
    type Machine = Hosted<SM>;
    type Tag = Waiting;
    type Event = Command;

    fn replica(&mut self) -> &mut Replica<Hosted<SM>, Waiting> {
        &mut self.replica
    }

    fn tick(&mut self) {
        self.replica.tick();
    }

    fn event(&mut self, command: Command) -> bool {
        match command {
            Command::Propose {
                data,
                wait_applied,
                reply,
            } => {
                if !wait_applied {
                    let term = self.replica.raw().term();
                    let result = self
                        .replica
                        .propose_untracked(data)
                        .map(|index| Proposed { index, term })
                        .map_err(propose_error);
                    let _ = reply.send(result);
                    return true;
                }
                if self.replica.pending_proposals() >= self.max_pending_proposals {
                    // Forget waiters whose caller gave up before refusing a new one.
                    self.replica.forget_proposals(Waiting::is_closed);
                }
                if self.replica.pending_proposals() >= self.max_pending_proposals {
                    let _ =
                        reply.send(Err(ProposeError::Busy("too many proposals waiting".into())));
                    return true;
                }
                if let Err((e, waiting)) = self.replica.propose(data, Waiting::Proposal(reply)) {
                    waiting.fail(propose_error(e));
                }
            }
            Command::ReadIndex { reply } => {
                if self.replica.pending_reads() >= self.max_pending_reads {
                    let _ = reply.send(Err(ProposeError::Busy("too many reads waiting".into())));
                    return true;
                }
                if let Err((e, waiting)) = self.replica.read(Waiting::Read(reply)) {
                    waiting.fail(propose_error(e));
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(self.replica.status());
            }
            Command::ConfChange { steps, reply } => {
                let waiting = Waiting::ConfChange(reply);
                if let Err((e, waiting)) = self.replica.propose_conf_change(steps, waiting) {
                    waiting.fail(match e {
                        shoal_raft::Error::NotLeader { leader } => {
                            ProposeError::NotLeader { leader }
                        }
                        other => ProposeError::ConfChange(other),
                    });
                }
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn answer(&mut self) {
        for done in self.replica.take_conf_done() {
            match done {
                ConfChangeDone::Committed {
                    tag, membership, ..
                } => {
                    if let Waiting::ConfChange(r) = tag {
                        let _ = r.send(Ok(membership));
                    }
                }
                ConfChangeDone::NotLeader { tag, leader } => {
                    tag.fail(ProposeError::NotLeader { leader })
                }
            }
        }
        for done in self.replica.take_done() {
            match done {
                Done::Applied {
                    tag, index, term, ..
                } => {
                    if let Waiting::Proposal(r) = tag {
                        let _ = r.send(Ok(Proposed { index, term }));
                    }
                }
                // Replaced by entries of another leader, or skipped by a snapshot (which cannot
                // say whether our entry is inside it): lost; clients retry idempotently.
                Done::Lost { tag, index } => tag.fail(ProposeError::Lost { index }),
                Done::ReadReady { tag, index } => {
                    if let Waiting::Read(r) = tag {
                        let _ = r.send(Ok(index));
                    }
                }
                Done::ReadFailed { tag, reason } => tag.fail(match reason {
                    ReadFailure::NotLeader { leader } => ProposeError::NotLeader { leader },
                    ReadFailure::TimedOut => ProposeError::Busy("read timed out".into()),
                }),
            }
        }
    }

    fn stop(&mut self, commands: &mut mpsc::Receiver<Command>) {
        for waiting in self.replica.drain_waiting() {
            waiting.fail(ProposeError::Stopped);
        }
        {
            commands.close();
            while let Ok(c) = commands.try_recv() {
                match c {
                    Command::Propose { reply, .. } => {
                        let _ = reply.send(Err(ProposeError::Stopped));
                    }
                    Command::ReadIndex { reply } => {
                        let _ = reply.send(Err(ProposeError::Stopped));
                    }
                    Command::ConfChange { reply, .. } => {
                        let _ = reply.send(Err(ProposeError::Stopped));
                    }
                    Command::Status { .. } | Command::Shutdown => {}
                }
            }
        }
    }
}

/// A fatal error of the replica other than storage: an unusable snapshot or entry.
fn node_error(e: shoal_replica::Error) -> NodeError {
    match e {
        shoal_replica::Error::Unusable {
            what: "snapshot",
            index,
            reason,
        } => NodeError::Restore {
            index: LogIndex(index),
            reason,
        },
        shoal_replica::Error::Raft(e) => NodeError::Raft(e),
        other => NodeError::Replica(other),
    }
}

fn propose_error(e: shoal_raft::Error) -> ProposeError {
    match e {
        shoal_raft::Error::NotLeader { leader } => ProposeError::NotLeader { leader },
        other => ProposeError::Busy(other.to_string()),
    }
}
