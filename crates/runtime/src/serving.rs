//! What every server on the replica driver ([`crate::driver`]) does the same way: open its
//! replica's durable storage and Raft configuration, and keep its client connections (the
//! table of reply queues, the connection limit, replies that never block the loop). The
//! generic node, the KV server and the shard group server share these, so they open, refuse
//! and drop the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use shoal_raft::{Config as RaftConfig, NodeId};
use shoal_storage::{DurableStorage, StdDisk, StorageConfig};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::transport::{ClientAcceptor, ClientConnection};

/// Why a replica's storage could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The data directory itself is unusable (locked by another server, not a directory, …).
    DataDir(shoal_storage::Error),
    /// Reading or recovering what it holds failed.
    Storage(shoal_storage::Error),
}

/// A replica's storage and Raft configuration, opened.
pub(crate) struct Opened {
    /// The data directory's handle: it holds the directory's lock until dropped, so the
    /// driver keeps it for the server's life.
    pub disk: StdDisk,
    pub storage: DurableStorage,
    pub raft: RaftConfig,
}

/// Opens server `id`'s durable storage in `data_dir` (taking the directory's lock) and its
/// Raft configuration among `peers`, with the given ticks and this server's election seed.
pub(crate) fn open_replica(
    data_dir: &Path,
    cluster_id: u64,
    id: u64,
    peers: impl IntoIterator<Item = u64>,
    election_tick: u32,
    heartbeat_tick: u32,
) -> Result<Opened, OpenError> {
    let mut disk =
        StdDisk::new(data_dir).map_err(|e| OpenError::Storage(shoal_storage::Error::Disk(e)))?;
    // Snapshots travel as files (the snapshot stream): only their metadata is in memory.
    let storage_config = StorageConfig {
        snapshot_data_in_memory: false,
        ..StorageConfig::default()
    };
    let storage = DurableStorage::open(&mut disk, cluster_id, id, storage_config).map_err(|e| {
        if e.is_about_directory() {
            OpenError::DataDir(e)
        } else {
            OpenError::Storage(e)
        }
    })?;
    let mut raft = RaftConfig::new(NodeId(id), peers.into_iter().map(NodeId).collect());
    raft.election_tick = election_tick;
    raft.heartbeat_tick = heartbeat_tick;
    raft.rng_seed = crate::ready::election_seed(id);
    Ok(Opened {
        disk,
        storage,
        raft,
    })
}

/// Forwards accepted client connections into the driver's event queue (wrapped by `wrap`),
/// so the driver waits on one channel.
pub(crate) fn forward_accepted<E: Send + 'static>(
    mut clients: ClientAcceptor,
    events: mpsc::Sender<E>,
    wrap: fn(ClientConnection) -> E,
) {
    tokio::spawn(async move {
        while let Some(conn) = clients.recv().await {
            if events.send(wrap(conn)).await.is_err() {
                break;
            }
        }
    });
}

/// A server's open client connections: token → the connection's reply queue.
pub(crate) struct ClientTable<R> {
    connections: BTreeMap<u64, mpsc::Sender<R>>,
    next_token: u64,
    max: usize,
}

impl<R> ClientTable<R> {
    /// An empty table admitting at most `max` connections at once.
    pub(crate) fn new(max: usize) -> ClientTable<R> {
        ClientTable {
            connections: BTreeMap::new(),
            next_token: 1,
            max,
        }
    }

    /// Admits a connection from `remote`: its token and the queue its replies arrive on, or
    /// `None` (logged) when the table is full: the caller drops the connection.
    pub(crate) fn admit(
        &mut self,
        remote: SocketAddr,
        queue_len: usize,
    ) -> Option<(u64, mpsc::Receiver<R>)> {
        if self.connections.len() >= self.max {
            warn!(%remote, limit = self.max, "refusing a client connection: too many");
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        let (tx, rx) = mpsc::channel(queue_len);
        self.connections.insert(token, tx);
        crate::metrics::client_connections(1);
        Some((token, rx))
    }

    /// Whether connection `token` is still open (else nobody would read an answer).
    pub(crate) fn is_open(&self, token: u64) -> bool {
        self.connections.contains_key(&token)
    }

    /// A handle on connection `token`'s reply queue (for an answer made on another thread).
    pub(crate) fn sender(&self, token: u64) -> Option<mpsc::Sender<R>> {
        self.connections.get(&token).cloned()
    }

    /// Forgets connection `token` (it closed).
    pub(crate) fn remove(&mut self, token: u64) {
        if self.connections.remove(&token).is_some() {
            crate::metrics::client_connections(-1);
        }
    }

    /// Drops every reply queue, which closes the connections.
    pub(crate) fn clear(&mut self) {
        crate::metrics::client_connections(-(self.connections.len() as i64));
        self.connections.clear();
    }

    /// Queues `reply` for connection `token` without waiting: a full queue drops the reply
    /// (the client retries), a closed one forgets the connection, a gone client is skipped.
    pub(crate) fn send(&mut self, token: u64, reply: R) {
        let Some(tx) = self.connections.get(&token) else {
            return; // the client left
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
                self.remove(token);
            }
        }
    }
}
