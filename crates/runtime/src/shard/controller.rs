//! The shard controller on tokio: the sans-IO [`Controller`] driven by a task, its store
//! requests sent to the controller store (a Shoal KV cluster) and its control requests to the
//! group servers named in the configurations (their `IP:PORT` addresses), over [`Links`].
//!
//! A controller is not a server: any process may run one ([`ShardController::start`]) for as
//! long as it has operations to run — `shoal shard join|leave|move` and `shoal shard up` each
//! run one for their change, then stop. Many may run at once on many hosts: the store's lock
//! (held under a lease kept alive while the controller runs) lets one drive at a time, and a
//! controller that finds the latest change incomplete (its driver was killed mid-way) finishes
//! it before anything else. [`ShardController::stop`] revokes the lease, so the next
//! controller takes the lock at once; a controller that dies without stopping holds it until
//! its lease runs out (the lease TTL, 3 s by default).
//!
//! Reading configurations needs no lock: [`read_latest`] and [`read_config`] read the store
//! linearizably through a plain KV client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures::{SinkExt as _, StreamExt as _};
use shoal_shard::layout::{config_key, Record, LATEST_KEY};
use shoal_shard::{
    Config, Controller, ControllerConfig, ControllerStatus, CtlAction, CtlPhase, Op,
};
use shoal_wire::kv::{KvReply, KvRequest};
use shoal_wire::shard::{ControlOp, ControlReply, ControlRequest, FromGroup, ToGroup};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::link::{Event, LinkConfig, Links, Timers};
use crate::kv::client::{DEFAULT_CLUSTER_ID, DEFAULT_CONNECT_TIMEOUT, REPLY_QUEUE_LEN};
use crate::kv::{Client, ClientConfig, ClientError};
use crate::tls::Security;
use crate::transport::connect_client_secure;

/// Largest frame on a controller's connections: the wire's default (16 MiB). A migration's
/// Export answer and Install request carry a whole shard: when larger than a frame, they
/// travel in parts ([`shoal_wire::parts`]), up to [`CONTROLLER_MAX_MESSAGE_BYTES`].
pub const CONTROLLER_MAX_FRAME_BYTES: usize = shoal_wire::DEFAULT_MAX_FRAME_BYTES;
/// Largest message on a controller's connections to group servers (a shard's export, in
/// parts): 1 GiB, the servers' default message limit (`TransportConfig::max_message_bytes`).
pub const CONTROLLER_MAX_MESSAGE_BYTES: usize = crate::transport::DEFAULT_MAX_MESSAGE_BYTES;

/// How long a large migration step sent to a group server (an Export, an Install carrying a
/// shard) is given to answer before the controller's retries may send it again. The
/// controller's protocol resends an unanswered step every `retry_timeout` (to the next server,
/// which points back at the leader): right for small steps, but a large Install takes longer
/// than that to commit (its one log entry holds the shard, written and replicated by every
/// server), and each copy sent again would be another whole shard to transfer, log, replicate
/// and snapshot (applied as "already done"). So while a large step is in flight to a server
/// whose connection holds, its resends are held back, until the server answers (a NotLeader
/// answer included), the connection is lost, or this much time passed.
pub const LARGE_STEP_PATIENCE: Duration = Duration::from_secs(10);

/// A control request whose answer may be slow and whose copies are costly: see
/// [`LARGE_STEP_PATIENCE`]. Exports (the answer is the shard), Installs with data (a probe
/// has none), and a copy's chunks and stages (about a MiB each, several in flight: resent
/// every `retry_timeout` while a loaded group commits them, each copy would add a MiB to
/// transfer and log, and the more loaded the group, the more copies).
fn is_large_step(op: &ControlOp) -> bool {
    match op {
        ControlOp::Export { .. }
        | ControlOp::ExportChunk { .. }
        | ControlOp::ExportDelta { .. } => true,
        ControlOp::Install { data, .. } => !data.is_empty(),
        ControlOp::Stage { items, .. } => !items.is_empty(),
        ControlOp::StageRound { items, absent, .. } => !items.is_empty() || !absent.is_empty(),
        _ => false,
    }
}

