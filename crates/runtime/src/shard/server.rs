//! The server of one shard group: a [`GroupHost`] on the tokio replica driver (the
//! crate-private `driver` module, the one the KV server runs on), with the TCP [`Transport`]
//! for the group's Raft peers, client connections handed over by the same listener, durable
//! storage in a real directory and a ticker.
//!
//! A client connection carries [`ToGroup`] frames and gets [`FromGroup`] frames back: a
//! client's [`ShardRequest`] is answered with a [`ShardReply`], a controller's
//! [`ControlRequest`] (Adopt, Freeze, Export, Install, Delete, Adopted) with a
//! [`ControlReply`]. Replies are sent after each round of Readies, so a reply to a write (or a
//! migration step) is only sent once its entry was committed, fsynced on a majority. A message
//! larger than a frame (a large shard's Install, its Export answer) travels in parts
//! (`shoal_wire::parts`). A frame that does not decode or exceeds the frame limit, and a
//! message in parts that is malformed or exceeds the message limit, are answered with a
//! [`Refusal`] that says why, and the connection is closed; nothing of it is applied.
//!
//! The data directory holds the group's identity next to Raft's ([`GROUP_FILE`]: gid and shard
//! count, written once): a directory written by a server of another group, or with another
//! shard count, is refused before anything is served. A storage error, or a committed entry
//! the state machine cannot use, stops the server with an error naming the directory.
//!
//! Migration steps are logged at info level by the group's leader when they are decided:
//! freeze, export (the copy), install and delete, with the shard, the configuration and the
//! bytes moved (export, install) or the keys held (freeze, delete: counting them is free).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use shoal_kv::Limits;
use shoal_raft::Message;
use shoal_replica::{Replica, SnapshotPolicy};
use shoal_shard::host::Waiter;
use shoal_shard::{GroupHost, ShardMachine};
use shoal_storage::{Disk as _, StdDisk};
use shoal_wire::shard::{
    ControlOp, ControlReply, ControlRequest, ControlStatus, FromGroup, ShardRequest, ToGroup,
};
use shoal_wire::{Refusal, SHARD_SERVICE};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn, Instrument};

use crate::driver::{Driver, Service};
use crate::kv::server::{
    CLIENT_REPLY_QUEUE_LEN, CLIENT_REQUEST_QUEUE_LEN, DEFAULT_MAX_CLIENT_CONNECTIONS,
    MAX_PENDING_REQUESTS,
};
use crate::serving::{forward_accepted, open_replica, ClientTable, OpenError, Opened};
use crate::transport::{send_queued, ClientConnection, Transport, TransportConfig, TransportError};

/// The file in a group server's data directory that records its gid and shard count.
pub const GROUP_FILE: &str = "shard-group";
/// Migration steps remembered for their log line until decided; beyond, a step is still
/// carried out, only not logged.
const MAX_LOGGED_STEPS: usize = 4096;

/// Everything one shard group server is started with.
#[derive(Debug, Clone)]
pub struct ShardServerConfig {
    /// The group's id (never 0).
    pub gid: u64,
    /// This server's id within the group (a key of `peers`).
    pub id: u64,
    /// The cluster (every group and the controller's clients): checked in every handshake.
    pub cluster_id: u64,
    /// Every server of the group, this one included: id → address.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Data directory (log, hard state, snapshot, identity, [`GROUP_FILE`]).
    pub data_dir: PathBuf,
    /// The cluster's shard count (the same for every group, for good).
    pub shards: u32,
    /// The controller store's addresses, if known (recorded for the group's own follower of
    /// the controller, which is not here yet; the controller drives migrations over the
    /// client connection meanwhile).
    pub controller: Vec<SocketAddr>,
    /// Wall-clock length of one Raft tick.
    pub tick_interval: Duration,
    /// Election timeout in ticks (randomized in `[election_tick, 2 * election_tick)`).
    pub election_tick: u32,
    /// Heartbeat interval in ticks.
    pub heartbeat_tick: u32,
    /// Snapshot (and drop the log) past this many bytes of log; `None`: never.
    pub snapshot_bytes: Option<u64>,
    /// Store limits: the same on every server of every group (shards migrate).
    pub limits: Limits,
    /// Client connections served at once; more are closed at once.
    pub max_client_connections: usize,
    /// Transport limits (its ids, cluster and peers are taken from this config).
    pub transport: TransportConfig,
}

