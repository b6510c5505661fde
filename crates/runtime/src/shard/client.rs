//! The async client of a sharded cluster: the sans-IO [`ShardClerk`] driven over TCP with
//! tokio timers, the sharded counterpart of [`crate::kv::Client`] with the same methods and
//! outcomes.
//!
//! The clerk decides everything (which group owns a key, which server to ask, when to fetch
//! a new configuration from the controller's store, the per-shard sessions, the "maybe"
//! rule); this module carries its [`ClientAction`]s out over [`Links`]: one connection per
//! store server and per group server, shared by every client of a [`ShardClientPool`]. An
//! operation that misses its deadline returns [`ClientError::Timeout`], saying what was seen
//! (its outcome is unknown: a write may still apply), and the client continues with a fresh
//! clerk under a new client id and new sessions, so a late answer to the abandoned request is
//! never taken for the next one's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_kv::Outcome;
use shoal_shard::{ClientAction, Config, ShardClerk, ShardClerkConfig};
use shoal_wire::kv::{Expected, KvOp, KvReply, KvRequest, KvResult, ScanItem};
use shoal_wire::shard::{FromGroup, ToGroup};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::link::{Event, LinkConfig, Links, Timers};
use crate::kv::client::{delete_outcome, put_outcome, too_large_or_unexpected};
use crate::kv::client::{
    DEFAULT_CLUSTER_ID, DEFAULT_CONNECT_TIMEOUT, DEFAULT_OP_TIMEOUT, DEFAULT_RETRY_TIMEOUT,
    POOL_CONNECTION_QUEUE_LEN, REPLY_QUEUE_LEN,
};
use crate::kv::{ClientError, DeleteOutcome, PutOutcome};

/// Settings of a [`ShardClient`].
#[derive(Debug, Clone)]
pub struct ShardClientConfig {
    /// The controller store's servers (the KV cluster holding the configurations), in
    /// server-id order, as `shoal shard up` writes them to `DIR/controller`.
    pub controller: Vec<SocketAddr>,
    /// The cluster id every server was started with.
    pub cluster_id: u64,
    /// Overall time an operation may take, retries and configuration fetches included.
    pub op_timeout: Duration,
    /// Time to establish a TCP connection.
    pub connect_timeout: Duration,
    /// Time to wait for an answer before resending to the next server.
    pub retry_timeout: Duration,
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// Reads answered by whichever server of the owner group is asked, from its local state
    /// (possibly stale). The configuration itself is always read linearizably.
    pub serializable_reads: bool,
    /// Plain TCP or TLS ([`crate::tls`]), to the controller store and the groups alike.
    pub security: crate::tls::Security,
}

impl ShardClientConfig {
    /// Defaults (the KV client's) for the cluster whose controller store is at `controller`.
    pub fn new(controller: Vec<SocketAddr>) -> ShardClientConfig {
        ShardClientConfig {
            controller,
            cluster_id: DEFAULT_CLUSTER_ID,
            op_timeout: DEFAULT_OP_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry_timeout: DEFAULT_RETRY_TIMEOUT,
            max_frame_bytes: shoal_wire::DEFAULT_MAX_FRAME_BYTES,
            serializable_reads: false,
            security: crate::tls::Security::plain(),
        }
    }

    fn links(&self, queue_len: usize) -> LinkConfig {
        LinkConfig {
            cluster_id: self.cluster_id,
            max_frame_bytes: self.max_frame_bytes,
            // A client's messages and their answers fit in a frame (a value is at most
            // 1 MiB): a client accepts no more in parts than in one frame.
            max_message_bytes: self.max_frame_bytes,
            connect_timeout: self.connect_timeout,
            queue_len,
            security: self.security.clone(),
        }
    }
}

/// Connections shared by many [`ShardClient`]s ([`ShardClient::with_pool`]): one TCP
/// connection per store server and per group server carries the requests of every client of
/// the pool, as [`crate::kv::ClientPool`] does for one group.
#[derive(Clone)]
pub struct ShardClientPool {
    config: ShardClientConfig,
    store: Links<KvRequest, KvReply>,
    groups: Links<ToGroup, FromGroup>,
}

impl std::fmt::Debug for ShardClientPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardClientPool")
            .field("controller", &self.config.controller)
            .finish_non_exhaustive()
    }
}

impl ShardClientPool {
    /// A pool for the cluster of `config`; connects lazily.
    pub fn new(config: ShardClientConfig) -> ShardClientPool {
        ShardClientPool::with_queue_len(config, POOL_CONNECTION_QUEUE_LEN)
    }

    fn with_queue_len(config: ShardClientConfig, queue_len: usize) -> ShardClientPool {
        ShardClientPool {
            store: Links::new(config.links(queue_len)),
            groups: Links::new(config.links(queue_len)),
            config,
        }
    }
}

