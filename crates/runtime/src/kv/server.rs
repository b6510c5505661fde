//! The KV server: one [`KvRsm`] on the tokio replica driver (the crate-private `driver`
//! module, `driver.rs`), with the TCP [`Transport`] for peers, client connections handed over
//! by the same listener, durable storage in a real directory and a ticker.
//!
//! The driver carries out every `Ready` through the replica shell (the contract is on
//! `shoal_raft::Ready`); this module adds what a KV server has besides: client connections,
//! their requests fed to [`KvRsm::handle_request`], and the replies of [`KvRsm::take_replies`]
//! sent back after each round of Readies. A reply to a write is therefore only sent after the
//! entry was committed, which needs it fsynced on a majority. A storage error or an unusable
//! committed entry stops the server.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use shoal_kv::{KvMachine, KvRsm, RsmConfig, Waiter};
use shoal_raft::{Membership, Message};
use shoal_replica::Replica;
use shoal_wire::kv::{KvReply, KvRequest, KvResult, SnapshotTransfer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn, Instrument};

use crate::driver::{Driver, Service};
use crate::serving::{forward_accepted, open_replica, ClientTable, OpenError, Opened};
use crate::snapshot_stream::SnapshotProgress;
use crate::transport::{send_queued, ClientConnection, Transport, TransportConfig, TransportError};

/// Default [`KvServerConfig::tick_interval`]: every Shoal server's tick.
pub use crate::driver::{DEFAULT_TICK_INTERVAL, MAX_EVENTS_PER_READY};
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
    /// This server joined a running cluster (`shoal kv server --join`): `peers` are where
    /// the members were when it joined, not a bootstrap membership; it learns the membership
    /// from the leader's log. Recorded in the data directory ([`JOINED_FILE`]).
    pub joined: bool,
}

/// The file in a data directory that records that its server joined a running cluster, with
/// the members' addresses it learned then (`ID ADDR` per line).
pub const JOINED_FILE: &str = "joined";

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
            joined: false,
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
    /// The data directory says this server was removed from the cluster.
    #[error(
        "server {id} was removed from the cluster (its data in {dir} says so: the membership \
         {membership}); it will not serve again. To bring it back, add it anew with \
         `shoal kv member add {id} ADDR --learner` and start it on an empty --data with --join"
    )]
    Removed {
        /// The server.
        id: u64,
        /// The data directory.
        dir: String,
        /// The membership its data holds.
        membership: String,
    },
    /// The record of a joined server ([`JOINED_FILE`]) could not be written.
    #[error("writing {path}")]
    JoinedFile {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Reads a data directory's [`JOINED_FILE`]: `None` if the server was not started with
/// `--join`, else the members' addresses it recorded.
pub fn read_joined(
    data_dir: &std::path::Path,
) -> std::io::Result<Option<BTreeMap<u64, SocketAddr>>> {
    let path = data_dir.join(JOINED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut members = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = line.split_once(' ').and_then(|(id, addr)| {
            Some((
                id.parse::<u64>().ok()?,
                addr.trim().parse::<SocketAddr>().ok()?,
            ))
        });
        let Some((id, addr)) = parsed else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: bad line {line:?} (want `ID ADDR`)", path.display()),
            ));
        };
        members.insert(id, addr);
    }
    Ok(Some(members))
}