/// The pause before each chunk of a copy while the shard serves (the throttle: real groups
/// serve other shards meanwhile, and the copy is in no hurry): with [`CHUNK_BYTES`] about
/// 10 MiB/s per move at most. Measured in `docs/benchmarks.md`, "Migration while serving":
/// 1 MiB chunks every 10 ms kept the moving shard answered but raised the other shards' p99
/// 4–8× on this 2-core machine (each chunk is a 1 MiB log entry written and fsynced by three
/// servers on the disk every put waits for); 256 KiB every 25 ms kept it within 0.8–1.1×.
pub const PRECOPY_PAUSE: Duration = Duration::from_millis(25);
/// About how many bytes one chunk of a moving shard carries (one `ExportChunk` answer, one
/// `Stage` log entry at the new owner): small enough that one chunk's write and fsync does not
/// hold up the groups' own requests for long (see [`PRECOPY_PAUSE`]).
pub const CHUNK_BYTES: u64 = 256 * 1024;
/// Stages of one move in flight while the shard serves.
pub const PRECOPY_IN_FLIGHT: usize = 1;

/// The throttle of a copy while the shard serves: [`PRECOPY_PAUSE`], [`PRECOPY_IN_FLIGHT`],
/// [`CHUNK_BYTES`],
/// or from the environment (for measuring;
/// `docs/sharding.md`, "Copying while the shard serves"): `SHOAL_MIGRATION_PRECOPY=0` copies
/// frozen only, `SHOAL_MIGRATION_COPY_PAUSE_MS` is the pause between a move's live chunks,
/// `SHOAL_MIGRATION_COPY_IN_FLIGHT` its stages in flight, `SHOAL_MIGRATION_CHUNK_KIB` the size
/// of a chunk, `SHOAL_MIGRATION_DELTA_ROUNDS` the most delta rounds (0: none) and
/// `SHOAL_MIGRATION_DELTA_MIN_BYTES` the size of a delta round after which no other is staged.
fn migration_knobs(cfg: &mut ControllerConfig) -> anyhow::Result<()> {
    cfg.precopy_pause = PRECOPY_PAUSE;
    cfg.precopy_stages_in_flight = PRECOPY_IN_FLIGHT;
    cfg.chunk_bytes = CHUNK_BYTES;
    let var = |name: &str| -> anyhow::Result<Option<u64>> {
        match std::env::var(name) {
            Err(_) => Ok(None),
            Ok(v) => v.trim().parse().map(Some).map_err(|_| {
                anyhow::anyhow!("{name}={v:?} is not a whole number: give one, or unset it")
            }),
        }
    };
    if let Some(v) = var("SHOAL_MIGRATION_PRECOPY")? {
        cfg.precopy = v != 0;
    }
    if let Some(v) = var("SHOAL_MIGRATION_COPY_PAUSE_MS")? {
        cfg.precopy_pause = Duration::from_millis(v);
    }
    if let Some(v) = var("SHOAL_MIGRATION_COPY_IN_FLIGHT")? {
        cfg.precopy_stages_in_flight = usize::try_from(v.max(1)).unwrap_or(1);
    }
    if let Some(v) = var("SHOAL_MIGRATION_CHUNK_KIB")? {
        cfg.chunk_bytes = v.clamp(1, shoal_shard::group::MAX_CHUNK_BYTES / 1024) * 1024;
    }
    if let Some(v) = var("SHOAL_MIGRATION_DELTA_ROUNDS")? {
        cfg.delta_rounds = u32::try_from(v).unwrap_or(u32::MAX);
    }
    if let Some(v) = var("SHOAL_MIGRATION_DELTA_MIN_BYTES")? {
        cfg.delta_min_bytes = v;
    }
    tracing::debug!(
        precopy = cfg.precopy,
        pause_ms = cfg.precopy_pause.as_millis() as u64,
        in_flight = cfg.precopy_stages_in_flight,
        chunk_bytes = cfg.chunk_bytes,
        delta_rounds = cfg.delta_rounds,
        delta_min_bytes = cfg.delta_min_bytes,
        "migration copy settings"
    );
    Ok(())
}

