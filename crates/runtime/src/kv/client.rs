//! The async KV client: the sans-IO [`Clerk`] driven over TCP with tokio timers.
//!
//! The clerk decides everything (which server to ask, when to resend, the "maybe" rule); this
//! module only carries its [`Action`]s out: one lazily opened connection per endpoint, one
//! timer, and an overall deadline per operation. An operation that misses its deadline
//! returns [`ClientError::Timeout`] (its outcome is unknown: a write may still apply), and the
//! client continues with a fresh clerk under a new client id, so a late answer to the
//! abandoned request can never be taken for the next one's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use shoal_kv::{Action, Clerk, ClerkConfig, Lock, LockStep, Outcome};
use shoal_wire::kv::{
    Expected, KvOp, KvReply, KvRequest, KvResult, LeaseInfo, MemberInfo, ScanItem, ServerStatus,
    SnapshotTransfer,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use crate::tls::Security;
use crate::transport::{
    connect_client_secure, send_queued, TransportError, MAX_REFUSAL_FRAME_BYTES,
};
use bytes::{Buf as _, BytesMut};
use shoal_wire::codec::{CodecError, FrameCodec};
use shoal_wire::frame::{decode_frame, peek_frame_len, FRAME_HEADER_BYTES};
use shoal_wire::mr::ToWorker;
use shoal_wire::{Refusal, KV_SERVICE, PROTOCOL_MAGIC};
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};

/// Default [`ClientConfig::op_timeout`].
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ClientConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default [`ClientConfig::retry_timeout`]: wait this long for an answer before asking the
/// next server (a real network is slower than the simulator's, and an fsync is in the path).
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_millis(500);
/// Default [`ClientConfig::refused_grace`].
pub const DEFAULT_REFUSED_GRACE: Duration = Duration::from_secs(2);
/// Requests queued per connection before new ones are dropped (the clerk resends).
pub const CONNECTION_QUEUE_LEN: usize = 64;
/// Replies from all connections waiting to be read.
pub const REPLY_QUEUE_LEN: usize = 1024;
/// Default cluster id (the same as `shoal kv server`'s default).
pub const DEFAULT_CLUSTER_ID: u64 = 1;
/// Most pairs a scan asks for by default.
pub const DEFAULT_SCAN_LIMIT: u32 = 1000;

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The servers' addresses, in any order. A server that does not lead answers with the
    /// leader's address, which the client dials even if it is not listed: one reachable
    /// server is enough to find the leader (list several, so one down is not fatal).
    pub endpoints: Vec<SocketAddr>,
    /// The cluster id the servers were started with.
    pub cluster_id: u64,
    /// Overall time an operation may take, retries included.
    pub op_timeout: Duration,
    /// Time to establish a TCP connection.
    pub connect_timeout: Duration,
    /// Time to wait for an answer before resending to the next server.
    pub retry_timeout: Duration,
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// Reads answered by any server from its local state (possibly stale).
    pub serializable_reads: bool,
    /// How long an operation keeps trying when every server refuses the connection before it
    /// fails with [`ClientError::NoServer`] (capped by the operation's timeout): a cluster
    /// being started binds its ports within moments, a stopped one never does.
    pub refused_grace: Duration,
    /// Plain TCP or TLS ([`crate::tls`]).
    pub security: Security,
}

impl ClientConfig {
    /// Defaults for these endpoints.
    pub fn new(endpoints: Vec<SocketAddr>) -> ClientConfig {
        ClientConfig {
            endpoints,
            cluster_id: DEFAULT_CLUSTER_ID,
            op_timeout: DEFAULT_OP_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry_timeout: DEFAULT_RETRY_TIMEOUT,
            max_frame_bytes: shoal_wire::DEFAULT_MAX_FRAME_BYTES,
            serializable_reads: false,
            refused_grace: DEFAULT_REFUSED_GRACE,
            security: Security::plain(),
        }
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer within the operation's deadline. For a write (`write`), its outcome is
    /// unknown: it may still apply.
    #[error("{}", timeout_message(*.after, .seen, *.write))]
    Timeout {
        /// The deadline that ran out.
        after: Duration,
        /// What the client saw meanwhile, for a person: how many servers answered (none as
        /// leader), why the others did not ("no leader: 1 of 3 servers answering (…)").
        seen: String,
        /// The operation was a write, which may still apply.
        write: bool,
    },
    /// No endpoint can serve this cluster: each refused the connection, is a server of
    /// another cluster, or is not a KV server. Said at once, without waiting for the deadline;
    /// the message says which (e.g. "cannot reach any server (connection refused on A, B, C):
    /// is the cluster running?", "server A is cluster 1, not 2", "A is not a Shoal KV server
    /// (it speaks HTTP)").
    #[error("{0}")]
    NoServer(String),
    /// The key or value exceeds the servers' limit; nothing was stored.
    #[error("{what} of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// `"key"` or `"value"`.
        what: String,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The server answered something this operation cannot return (a bug or a version skew).
    #[error("unexpected answer: {0:?}")]
    Unexpected(KvResult),
    /// The server could not be reached (connection refused or lost).
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// The server's address.
        addr: SocketAddr,
        /// Why, for a person.
        reason: String,
    },
    /// The client is misconfigured (no endpoints).
    #[error("client: {0}")]
    Kv(#[from] shoal_kv::Error),
}

/// The answer to a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored; the key is now at this version.
    Written(u64),
    /// The key is at another version; nothing was stored.
    Mismatch,
    /// The key is missing and a version > 0 was expected.
    NoKey,
    /// A retried conditional put was answered "mismatch": the first send may have applied.
    Maybe,
}

/// The answer to a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// Removed.
    Deleted,
    /// The key is at another version; nothing was removed.
    Mismatch,
    /// The key is missing.
    NoKey,
    /// A retried delete was answered mismatch or no-key: the first send may have applied.
    Maybe,
}

/// An async client of a KV cluster. One operation at a time (`&mut self`); open several
/// clients for concurrency.
pub struct Client {
    config: ClientConfig,
    clerk: Clerk,
    replies_tx: mpsc::Sender<Incoming>,
    replies: mpsc::Receiver<Incoming>,
    /// The server whose answer finished the last operation.
    last_server: Option<u64>,
    /// Request ids of status requests (counting down from the top, apart from the clerk's).
    next_status_request: u64,
    /// The connections: the client's own (a pool of one), or shared ([`Client::with_pool`]).
    pool: ClientPool,
    /// Ids (client id, session ids) answers to this client carry, registered in the pool.
    routed: Vec<u64>,
    /// Wrong-leader answers received since the client was made ([`Client::redirects`]).
    redirects: u64,
}

/// Routes from the client id an answer echoes to the client waiting for it.
type Routes = Arc<Mutex<BTreeMap<u64, mpsc::Sender<Incoming>>>>;