/// Writes the [`JOINED_FILE`] (fsynced, then the directory) unless it exists.
fn write_joined(
    data_dir: &std::path::Path,
    peers: &BTreeMap<u64, SocketAddr>,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = data_dir.join(JOINED_FILE);
    if path.exists() {
        return Ok(());
    }
    let tmp = data_dir.join(format!("{JOINED_FILE}.tmp"));
    let mut text = String::from(
        "# This server joined a running cluster (`shoal kv server --join`); the members' \
         addresses then:\n",
    );
    for (id, addr) in peers {
        text.push_str(&format!("{id} {addr}\n"));
    }
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// How long one try of the start-up membership check waits for the leader's member list.
pub const MEMBERSHIP_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two tries of the start-up membership check.
pub const MEMBERSHIP_CHECK_PAUSE: Duration = Duration::from_secs(2);
/// Tries of the start-up membership check before it gives up (no leader answered).
pub const MEMBERSHIP_CHECK_TRIES: u32 = 6;

/// At start-up on existing data: asks the cluster's leader (through the other servers whose
/// addresses this server knows) whether server `id` is still a member, and says clearly in
/// the log if it is not: a server removed while it was down is never told (the leader no
/// longer sends it anything) and would otherwise sit idle without a word.
async fn check_still_member(id: u64, config: crate::kv::ClientConfig) {
    let mut client = match crate::kv::Client::new(config) {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "membership check: no client");
            return;
        }
    };
    for attempt in 1..=MEMBERSHIP_CHECK_TRIES {
        match client.member_list().await {
            Ok((leader, members)) => {
                if members.iter().any(|m| m.id == id) {
                    debug!(leader, "membership check: this server is a member");
                } else {
                    let ids: Vec<String> = members.iter().map(|m| m.id.to_string()).collect();
                    error!(
                        leader,
                        members = %ids.join(","),
                        "server {id} is not a member of the cluster: the leader (server \
                         {leader}) lists {}. It was removed, probably while it was down; it \
                         takes no part any more and the others refuse its connections. Stop \
                         it. To bring it back, add it anew (`shoal kv member add {id} ADDR \
                         --learner`) and start it on an empty --data with --join",
                        ids.join(", ")
                    );
                }
                return;
            }
            Err(e) => {
                debug!(attempt, error = %e, "membership check: no answer from the leader yet");
                tokio::time::sleep(MEMBERSHIP_CHECK_PAUSE).await;
            }
        }
    }
    warn!(
        tries = MEMBERSHIP_CHECK_TRIES,
        "membership check: no leader answered; cannot tell whether this server is still a \
         member (`shoal kv member list` tells)"
    );
}

/// What the listener and a client connection's task tell the driver.
enum ClientEvent {
    Accepted(ClientConnection),
    /// A request, with when it arrived (for its latency metric).
    Request(u64, KvRequest, tokio::time::Instant),
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
    let Opened {
        disk,
        storage,
        raft,
    } = open_replica(
        &config.data_dir,
        config.cluster_id,
        config.id,
        // A joining server has no bootstrap membership: it learns it from the leader's log.
        config
            .peers
            .keys()
            .copied()
            .filter(|_| !config.joined)
            .collect::<Vec<_>>(),
        config.election_tick,
        config.heartbeat_tick,
    )
    .map_err(|e| match e {
        OpenError::DataDir(e) => KvServerError::DataDir(e),
        OpenError::Storage(source) => KvServerError::Storage {
            dir: config.data_dir.display().to_string(),
            source,
        },
    })?;
    // The lease clock counts ticks: one tick is one tick interval of wall time. A tick the
    // loop was too busy to take is taken late (`MissedTickBehavior::Delay`), so the lease
    // clock can only run slow: a lease then lives a little longer, never shorter.
    let mut rsm_config = config.rsm;
    rsm_config.tick_ms = u64::try_from(config.tick_interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut rsm = KvRsm::new(raft, storage, rsm_config)?;
    let status = rsm.raw().status();
    if status.removed {
        return Err(KvServerError::Removed {
            id: config.id,
            dir: config.data_dir.display().to_string(),
            membership: status.membership.to_string(),
        });
    }
    if config.joined {
        write_joined(&config.data_dir, &config.peers).map_err(|source| {
            KvServerError::JoinedFile {
                path: config.data_dir.join(JOINED_FILE).display().to_string(),
                source,
            }
        })?;
    }
    rsm.set_known_addresses(
        config
            .peers
            .iter()
            .map(|(&id, addr)| (id, addr.to_string()))
            .collect(),
    );
    // Serializing a backup of a large store takes long: `answer` does it on a blocking thread.
    rsm.set_backups_off_loop(true);
    let status = rsm.raw().status();
    info!(node = config.id, term = %status.term, commit = %status.commit,
        applied = %rsm.applied(), "kv server restored");
    // A server restarted on its data may have been removed while it was down, and nothing
    // tells it so (a removed server is no longer sent the log): ask the cluster.
    let others: Vec<SocketAddr> = rsm
        .addresses()
        .into_iter()
        .filter(|(id, _)| *id != config.id)
        .filter_map(|(_, addr)| addr.parse().ok())
        .collect();
    let membership_check = (status.last_index.0 > 0 && !others.is_empty()).then(|| {
        let mut client = crate::kv::ClientConfig::new(others);
        client.cluster_id = config.cluster_id;
        client.security = config.transport.security.clone();
        client.op_timeout = MEMBERSHIP_CHECK_TIMEOUT;
        tokio::spawn(
            check_still_member(config.id, client)
                .instrument(tracing::info_span!("kv", node = config.id)),
        )
    });

    let mut tc = config.transport.clone();
    tc.node_id = config.id;
    tc.cluster_id = config.cluster_id;
    tc.peers = config.peers.clone();
    tc.snapshot.dir = Some(config.data_dir.clone());
    let (transport, inbound, clients) = Transport::<Message>::start(tc, listener)?;
    let snapshots = transport.snapshot_progress();
    let (events_tx, events) = mpsc::channel(CLIENT_REQUEST_QUEUE_LEN);
    forward_accepted(clients, events_tx.clone(), ClientEvent::Accepted);
    let span = tracing::info_span!("kv", node = config.id);
    let data_dir = config.data_dir.clone();
    let driver = Driver {
        service: KvService {
            rsm,
            clients: ClientTable::new(config.max_client_connections),
            events_tx,
            timing: crate::metrics::RequestTiming::new(MAX_PENDING_REQUESTS),
            peers_seen: None,
            transfers: Transfers::new(snapshots),
        },
        disk,
        data_dir: config.data_dir.clone(),
        transport,
        tick_interval: config.tick_interval,
    };
    let result = driver.run(inbound, events, shutdown).instrument(span).await;
    if let Some(check) = membership_check {
        check.abort();
    }
    let dir = data_dir.display().to_string();
    let result = result.map_err(|e| match e {
        shoal_replica::Error::Storage(source) => KvServerError::Storage { dir, source },
        other => KvServerError::StateMachine {
            dir,
            source: shoal_kv::Error::from(other),
        },
    });
    match &result {
        Ok(()) => info!(node = config.id, "kv server stopped"),
        Err(e) => {
            error!(node = config.id, error = %crate::ready::error_chain(e), "kv server stopped on a fatal error")
        }
    }
    result
}

/// The KV server as a service of the replica driver.
struct KvService {
    rsm: KvRsm,
    clients: ClientTable<KvReply>,
    events_tx: mpsc::Sender<ClientEvent>,
    timing: crate::metrics::RequestTiming,
    /// The membership and addresses the transport's peers were last made from.
    peers_seen: Option<(Membership, BTreeMap<u64, String>)>,
    /// The snapshot sends under way, for `kv member list`.
    transfers: Transfers,
}

/// The transport's snapshot sends as `kv member list` shows them: the state machine that
/// builds the member list cannot see the transport, so the driver adds them to the answer.
struct Transfers {
    progress: SnapshotProgress,
    /// Per member: the snapshot index, when this server first saw the send, and the bytes
    /// acknowledged then (the start of its rate).
    first_seen: BTreeMap<u64, (u64, tokio::time::Instant, u64)>,
}

impl Transfers {
    fn new(progress: SnapshotProgress) -> Transfers {
        Transfers {
            progress,
            first_seen: BTreeMap::new(),
        }
    }