/// Settings of a [`ShardController`].
#[derive(Debug, Clone)]
pub struct ControllerDriverConfig {
    /// The controller store's KV servers, in server-id order.
    pub store: Vec<SocketAddr>,
    /// The cluster id every server was started with.
    pub cluster_id: u64,
    /// The shard count: used only to create configuration 0 in an empty store (a store that
    /// holds configurations keeps its count).
    pub shards: u32,
    /// The lock holder's name, unique among the controllers running at once. Default:
    /// `HOSTNAME-PID`.
    pub name: String,
    /// The lock's lease: how long the lock stays taken after a controller died without
    /// stopping.
    pub lease_ttl: Duration,
    /// Wait this long for a server before asking the next (and before retrying a step a
    /// group refused).
    pub retry_timeout: Duration,
    /// Time to establish a TCP connection.
    pub connect_timeout: Duration,
    /// Largest frame on its connections.
    pub max_frame_bytes: usize,
    /// Largest message on its connections to group servers: a shard's export, sent in parts
    /// when larger than a frame. A shard larger than this cannot move.
    pub max_message_bytes: usize,
    /// Plain TCP or TLS ([`crate::tls`]), to the controller store and the groups alike.
    pub security: Security,
}

impl ControllerDriverConfig {
    /// Defaults for the cluster whose controller store is at `store`.
    pub fn new(store: Vec<SocketAddr>, shards: u32) -> ControllerDriverConfig {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".to_string());
        ControllerDriverConfig {
            store,
            cluster_id: DEFAULT_CLUSTER_ID,
            shards,
            name: format!("{host}-{}", std::process::id()),
            lease_ttl: Duration::from_secs(3),
            retry_timeout: Duration::from_millis(200),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_frame_bytes: CONTROLLER_MAX_FRAME_BYTES,
            max_message_bytes: CONTROLLER_MAX_MESSAGE_BYTES,
            security: Security::plain(),
        }
    }

    fn links(&self) -> LinkConfig {
        LinkConfig {
            cluster_id: self.cluster_id,
            max_frame_bytes: self.max_frame_bytes,
            max_message_bytes: self.max_message_bytes,
            connect_timeout: self.connect_timeout,
            queue_len: 1024,
            security: self.security.clone(),
        }
    }
}

enum Cmd {
    Submit(Op, oneshot::Sender<Result<u64, String>>),
    Stop(oneshot::Sender<()>),
}