impl ShardServerConfig {
    /// A configuration with every limit at its default.
    pub fn new(
        gid: u64,
        id: u64,
        cluster_id: u64,
        peers: BTreeMap<u64, SocketAddr>,
        data_dir: PathBuf,
        shards: u32,
    ) -> ShardServerConfig {
        ShardServerConfig {
            gid,
            id,
            cluster_id,
            transport: TransportConfig {
                service: SHARD_SERVICE.to_string(),
                ..TransportConfig::new(id, cluster_id, peers.clone())
            },
            peers,
            data_dir,
            shards,
            controller: Vec::new(),
            tick_interval: crate::driver::DEFAULT_TICK_INTERVAL,
            election_tick: shoal_raft::DEFAULT_ELECTION_TICK,
            heartbeat_tick: shoal_raft::DEFAULT_HEARTBEAT_TICK,
            snapshot_bytes: Some(64 * 1024 * 1024),
            limits: Limits::default(),
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
        }
    }
}

/// Errors of a shard group server.
#[derive(Debug, thiserror::Error)]
pub enum ShardServerError {
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
    /// The data directory belongs to another group, or was written with another shard count.
    #[error("{file} says {found}, but this server was started as {want}: the directory was created for another group or shard count (give this server its own --data, or start it with the --gid and --shards the directory was created with)")]
    OtherGroup {
        /// The group file.
        file: String,
        /// What the file records.
        found: String,
        /// What the server was started as.
        want: String,
    },
    /// The data directory holds Raft state but no group file: a directory of another kind of
    /// server (a KV server's).
    #[error("{dir} holds the data of a server that is not a shard group's (no {GROUP_FILE} file, but a Raft log): use an empty or this group's directory")]
    NotAGroupDir {
        /// The data directory.
        dir: String,
    },
    /// The group file could not be read or written, or does not parse.
    #[error("group file {file}: {reason}")]
    GroupFile {
        /// The file.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// The group's state machine or replica refused to start (an unreadable snapshot).
    #[error("shard group host: {0}")]
    Host(#[from] shoal_shard::HostError),
    /// Raft committed a snapshot or entry the state machine cannot use: the server stops
    /// rather than diverge from the others.
    #[error("state machine in {dir} (move the directory aside: the server then re-syncs from the others)")]
    StateMachine {
        /// The data directory.
        dir: String,
        /// The cause.
        #[source]
        source: shoal_replica::Error,
    },
    /// The transport failed to start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The configuration is unusable.
    #[error("invalid server config: {0}")]
    InvalidConfig(String),
}

/// What the listener and a client connection's task tell the driver.
enum ClientEvent {
    Accepted(ClientConnection),
    /// A request, with when it arrived (for its latency metric).
    Request(u64, ShardRequest, tokio::time::Instant),
    Control(u64, ControlRequest),
    Closed(u64),
}

/// The group file's text.
fn group_file_text(gid: u64, shards: u32) -> String {
    format!("shoal shard group\ngid {gid}\nshards {shards}\n")
}

/// Parses a group file: (gid, shards).
fn parse_group_file(text: &str) -> Option<(u64, u32)> {
    let mut lines = text.lines();
    if lines.next()? != "shoal shard group" {
        return None;
    }
    let gid = lines.next()?.strip_prefix("gid ")?.parse().ok()?;
    let shards = lines.next()?.strip_prefix("shards ")?.parse().ok()?;
    Some((gid, shards))
}

/// Reads the group file of `dir`: `None` when there is none.
fn read_group_file(dir: &Path) -> Result<Option<(u64, u32)>, ShardServerError> {
    let path = dir.join(GROUP_FILE);
    let file = path.display().to_string();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let parsed = std::str::from_utf8(&bytes).ok().and_then(parse_group_file);
            match parsed {
                Some(p) => Ok(Some(p)),
                None => Err(ShardServerError::GroupFile {
                    file,
                    reason: "not a group file (damaged, or written by something else)".into(),
                }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ShardServerError::GroupFile {
            file,
            reason: e.to_string(),
        }),
    }
}

/// Writes the group file atomically (temporary file, fsync, rename, directory fsync).
fn write_group_file(
    disk: &mut StdDisk,
    dir: &Path,
    gid: u64,
    shards: u32,
) -> Result<(), ShardServerError> {
    let tmp = format!("{GROUP_FILE}.tmp");
    let text = group_file_text(gid, shards);
    let result = (|| {
        let _ = disk.remove(&tmp);
        disk.create(&tmp)?;
        disk.append(&tmp, text.as_bytes())?;
        disk.sync(&tmp)?;
        disk.close(&tmp);
        disk.rename(&tmp, GROUP_FILE)?;
        disk.sync_dir()
    })();
    result.map_err(|e| ShardServerError::GroupFile {
        file: dir.join(GROUP_FILE).display().to_string(),
        reason: e.to_string(),
    })
}

/// Runs one shard group server on `listener` until `shutdown` completes or a fatal error
/// (storage, a committed entry the machine cannot use).
///
/// Checks the data directory first: a directory of another group (its [`GROUP_FILE`]), node
/// or cluster is refused before anything is served.
pub async fn run_shard_server(
    config: ShardServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ShardServerError> {
    if config.gid == shoal_shard::NO_GROUP {
        return Err(ShardServerError::InvalidConfig(
            "gid 0 is reserved (it means \"no owner\")".into(),
        ));
    }
    if !config.peers.contains_key(&config.id) {
        return Err(ShardServerError::InvalidConfig(format!(
            "server {} is not in the peer list",
            config.id
        )));
    }
    if config.tick_interval.is_zero() || config.max_client_connections == 0 {
        return Err(ShardServerError::InvalidConfig(
            "tick interval and connection limit must be positive".into(),
        ));
    }
    shoal_shard::validate_shards(u64::from(config.shards))
        .map_err(|e| ShardServerError::InvalidConfig(e.to_string()))?;
    let dir = config.data_dir.display().to_string();
    let want = format!("gid {} with {} shards", config.gid, config.shards);
    let recorded = read_group_file(&config.data_dir)?;
    if let Some((gid, shards)) = recorded {
        if (gid, shards) != (config.gid, config.shards) {
            return Err(ShardServerError::OtherGroup {
                file: config.data_dir.join(GROUP_FILE).display().to_string(),
                found: format!("gid {gid} with {shards} shards"),
                want,
            });
        }
    }
    let Opened {
        mut disk,
        storage,
        raft,
    } = open_replica(
        &config.data_dir,
        config.cluster_id,
        config.id,
        config.peers.keys().copied(),
        config.election_tick,
        config.heartbeat_tick,
    )
    .map_err(|e| match e {
        OpenError::DataDir(e) => ShardServerError::DataDir(e),
        OpenError::Storage(source) => ShardServerError::Storage {
            dir: dir.clone(),
            source,
        },
    })?;
    let snapshot = SnapshotPolicy {
        log_bytes: config.snapshot_bytes,
        entries: None,
    };
    let host = GroupHost::new(
        raft,
        storage,
        config.gid,
        config.shards,
        config.limits,
        snapshot,
    )?;
    let status = host.raw().status();
    if recorded.is_none() {
        // A new directory, or one whose first start ended before the file was written: it
        // must hold no Raft state yet (else it is another kind of server's).
        if status.term.0 != 0 || status.commit.0 != 0 {
            return Err(ShardServerError::NotAGroupDir { dir });
        }
        write_group_file(&mut disk, &config.data_dir, config.gid, config.shards)?;
    }
    info!(gid = config.gid, node = config.id, term = %status.term, commit = %status.commit,
        adopted = host.machine().config().num, "shard group server restored");

    let mut tc = config.transport.clone();
    tc.node_id = config.id;
    tc.cluster_id = config.cluster_id;
    tc.peers = config.peers.clone();
    tc.snapshot.dir = Some(config.data_dir.clone());
    let (transport, inbound, clients) = Transport::<Message>::start(tc, listener)?;
    let (events_tx, events) = mpsc::channel(CLIENT_REQUEST_QUEUE_LEN);
    forward_accepted(clients, events_tx.clone(), ClientEvent::Accepted);
    let span = tracing::info_span!("shard", gid = config.gid, node = config.id);
    let driver = Driver {
        service: ShardService {
            host,
            gid: config.gid,
            cluster_id: config.cluster_id,
            clients: ClientTable::new(config.max_client_connections),
            events_tx,
            steps: BTreeMap::new(),
            timing: crate::metrics::RequestTiming::new(MAX_PENDING_REQUESTS),
            moving_out: BTreeMap::new(),
        },
        disk,
        data_dir: config.data_dir.clone(),
        transport,
        tick_interval: config.tick_interval,
    };
    let result = driver.run(inbound, events, shutdown).instrument(span).await;
    let result = result.map_err(|e| match e {
        shoal_replica::Error::Storage(source) => ShardServerError::Storage {
            dir: dir.clone(),
            source,
        },
        other => ShardServerError::StateMachine {
            dir: dir.clone(),
            source: other,
        },
    });
    match &result {
        Ok(()) => info!(
            gid = config.gid,
            node = config.id,
            "shard group server stopped"
        ),
        Err(e) => {
            error!(gid = config.gid, node = config.id, error = %crate::ready::error_chain(e),
                "shard group server stopped on a fatal error")
        }
    }
    result
}

/// A migration step waiting to be decided, for its log line.
struct Step {
    what: &'static str,
    /// `None` for an adoption.
    shard: Option<u32>,
    config: u64,
    /// Bytes carried by the request (an install's export).
    bytes: Option<usize>,
    /// Keys of the shard held here when the step was asked (a freeze's, a delete's).
    keys: usize,
}

/// The group server as a service of the replica driver.
struct ShardService {
    host: GroupHost,
    gid: u64,
    cluster_id: u64,
    clients: ClientTable<FromGroup>,
    events_tx: mpsc::Sender<ClientEvent>,
    /// Migration steps in flight: (token, tag) → what to log once decided.
    steps: BTreeMap<(u64, u64), Step>,
    /// Client requests waiting for their reply (the latency metric).
    timing: crate::metrics::RequestTiming,
    /// Shards moving away: (shard, configuration) → when the freeze arrived (the migration
    /// duration metric, observed at the delete).
    moving_out: BTreeMap<(u32, u64), tokio::time::Instant>,
}

impl Service for ShardService {
    type Machine = ShardMachine;
    type Tag = Waiter;
    type Event = ClientEvent;

    fn replica(&mut self) -> &mut Replica<ShardMachine, Waiter> {
        self.host.replica_mut()
    }

    fn tick(&mut self) {
        self.host.tick();
        let sessions = self
            .host
            .machine()
            .shards()
            .map(|(_, shard)| shard.store.session_count())
            .sum();
        crate::metrics::set_sessions(sessions);
    }

    fn metrics_group(&self) -> u64 {
        self.gid
    }

    fn event(&mut self, event: ClientEvent) -> bool {
        match event {
            ClientEvent::Accepted(conn) => self.accept(conn),
            ClientEvent::Request(token, request, at) => {
                if !self.clients.is_open(token) {
                    // The connection closed: nobody would read the answer.
                } else if self.host.pending() >= MAX_PENDING_REQUESTS {
                    debug!(
                        token,
                        limit = MAX_PENDING_REQUESTS,
                        "dropping a request: too many pending"
                    );
                } else {
                    let op = crate::metrics::op_value(&request.op);
                    self.timing
                        .arrived(token, (request.client, request.request), op, at);
                    self.host.handle_request(token, request);
                }
            }
            ClientEvent::Control(token, request) => {
                if !self.clients.is_open(token) {
                    // The connection closed.
                } else if self.host.pending() >= MAX_PENDING_REQUESTS {
                    debug!(
                        token,
                        limit = MAX_PENDING_REQUESTS,
                        "dropping a control request: too many pending"
                    );
                } else {
                    self.note_step(token, &request);
                    let request = self.probe_if_held(request);
                    self.host.handle_control(token, request);
                }
            }
            ClientEvent::Closed(token) => {
                self.timing.closed(token);
                self.clients.remove(token);
                self.steps.retain(|(t, _), _| *t != token);
            }
        }
        true
    }

    fn answer(&mut self) {
        let replies = self.host.take_replies();
        for (token, reply) in replies {
            let (ids, outcome) = crate::metrics::shard_reply_outcome(&reply);
            self.timing.replied(token, ids, outcome);
            self.clients.send(token, FromGroup::Reply(reply));
        }
        let control = self.host.take_control_replies();
        for (token, reply) in control {
            if let ControlReply::Exported {
                data: Some(data), ..
            } = &reply
            {
                crate::metrics::migration_bytes(data.len());
            }
            self.log_step(token, &reply);
            self.clients.send(token, FromGroup::Control(reply));
        }
    }

    fn stop(&mut self, _events: &mut mpsc::Receiver<ClientEvent>) {
        self.clients.clear();
    }
}

impl ShardService {
    /// Remembers a migration step, to log it once decided.
    fn note_step(&mut self, token: u64, request: &ControlRequest) {
        if request.gid != self.gid {
            return;
        }
        {
            use crate::metrics::MigrationStep as M;
            let (step, bytes) = match &request.op {
                ControlOp::Adopt { .. } => (Some(M::adopt), 0),
                ControlOp::Freeze { .. } => (Some(M::freeze), 0),
                ControlOp::Export { .. } => (Some(M::export), 0),
                ControlOp::CopyStart { .. } => (Some(M::copy_start), 0),
                ControlOp::CopyRound { .. } => (Some(M::copy_round), 0),
                ControlOp::ExportChunk { .. } => (Some(M::export_chunk), 0),
                ControlOp::ExportDelta { .. } => (Some(M::export_delta), 0),
                ControlOp::Stage { items, .. } | ControlOp::StageRound { items, .. } => (
                    Some(M::stage),
                    items.iter().map(|i| i.key.len() + i.value.len()).sum(),
                ),
                ControlOp::Install { data, .. } => (Some(M::install), data.len()),
                ControlOp::Delete { .. } => (Some(M::delete), 0),
                ControlOp::Adopted | ControlOp::Shards => (None, 0),
            };
            if let Some(step) = step {
                crate::metrics::migration_step(step);
                crate::metrics::migration_bytes(bytes);
            }
        }
        if self.steps.len() >= MAX_LOGGED_STEPS {
            return;
        }
        let keys = match &request.op {
            ControlOp::Freeze { shard, .. } | ControlOp::Delete { shard, .. } => {
                self.shard_keys(*shard)
            }
            _ => 0,
        };
        let step = match &request.op {
            ControlOp::Freeze { shard, config } => Step {
                what: "freeze",
                shard: Some(*shard),
                config: *config,
                bytes: None,
                keys,
            },
            ControlOp::Export { shard, config } => Step {
                what: "copy (export)",
                shard: Some(*shard),
                config: *config,
                bytes: None,
                keys,
            },
            ControlOp::Install {
                shard,
                config,
                data,
            } => Step {
                what: "install",
                shard: Some(*shard),
                config: *config,
                bytes: Some(data.len()),
                keys,
            },
            ControlOp::Delete { shard, config } => Step {
                what: "delete",
                shard: Some(*shard),
                config: *config,
                bytes: None,
                keys,
            },
            ControlOp::CopyStart { shard, config } => Step {
                what: "copy start (the shard copied while it serves)",
                shard: Some(*shard),
                config: *config,
                bytes: None,
                keys,
            },
            ControlOp::Adopt { .. } => Step {
                what: "adopt",
                shard: None,
                config: 0,
                bytes: None,
                keys,
            },
            ControlOp::Adopted | ControlOp::Shards => return,
            // A move's copy is a chunk and a stage per MiB: logged at debug, not per step.
            ControlOp::ExportChunk { shard, config, .. } => {
                debug!(
                    gid = self.gid,
                    shard, config, "migration step: copy (chunk)"
                );
                return;
            }
            ControlOp::Stage {
                shard,
                config,
                items,
            } => {
                debug!(
                    gid = self.gid,
                    shard,
                    config,
                    keys = items.len(),
                    "migration step: stage"
                );
                return;
            }
            ControlOp::StageRound {
                shard,
                config,
                round,
                items,
                absent,
            } => {
                debug!(
                    gid = self.gid,
                    shard,
                    config,
                    round,
                    keys = items.len(),
                    absent = absent.len(),
                    "migration step: stage"
                );
                return;
            }
            ControlOp::ExportDelta { shard, config, .. } => {
                debug!(
                    gid = self.gid,
                    shard, config, "migration step: copy (delta chunk)"
                );
                return;
            }
            ControlOp::CopyRound {
                shard,
                config,
                round,
            } => Step {
                what: if *round == 1 {
                    "copy round (re-sending the keys written during the copy)"
                } else {
                    "copy round (re-sending the keys written during the last round)"
                },
                shard: Some(*shard),
                config: *config,
                bytes: None,
                keys,
            },
        };
        self.steps.insert((token, request.tag), step);
    }

    /// A shard moving away, for the migration metrics: from its freeze to its delete, both
    /// decided in this group's log (a retried step counts once). Bounded: a shard is frozen at
    /// most once per configuration; past the bound (deletes never seen) it starts over.
    fn track_move(&mut self, what: &str, shard: u32, config: u64) {
        match what {
            "freeze" => {
                if self.moving_out.len() >= MAX_LOGGED_STEPS {
                    self.moving_out.clear();
                }
                self.moving_out
                    .entry((shard, config))
                    .or_insert_with(tokio::time::Instant::now);
            }
            "delete" => {
                if let Some(at) = self.moving_out.remove(&(shard, config)) {
                    crate::metrics::migration_done(at.elapsed().as_secs_f64());
                }
            }
            _ => return,
        }
        crate::metrics::set_migrations_in_progress(self.moving_out.len());
    }

    /// Logs a decided migration step (at info) or one this server could not carry out.
    fn log_step(&mut self, token: u64, reply: &ControlReply) {
        let Some(step) = self.steps.remove(&(token, reply.tag())) else {
            return;
        };
        let Step {
            what,
            shard,
            config,
            bytes,
            keys,
        } = step;
        let Some(shard) = shard else {
            if let ControlReply::Done {
                status, adopted, ..
            } = reply
            {
                info!(gid = self.gid, adopted, status = ?status, "configuration adoption decided");
            }
            return;
        };
        match reply {
            ControlReply::Done {
                status, adopted, ..
            } => {
                if matches!(status, ControlStatus::Applied | ControlStatus::AlreadyDone) {
                    self.track_move(what, shard, config);
                }
                let status = match status {
                    ControlStatus::Applied => "applied".to_string(),
                    ControlStatus::AlreadyDone => "already done".to_string(),
                    ControlStatus::Stale { seen } => format!("stale (at {seen})"),
                    ControlStatus::Refused { reason } => format!("refused: {reason}"),
                };
                match (bytes, keys) {
                    (Some(bytes), _) => info!(gid = self.gid, step = what, shard, config, bytes,
                        adopted, %status, "migration step"),
                    (None, keys) => info!(gid = self.gid, step = what, shard, config, keys,
                        adopted, %status, "migration step"),
                }
            }
            ControlReply::Exported { data, adopted, .. } => match data {
                Some(data) => info!(
                    gid = self.gid,
                    step = what,
                    shard,
                    config,
                    bytes = data.len(),
                    adopted,
                    "migration step: shard exported"
                ),
                None => info!(
                    gid = self.gid,
                    step = what,
                    shard,
                    config,
                    adopted,
                    "migration step: shard not held frozen at that configuration"
                ),
            },
            other => debug!(gid = self.gid, step = what, shard, config, reply = ?other,
                "migration step not carried out here"),
        }
    }

    /// An Install with data for a shard this server already holds at that configuration or a
    /// newer one becomes the same Install without data (a probe): its outcome (AlreadyDone or
    /// Stale) does not depend on the data, since a shard's configuration only grows, and the
    /// group then logs a few bytes instead of a whole shard again (a controller resending an
    /// Install to a new leader that has applied the first copy).
    fn probe_if_held(&self, mut request: ControlRequest) -> ControlRequest {
        if let ControlOp::Install {
            shard,
            config,
            data,
        } = &mut request.op
        {
            let held = self.host.machine().shard(*shard).map(|s| s.config);
            if !data.is_empty() && held.is_some_and(|c| c >= *config) {
                debug!(gid = self.gid, shard = *shard, config = *config, held = ?held,
                    bytes = data.len(), "install of a shard already held: sent as a probe");
                *data = Vec::new();
            }
        }
        request
    }

    /// The keys this server holds of `shard` (a freeze or delete's log line: counting them
    /// is free, where its bytes would take an export's serialization in the loop).
    fn shard_keys(&self, shard: u32) -> usize {
        self.host
            .machine()
            .shard(shard)
            .map_or(0, |s| s.store.len())
    }

    fn accept(&mut self, conn: ClientConnection) {
        let remote = conn.peer_addr;
        let Some((token, reply_rx)) = self.clients.admit(remote, CLIENT_REPLY_QUEUE_LEN) else {
            return;
        };
        let events = self.events_tx.clone();
        let span = tracing::debug_span!("client", %remote, token);
        let cluster_id = self.cluster_id;
        tokio::spawn(serve_client(conn, token, cluster_id, events, reply_rx).instrument(span));
    }
}

/// One client connection: requests go to the driver, replies come back on `replies`. A frame
/// that does not decode (or exceeds the limit) is answered with a [`Refusal`] saying why, and
/// the connection is closed. Messages larger than a frame (a large shard's Install, its
/// Export answer) travel in parts both ways, up to the transport's message limit
/// ([`TransportConfig::max_message_bytes`]); a bad or oversized message in parts is refused
/// the same way, and nothing of it is applied.
async fn serve_client(
    conn: ClientConnection,
    token: u64,
    cluster_id: u64,
    events: mpsc::Sender<ClientEvent>,
    mut replies: mpsc::Receiver<FromGroup>,
) {
    let mut framed = conn.framed_in_parts::<ToGroup, FromGroup>();
    loop {
        tokio::select! {
            frame = framed.next() => match frame {
                Some(Ok(message)) => {
                    let event = match message {
                        ToGroup::Request(r) => {
                            ClientEvent::Request(token, r, tokio::time::Instant::now())
                        }
                        ToGroup::Control(c) => ClientEvent::Control(token, c),
                        // Reassembled by the codec: a part never comes out of it.
                        ToGroup::Part { .. } => continue,
                    };
                    if events.send(event).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "closing client connection: bad frame");
                    let reason = format!("bad frame ({e}): a shard group server speaks the \
                        shard protocol (shoal_wire::shard::ToGroup) only; the connection is closed");
                    let refusal = Refusal::new(cluster_id, SHARD_SERVICE, reason);
                    let _ = events.send(ClientEvent::Closed(token)).await;
                    crate::transport::refuse(framed.into_inner(), refusal).await;
                    return;
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