    /// Notes the sends under way (each tick), so a rate can be given.
    fn observe(&mut self) -> Vec<crate::snapshot_stream::SnapshotSendStatus> {
        let sends = self.progress.sends();
        let now = tokio::time::Instant::now();
        self.first_seen
            .retain(|to, _| sends.iter().any(|s| s.to == *to));
        for s in &sends {
            let first = self
                .first_seen
                .entry(s.to)
                .or_insert((s.index, now, s.sent_bytes));
            // Another snapshot, or an attempt that restarted from the beginning.
            if first.0 != s.index || s.sent_bytes < first.2 {
                *first = (s.index, now, s.sent_bytes);
            }
        }
        sends
    }

    /// The sends under way, with their average rate since first seen.
    fn current(&mut self) -> Vec<SnapshotTransfer> {
        let now = tokio::time::Instant::now();
        self.observe()
            .into_iter()
            .map(|s| {
                let bytes_per_sec = self.first_seen.get(&s.to).map_or(0, |&(_, at, bytes)| {
                    let secs = now.duration_since(at).as_secs_f64();
                    // Under a second of history says little.
                    if secs < 1.0 {
                        0
                    } else {
                        (s.sent_bytes.saturating_sub(bytes) as f64 / secs) as u64
                    }
                });
                SnapshotTransfer {
                    to: s.to,
                    index: s.index,
                    sent_bytes: s.sent_bytes,
                    total_bytes: s.total_bytes,
                    attempt: s.attempt,
                    bytes_per_sec,
                }
            })
            .collect()
    }
}

impl Service for KvService {
    type Machine = KvMachine;
    type Tag = Waiter;
    type Event = ClientEvent;