/// A running controller: a tokio task holding (or acquiring) the store's lock. Dropping it
/// without [`ShardController::stop`] ends the task, the lease left to run out.
pub struct ShardController {
    cmds: mpsc::Sender<Cmd>,
    status: Arc<Mutex<ControllerStatus>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShardController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardController")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Drop for ShardController {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl ShardController {
    /// Starts a controller (on the current tokio runtime): it grants a lease, takes the lock
    /// (waiting while another controller holds it), and finishes an incomplete change if the
    /// latest one is.
    pub fn start(config: ControllerDriverConfig) -> anyhow::Result<ShardController> {
        if config.store.is_empty() {
            bail!(
                "no controller store addresses given: pass --controller ADDR,ADDR,ADDR (the \
                 lines of DIR/controller written by `shoal shard up`)"
            );
        }
        let store_ids: Vec<u64> = (1..=config.store.len() as u64).collect();
        let mut cfg = ControllerConfig::new(
            config.name.clone().into_bytes(),
            new_id(),
            store_ids,
            config.shards,
        );
        cfg.lease_ttl_ms = u64::try_from(config.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        cfg.retry_timeout = config.retry_timeout;
        migration_knobs(&mut cfg)?;
        let ctl = Controller::new(cfg).context("starting the shard controller")?;
        let status = Arc::new(Mutex::new(ctl.status()));
        let (cmds, rx) = mpsc::channel(16);
        let task = tokio::spawn(drive(config, ctl, rx, Arc::clone(&status)));
        Ok(ShardController {
            cmds,
            status,
            task: Some(task),
        })
    }

    /// Runs `op` to completion: the new configuration's number once every moved shard is
    /// installed at its new owner and deleted at its old one, or why it was refused (nothing
    /// changed). Waits as long as it takes (a group that is unreachable is retried; see
    /// [`ShardController::status`] for what it waits for).
    pub async fn submit(&self, op: Op) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Submit(op, tx)).await.is_err() {
            return Err("the controller stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the controller stopped".into()))
    }

    /// What the controller is doing: phase, lock, the latest configuration, moves pending
    /// and done, the last problem a server reported.
    pub fn status(&self) -> ControllerStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops: revokes the lease (deleting the lock) so the next controller need not wait
    /// for it to run out. A change in progress stays recorded; the next controller finishes it.
    pub async fn stop(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

fn new_id() -> u64 {
    use rand::Rng;
    // Not the protocol's RNG: the runtime is where entropy comes in.
    rand::rngs::OsRng.gen::<u64>() | 1
}

/// The controller's task.
async fn drive(
    config: ControllerDriverConfig,
    mut ctl: Controller,
    mut cmds: mpsc::Receiver<Cmd>,
    status: Arc<Mutex<ControllerStatus>>,
) {
    let (store_tx, mut store_rx) = mpsc::channel::<Event<KvReply>>(REPLY_QUEUE_LEN);
    let (group_tx, mut group_rx) = mpsc::channel::<Event<FromGroup>>(REPLY_QUEUE_LEN);
    let store: Links<KvRequest, KvReply> = Links::to_one(config.links(), store_tx.clone());
    let groups: Links<ToGroup, FromGroup> = Links::to_one(config.links(), group_tx.clone());
    // Group servers asked: address → (gid, name in the configuration).
    let mut servers: BTreeMap<SocketAddr, (u64, String)> = BTreeMap::new();
    // Large steps sent and not answered yet: tag → (server, when sent).
    let mut in_flight: BTreeMap<u64, (SocketAddr, Instant)> = BTreeMap::new();
    let mut waiting: BTreeMap<u64, oneshot::Sender<Result<u64, String>>> = BTreeMap::new();
    let mut next_ticket = 1u64;
    let mut timers = Timers::default();
    let mut last_logged: Option<(CtlPhase, Option<u64>, bool, Option<String>)> = None;
    let mut actions = ctl.start();
    let stopped = loop {
        for action in actions.drain(..) {
            match action {
                CtlAction::Store { server, request } => {
                    let addr = usize::try_from(server.saturating_sub(1))
                        .ok()
                        .and_then(|i| config.store.get(i));
                    if let Some(&addr) = addr {
                        store.send(addr, request, &store_tx);
                    }
                }
                CtlAction::Group {
                    gid,
                    server,
                    request,
                } => match server.parse::<SocketAddr>() {
                    Ok(addr) => {
                        if is_large_step(&request.op) {
                            let now = Instant::now();
                            if let Some((to, since)) = in_flight.get(&request.tag) {
                                if now.duration_since(*since) < LARGE_STEP_PATIENCE {
                                    debug!(gid, tag = request.tag, to = %to, "a large step is in flight: not sending it again yet");
                                    continue;
                                }
                            }
                            in_flight
                                .retain(|_, (_, t)| now.duration_since(*t) < LARGE_STEP_PATIENCE);
                            in_flight.insert(request.tag, (addr, now));
                        }
                        servers.insert(addr, (gid, server));
                        groups.send(addr, ToGroup::Control(request), &group_tx);
                    }
                    // Retried on the controller's timers; said once per phase change below.
                    Err(_) => warn!(
                        gid,
                        %server,
                        "a group server is named by something other than IP:PORT: it cannot be reached"
                    ),
                },
                CtlAction::SetTimer { after, token } => timers.set(after, token),
                CtlAction::Finished { ticket, result } => {
                    if let Some(tx) = waiting.remove(&ticket) {
                        let _ = tx.send(result);
                    }
                }
            }
        }
        let s = ctl.status();
        let summary = (s.phase, s.latest, s.complete, s.last_problem.clone());
        if last_logged.as_ref() != Some(&summary) {
            debug!(phase = ?s.phase, latest = ?s.latest, complete = s.complete,
                moves_pending = s.moves_pending, problem = ?s.last_problem, "controller");
            last_logged = Some(summary);
        }
        *status.lock().unwrap_or_else(|e| e.into_inner()) = s;
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Submit(op, tx)) => {
                    let ticket = next_ticket;
                    next_ticket += 1;
                    debug!(ticket, ?op, "submitting");
                    waiting.insert(ticket, tx);
                    actions = ctl.submit(ticket, op);
                }
                Some(Cmd::Stop(tx)) => break Some(tx),
                None => break None,
            },
            event = store_rx.recv() => {
                if let Some(Event::Reply(_, reply)) = event {
                    actions = ctl.on_store_reply(reply);
                }
                // A lost connection: the controller's own timers resend.
            }
            event = group_rx.recv() => match event {
                Some(Event::Reply(addr, FromGroup::Control(reply))) => {
                    if in_flight.get(&reply.tag()).is_some_and(|(to, _)| *to == addr) {
                        in_flight.remove(&reply.tag());
                    }
                    if let Some((gid, name)) = servers.get(&addr) {
                        actions = ctl.on_group_reply(*gid, name, reply);
                    }
                }
                // Whatever was in flight there will not be answered: resends may go.
                Some(Event::Lost(addr, _)) => in_flight.retain(|_, (to, _)| *to != addr),
                _ => {}
            },
            _ = timers.next_due() => {
                for token in timers.take_due() {
                    actions.extend(ctl.on_timer(token));
                }
            }
        }
    };
    if let Some(lease) = ctl.lease() {
        let mut cc = ClientConfig::new(config.store.clone());
        cc.cluster_id = config.cluster_id;
        cc.op_timeout = Duration::from_secs(2);
        cc.security = config.security.clone();
        if let Ok(mut client) = Client::new(cc) {
            match client.lease_revoke(lease).await {
                Ok(_) => debug!(lease, "controller lease revoked"),
                Err(e) => {
                    warn!(lease, error = %e, "could not revoke the controller's lease; the next controller waits for it to run out")
                }
            }
        }
    }
    if let Some(tx) = stopped {
        let _ = tx.send(());
    }
}