/// Connections shared by many [`Client`]s ([`Client::with_pool`]): one TCP connection per
/// server carries the requests of every client of the pool, written in batches, and each
/// answer goes to the client whose id (or session id) it echoes. Each client still runs one
/// operation at a time in its own session, so N clients of one pool keep N operations in
/// flight over one connection per server, as a gRPC channel does.
#[derive(Clone)]
pub struct ClientPool {
    config: ClientConfig,
    /// Requests queued per connection before new ones are dropped (the clerks resend).
    queue_len: usize,
    connections: Arc<Mutex<BTreeMap<u64, mpsc::Sender<KvRequest>>>>,
    routes: Routes,
    /// Where each server (a clerk's server number) is, shared by the pool's clients so that
    /// a number means the same address to all of them.
    directory: Arc<Mutex<Directory>>,
}

/// Most leader addresses a [`ClientPool`] learns from wrong-leader answers beyond its
/// endpoints (a bound on what servers' answers can make a client remember).
pub const MAX_LEARNT_ADDRESSES: usize = 64;

/// The servers a pool's clients send to: server `n` (the clerk's number) is at `addrs[n - 1]`;
/// the endpoints come first, in the order given, then the leaders' addresses learnt from
/// wrong-leader answers. `ids` maps a server's Raft id, as the hints name it, to its number.
#[derive(Debug, Default)]
struct Directory {
    addrs: Vec<SocketAddr>,
    endpoints: usize,
    ids: BTreeMap<u64, u64>,
}

impl Directory {
    fn new(endpoints: &[SocketAddr]) -> Directory {
        Directory {
            addrs: endpoints.to_vec(),
            endpoints: endpoints.len(),
            ids: BTreeMap::new(),
        }
    }

    fn addr(&self, server: u64) -> Option<SocketAddr> {
        index_of(server).and_then(|i| self.addrs.get(i)).copied()
    }

    /// The number of the server at `addr`, added if new (`None` once
    /// [`MAX_LEARNT_ADDRESSES`] were learnt).
    fn number_of(&mut self, addr: SocketAddr) -> Option<u64> {
        if let Some(i) = self.addrs.iter().position(|a| *a == addr) {
            return Some(i as u64 + 1);
        }
        if self.addrs.len() - self.endpoints >= MAX_LEARNT_ADDRESSES {
            return None;
        }
        self.addrs.push(addr);
        Some(self.addrs.len() as u64)
    }

    /// The server number a wrong-leader hint points at: the leader's address if the answer
    /// carries one (remembered under the leader's id), else the number last learnt for that
    /// id. An id alone is not taken for an endpoint's position: endpoints may be in any order.
    fn place_hint(&mut self, leader: Option<u64>, leader_addr: Option<&str>) -> Option<u64> {
        match leader_addr.and_then(|a| a.parse::<SocketAddr>().ok()) {
            Some(addr) => {
                let number = self.number_of(addr)?;
                if let Some(id) = leader {
                    self.ids.insert(id, number);
                }
                Some(number)
            }
            None => self.ids.get(&leader?).copied(),
        }
    }
}

impl std::fmt::Debug for ClientPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPool")
            .field("endpoints", &self.config.endpoints)
            .finish_non_exhaustive()
    }
}

/// Requests queued per pooled connection (many clients share it).
pub const POOL_CONNECTION_QUEUE_LEN: usize = 8192;

impl ClientPool {
    /// A pool for the cluster at `config.endpoints`; connects lazily.
    pub fn new(config: ClientConfig) -> ClientPool {
        ClientPool::with_queue_len(config, POOL_CONNECTION_QUEUE_LEN)
    }

    fn with_queue_len(config: ClientConfig, queue_len: usize) -> ClientPool {
        ClientPool {
            directory: Arc::new(Mutex::new(Directory::new(&config.endpoints))),
            config,
            queue_len,
            connections: Arc::default(),
            routes: Arc::default(),
        }
    }

    fn directory(&self) -> std::sync::MutexGuard<'_, Directory> {
        self.directory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue of the shared connection to `server` (`addr`), opened if needed.
    fn sender(&self, server: u64, addr: SocketAddr) -> mpsc::Sender<KvRequest> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        match connections.get(&server) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(self.queue_len);
                tokio::spawn(pooled_connection(
                    server,
                    addr,
                    self.config.clone(),
                    rx,
                    Arc::clone(&self.routes),
                ));
                connections.insert(server, tx.clone());
                tx
            }
        }
    }

    fn route(&self, id: u64, to: mpsc::Sender<Incoming>) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.insert(id, to);
    }

    fn unroute(&self, ids: &[u64]) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            routes.remove(id);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.pool.unroute(&self.routed);
    }
}

/// What the connection tasks tell the client.
#[derive(Debug)]
enum Incoming {
    /// Server `.0` answered.
    Reply(u64, KvReply),
    /// The connection to server `.0` failed or could not be opened, for this reason.
    Lost(u64, LinkFailure),
}

/// Why a connection to a server ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkFailure {
    /// Connection refused: nothing listens there.
    ConnectionRefused,
    /// The server refused the handshake or the first request, and said why.
    RefusedBy(Refusal),
    /// The other end answered in another protocol (described).
    Foreign(String),
    /// The connection could not be opened for another reason (a timeout, no route).
    Connect(String),
    /// The connection was open (a request may have been delivered) and ended.
    Lost(String),
    /// The TLS handshake failed (a certificate refused by either side, TLS against a plain
    /// server): the server processed nothing, and retrying cannot help.
    Tls(String),
}

impl LinkFailure {
    /// Whether retrying within this operation cannot help: the endpoint is no server of this
    /// cluster, or nothing listens there.
    fn is_definite(&self) -> bool {
        matches!(
            self,
            LinkFailure::ConnectionRefused
                | LinkFailure::RefusedBy(_)
                | LinkFailure::Foreign(_)
                | LinkFailure::Tls(_)
        )
    }

    /// The failure of the endpoint at `addr`, for a person, in a client of `cluster_id`.
    fn describe(&self, addr: SocketAddr, cluster_id: u64) -> String {
        match self {
            LinkFailure::ConnectionRefused => format!("{addr}: connection refused"),
            LinkFailure::RefusedBy(r) if r.service == KV_SERVICE && r.cluster_id != cluster_id => {
                format!(
                    "server {addr} is cluster {}, not {cluster_id}",
                    r.cluster_id
                )
            }
            LinkFailure::RefusedBy(r) if r.service == KV_SERVICE => {
                format!("server {addr} refused the connection: {}", r.reason)
            }
            LinkFailure::RefusedBy(r) => {
                format!(
                    "{addr} is not a Shoal KV server (it is a {}: {})",
                    r.service, r.reason
                )
            }
            LinkFailure::Foreign(what) => {
                format!("{addr} is not a Shoal KV server (it speaks {what})")
            }
            LinkFailure::Connect(e) => format!("{addr}: {e}"),
            LinkFailure::Lost(e) | LinkFailure::Tls(e) => format!("{addr}: {e}"),
        }
    }
}

/// What one operation learnt about each server (index `server - 1`).
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Servers that sent any answer during the operation.
    answered: Vec<bool>,
    /// The last failure of each server's connection during the operation.
    failed: Vec<Option<LinkFailure>>,
    /// A connection failed after it was open: a request may have reached a server.
    maybe_delivered: bool,
}