    fn replica(&mut self) -> &mut Replica<KvMachine, Waiter> {
        self.rsm.replica_mut()
    }

    fn tick(&mut self) {
        self.rsm.tick();
        crate::metrics::set_sessions(self.rsm.store().session_count());
        self.transfers.observe();
    }

    fn event(&mut self, event: ClientEvent) -> bool {
        match event {
            ClientEvent::Accepted(conn) => self.accept(conn),
            ClientEvent::Request(token, request, at) => {
                if !self.clients.is_open(token) {
                    // The connection closed: nobody would read the answer.
                } else if self.rsm.pending() >= MAX_PENDING_REQUESTS {
                    debug!(
                        token,
                        limit = MAX_PENDING_REQUESTS,
                        "dropping a request: too many pending"
                    );
                } else {
                    let op = crate::metrics::op_value(&request.op);
                    self.timing
                        .arrived(token, (request.client, request.request), op, at);
                    self.rsm.handle_request(token, request);
                }
            }
            ClientEvent::Closed(token) => {
                self.timing.closed(token);
                self.clients.remove(token);
            }
        }
        true
    }

    fn answer(&mut self) {
        for (token, mut reply) in self.rsm.take_replies() {
            if let KvReply::Done {
                result: KvResult::Members { transfers, .. },
                ..
            } = &mut reply
            {
                *transfers = self.transfers.current();
            }
            if let Some((ids, outcome)) = crate::metrics::kv_reply_outcome(&reply) {
                self.timing.replied(token, ids, outcome);
            }
            self.clients.send(token, reply);
        }
        for backup in self.rsm.take_backups() {
            let Some(tx) = self.clients.sender(backup.reply_to()) else {
                continue; // the client left
            };
            // Serialized off the loop (an O(1) copy of the store), like a snapshot job; the
            // connection's task splits it into parts.
            tokio::task::spawn_blocking(move || {
                let (_, reply) = backup.into_reply();
                let _ = tx.blocking_send(reply);
            });
        }
    }

    fn stop(&mut self, _events: &mut mpsc::Receiver<ClientEvent>) {
        self.clients.clear();
    }

    fn peers_changed(&mut self) -> Option<BTreeMap<u64, SocketAddr>> {
        let membership = self.rsm.raw().membership();
        let table = self.rsm.addresses();
        if self
            .peers_seen
            .as_ref()
            .is_some_and(|(m, t)| m == membership && *t == table)
        {
            return None;
        }
        self.peers_seen = Some((membership.clone(), table));
        // A server still joining knows no membership yet: it talks to everyone it knows of
        // (the leader must hear its answers to bring it up to date).
        let me = self.rsm.raw().status().id.0;
        let wanted = if membership.is_empty() {
            self.rsm
                .addresses()
                .into_iter()
                .filter(|(id, _)| *id != me)
                .collect()
        } else {
            self.rsm.peer_addresses()
        };
        let mut peers = BTreeMap::new();
        for (id, addr) in wanted {
            match addr.parse::<SocketAddr>() {
                Ok(a) => {
                    peers.insert(id, a);
                }
                Err(_) => warn!(peer = id, %addr, "a member's address does not parse; skipped"),
            }
        }
        Some(peers)
    }
}

impl KvService {
    fn accept(&mut self, conn: ClientConnection) {
        let remote = conn.peer_addr;
        let Some((token, reply_rx)) = self.clients.admit(remote, CLIENT_REPLY_QUEUE_LEN) else {
            return;
        };
        let events = self.events_tx.clone();
        let span = tracing::debug_span!("client", %remote, token);
        tokio::spawn(serve_client(conn, token, events, reply_rx).instrument(span));
    }
}

/// One client connection: requests go to the driver, replies come back on `replies`. A frame
/// that does not decode (or exceeds the limit) closes the connection. A reply larger than a
/// frame (a backup, [`shoal_wire::kv::KvResult::Snapshot`]) goes out in parts; requests
/// always fit in one frame.
async fn serve_client(
    conn: ClientConnection,
    token: u64,
    events: mpsc::Sender<ClientEvent>,
    mut replies: mpsc::Receiver<KvReply>,
) {
    let mut framed = conn.framed_in_parts::<KvRequest, KvReply>();
    loop {
        tokio::select! {
            frame = framed.next() => match frame {
                Some(Ok(request)) => {
                    let at = tokio::time::Instant::now();
                    if events.send(ClientEvent::Request(token, request, at)).await.is_err() {
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