fn store_client(
    security: &Security,
    store: &[SocketAddr],
    cluster_id: u64,
    timeout: Duration,
) -> Result<Client, ClientError> {
    let mut cc = ClientConfig::new(store.to_vec());
    cc.cluster_id = cluster_id;
    cc.op_timeout = timeout;
    cc.security = security.clone();
    Client::new(cc)
}

/// The latest record (configuration, its moves, whether the change is complete), read
/// linearizably from the controller store; `None` before the first controller ran.
pub async fn read_latest(
    store: &[SocketAddr],
    cluster_id: u64,
    timeout: Duration,
) -> Result<Option<Record>, ClientError> {
    read_latest_secure(&Security::plain(), store, cluster_id, timeout).await
}

/// [`read_latest`] over plain TCP or TLS, as `security` says.
pub async fn read_latest_secure(
    security: &Security,
    store: &[SocketAddr],
    cluster_id: u64,
    timeout: Duration,
) -> Result<Option<Record>, ClientError> {
    let mut client = store_client(security, store, cluster_id, timeout)?;
    match client.get(LATEST_KEY).await? {
        None => Ok(None),
        Some((bytes, _)) => Record::decode(&bytes).map(Some).map_err(|e| {
            ClientError::NoServer(format!(
                "the controller store's latest record does not decode ({e}): is this the \
                 controller store of a sharded cluster, of this version of Shoal?"
            ))
        }),
    }
}

/// Configuration `num` from the controller store's history; `None` if it holds no such one.
pub async fn read_config(
    store: &[SocketAddr],
    cluster_id: u64,
    num: u64,
    timeout: Duration,
) -> Result<Option<Config>, ClientError> {
    read_config_secure(&Security::plain(), store, cluster_id, num, timeout).await
}

