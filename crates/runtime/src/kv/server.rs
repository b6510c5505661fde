//! The KV server driver: one [`KvRsm`] on tokio, with the TCP [`Transport`] for peers, client
//! connections handed over by the same listener, durable storage in a real directory and a
//! ticker.
//!
//! One task owns the `KvRsm`. It waits for a tick, a peer message, a new client connection or
//! a client request, feeds it to the state machine, then carries out every `Ready` in the order
//! `docs/kv.md` prescribes ("What a driver does"), the same order as the simulator's driver:
//!
//! 1. send `messages` (they promise nothing unpersisted);
//! 2. persist the received snapshot, the entries and the hard state, then fsync once;
//! 3. send `persisted_messages` (votes, append acknowledgements: they promise step 2);
//! 4. `apply` (restore, apply committed entries, serve safe reads);
//! 5. (`compact` stays empty: this driver makes its own snapshots off the loop, below);
//! 6. `advance`, then maybe start a snapshot;
//! 7. send the replies to their connections.
//!
//! A reply to a write is therefore only sent after the entry was committed, which needs it
//! fsynced on a majority. A storage error stops the server.
//!
//! Our own snapshots are made off the loop: the state machine hands out an O(1) copy of the
//! store ([`shoal_kv::SnapshotJob`]), a thread of its own at a lower priority serializes it
//! and writes and fsyncs it under a temporary name, and the loop then only renames it into place and drops the
//! log before it ([`DurableStorage::install_prepared`]), between two Readies. Serializing and
//! writing tens of megabytes in the loop used to stall every request for 100–200 ms.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use shoal_kv::{KvRsm, RsmConfig, SnapshotJob};
use shoal_raft::{Config as RaftConfig, Message, NodeId, Ready};
use shoal_storage::{DurableStorage, PreparedSnapshot, StdDisk, StorageConfig};
use shoal_wire::kv::{KvReply, KvRequest};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn, Instrument};

use crate::transport::{
    send_queued, ClientConnection, Inbound, Transport, TransportConfig, TransportError,
};

/// Default [`KvServerConfig::tick_interval`]: the wall-clock length of one Raft tick.
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_millis(25);
/// Default [`KvServerConfig::max_client_connections`].
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: usize = 1024;
/// Requests from all client connections waiting for the driver; a connection whose request
/// does not fit waits (TCP backpressure).
pub const CLIENT_REQUEST_QUEUE_LEN: usize = 4096;
/// Replies queued per client connection; a client that does not read its replies loses the
/// newest (it retries). Large enough for a multiplexing client's many requests in flight.
pub const CLIENT_REPLY_QUEUE_LEN: usize = 4096;
/// Client requests waiting for an answer in the state machine; a request beyond it is dropped
/// as a lossy network would (its client resends), so a client that pipelines without limit
/// cannot grow the server's memory.
pub const MAX_PENDING_REQUESTS: usize = 10_000;
/// Events handled per wake-up before the `Ready` is carried out, so that many requests and
/// appends share one fsync.
pub const MAX_EVENTS_PER_READY: usize = 256;
/// Ticks between two measurements of the live log's size (for snapshots).
pub const SNAPSHOT_CHECK_TICKS: u64 = 4;

/// Everything one KV server is started with.
#[derive(Debug, Clone)]
pub struct KvServerConfig {
    /// This server's id (a key of `peers`).
    pub id: u64,
    /// The cluster; recorded in the data directory and checked in every handshake.
    pub cluster_id: u64,
    /// Every server of the cluster, this one included: id → address.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Data directory (log, hard state, snapshot, identity).
    pub data_dir: PathBuf,
    /// Wall-clock length of one Raft tick.
    pub tick_interval: Duration,
    /// Election timeout in ticks (randomized in `[election_tick, 2 * election_tick)`).
    pub election_tick: u32,
    /// Heartbeat interval in ticks.
    pub heartbeat_tick: u32,
    /// Snapshot threshold and store limits.
    pub rsm: RsmConfig,
    /// Client connections served at once; more are closed at once.
    pub max_client_connections: usize,
    /// Transport limits (its ids, cluster and peers are taken from this config).
    pub transport: TransportConfig,
}