impl Seen {
    fn new(servers: usize) -> Seen {
        Seen {
            answered: vec![false; servers],
            failed: vec![None; servers],
            maybe_delivered: false,
        }
    }

    /// Makes room for server `server` (a leader learnt from a hint), if it can be one.
    fn index(&mut self, server: u64) -> Option<usize> {
        let i = index_of(server)?;
        if i >= self.answered.len() && i < self.answered.len() + MAX_LEARNT_ADDRESSES {
            self.answered.resize(i + 1, false);
            self.failed.resize(i + 1, None);
        }
        (i < self.answered.len()).then_some(i)
    }

    fn answered(&mut self, server: u64) {
        if let Some(i) = self.index(server) {
            self.answered[i] = true;
        }
    }

    fn failed(&mut self, server: u64, failure: LinkFailure) {
        if matches!(failure, LinkFailure::Lost(_)) {
            self.maybe_delivered = true;
        }
        if let Some(i) = self.index(server) {
            self.failed[i] = Some(failure);
        }
    }

    fn has_failed(&self, server: u64) -> bool {
        index_of(server)
            .and_then(|i| self.failed.get(i))
            .is_some_and(Option::is_some)
    }

    /// Whether some server refused the connection (it may be starting).
    fn any_refused(&self) -> bool {
        self.failed
            .iter()
            .any(|f| matches!(f, Some(LinkFailure::ConnectionRefused)))
    }

    /// Whether no server answered and every one failed for good.
    fn hopeless(&self) -> bool {
        !self.answered.iter().any(|&a| a)
            && self
                .failed
                .iter()
                .all(|f| f.as_ref().is_some_and(LinkFailure::is_definite))
    }

    /// The message of [`ClientError::NoServer`] when [`Seen::hopeless`].
    fn no_server(&self, endpoints: &[SocketAddr], cluster_id: u64, write: bool) -> String {
        let mut refused = Vec::new();
        let mut other = Vec::new();
        for (f, addr) in self.failed.iter().zip(endpoints) {
            match f {
                Some(LinkFailure::ConnectionRefused) => refused.push(addr.to_string()),
                Some(f) => other.push(f.describe(*addr, cluster_id)),
                None => {}
            }
        }
        let mut message = if other.is_empty() {
            let which = if refused.len() == 1 {
                "the server"
            } else {
                "any server"
            };
            format!(
                "cannot reach {which} (connection refused on {}): is the cluster running?",
                refused.join(", ")
            )
        } else {
            if !refused.is_empty() {
                other.push(format!("connection refused on {}", refused.join(", ")));
            }
            other.join("; ")
        };
        if write && self.maybe_delivered {
            message.push_str(" (a write may or may not have applied)");
        }
        message
    }

    /// What the client saw, for [`ClientError::Timeout`].
    fn summary(&self, endpoints: &[SocketAddr], cluster_id: u64) -> String {
        let answering = self.answered.iter().filter(|&&a| a).count();
        let details: Vec<String> = self
            .failed
            .iter()
            .zip(&self.answered)
            .zip(endpoints)
            .filter(|((_, &answered), _)| !answered)
            .map(|((f, _), addr)| match f {
                Some(f) => f.describe(*addr, cluster_id),
                None => format!("{addr}: no answer"),
            })
            .collect();
        let details = if details.is_empty() {
            String::new()
        } else {
            format!(" ({})", details.join("; "))
        };
        if answering == 0 {
            format!("no server answered{details}")
        } else {
            format!(
                "no leader: {answering} of {} servers answering{details}",
                endpoints.len()
            )
        }
    }
}

/// The endpoint index of server `server` (ids count from 1), if it can be one.
fn index_of(server: u64) -> Option<usize> {
    usize::try_from(server.checked_sub(1)?).ok()
}

/// The message of [`ClientError::Timeout`].
fn timeout_message(after: Duration, seen: &str, write: bool) -> String {
    let mut m = format!("no answer within {after:?}");
    if !seen.is_empty() {
        m.push_str(": ");
        m.push_str(seen);
    }
    if write {
        m.push_str(" (a write may or may not have applied)");
    }
    m
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.config.endpoints)
            .field("client_id", &self.clerk.client_id())
            .finish_non_exhaustive()
    }
}

/// A fresh random client id: sessions are keyed by it, so two clients must not share one.
fn new_client_id() -> u64 {
    use rand::Rng;
    // Not the protocol's RNG: the runtime is where entropy comes in.
    rand::rngs::OsRng.gen::<u64>() | 1
}