/// [`read_config`] over plain TCP or TLS, as `security` says.
pub async fn read_config_secure(
    security: &Security,
    store: &[SocketAddr],
    cluster_id: u64,
    num: u64,
    timeout: Duration,
) -> Result<Option<Config>, ClientError> {
    let mut client = store_client(security, store, cluster_id, timeout)?;
    match client.get(&config_key(num)).await? {
        None => Ok(None),
        Some((bytes, _)) => Config::decode(&bytes).map(Some).map_err(|e| {
            ClientError::NoServer(format!(
                "configuration {num} in the controller store does not decode ({e})"
            ))
        }),
    }
}

/// What one group server says of itself: whether it leads its group, the configuration it
/// adopted (leader only) and its leader hint (a follower's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupServerStatus {
    /// It leads its group.
    pub leader: bool,
    /// The configuration its group adopted (known by the leader; 0 from a follower).
    pub adopted: u64,
    /// A follower's hint: the id (position in the group, from 1) of the leader it follows.
    pub leader_hint: Option<u64>,
}

/// Asks the server at `addr` (of group `gid`) whether it leads and which configuration its
/// group adopted, within `timeout`. Errors say why, for a person.
pub async fn group_server_status(
    addr: SocketAddr,
    gid: u64,
    cluster_id: u64,
    timeout: Duration,
) -> Result<GroupServerStatus, String> {
    group_server_status_secure(&Security::plain(), addr, gid, cluster_id, timeout).await
}

/// [`group_server_status`] over plain TCP or TLS, as `security` says.
pub async fn group_server_status_secure(
    security: &Security,
    addr: SocketAddr,
    gid: u64,
    cluster_id: u64,
    timeout: Duration,
) -> Result<GroupServerStatus, String> {
    match ask_group_server(security, addr, gid, cluster_id, timeout, ControlOp::Adopted).await? {
        ControlReply::Adopted { adopted, .. } => Ok(GroupServerStatus {
            leader: true,
            adopted,
            leader_hint: None,
        }),
        ControlReply::NotLeader { leader, .. } => Ok(GroupServerStatus {
            leader: false,
            adopted: 0,
            leader_hint: leader,
        }),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Asks the server at `addr` (of group `gid`) how many shards its group has (any server
/// answers, leader or not), within `timeout`. Errors say why, for a person (a server older
/// than this question closes the connection).
pub async fn group_server_shards_secure(
    security: &Security,
    addr: SocketAddr,
    gid: u64,
    cluster_id: u64,
    timeout: Duration,
) -> Result<u32, String> {
    match ask_group_server(security, addr, gid, cluster_id, timeout, ControlOp::Shards).await {
        Ok(ControlReply::Shards { shards, .. }) => Ok(shards),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) if e.starts_with("connection closed") => Err(format!("{e} (an older server?)")),
        Err(e) => Err(e),
    }
}

/// One control question to the server at `addr` (of group `gid`) on a connection of its own,
/// within `timeout`: its answer, or why there is none, for a person (a server of another
/// group is an error here).
async fn ask_group_server(
    security: &Security,
    addr: SocketAddr,
    gid: u64,
    cluster_id: u64,
    timeout: Duration,
    op: ControlOp,
) -> Result<ControlReply, String> {
    let ask = async {
        let mut framed = connect_client_secure::<FromGroup, ToGroup>(
            security,
            addr,
            cluster_id,
            shoal_wire::DEFAULT_MAX_FRAME_BYTES,
            timeout,
        )
        .await
        .map_err(|e| match e {
            crate::transport::TransportError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                "connection refused".to_string()
            }
            other => other.to_string(),
        })?;
        let request = ControlRequest { tag: 1, gid, op };
        framed
            .send(ToGroup::Control(request))
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        loop {
            match framed.next().await {
                Some(Ok(FromGroup::Control(ControlReply::WrongGid { gid: theirs, .. }))) => {
                    return Err(format!("a server of group {theirs}, not of group {gid}"))
                }
                Some(Ok(FromGroup::Control(reply))) => return Ok(reply),
                // A client's answer (or a part: never one here, this codec has no parts).
                Some(Ok(FromGroup::Reply(_) | FromGroup::Part { .. })) => continue,
                Some(Err(e)) => {
                    return Err(format!(
                        "bad answer ({e}): another cluster, or not a shard group server?"
                    ))
                }
                None => return Err("connection closed without an answer".into()),
            }
        }
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