/// An async client of a sharded cluster. One operation at a time (`&mut self`); open several
/// (sharing a [`ShardClientPool`]) for concurrency.
pub struct ShardClient {
    config: ShardClientConfig,
    clerk: ShardClerk,
    pool: ShardClientPool,
    store_tx: mpsc::Sender<Event<KvReply>>,
    group_tx: mpsc::Sender<Event<FromGroup>>,
    store_rx: mpsc::Receiver<Event<KvReply>>,
    group_rx: mpsc::Receiver<Event<FromGroup>>,
    /// Route keys registered by the operation in flight.
    store_routes: Vec<(u64, u64)>,
    group_routes: Vec<(u64, u64)>,
}

impl std::fmt::Debug for ShardClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardClient")
            .field("controller", &self.config.controller)
            .field("config", &self.clerk.config().map(|c| c.num))
            .finish_non_exhaustive()
    }
}

/// What one operation saw of the servers, for the timeout message.
#[derive(Default)]
struct Seen {
    /// The last failure of each address since its last answer.
    failed: BTreeMap<SocketAddr, String>,
    answered: usize,
    /// Group servers asked: address → gid.
    gid_of: BTreeMap<SocketAddr, u64>,
}

impl Seen {
    fn summary(&self, controller: &[SocketAddr]) -> String {
        if self.failed.is_empty() {
            return format!(
                "{} answers, none final (a migration in progress, or no leader)",
                self.answered
            );
        }
        let parts: Vec<String> = self
            .failed
            .iter()
            .map(|(addr, why)| {
                let what = match self.gid_of.get(addr) {
                    Some(g) => format!("group {g} server {addr}"),
                    None if controller.contains(addr) => format!("controller store {addr}"),
                    None => addr.to_string(),
                };
                format!("{what}: {why}")
            })
            .collect();
        format!("{} answers; {}", self.answered, parts.join("; "))
    }
}

fn new_id() -> u64 {
    use rand::Rng;
    // Not the protocol's RNG: the runtime is where entropy comes in.
    rand::rngs::OsRng.gen::<u64>() | 1
}

impl ShardClient {
    /// A client of the cluster of `config`; connects lazily.
    pub fn new(config: ShardClientConfig) -> Result<ShardClient, ClientError> {
        let pool = ShardClientPool::with_queue_len(
            config.clone(),
            crate::kv::client::CONNECTION_QUEUE_LEN,
        );
        ShardClient::in_pool(config, pool)
    }

    /// A client sharing `pool`'s connections with the pool's other clients.
    pub fn with_pool(pool: &ShardClientPool) -> Result<ShardClient, ClientError> {
        ShardClient::in_pool(pool.config.clone(), pool.clone())
    }

    fn in_pool(
        config: ShardClientConfig,
        pool: ShardClientPool,
    ) -> Result<ShardClient, ClientError> {
        let clerk = Self::clerk(&config)?;
        let (store_tx, store_rx) = mpsc::channel(REPLY_QUEUE_LEN);
        let (group_tx, group_rx) = mpsc::channel(REPLY_QUEUE_LEN);
        Ok(ShardClient {
            config,
            clerk,
            pool,
            store_tx,
            group_tx,
            store_rx,
            group_rx,
            store_routes: Vec::new(),
            group_routes: Vec::new(),
        })
    }

    fn clerk(config: &ShardClientConfig) -> Result<ShardClerk, ClientError> {
        if config.controller.is_empty() {
            return Err(ClientError::NoServer(
                "no controller store addresses given: pass --controller ADDR,ADDR,ADDR (the \
                 lines of DIR/controller written by `shoal shard up`)"
                    .into(),
            ));
        }
        let store = (1..=config.controller.len() as u64).collect();
        let mut cfg = ShardClerkConfig::new(new_id(), store);
        cfg.retry_timeout = config.retry_timeout;
        cfg.serializable_reads = config.serializable_reads;
        // Random, with room to count up for ever: see the links' routing.
        cfg.first_request = (new_id() >> 2) | 1;
        ShardClerk::new(cfg).map_err(|e| ClientError::NoServer(e.to_string()))
    }

    /// The configuration the client routes by (fetched from the controller's store), if any.
    pub fn config(&self) -> Option<&Config> {
        self.clerk.config()
    }

    /// The controller store's addresses.
    pub fn controller(&self) -> &[SocketAddr] {
        &self.config.controller
    }