impl KvServerConfig {
    /// A configuration with every limit at its default.
    pub fn new(
        id: u64,
        cluster_id: u64,
        peers: BTreeMap<u64, SocketAddr>,
        data_dir: PathBuf,
    ) -> KvServerConfig {
        KvServerConfig {
            id,
            cluster_id,
            transport: TransportConfig {
                service: shoal_wire::KV_SERVICE.to_string(),
                ..TransportConfig::new(id, cluster_id, peers.clone())
            },
            peers,
            data_dir,
            tick_interval: DEFAULT_TICK_INTERVAL,
            election_tick: shoal_raft::DEFAULT_ELECTION_TICK,
            heartbeat_tick: shoal_raft::DEFAULT_HEARTBEAT_TICK,
            rsm: RsmConfig::default(),
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
        }
    }
}

/// Errors of a KV server.
#[derive(Debug, thiserror::Error)]
pub enum KvServerError {
    /// The durable storage failed or refused to open (another node's or cluster's directory,
    /// corruption).
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
    /// The replicated state machine refused its state (for example an unreadable snapshot).
    #[error("kv state machine: {0}")]
    Kv(#[from] shoal_kv::Error),
    /// Raft committed a snapshot or entry the state machine cannot use (it does not decode):
    /// the server stops rather than diverge from the others.
    #[error("state machine in {dir} (move the directory aside: the server then re-syncs from the others)")]
    StateMachine {
        /// The data directory.
        dir: String,
        /// The cause.
        #[source]
        source: shoal_kv::Error,
    },
    /// The transport failed to start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The configuration is unusable.
    #[error("invalid server config: {0}")]
    InvalidConfig(String),
}

/// What a client connection's task tells the driver.
enum ClientEvent {
    Request(u64, KvRequest),
    Closed(u64),
}

/// Runs one KV server on `listener` until `shutdown` completes or a fatal error (storage).
///
/// Opens the data directory first: a directory of another node or cluster is refused with
/// [`KvServerError::Storage`] before anything is served.
pub async fn run_server(
    config: KvServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), KvServerError> {
    if !config.peers.contains_key(&config.id) {
        return Err(KvServerError::InvalidConfig(format!(
            "server {} is not in the peer list",
            config.id
        )));
    }
    if config.tick_interval.is_zero() || config.max_client_connections == 0 {
        return Err(KvServerError::InvalidConfig(
            "tick interval and connection limit must be positive".into(),
        ));
    }
    let dir = config.data_dir.display().to_string();
    let storage_err = |source| KvServerError::Storage {
        dir: dir.clone(),
        source,
    };
    let mut disk =
        StdDisk::new(&config.data_dir).map_err(|e| storage_err(shoal_storage::Error::Disk(e)))?;
    // The open takes the directory's lock, held by `disk` (kept by the driver) until we exit.
    let storage = DurableStorage::open(
        &mut disk,
        config.cluster_id,
        config.id,
        StorageConfig::default(),
    )
    .map_err(|e| {
        if e.is_about_directory() {
            KvServerError::DataDir(e)
        } else {
            storage_err(e)
        }
    })?;
    let mut raft = RaftConfig::new(
        NodeId(config.id),
        config.peers.keys().copied().map(NodeId).collect(),
    );
    raft.election_tick = config.election_tick;
    raft.heartbeat_tick = config.heartbeat_tick;
    raft.rng_seed = crate::ready::election_seed(config.id);
    // The lease clock counts ticks: one tick is one tick interval of wall time. A tick the
    // loop was too busy to take is taken late (`MissedTickBehavior::Delay`), so the lease
    // clock can only run slow: a lease then lives a little longer, never shorter.
    let mut rsm_config = config.rsm;
    rsm_config.tick_ms = u64::try_from(config.tick_interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let rsm = KvRsm::new(raft, storage, rsm_config)?;
    let status = rsm.raw().status();
    info!(node = config.id, term = %status.term, commit = %status.commit,
        applied = %rsm.applied(), "kv server restored");

    let mut tc = config.transport.clone();
    tc.node_id = config.id;
    tc.cluster_id = config.cluster_id;
    tc.peers = config.peers.clone();
    let (transport, inbound, clients) = Transport::<Message>::start(tc, listener)?;
    let (events_tx, events) = mpsc::channel(CLIENT_REQUEST_QUEUE_LEN);
    let (snapshot_tx, snapshot_rx) = mpsc::channel(1);
    let span = tracing::info_span!("kv", node = config.id);
    let driver = Driver {
        config,
        rsm,
        disk,
        transport,
        connections: BTreeMap::new(),
        next_token: 1,
        events_tx,
        ticks: 0,
        last_snapshot_check: 0,
        snapshot_running: false,
        snapshot_tx,
    };
    driver
        .run(inbound, clients, events, snapshot_rx, shutdown)
        .instrument(span)
        .await
}

enum Event {
    Tick,
    Peer(u64, Message),
    Accepted(ClientConnection),
    Client(ClientEvent),
    /// A snapshot made off the loop is durable under a temporary name (or failed).
    SnapshotWritten(Result<PreparedSnapshot, shoal_storage::Error>),
    Stop,
}

struct Driver {
    config: KvServerConfig,
    rsm: KvRsm<DurableStorage>,
    disk: StdDisk,
    transport: Transport<Message>,
    /// Open client connections: token → their reply queue.
    connections: BTreeMap<u64, mpsc::Sender<KvReply>>,
    next_token: u64,
    events_tx: mpsc::Sender<ClientEvent>,
    /// Ticks since start.
    ticks: u64,
    /// Tick of the last measurement of the Raft state's size.
    last_snapshot_check: u64,
    /// A snapshot is being made off the loop (one at a time).
    snapshot_running: bool,
    /// Where the snapshot thread sends its result.
    snapshot_tx: mpsc::Sender<Result<PreparedSnapshot, shoal_storage::Error>>,
}

impl Driver {
    async fn run(
        mut self,
        mut inbound: Inbound<Message>,
        mut clients: mpsc::Receiver<ClientConnection>,
        mut events: mpsc::Receiver<ClientEvent>,
        mut snapshots: mpsc::Receiver<Result<PreparedSnapshot, shoal_storage::Error>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), KvServerError> {
        let mut ticker = tokio::time::interval(self.config.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let result = loop {
            let event = tokio::select! {
                _ = ticker.tick() => Event::Tick,
                m = inbound.recv() => match m {
                    Some((from, msg)) => Event::Peer(from, msg),
                    None => Event::Stop,
                },
                c = clients.recv() => match c {
                    Some(c) => Event::Accepted(c),
                    None => Event::Stop,
                },
                e = events.recv() => match e {
                    Some(e) => Event::Client(e),
                    None => Event::Stop,
                },
                Some(s) = snapshots.recv() => Event::SnapshotWritten(s),
                _ = &mut shutdown => Event::Stop,
            };
            match self.handle(event) {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
            // Take whatever else is already waiting, so that it shares one Ready (and fsync).
            for _ in 0..MAX_EVENTS_PER_READY {
                let event = if let Ok((from, msg)) = inbound.try_recv() {
                    Event::Peer(from, msg)
                } else if let Ok(e) = events.try_recv() {
                    Event::Client(e)
                } else {
                    break;
                };
                // Peer messages and client events neither stop the server nor fail.
                let _ = self.handle(event);
            }
            if let Err(e) = self.process_ready() {
                break Err(e);
            }
            self.flush_replies();
        };
        match &result {
            Ok(()) => info!("kv server stopped"),
            Err(e) => {
                error!(error = %crate::ready::error_chain(e), "kv server stopped on a fatal error")
            }
        }
        result
    }

    /// Feeds one event to the state machine. `Ok(false)`: stop; an error (a snapshot written
    /// off the loop that failed or cannot be installed) is fatal.
    fn handle(&mut self, event: Event) -> Result<bool, KvServerError> {
        match event {
            Event::Tick => {
                self.rsm.tick();
                self.ticks += 1;
            }
            Event::Peer(from, msg) => {
                // The handshake proved `from`; a message claiming another sender or addressed
                // to another server is forged or misrouted.
                if msg.from.0 != from || msg.to.0 != self.config.id {
                    warn!(conn_peer = from, msg_from = %msg.from, msg_to = %msg.to,
                        "dropping a message with a wrong sender or receiver");
                } else {
                    self.rsm.step(msg);
                }
            }
            Event::Accepted(conn) => self.accept(conn),
            Event::SnapshotWritten(result) => self.install_snapshot(result)?,
            Event::Client(ClientEvent::Request(token, request)) => {
                if !self.connections.contains_key(&token) {
                    // The connection closed: nobody would read the answer.
                } else if self.rsm.pending() >= MAX_PENDING_REQUESTS {
                    debug!(
                        token,
                        limit = MAX_PENDING_REQUESTS,
                        "dropping a request: too many pending"
                    );
                } else {
                    self.rsm.handle_request(token, request);
                }
            }
            Event::Client(ClientEvent::Closed(token)) => {
                self.connections.remove(&token);
            }
            Event::Stop => return Ok(false),
        }
        Ok(true)
    }

    fn accept(&mut self, conn: ClientConnection) {
        let remote = conn.peer_addr;
        if self.connections.len() >= self.config.max_client_connections {
            warn!(%remote, limit = self.config.max_client_connections,
                "refusing a client connection: too many");
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        let (reply_tx, reply_rx) = mpsc::channel(CLIENT_REPLY_QUEUE_LEN);
        self.connections.insert(token, reply_tx);
        let events = self.events_tx.clone();
        let span = tracing::debug_span!("client", %remote, token);
        tokio::spawn(serve_client(conn, token, events, reply_rx).instrument(span));
    }

    fn process_ready(&mut self) -> Result<(), KvServerError> {
        while let Some(rd) = self.rsm.ready() {
            self.carry_out(rd)?;
        }
        Ok(())
    }

    fn carry_out(&mut self, mut rd: Ready) -> Result<(), KvServerError> {
        if let Some(soft) = rd.soft_state {
            let term = self.rsm.raw().status().term;
            info!(role = %crate::ready::role_text(soft.role), leader = %crate::ready::leader_text(soft.leader), term = term.0,
                "role changed");
        }
        // 1. Messages that promise nothing unpersisted.
        for m in std::mem::take(&mut rd.messages) {
            self.send(m);
        }
        // 2. Persist, then one fsync.
        let result =
            crate::ready::persist_ready(self.rsm.raw_mut().storage_mut(), &mut self.disk, &rd);
        result.map_err(|e| self.storage_error(e))?;
        // 3. Messages that promise what step 2 made durable.
        for m in std::mem::take(&mut rd.persisted_messages) {
            self.send(m);
        }
        // 4. Apply, serve reads, answer writes.
        self.rsm
            .apply(&rd)
            .map_err(|source| KvServerError::StateMachine {
                dir: self.config.data_dir.display().to_string(),
                source,
            })?;
        // 5. Nothing: the KV state machine hands its snapshots out as jobs (`start_snapshot`),
        // never through `RawNode::snapshot`, so no Ready carries `compact`.
        debug_assert!(rd.compact.is_none(), "compact in a Ready of the KV server");
        // 6. Done; maybe start a snapshot.
        self.rsm.advance();
        if self.config.rsm.snapshot_bytes.is_some()
            && !self.snapshot_running
            && self.ticks >= self.last_snapshot_check + SNAPSHOT_CHECK_TICKS
        {
            self.last_snapshot_check = self.ticks;
            let bytes = self.raft_state_bytes();
            if let Some(job) = self.rsm.snapshot_job(bytes) {
                self.start_snapshot(job);
            }
        }
        Ok(())
    }

    /// Serializes and writes a snapshot on a thread of its own, with its own handle on the
    /// data directory; the result comes back as [`Event::SnapshotWritten`].
    fn start_snapshot(&mut self, job: SnapshotJob) {
        let index = job.index();
        info!(%index, "snapshot started");
        self.snapshot_running = true;
        let dir = self.config.data_dir.clone();
        let tx = self.snapshot_tx.clone();
        let work = move || {
            lower_this_threads_priority();
            let snapshot = job.run();
            let result = StdDisk::new(&dir)
                .map_err(shoal_storage::Error::Disk)
                .and_then(|mut disk| shoal_storage::prepare_snapshot(&mut disk, snapshot));
            // The server may have stopped meanwhile; the temporary file is removed at open.
            let _ = tx.blocking_send(result);
        };
        // A thread of its own (not the blocking pool), because it lowers its own priority.
        let spawned = std::thread::Builder::new()
            .name("shoal-snapshot".into())
            .spawn(work);
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the snapshot thread; snapshot skipped");
            self.snapshot_running = false;
        }
    }

    /// Makes a snapshot written off the loop the storage's snapshot and drops the log before
    /// it (a rename and a directory fsync). Called between Readies.
    fn install_snapshot(
        &mut self,
        result: Result<PreparedSnapshot, shoal_storage::Error>,
    ) -> Result<(), KvServerError> {
        self.snapshot_running = false;
        let prepared = result.map_err(|e| self.storage_error(e))?;
        let index = prepared.meta().index;
        let (storage, disk) = (self.rsm.raw_mut().storage_mut(), &mut self.disk);
        let installed =
            crate::ready::in_place(|| storage.install_prepared_releasing(disk, prepared))
                .map_err(|e| self.storage_error(e))?;
        if let Some(dropped) = installed {
            info!(%index, entries = dropped.len(), "snapshot written, log compacted");
            // Freeing a few hundred thousand entries takes milliseconds: not in the loop.
            tokio::task::spawn_blocking(move || drop(dropped));
        } else {
            debug!(%index, "snapshot written but superseded by a newer one: discarded");
        }
        Ok(())
    }

    /// Bytes of the Raft state the snapshot threshold is about: the live log.
    fn raft_state_bytes(&self) -> u64 {
        self.rsm.raw().storage().log_bytes()
    }

    fn storage_error(&self, source: shoal_storage::Error) -> KvServerError {
        KvServerError::Storage {
            dir: self.config.data_dir.display().to_string(),
            source,
        }
    }

    fn send(&mut self, m: Message) {
        crate::ready::send(&self.transport, m);
    }

    fn flush_replies(&mut self) {
        for (token, reply) in self.rsm.take_replies() {
            let Some(tx) = self.connections.get(&token) else {
                continue; // the client left
            };
            match tx.try_send(reply) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    debug!(
                        token,
                        "client reply queue full: dropping a reply (it retries)"
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.connections.remove(&token);
                }
            }
        }
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

/// One client connection: requests go to the driver, replies come back on `replies`. A frame
/// that does not decode (or exceeds the limit) closes the connection.
async fn serve_client(
    conn: ClientConnection,
    token: u64,
    events: mpsc::Sender<ClientEvent>,
    mut replies: mpsc::Receiver<KvReply>,
) {
    let mut framed = conn.framed::<KvRequest, KvReply>();
    loop {
        tokio::select! {
            frame = framed.next() => match frame {
                Some(Ok(request)) => {
                    if events.send(ClientEvent::Request(token, request)).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "closing client connection: bad frame");
                    break;
                }
                None => break,
            },
            reply = replies.recv() => match reply {
                Some(reply) => {
                    if let Err(e) = send_queued(&mut framed, reply, &mut replies).await {
                        debug!(error = %e, "client connection failed");
                        break;
                    }
                }
                None => break,
            },
        }
    }
    let _ = events.send(ClientEvent::Closed(token)).await;
}