impl Client {
    /// A client of the cluster at `config.endpoints`; connects lazily.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        let pool = ClientPool::with_queue_len(config.clone(), CONNECTION_QUEUE_LEN);
        Client::in_pool(config, pool)
    }

    /// A client sharing `pool`'s connections with the pool's other clients.
    pub fn with_pool(pool: &ClientPool) -> Result<Client, ClientError> {
        Client::in_pool(pool.config.clone(), pool.clone())
    }

    fn in_pool(config: ClientConfig, pool: ClientPool) -> Result<Client, ClientError> {
        let clerk = Self::clerk(&config, &pool)?;
        let (replies_tx, replies) = mpsc::channel(REPLY_QUEUE_LEN);
        let mut client = Client {
            config,
            clerk,
            replies_tx,
            replies,
            last_server: None,
            next_status_request: u64::MAX,
            pool,
            routed: Vec::new(),
            redirects: 0,
        };
        client.update_routes();
        Ok(client)
    }

    /// How many wrong-leader answers the client received since it was made (each costs a
    /// round trip; a client that follows the leader's address needs at most one per change of
    /// leader).
    pub fn redirects(&self) -> u64 {
        self.redirects
    }

    /// Follows a wrong-leader answer's hint: the clerk numbers servers by their place in the
    /// pool's directory, not by Raft id, so the hint is translated (and a leader that is
    /// none of the endpoints added to the directory and to the clerk).
    fn place_hint(&mut self, reply: KvReply) -> KvReply {
        let KvReply::WrongLeader {
            client,
            request,
            leader,
            leader_addr,
        } = reply
        else {
            return reply;
        };
        self.redirects += 1;
        let number = self
            .pool
            .directory()
            .place_hint(leader, leader_addr.as_deref());
        if let Some(n) = number {
            if self.clerk.add_server(n) {
                debug!(leader = ?leader, addr = ?leader_addr, server = n,
                    "following a leader hint to an address not among the endpoints");
            }
        }
        KvReply::WrongLeader {
            client,
            request,
            leader: number,
            leader_addr,
        }
    }

    /// Every server's address the client knows, by server number (the endpoints, then the
    /// leaders learnt from hints).
    fn known_addrs(&self) -> Vec<SocketAddr> {
        self.pool.directory().addrs.clone()
    }

    /// Makes sure the pool routes answers to our client id and session to us.
    fn update_routes(&mut self) {
        for id in [Some(self.clerk.client_id()), self.clerk.session()]
            .into_iter()
            .flatten()
        {
            if !self.routed.contains(&id) {
                self.pool.route(id, self.replies_tx.clone());
                self.routed.push(id);
            }
        }
    }

    /// The id of the server (`index + 1` in the endpoint list) whose answer finished the last
    /// operation, if it finished.
    pub fn last_server(&self) -> Option<u64> {
        self.last_server
    }

    /// Asks the server at `endpoints[index]` about itself (role, term, leader, commit and
    /// applied indexes), whether it leads or not. Waits at most `timeout`.
    pub async fn status(
        &mut self,
        index: usize,
        timeout: Duration,
    ) -> Result<ServerStatus, ClientError> {
        match self.ask_one(index, KvOp::Status, timeout).await? {
            KvResult::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// The members as the server at `endpoints[index]` knows them, leader or not (a server
    /// joining a cluster learns the addresses this way; a follower's answer has no
    /// replication progress). Waits at most `timeout`.
    pub async fn member_list_at(
        &mut self,
        index: usize,
        timeout: Duration,
    ) -> Result<(u64, Vec<MemberInfo>), ClientError> {
        match self.ask_one(index, KvOp::MemberList, timeout).await? {
            KvResult::Members {
                leader, members, ..
            } => Ok((leader, members)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Sends `op` to the server at `endpoints[index]` alone (serializable: answered by that
    /// server whether it leads or not) and waits at most `timeout` for its answer.
    async fn ask_one(
        &mut self,
        index: usize,
        op: KvOp,
        timeout: Duration,
    ) -> Result<KvResult, ClientError> {
        if index >= self.config.endpoints.len() {
            return Err(ClientError::Kv(shoal_kv::Error::NoServers));
        }
        while self.replies.try_recv().is_ok() {}
        let server = index as u64 + 1;
        let request = KvRequest {
            client: self.clerk.client_id(),
            request: self.next_status_request,
            op,
            serializable: true,
        };
        self.next_status_request -= 1;
        let ids = (request.client, request.request);
        self.send(server, request);
        let deadline = Instant::now() + timeout;
        loop {
            tokio::select! {
                incoming = self.replies.recv() => match incoming {
                    Some(Incoming::Reply(from, reply)) if from == server && reply.ids() == ids => {
                        return match reply {
                            KvReply::Done { result, .. } => Ok(result),
                            KvReply::WrongLeader { .. } | KvReply::Part { .. } => {
                                Err(ClientError::Unexpected(KvResult::Stale))
                            }
                        };
                    }
                    Some(Incoming::Lost(from, failure)) if from == server => {
                        let addr = self.config.endpoints[index];
                        return Err(match failure {
                            LinkFailure::Connect(reason) | LinkFailure::Lost(reason) => {
                                ClientError::Unreachable { addr, reason }
                            }
                            LinkFailure::ConnectionRefused => ClientError::Unreachable {
                                addr,
                                reason: "connection refused".into(),
                            },
                            definite => ClientError::NoServer(
                                definite.describe(addr, self.config.cluster_id),
                            ),
                        });
                    }
                    Some(_) => {}
                    None => return Err(status_timeout(timeout)),
                },
                _ = tokio::time::sleep_until(deadline) => return Err(status_timeout(timeout)),
            }
        }
    }

    /// The status of every endpoint, in endpoint order (`Err` for those that did not answer
    /// within `timeout`; they are asked concurrently).
    pub async fn statuses(&self, timeout: Duration) -> Vec<Result<ServerStatus, ClientError>> {
        let mut out = Vec::with_capacity(self.config.endpoints.len());
        for i in 0..self.config.endpoints.len() {
            let mut c = match Client::new(self.config.clone()) {
                Ok(c) => c,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            out.push(Ok(tokio::spawn(async move { c.status(i, timeout).await })));
        }
        let mut results = Vec::with_capacity(out.len());
        for h in out {
            results.push(match h {
                Ok(handle) => handle.await.unwrap_or(Err(status_timeout(timeout))),
                Err(e) => Err(e),
            });
        }
        results
    }

    /// The current leader's status: asks every endpoint and returns the leader with the
    /// highest term, or `None` if no server answers as leader within `timeout`.
    pub async fn find_leader(&self, timeout: Duration) -> Option<ServerStatus> {
        self.statuses(timeout)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .filter(|s| s.role == shoal_wire::kv::ServerRole::Leader)
            .max_by_key(|s| s.term)
    }

    /// A clerk over every server the pool knows (the endpoints and the leaders learnt).
    fn clerk(config: &ClientConfig, pool: &ClientPool) -> Result<Clerk, ClientError> {
        let known = pool.directory().addrs.len().max(config.endpoints.len());
        let servers = (1..=known as u64).collect();
        let mut cc = ClerkConfig::new(new_client_id(), servers);
        cc.retry_timeout = config.retry_timeout;
        cc.serializable_reads = config.serializable_reads;
        Ok(Clerk::new(cc)?)
    }

    /// The servers' addresses, as configured.
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.config.endpoints
    }

    /// This client's current id (it changes after a timed-out operation).
    pub fn client_id(&self) -> u64 {
        self.clerk.client_id()
    }

    /// Runs one operation to its outcome, within `op_timeout`.
    pub async fn execute(&mut self, op: KvOp) -> Result<Outcome, ClientError> {
        let timeout = self.config.op_timeout;
        self.execute_within(op, timeout).await
    }

    /// Runs one operation to its outcome, within `timeout`.
    pub async fn execute_within(
        &mut self,
        op: KvOp,
        timeout: Duration,
    ) -> Result<Outcome, ClientError> {
        // Answers to abandoned requests are of no use.
        while self.replies.try_recv().is_ok() {}
        self.last_server = None;
        let started = Instant::now();
        let deadline = started + timeout;
        let grace = self.config.refused_grace.min(timeout);
        let write = matches!(op, KvOp::Put { .. } | KvOp::Delete { .. });
        let mut seen = Seen::new(self.known_addrs().len());
        let mut actions = self.clerk.start(op)?;
        let mut timer: Option<(Instant, u64)> = None;
        loop {
            self.update_routes();
            for action in actions.drain(..) {
                match action {
                    Action::Send { server, request } => self.send(server, request),
                    Action::SetTimer { after, token } => {
                        timer = Some((Instant::now() + after, token))
                    }
                    Action::Finished(outcome) => return Ok(outcome),
                }
            }
            let (timer_at, token) = timer.unwrap_or((deadline, 0));
            tokio::select! {
                incoming = self.replies.recv() => match incoming {
                    Some(Incoming::Reply(server, reply)) => {
                        seen.answered(server);
                        let reply = self.place_hint(reply);
                        actions = self.clerk.on_reply(reply);
                        if actions.iter().any(|a| matches!(a, Action::Finished(_))) {
                            self.last_server = Some(server);
                        }
                    }
                    Some(Incoming::Lost(server, failure)) => {
                        let again = seen.has_failed(server) && failure.is_definite();
                        seen.failed(server, failure);
                        if seen.hopeless()
                            && (!seen.any_refused() || started.elapsed() >= grace)
                        {
                            // Every endpoint refused or is no server of this cluster: waiting
                            // for the deadline would only hide that.
                            self.abandon()?;
                            return Err(ClientError::NoServer(seen.no_server(
                                &self.known_addrs(),
                                self.config.cluster_id,
                                write,
                            )));
                        }
                        // The first failure of a server moves on to the next at once; a server
                        // that keeps refusing is retried on the clerk's timer, not in a loop.
                        if !again {
                            actions = self.clerk.on_unreachable(server);
                        }
                    }
                    None => {}
                },
                _ = tokio::time::sleep_until(timer_at), if timer.is_some() => {
                    timer = None;
                    actions = self.clerk.on_timer(token);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.abandon()?;
                    return Err(ClientError::Timeout {
                        after: timeout,
                        seen: seen.summary(&self.known_addrs(), self.config.cluster_id),
                        write,
                    });
                }
            }
        }
    }

    /// Gives up the operation in progress. The clerk still waits for it: start over with a
    /// new identity so its answer can never be mistaken for a later one's.
    fn abandon(&mut self) -> Result<(), ClientError> {
        self.clerk = Self::clerk(&self.config, &self.pool)?;
        self.update_routes();
        Ok(())
    }

    fn send(&mut self, server: u64, request: KvRequest) {
        let Some(addr) = self.pool.directory().addr(server) else {
            return;
        };
        // Full or closed: the request is lost, like on a network; the clerk resends.
        let _ = self.pool.sender(server, addr).try_send(request);
    }

    /// Reads `key`: its value and version, or `None` if missing.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        match self.done(KvOp::Get { key: key.to_vec() }).await? {
            KvResult::Found { value, version } => Ok(Some((value, version))),
            KvResult::NoKey => Ok(None),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Stores `value` under `key` if the key is at `expected` (`Expected::Version(0)`: only
    /// if missing; `Expected::Any`: unconditionally).
    pub async fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        expected: Expected,
    ) -> Result<PutOutcome, ClientError> {
        let op = KvOp::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            expected,
        };
        put_outcome(self.execute(op).await?)
    }

    /// Removes `key` if it is at `expected` (or unconditionally with `Expected::Any`).
    pub async fn delete(
        &mut self,
        key: &[u8],
        expected: Expected,
    ) -> Result<DeleteOutcome, ClientError> {
        let op = KvOp::Delete {
            key: key.to_vec(),
            expected,
        };
        delete_outcome(self.execute(op).await?)
    }

    /// Keys in `[start, end)` (no end: to the last key) in key order, at most `limit`.
    ///
    /// The servers answer at most their `max_scan_items` per request; a longer scan is read
    /// in pages (each next page starts just after the last key of the one before), so it is
    /// `limit` keys whenever there are that many. Each page is linearizable on its own; a scan
    /// of several pages is not one snapshot (a key written meanwhile may or may not appear).
    pub async fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<ScanItem>, ClientError> {
        let mut items: Vec<ScanItem> = Vec::new();
        let mut from = start.to_vec();
        while (items.len() as u64) < u64::from(limit) {
            let asked = limit - items.len() as u32;
            let page = self.scan_page(&from, end, asked).await?;
            // An empty page is the end of the range; a full one is all that was asked for. A
            // short one may be the end or the servers' cap: only the next page tells.
            let Some(last) = page.last() else { break };
            // The smallest key after `last`.
            from = last.key.clone();
            from.push(0);
            let full = page.len() as u32 >= asked;
            items.extend(page);
            if full {
                break;
            }
        }
        items.truncate(limit as usize);
        Ok(items)
    }

    /// One request of a scan (the servers may answer fewer than `limit` pairs).
    async fn scan_page(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<ScanItem>, ClientError> {
        let op = KvOp::Scan {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            limit,
        };
        match self.done(op).await? {
            KvResult::Scanned { items } => Ok(items),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    async fn done(&mut self, op: KvOp) -> Result<KvResult, ClientError> {
        match self.execute(op).await? {
            Outcome::Done(r @ KvResult::TooLarge { .. }) => Err(too_large_or_unexpected(r)),
            Outcome::Done(r) => Ok(r),
            Outcome::Maybe => Err(ClientError::Unexpected(KvResult::VersionMismatch)),
        }
    }

    /// Acquires `lock` (waits while another owner holds it). Each KV operation is bounded by
    /// `op_timeout`; the wait for the holder is not.
    pub async fn acquire(&mut self, lock: &mut Lock) -> Result<(), ClientError> {
        let step = lock.acquire();
        self.drive_lock(lock, step, LockStep::Acquired).await
    }

    /// Releases `lock` (which we hold).
    pub async fn release(&mut self, lock: &mut Lock) -> Result<(), ClientError> {
        let step = lock.release();
        self.drive_lock(lock, step, LockStep::Released).await
    }

    async fn drive_lock(
        &mut self,
        lock: &mut Lock,
        mut step: LockStep,
        until: LockStep,
    ) -> Result<(), ClientError> {
        loop {
            step = match step {
                LockStep::Run(op) => {
                    let outcome = self.execute(op).await?;
                    lock.on_outcome(outcome)
                }
                LockStep::Wait(d) => {
                    tokio::time::sleep(d).await;
                    lock.on_wait_done()
                }
                done if done == until => return Ok(()),
                LockStep::LeaseLost => {
                    let id = lock.lease();
                    return Err(ClientError::Unexpected(KvResult::LeaseNotFound { id }));
                }
                other => {
                    debug!(?other, "lock step out of order");
                    return Ok(());
                }
            };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Leases (`docs/kv.md`, "Leases"). Kept in a section of their own.

/// The answer to [`Client::lease_grant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOutcome {
    /// The lease was granted.
    Granted {
        /// Its id.
        id: u64,
        /// Its TTL in ms.
        ttl_ms: u64,
    },
    /// The server refused (TTL out of bounds, too many leases): why.
    Refused(String),
}

/// The answer to [`Client::put_with_lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasePutOutcome {
    /// Stored and attached; the key's new version.
    Written(u64),
    /// The key was at another version: nothing stored.
    Mismatch,
    /// The key was missing and a version > 0 was expected: nothing stored.
    NoKey,
    /// The lease does not exist (expired, revoked, never granted): nothing stored.
    LeaseNotFound,
    /// A retried put may or may not have applied.
    Maybe,
}

/// A plain put's answer as a leased put's, so one caller can handle both.
impl From<PutOutcome> for LeasePutOutcome {
    fn from(outcome: PutOutcome) -> LeasePutOutcome {
        match outcome {
            PutOutcome::Written(version) => LeasePutOutcome::Written(version),
            PutOutcome::Mismatch => LeasePutOutcome::Mismatch,
            PutOutcome::NoKey => LeasePutOutcome::NoKey,
            PutOutcome::Maybe => LeasePutOutcome::Maybe,
        }
    }
}

impl Client {
    /// Grants a lease of `ttl` (rounded down to ms).
    pub async fn lease_grant(&mut self, ttl: Duration) -> Result<GrantOutcome, ClientError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        match self.done(KvOp::LeaseGrant { ttl_ms }).await? {
            KvResult::LeaseGranted { id, ttl_ms } => Ok(GrantOutcome::Granted { id, ttl_ms }),
            KvResult::Refused { reason } => Ok(GrantOutcome::Refused(reason)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Renews lease `id` to its full TTL: `Some(ttl_ms)`, or `None` if the lease is gone.
    /// Answered only once the renewal is committed (it goes through the log).
    pub async fn lease_keep_alive(&mut self, id: u64) -> Result<Option<u64>, ClientError> {
        match self.execute(KvOp::LeaseKeepAlive { id }).await? {
            Outcome::Done(KvResult::LeaseKept { ttl_ms, .. }) => Ok(Some(ttl_ms)),
            Outcome::Done(KvResult::LeaseNotFound { .. }) => Ok(None),
            // A retried keep-alive whose session expired: it may have applied, but nothing
            // says the lease lives; the caller's next keep-alive will tell.
            Outcome::Maybe => Err(ClientError::Unexpected(KvResult::SessionExpired)),
            Outcome::Done(other) => Err(ClientError::Unexpected(other)),
        }
    }

    /// Revokes lease `id` and deletes its keys: `Some(keys deleted)`, or `None` if the lease
    /// was already gone.
    pub async fn lease_revoke(&mut self, id: u64) -> Result<Option<u64>, ClientError> {
        match self.execute(KvOp::LeaseRevoke { id }).await? {
            Outcome::Done(KvResult::LeaseRevoked { keys, .. }) => Ok(Some(keys)),
            Outcome::Done(KvResult::LeaseNotFound { .. }) => Ok(None),
            // Retried and the session expired meanwhile: a revoke is idempotent, ask again.
            Outcome::Maybe => match self.execute(KvOp::LeaseRevoke { id }).await? {
                Outcome::Done(KvResult::LeaseRevoked { keys, .. }) => Ok(Some(keys)),
                _ => Ok(None),
            },
            Outcome::Done(other) => Err(ClientError::Unexpected(other)),
        }
    }

    /// The live leases (a linearizable read: remaining times as the leader counts them).
    pub async fn lease_list(&mut self) -> Result<Vec<LeaseInfo>, ClientError> {
        match self.done(KvOp::LeaseList).await? {
            KvResult::Leases { leases } => Ok(leases),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// The members as the leader knows them, and the leader's id.
    pub async fn member_list(&mut self) -> Result<(u64, Vec<MemberInfo>), ClientError> {
        let (leader, members, _) = self.member_list_with_transfers().await?;
        Ok((leader, members))
    }

    /// [`Client::member_list`] with the snapshots the leader is sending to members (bytes
    /// acknowledged of the total, per member).
    pub async fn member_list_with_transfers(
        &mut self,
    ) -> Result<(u64, Vec<MemberInfo>, Vec<SnapshotTransfer>), ClientError> {
        match self.done(KvOp::MemberList).await? {
            KvResult::Members {
                leader,
                members,
                transfers,
            } => Ok((leader, members, transfers)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// A membership change ([`KvOp::MemberAdd`], [`KvOp::MemberPromote`],
    /// [`KvOp::MemberRemove`]) through the leader: `Ok(Ok(members))` once it is committed,
    /// `Ok(Err(reason))` when the leader refused it (the reason says what to do).
    pub async fn member_change(
        &mut self,
        op: KvOp,
    ) -> Result<Result<(u64, Vec<MemberInfo>), String>, ClientError> {
        match self.done(op).await? {
            KvResult::Members {
                leader, members, ..
            } => Ok(Ok((leader, members))),
            KvResult::Refused { reason } => Ok(Err(reason)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// [`Client::put`] attaching the key to lease `lease` (deleted when the lease ends).
    pub async fn put_with_lease(
        &mut self,
        key: &[u8],
        value: &[u8],
        expected: Expected,
        lease: u64,
    ) -> Result<LeasePutOutcome, ClientError> {
        let op = KvOp::PutLease {
            key: key.to_vec(),
            value: value.to_vec(),
            expected,
            lease,
        };
        match self.execute(op).await? {
            Outcome::Maybe => Ok(LeasePutOutcome::Maybe),
            Outcome::Done(KvResult::Written { version }) => Ok(LeasePutOutcome::Written(version)),
            Outcome::Done(KvResult::VersionMismatch) => Ok(LeasePutOutcome::Mismatch),
            Outcome::Done(KvResult::NoKey) => Ok(LeasePutOutcome::NoKey),
            Outcome::Done(KvResult::LeaseNotFound { .. }) => Ok(LeasePutOutcome::LeaseNotFound),
            Outcome::Done(other) => Err(too_large_or_unexpected(other)),
        }
    }
}

/// Default largest backup [`Client::backup`] accepts (1 GiB, the servers' message limit).
pub const DEFAULT_MAX_BACKUP_BYTES: usize = crate::transport::DEFAULT_MAX_MESSAGE_BYTES;

/// A consistent copy of the cluster's state, from [`Client::backup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// The last log index the state covers (every write acknowledged before the request is
    /// at or below it).
    pub index: u64,
    /// The term of the entry at `index`.
    pub term: u64,
    /// The voting members at `index`.
    pub voters: Vec<u64>,
    /// The server (the leader) that took it.
    pub server: u64,
    /// The store's snapshot (`shoal_kv::KvStore::snapshot`'s format).
    pub data: Vec<u8>,
}

impl Client {
    /// Takes a backup from the leader: a [`KvOp::Snapshot`] read, confirmed by read-index, so
    /// the state holds every write acknowledged before the call. The answer may be far larger
    /// than a frame: it arrives in parts, reassembled up to `max_bytes`. The leader is found
    /// with [`Client::statuses`] and asked on a connection of its own; a lost leadership or
    /// connection is retried on the new leader until `op_timeout` runs out, and one transfer
    /// may take up to `transfer_timeout`.
    pub async fn backup(
        &self,
        max_bytes: usize,
        transfer_timeout: Duration,
    ) -> Result<Backup, ClientError> {
        let op_timeout = self.config.op_timeout;
        let deadline = Instant::now() + op_timeout;
        let mut seen = String::from("no leader");
        let mut all_refused_since: Option<Instant> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout {
                    after: op_timeout,
                    seen,
                    write: false,
                });
            }
            let statuses = self.statuses(left.min(Duration::from_secs(2))).await;
            let leader = statuses
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.as_ref().ok()?)))
                .filter(|(_, s)| s.role == shoal_wire::kv::ServerRole::Leader)
                .max_by_key(|(_, s)| s.term)
                .map(|(i, _)| i);
            let Some(i) = leader else {
                if let Some(Err(e @ ClientError::NoServer(_))) = statuses.first() {
                    if statuses
                        .iter()
                        .all(|s| matches!(s, Err(ClientError::NoServer(_))))
                    {
                        return Err(ClientError::NoServer(e.to_string()));
                    }
                }
                let refused = |s: &Result<ServerStatus, ClientError>| {
                    matches!(s, Err(ClientError::Unreachable { reason, .. })
                        if reason == "connection refused")
                };
                if statuses.iter().all(refused) {
                    // A cluster being started binds its ports within moments; a stopped one
                    // never does: say so after the grace instead of waiting for the deadline.
                    let since = *all_refused_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.refused_grace {
                        let addrs: Vec<String> = self
                            .config
                            .endpoints
                            .iter()
                            .map(|a| a.to_string())
                            .collect();
                        return Err(ClientError::NoServer(format!(
                            "cannot reach any server (connection refused on {}): is the \
                             cluster running?",
                            addrs.join(", ")
                        )));
                    }
                } else {
                    all_refused_since = None;
                }
                let answering = statuses.iter().filter(|s| s.is_ok()).count();
                let why: Vec<String> = statuses
                    .iter()
                    .filter_map(|s| s.as_ref().err().map(|e| e.to_string()))
                    .collect();
                seen = format!(
                    "no leader: {answering} of {} servers answering",
                    statuses.len()
                );
                if !why.is_empty() {
                    seen.push_str(&format!(" ({})", why.join("; ")));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let addr = self.config.endpoints[i];
            match self.backup_from(addr, max_bytes, transfer_timeout).await {
                Ok(Some(backup)) => return Ok(backup),
                Ok(None) => {
                    seen = format!("{addr} stopped leading during the backup");
                }
                Err(e @ ClientError::Unreachable { .. }) => {
                    debug!(%addr, error = %e, "backup failed; retrying");
                    seen = e.to_string();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks the server at `addr` for a backup on a connection of its own: `Ok(None)` if it
    /// does not lead (any more).
    async fn backup_from(
        &self,
        addr: SocketAddr,
        max_bytes: usize,
        transfer_timeout: Duration,
    ) -> Result<Option<Backup>, ClientError> {
        use futures::SinkExt as _;
        let unreachable = |reason: String| ClientError::Unreachable { addr, reason };
        let framed = connect_client_secure::<KvReply, KvRequest>(
            &self.config.security,
            addr,
            self.config.cluster_id,
            self.config.max_frame_bytes,
            self.config.connect_timeout,
        )
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        // The hello went straight to the socket: nothing is buffered in `framed`.
        let mut framed = tokio_util::codec::Framed::new(
            framed.into_inner(),
            shoal_wire::codec::PartCodec::<KvReply, KvRequest>::new(
                self.config.max_frame_bytes,
                max_bytes,
            ),
        );
        let request = KvRequest {
            client: new_client_id(),
            request: 1,
            op: KvOp::Snapshot,
            serializable: false,
        };
        let ids = (request.client, request.request);
        framed
            .send(request)
            .await
            .map_err(|e| unreachable(format!("sending the request: {e}")))?;
        let answer = tokio::time::timeout(transfer_timeout, async {
            loop {
                match framed.next().await {
                    Some(Ok(reply)) if reply.ids() == ids => return Ok(reply),
                    Some(Ok(_)) => {}
                    Some(Err(CodecError::Parts(shoal_wire::parts::PartsError::TooLarge {
                        len,
                        max,
                    }))) => {
                        return Err(ClientError::TooLarge {
                            what: "backup".into(),
                            bytes: len as u64,
                            limit: max as u64,
                        })
                    }
                    Some(Err(e)) => return Err(unreachable(format!("receiving the backup: {e}"))),
                    None => return Err(unreachable("closed the connection".into())),
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout {
            after: transfer_timeout,
            seen: format!("{addr} sent no whole backup (raise --transfer-timeout?)"),
            write: false,
        })??;
        match answer {
            KvReply::Done {
                result:
                    KvResult::Snapshot {
                        index,
                        term,
                        voters,
                        server,
                        data,
                    },
                ..
            } => Ok(Some(Backup {
                index,
                term,
                voters,
                server,
                data,
            })),
            KvReply::Done { result, .. } => Err(ClientError::Unexpected(result)),
            KvReply::WrongLeader { .. } | KvReply::Part { .. } => Ok(None),
        }
    }
}

/// The error of a status request that got no answer in time.
fn status_timeout(after: Duration) -> ClientError {
    ClientError::Timeout {
        after,
        seen: String::new(),
        write: false,
    }
}

/// A put's outcome as the client returns it (the sharded client's too).
pub(crate) fn put_outcome(outcome: Outcome) -> Result<PutOutcome, ClientError> {
    match outcome {
        Outcome::Maybe => Ok(PutOutcome::Maybe),
        Outcome::Done(KvResult::Written { version }) => Ok(PutOutcome::Written(version)),
        Outcome::Done(KvResult::VersionMismatch) => Ok(PutOutcome::Mismatch),
        Outcome::Done(KvResult::NoKey) => Ok(PutOutcome::NoKey),
        Outcome::Done(other) => Err(too_large_or_unexpected(other)),
    }
}

/// A delete's outcome as the client returns it (the sharded client's too).
pub(crate) fn delete_outcome(outcome: Outcome) -> Result<DeleteOutcome, ClientError> {
    match outcome {
        Outcome::Maybe => Ok(DeleteOutcome::Maybe),
        Outcome::Done(KvResult::Deleted) => Ok(DeleteOutcome::Deleted),
        Outcome::Done(KvResult::VersionMismatch) => Ok(DeleteOutcome::Mismatch),
        Outcome::Done(KvResult::NoKey) => Ok(DeleteOutcome::NoKey),
        Outcome::Done(other) => Err(too_large_or_unexpected(other)),
    }
}

pub(crate) fn too_large_or_unexpected(result: KvResult) -> ClientError {
    match result {
        KvResult::TooLarge { what, bytes, limit } => ClientError::TooLarge { what, bytes, limit },
        other => ClientError::Unexpected(other),
    }
}

/// One connection of a [`ClientPool`]: connects, writes the queued requests, hands each answer
/// to the client whose id it echoes, and tells every client of the pool when it fails (it is
/// replaced on the next send).
async fn pooled_connection(
    server: u64,
    addr: SocketAddr,
    config: ClientConfig,
    requests: mpsc::Receiver<KvRequest>,
    routes: Routes,
) {
    let failure = run_connection(server, addr, config, requests, |incoming| {
        if let Incoming::Reply(_, reply) = &incoming {
            let to = {
                let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
                routes.get(&reply.ids().0).cloned()
            };
            // A client that is gone, or does not read: the answer is lost (it resends).
            if let Some(to) = to {
                let _ = to.try_send(incoming);
            }
        }
        true
    })
    .await;
    let clients: Vec<mpsc::Sender<Incoming>> = {
        let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.values().cloned().collect()
    };
    for c in clients {
        let _ = c.try_send(Incoming::Lost(server, failure.clone()));
    }
}

/// How long a client waits for a server's last words (a [`Refusal`]) after a write to it
/// failed: a server that refuses closes the connection, which can fail the write first.
const LAST_WORDS_WAIT: Duration = Duration::from_millis(200);

/// Connects, then writes queued requests (in batches) and hands each answer to `deliver`
/// until the connection fails or `deliver` says stop; returns why it ended.
async fn run_connection(
    server: u64,
    addr: SocketAddr,
    config: ClientConfig,
    mut requests: mpsc::Receiver<KvRequest>,
    mut deliver: impl FnMut(Incoming) -> bool,
) -> LinkFailure {
    let framed = match connect_client_secure::<KvReply, KvRequest>(
        &config.security,
        addr,
        config.cluster_id,
        config.max_frame_bytes,
        config.connect_timeout,
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            debug!(%addr, error = %e, "cannot connect");
            return match e {
                TransportError::Connect { source, .. }
                    if source.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    LinkFailure::ConnectionRefused
                }
                TransportError::Connect { source, .. } if is_tls_error(&source) => {
                    LinkFailure::Tls(source.to_string())
                }
                TransportError::Connect { source, .. } => LinkFailure::Connect(source.to_string()),
                other => LinkFailure::Connect(other.to_string()),
            };
        }
    };
    // The hello went straight to the socket: nothing is buffered in `framed`.
    let (read, write) = tokio::io::split(framed.into_inner());
    let mut stream = FramedRead::new(read, ServerFrames::new(config.max_frame_bytes));
    let mut sink = FramedWrite::new(
        write,
        FrameCodec::<KvReply, KvRequest>::new(config.max_frame_bytes),
    );
    let mut answered = false;
    loop {
        let frame = tokio::select! {
            request = requests.recv() => match request {
                Some(request) => {
                    if let Err(e) = send_queued(&mut sink, request, &mut requests).await {
                        debug!(%addr, error = %e, "connection failed");
                        // A refusing server closes at once: its refusal may be waiting.
                        return match tokio::time::timeout(LAST_WORDS_WAIT, stream.next()).await {
                            Ok(Some(Ok(ServerFrame::Refused(r)))) => LinkFailure::RefusedBy(r),
                            Ok(Some(Ok(ServerFrame::Foreign(what)))) => LinkFailure::Foreign(what),
                            Ok(Some(Err(CodecError::Io(e)))) if !answered && is_tls_error(&e) => {
                                LinkFailure::Tls(e.to_string())
                            }
                            _ => LinkFailure::Lost(format!("connection lost: {e}")),
                        };
                    }
                    continue;
                }
                None => return LinkFailure::Lost("connection no longer needed".into()),
            },
            frame = stream.next() => frame,
        };
        match frame {
            Some(Ok(ServerFrame::Reply(reply))) => {
                answered = true;
                if !deliver(Incoming::Reply(server, reply)) {
                    return LinkFailure::Lost("connection no longer needed".into());
                }
            }
            Some(Ok(ServerFrame::Refused(r))) => {
                debug!(%addr, service = %r.service, reason = %r.reason, "refused");
                return LinkFailure::RefusedBy(r);
            }
            Some(Ok(ServerFrame::Foreign(what))) => {
                debug!(%addr, %what, "not a KV server");
                return LinkFailure::Foreign(what);
            }
            // The server refused this client's certificate: TLS 1.3 says so at the first read.
            Some(Err(CodecError::Io(e))) if !answered && is_tls_error(&e) => {
                debug!(%addr, error = %e, "TLS refused");
                return LinkFailure::Tls(e.to_string());
            }
            Some(Err(e)) => {
                debug!(%addr, error = %e, "connection failed");
                return LinkFailure::Lost(format!("connection failed: {e}"));
            }
            None if answered => return LinkFailure::Lost("connection closed".into()),
            None => {
                return LinkFailure::Lost(
                    "closed the connection without answering (an older server of another \
                     cluster, or not a KV server?)"
                        .into(),
                )
            }
        }
    }
}

/// Whether `e` is a TLS handshake failure ([`crate::tls`] words them so).
fn is_tls_error(e: &std::io::Error) -> bool {
    e.to_string().starts_with("TLS")
}

/// What a server sent on a client connection.
#[derive(Debug)]
enum ServerFrame {
    /// An answer.
    Reply(KvReply),
    /// A refusal (always the first frame, then the server closes).
    Refused(Refusal),
    /// The first bytes are not a KV answer: what they look like.
    Foreign(String),
}

/// Decodes a server's frames, looking harder at the first: a [`Refusal`], or the bytes of
/// another protocol (an HTTP error page, a MapReduce coordinator's refusal), are told apart
/// from an answer so the client can say what it reached.
struct ServerFrames {
    replies: FrameCodec<KvReply, KvRequest>,
    max_frame_bytes: usize,
    first: bool,
}

impl ServerFrames {
    fn new(max_frame_bytes: usize) -> ServerFrames {
        ServerFrames {
            replies: FrameCodec::new(max_frame_bytes),
            max_frame_bytes,
            first: true,
        }
    }

    fn first_frame(&mut self, src: &mut BytesMut) -> Result<Option<ServerFrame>, CodecError> {
        const HTTP: &[u8] = b"HTTP/";
        if src.len() < HTTP.len() && HTTP.starts_with(src) {
            return Ok(None);
        }
        if src.starts_with(HTTP) {
            self.first = false;
            src.clear();
            return Ok(Some(ServerFrame::Foreign("HTTP".into())));
        }
        let len = match peek_frame_len(src, self.max_frame_bytes) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(None),
            Err(_) => {
                self.first = false;
                let what = describe_foreign(src);
                src.clear();
                return Ok(Some(ServerFrame::Foreign(what)));
            }
        };
        if src.len() < FRAME_HEADER_BYTES + len {
            src.reserve(FRAME_HEADER_BYTES + len - src.len());
            return Ok(None);
        }
        self.first = false;
        if let Ok(Some((r, used))) = decode_frame::<Refusal>(src, MAX_REFUSAL_FRAME_BYTES) {
            if r.magic == PROTOCOL_MAGIC {
                src.advance(used);
                return Ok(Some(ServerFrame::Refused(r)));
            }
        }
        if let Ok(Some((reply, used))) = decode_frame::<KvReply>(src, self.max_frame_bytes) {
            src.advance(used);
            return Ok(Some(ServerFrame::Reply(reply)));
        }
        let what = match decode_frame::<ToWorker>(src, self.max_frame_bytes) {
            Ok(Some(_)) => "the MapReduce coordinator protocol".to_string(),
            _ => "another protocol (its first message is not a KV answer)".to_string(),
        };
        src.clear();
        Ok(Some(ServerFrame::Foreign(what)))
    }
}

/// What the first bytes of another protocol look like, for a person.
fn describe_foreign(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(40)];
    let text = head
        .iter()
        .take_while(|&&b| b != b'\r' && b != b'\n')
        .all(|b| b.is_ascii_graphic() || *b == b' ');
    if text && !head.is_empty() {
        let line: String = head
            .iter()
            .take_while(|&&b| b != b'\r' && b != b'\n')
            .map(|&b| b as char)
            .collect();
        format!("a text protocol: {line:?}")
    } else {
        "an unknown binary protocol".into()
    }
}

impl Decoder for ServerFrames {
    type Item = ServerFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ServerFrame>, CodecError> {
        if self.first {
            return self.first_frame(src);
        }
        Ok(self.replies.decode(src)?.map(ServerFrame::Reply))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ServerFrame>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None if self.first => {
                self.first = false;
                let what = describe_foreign(src);
                src.clear();
                Ok(Some(ServerFrame::Foreign(what)))
            }
            None => Err(CodecError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            ))),
        }
    }
}