    /// Runs one operation (get, put, delete, scan) to its outcome, within `op_timeout`.
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
        while self.store_rx.try_recv().is_ok() {}
        while self.group_rx.try_recv().is_ok() {}
        let deadline = Instant::now() + timeout;
        let write = matches!(op, KvOp::Put { .. } | KvOp::Delete { .. });
        let mut seen = Seen::default();
        let mut actions = self
            .clerk
            .start(op)
            .map_err(|e| ClientError::NoServer(e.to_string()))?;
        let mut timers = Timers::default();
        let result = loop {
            let mut finished = None;
            for action in actions.drain(..) {
                match action {
                    ClientAction::Store { server, request } => {
                        if let Some(addr) = self.store_addr(server) {
                            self.store_routes.push((request.client, request.request));
                            self.pool.store.send(addr, request, &self.store_tx);
                        }
                    }
                    ClientAction::Group {
                        gid,
                        server,
                        request,
                    } => match server.parse::<SocketAddr>() {
                        Ok(addr) => {
                            seen.gid_of.insert(addr, gid);
                            self.group_routes.push((request.client, request.request));
                            self.pool
                                .groups
                                .send(addr, ToGroup::Request(request), &self.group_tx);
                        }
                        Err(_) => {
                            // A configuration naming a server by something other than its
                            // address: it cannot be reached from here.
                            seen.failed.insert(
                                SocketAddr::from(([0, 0, 0, 0], 0)),
                                format!("group {gid} server {server:?} is not an address"),
                            );
                            timers.set(Duration::ZERO, u64::MAX);
                        }
                    },
                    ClientAction::SetTimer { after, token } => timers.set(after, token),
                    ClientAction::Finished(outcome) => finished = Some(outcome),
                }
            }
            if let Some(outcome) = finished {
                break Ok(outcome);
            }
            tokio::select! {
                event = self.store_rx.recv() => match event {
                    Some(Event::Reply(addr, reply)) => {
                        seen.answered += 1;
                        seen.failed.remove(&addr);
                        actions = self.clerk.on_store_reply(reply);
                    }
                    Some(Event::Lost(addr, why)) => {
                        if let Some(server) = self.store_id(addr) {
                            // The first failure moves on to the next server at once; one that
                            // keeps failing is retried on the clerk's timers, not in a loop.
                            if seen.failed.insert(addr, why).is_none() {
                                actions = self.clerk.on_store_unreachable(server);
                            }
                        }
                    }
                    None => {}
                },
                event = self.group_rx.recv() => match event {
                    Some(Event::Reply(addr, FromGroup::Reply(reply))) => {
                        seen.answered += 1;
                        seen.failed.remove(&addr);
                        actions = self.clerk.on_group_reply(reply);
                    }
                    Some(Event::Reply(_, FromGroup::Control(_) | FromGroup::Part { .. })) => {}
                    Some(Event::Lost(addr, why)) => {
                        if let Some(&gid) = seen.gid_of.get(&addr) {
                            if seen.failed.insert(addr, why).is_none() {
                                actions = self.clerk.on_group_unreachable(gid, &addr.to_string());
                            }
                        }
                    }
                    None => {}
                },
                _ = timers.next_due() => {
                    for token in timers.take_due() {
                        if token != u64::MAX {
                            actions.extend(self.clerk.on_timer(token));
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    break Err(ClientError::Timeout {
                        after: timeout,
                        seen: seen.summary(&self.config.controller),
                        write,
                    });
                }
            }
        };
        self.pool.store.unroute(self.store_routes.drain(..));
        self.pool.groups.unroute(self.group_routes.drain(..));
        if result.is_err() {
            // The clerk still waits for the abandoned operation: start over with a new
            // identity so its answer can never be mistaken for a later one's.
            self.clerk = Self::clerk(&self.config)?;
        }
        result
    }

    fn store_addr(&self, server: u64) -> Option<SocketAddr> {
        let i = usize::try_from(server.checked_sub(1)?).ok()?;
        self.config.controller.get(i).copied()
    }

    fn store_id(&self, addr: SocketAddr) -> Option<u64> {
        let i = self.config.controller.iter().position(|a| *a == addr)?;
        Some(i as u64 + 1)
    }

    /// Reads `key`: its value and version, or `None` if missing.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        match self.done(KvOp::Get { key: key.to_vec() }).await? {
            KvResult::Found { value, version } => Ok(Some((value, version))),
            KvResult::NoKey => Ok(None),
            other => Err(too_large_or_unexpected(other)),
        }
    }

    /// Writes `key` if its version matches `expected`.
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

    /// Deletes `key` if its version matches `expected`.
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

    /// The keys in `[start, end)` in key order, at most `limit`: every shard is asked (each
    /// part linearizable on its own, not one snapshot across shards), the parts merged, in
    /// pages until `limit` keys or an empty page (so a scan costs one round of requests more
    /// than its pages).
    pub async fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<ScanItem>, ClientError> {
        let mut items: Vec<ScanItem> = Vec::new();
        let mut from = start.to_vec();
        while (items.len() as u64) < u64::from(limit) {
            let want = limit - items.len() as u32;
            let op = KvOp::Scan {
                start: from.clone(),
                end: end.map(<[u8]>::to_vec),
                limit: want,
            };
            let page = match self.done(op).await? {
                KvResult::Scanned { items } => items,
                other => return Err(too_large_or_unexpected(other)),
            };
            // Only an empty page ends the range: a page stops early at the last key of a
            // shard that may hold more (see `ShardClerk`'s scans).
            let Some(last) = page.last() else { break };
            // The next page starts just after the last key read.
            from = last.key.clone();
            from.push(0);
            items.extend(page);
        }
        items.truncate(limit as usize);
        Ok(items)
    }

    async fn done(&mut self, op: KvOp) -> Result<KvResult, ClientError> {
        match self.execute(op).await? {
            Outcome::Done(r) => Ok(r),
            Outcome::Maybe => Err(ClientError::NoServer(
                "a read answered maybe (a bug: reads are never retried into doubt)".into(),
            )),
        }
    }
}
