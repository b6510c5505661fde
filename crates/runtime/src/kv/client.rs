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
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use shoal_kv::{Action, Clerk, ClerkConfig, Lock, LockStep, Outcome};
use shoal_wire::kv::{Expected, KvOp, KvReply, KvRequest, KvResult, ScanItem};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use crate::transport::connect_client;

/// Default [`ClientConfig::op_timeout`].
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ClientConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default [`ClientConfig::retry_timeout`]: wait this long for an answer before asking the
/// next server (a real network is slower than the simulator's, and an fsync is in the path).
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_millis(500);
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
    /// The servers' addresses. List them in server-id order (server `i + 1` at index `i`, as
    /// `shoal kv up` writes them) so that the servers' leader hints can be followed; any order
    /// works, hints are then just less useful.
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
        }
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer within the operation's deadline; a write's outcome is unknown.
    #[error("no answer within {0:?} (a write may or may not have applied)")]
    Timeout(Duration),
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
    /// Connection tasks by server id (`index + 1`).
    connections: BTreeMap<u64, mpsc::Sender<KvRequest>>,
    replies_tx: mpsc::Sender<KvReply>,
    replies: mpsc::Receiver<KvReply>,
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
        let clerk = Self::clerk(&config)?;
        let (replies_tx, replies) = mpsc::channel(REPLY_QUEUE_LEN);
        Ok(Client {
            config,
            clerk,
            connections: BTreeMap::new(),
            replies_tx,
            replies,
        })
    }

    fn clerk(config: &ClientConfig) -> Result<Clerk, ClientError> {
        let servers = (1..=config.endpoints.len() as u64).collect();
        let mut cc = ClerkConfig::new(new_client_id(), servers);
        cc.retry_timeout = config.retry_timeout;
        cc.serializable_reads = config.serializable_reads;
        Ok(Clerk::new(cc)?)
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
        let deadline = Instant::now() + timeout;
        let mut actions = self.clerk.start(op)?;
        let mut timer: Option<(Instant, u64)> = None;
        loop {
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
                reply = self.replies.recv() => {
                    if let Some(reply) = reply {
                        actions = self.clerk.on_reply(reply);
                    }
                }
                _ = tokio::time::sleep_until(timer_at), if timer.is_some() => {
                    timer = None;
                    actions = self.clerk.on_timer(token);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // The clerk still waits for this operation: start over with a new
                    // identity so its answer can never be mistaken for a later one's.
                    self.clerk = Self::clerk(&self.config)?;
                    return Err(ClientError::Timeout(timeout));
                }
            }
        }
    }

    fn send(&mut self, server: u64, request: KvRequest) {
        let Some(&addr) = usize::try_from(server - 1)
            .ok()
            .and_then(|i| self.config.endpoints.get(i))
        else {
            return;
        };
        let tx = match self.connections.get(&server) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(CONNECTION_QUEUE_LEN);
                tokio::spawn(connection(
                    addr,
                    self.config.clone(),
                    rx,
                    self.replies_tx.clone(),
                ));
                self.connections.insert(server, tx.clone());
                tx
            }
        };
        // Full or closed: the request is lost, like on a network; the clerk resends.
        let _ = tx.try_send(request);
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
        match self.execute(op).await? {
            Outcome::Maybe => Ok(PutOutcome::Maybe),
            Outcome::Done(KvResult::Written { version }) => Ok(PutOutcome::Written(version)),
            Outcome::Done(KvResult::VersionMismatch) => Ok(PutOutcome::Mismatch),
            Outcome::Done(KvResult::NoKey) => Ok(PutOutcome::NoKey),
            Outcome::Done(other) => Err(too_large_or_unexpected(other)),
        }
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
        match self.execute(op).await? {
            Outcome::Maybe => Ok(DeleteOutcome::Maybe),
            Outcome::Done(KvResult::Deleted) => Ok(DeleteOutcome::Deleted),
            Outcome::Done(KvResult::VersionMismatch) => Ok(DeleteOutcome::Mismatch),
            Outcome::Done(KvResult::NoKey) => Ok(DeleteOutcome::NoKey),
            Outcome::Done(other) => Err(too_large_or_unexpected(other)),
        }
    }

    /// Keys in `[start, end)` (no end: to the last key) in key order, at most `limit`
    /// (further capped by the servers' `max_scan_items`).
    pub async fn scan(
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
                other => {
                    debug!(?other, "lock step out of order");
                    return Ok(());
                }
            };
        }
    }
}

fn too_large_or_unexpected(result: KvResult) -> ClientError {
    match result {
        KvResult::TooLarge { what, bytes, limit } => ClientError::TooLarge { what, bytes, limit },
        other => ClientError::Unexpected(other),
    }
}

/// One connection to a server: connects, writes the queued requests, forwards the replies.
/// Ends (and is replaced on the next send) when the connection fails.
async fn connection(
    addr: SocketAddr,
    config: ClientConfig,
    mut requests: mpsc::Receiver<KvRequest>,
    replies: mpsc::Sender<KvReply>,
) {
    let framed = match connect_client::<KvReply, KvRequest>(
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
            return;
        }
    };
    let (mut sink, mut stream) = framed.split();
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                Some(request) => {
                    if let Err(e) = sink.send(request).await {
                        debug!(%addr, error = %e, "connection failed");
                        return;
                    }
                }
                None => return,
            },
            reply = stream.next() => match reply {
                Some(Ok(reply)) => {
                    if replies.send(reply).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    debug!(%addr, error = %e, "connection failed");
                    return;
                }
                None => return,
            },
        }
    }
}
