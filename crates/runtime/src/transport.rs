//! The TCP transport (DESIGN.md §3): one listener per node serving peers and clients, one
//! outbound connection per peer with reconnection, bounded per-peer queues, batched writes.
//!
//! Peer connections are one-way, as in etcd: node A sends to B on A's outbound connection and
//! B answers on its own outbound connection to A. The accepting side only reads.
//!
//! Every connection starts with a [`Hello`] frame from the connecting side. The listener
//! checks magic, version and cluster id, then routes on the role: a `Peer` must be one of the
//! configured peers and its frames are delivered on the inbound stream as `(from, msg)`;
//! `Client` and `Shuffle` connections are handed, still unframed, to the service through
//! [`ClientAcceptor`]. Any bad frame closes only its own connection.
//!
//! Each frame on a peer connection carries a [`PeerFrame`]: a whole message, or one part of a
//! message too large for one frame (an InstallSnapshot of a big state machine). Parts of one
//! message follow each other on the connection (TCP keeps them in order); the reader
//! reassembles them up to [`TransportConfig::max_message_bytes`], growing its buffer only as
//! parts arrive, so a bogus peer cannot make it allocate more than it actually sent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{Sink, SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde::{de::DeserializeOwned, Serialize};
use shoal_wire::codec::{FrameCodec, PartCodec};
use shoal_wire::frame::{
    decode_frame, encode_frame, peek_frame_len, FrameError, FRAME_HEADER_BYTES,
};
use shoal_wire::{Hello, Refusal, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::codec::{Framed, FramedRead};
use tracing::{debug, info, warn, Instrument};

use crate::snapshot_stream::{
    Dial, SnapshotEvent, SnapshotProgress, SnapshotStreamConfig, SnapshotStreamStats,
    SnapshotStreams,
};
use crate::tls::{AcceptError, Security, Stream};

/// Largest handshake frame accepted, in bytes. A `Hello` is about 20 bytes; anything bigger is
/// not a Shoal peer and is refused before its payload is read.
pub const MAX_HELLO_FRAME_BYTES: usize = 64;
/// Default [`TransportConfig::max_frame_bytes`]: 16 MiB, the wire crate's hard maximum.
pub const DEFAULT_MAX_FRAME_BYTES: usize = shoal_wire::DEFAULT_MAX_FRAME_BYTES;
/// Default [`TransportConfig::max_message_bytes`]: 1 GiB, the largest message (a snapshot)
/// sent in parts over several frames.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 30;
/// Default [`TransportConfig::peer_queue_len`]: messages waiting for one peer.
pub const DEFAULT_PEER_QUEUE_LEN: usize = 4096;
/// Default [`TransportConfig::inbound_queue_len`]: peer messages waiting for the node.
pub const DEFAULT_INBOUND_QUEUE_LEN: usize = 4096;
/// Default [`TransportConfig::client_queue_len`]: accepted client connections not yet taken.
pub const DEFAULT_CLIENT_QUEUE_LEN: usize = 256;
/// Default [`TransportConfig::max_batch_frames`]: frames coalesced into one write.
pub const DEFAULT_MAX_BATCH_FRAMES: usize = 256;
/// Default [`TransportConfig::max_batch_bytes`]: bytes coalesced into one write (a batch stops
/// after the frame that crosses it).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Default [`TransportConfig::max_inbound_connections`].
pub const DEFAULT_MAX_INBOUND_CONNECTIONS: usize = 1024;
/// Default [`TransportConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default [`TransportConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`TransportConfig::backoff_min`].
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Default [`TransportConfig::backoff_max`].
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Default [`TransportConfig::service`].
pub const DEFAULT_SERVICE: &str = "Shoal server";
/// After a [`Refusal`], how long the refusing side keeps reading (and discarding) what the
/// caller still sends before it closes: closing with unread input would make the kernel reset
/// the connection, and the caller could lose the refusal.
pub const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// What a full per-peer queue gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// Drop the oldest queued message (fresh Raft state is worth more than stale).
    DropOldest,
    /// Refuse the new message.
    DropNewest,
}

/// Configuration of a [`Transport`]. Every limit is here, with a named default.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// This node's id (sent in the handshake).
    pub node_id: u64,
    /// The cluster id; a connection from another cluster is refused.
    pub cluster_id: u64,
    /// Every peer's id and address. May include this node, which is then ignored.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Largest frame payload sent or accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Largest peer message, in bytes: one that does not fit in a frame is sent in parts.
    pub max_message_bytes: usize,
    /// Messages queued per peer before [`TransportConfig::drop_policy`] applies.
    pub peer_queue_len: usize,
    /// What a full per-peer queue drops.
    pub drop_policy: DropPolicy,
    /// Peer messages buffered for the node before readers stop reading (backpressure).
    pub inbound_queue_len: usize,
    /// Client connections buffered before the listener waits for the service.
    pub client_queue_len: usize,
    /// Frames coalesced into one write.
    pub max_batch_frames: usize,
    /// Bytes coalesced into one write.
    pub max_batch_bytes: usize,
    /// Simultaneous inbound connections; more are closed at once.
    pub max_inbound_connections: usize,
    /// Time allowed for an outbound TCP connect.
    pub connect_timeout: Duration,
    /// Time allowed for an inbound connection's first frame.
    pub handshake_timeout: Duration,
    /// First reconnection delay.
    pub backoff_min: Duration,
    /// Cap of the exponentially growing reconnection delay (each delay is jittered down to
    /// half its value, so peers restarting together do not reconnect in lockstep).
    pub backoff_max: Duration,
    /// What this server is, for a person (sent in a [`Refusal`], so that a client of another
    /// service can say what it reached): [`shoal_wire::KV_SERVICE`], "Raft demo node", ….
    pub service: String,
    /// The snapshot stream ([`crate::snapshot_stream`]): where snapshots are read and
    /// received, how many sends at once, chunk and window sizes, timeouts, retries.
    pub snapshot: SnapshotStreamConfig,
    /// Plain TCP or TLS, for the listener and the connections to peers ([`crate::tls`]).
    pub security: Security,
}

impl TransportConfig {
    /// A configuration with every limit at its default.
    pub fn new(node_id: u64, cluster_id: u64, peers: BTreeMap<u64, SocketAddr>) -> Self {
        TransportConfig {
            node_id,
            cluster_id,
            peers,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            peer_queue_len: DEFAULT_PEER_QUEUE_LEN,
            drop_policy: DropPolicy::DropOldest,
            inbound_queue_len: DEFAULT_INBOUND_QUEUE_LEN,
            client_queue_len: DEFAULT_CLIENT_QUEUE_LEN,
            max_batch_frames: DEFAULT_MAX_BATCH_FRAMES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_inbound_connections: DEFAULT_MAX_INBOUND_CONNECTIONS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            service: DEFAULT_SERVICE.to_string(),
            snapshot: SnapshotStreamConfig::default(),
            security: Security::plain(),
        }
    }
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding or inspecting the listener failed.
    #[error("listener: {0}")]
    Listen(#[source] std::io::Error),
    /// `send` to a node that is not a configured peer.
    #[error("node {0} is not a configured peer")]
    UnknownPeer(u64),
    /// The configuration is unusable.
    #[error("invalid transport config: {0}")]
    InvalidConfig(String),
    /// Connecting to a server failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of the transport, for tests and metrics.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Messages given up because a peer queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Messages not sent because they encode to more than `max_message_bytes`.
    pub dropped_too_large: AtomicU64,
    /// Messages sent in several parts because they exceed `max_frame_bytes`.
    pub sent_in_parts: AtomicU64,
    /// Frames written to peers.
    pub frames_sent: AtomicU64,
    /// Batched writes to peers (each carries one or more frames).
    pub batches_written: AtomicU64,
    /// Outbound connections established.
    pub connects: AtomicU64,
    /// Outbound connection attempts that failed.
    pub connect_failures: AtomicU64,
    /// Inbound connections refused at the handshake (bad hello, cluster, unknown peer).
    pub rejected_handshakes: AtomicU64,
    /// Inbound peer connections closed because of a bad frame.
    pub bad_frames: AtomicU64,
    /// Frames received from peers.
    pub frames_received: AtomicU64,
}

impl TransportStats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A bounded queue of messages for one peer, shared by `send` and the peer's writer task.
struct PeerQueue<M> {
    messages: Mutex<VecDeque<M>>,
    ready: Notify,
}

impl<M> PeerQueue<M> {
    fn push(&self, msg: M, cap: usize, policy: DropPolicy, stats: &TransportStats) {
        {
            let mut q = match self.messages.lock() {
                Ok(q) => q,
                Err(poisoned) => poisoned.into_inner(),
            };
            if q.len() >= cap {
                bump(&stats.dropped_queue_full);
                match policy {
                    DropPolicy::DropOldest => {
                        q.pop_front();
                    }
                    DropPolicy::DropNewest => return,
                }
            }
            q.push_back(msg);
        }
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<M> {
        match self.messages.lock() {
            Ok(mut q) => q.pop_front(),
            Err(poisoned) => poisoned.into_inner().pop_front(),
        }
    }
}

/// An accepted connection whose hello named a non-peer role (a client or a shuffle fetch).
/// The service frames it with its own request and response types.
#[derive(Debug)]
pub struct ClientConnection {
    /// The validated handshake.
    pub hello: Hello,
    /// The remote address.
    pub peer_addr: SocketAddr,
    /// The stream (plain or TLS), positioned right after the handshake frame.
    pub stream: Stream,
    /// The transport's frame limit, used by [`ClientConnection::framed`].
    pub max_frame_bytes: usize,
    /// The transport's message limit ([`TransportConfig::max_message_bytes`]), used by
    /// [`ClientConnection::framed_in_parts`].
    pub max_message_bytes: usize,
}

impl ClientConnection {
    /// Frames the connection: decodes `In` (requests), encodes `Out` (responses).
    pub fn framed<In, Out>(self) -> Framed<Stream, FrameCodec<In, Out>> {
        Framed::new(self.stream, FrameCodec::new(self.max_frame_bytes))
    }

    /// Frames the connection like [`ClientConnection::framed`], with messages larger than a
    /// frame in parts ([`PartCodec`]) up to the transport's message limit, both ways (a shard
    /// group's Export answer and Install request carry a whole shard).
    pub fn framed_in_parts<In, Out>(self) -> Framed<Stream, PartCodec<In, Out>> {
        Framed::new(
            self.stream,
            PartCodec::new(self.max_frame_bytes, self.max_message_bytes),
        )
    }
}

/// Receives client connections accepted by the transport's listener.
pub type ClientAcceptor = mpsc::Receiver<ClientConnection>;
/// Receives `(from, message)` from peers; `from` is the node id the handshake proved
/// membership of. Receivers must still check that a message's own sender field agrees.
pub type Inbound<M> = mpsc::Receiver<(u64, M)>;

/// The sending half of the transport. Dropping it stops every task of the transport.
pub struct Transport<M> {
    node_id: u64,
    local_addr: SocketAddr,
    queues: BTreeMap<u64, Arc<PeerQueue<M>>>,
    config: Arc<TransportConfig>,
    stats: Arc<TransportStats>,
    tasks: Vec<JoinHandle<()>>,
    /// The peers now: whom the writers connect to, and whose connections are accepted (a
    /// membership change updates it with [`Transport::set_peers`]).
    peers: SharedPeers,
    /// Each peer's writer task and the address it connects to.
    writers: BTreeMap<u64, (SocketAddr, JoinHandle<()>)>,
    node_span: tracing::Span,
    snapshots: Arc<SnapshotStreams>,
}

/// The ids whose peer connections the listener accepts, shared with the accepting tasks.
type SharedPeers = Arc<RwLock<BTreeSet<u64>>>;

fn is_peer(peers: &SharedPeers, id: u64) -> bool {
    peers.read().map(|p| p.contains(&id)).unwrap_or(false)
}

impl<M> std::fmt::Debug for Transport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("node_id", &self.node_id)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl<M> Drop for Transport<M> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, t) in self.writers.values() {
            t.abort();
        }
        self.snapshots.abort_all();
    }
}

impl<M> Transport<M>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    /// Binds `listen` and starts the transport.
    pub async fn bind(
        config: TransportConfig,
        listen: SocketAddr,
    ) -> Result<(Transport<M>, Inbound<M>, ClientAcceptor), TransportError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(TransportError::Listen)?;
        Self::start(config, listener)
    }

    /// Starts the transport on an already bound listener (tests bind port 0 first).
    /// Must be called inside a tokio runtime.
    pub fn start(
        config: TransportConfig,
        listener: TcpListener,
    ) -> Result<(Transport<M>, Inbound<M>, ClientAcceptor), TransportError> {
        if config.max_frame_bytes < MIN_FRAME_BYTES
            || config.max_message_bytes < config.max_frame_bytes
            || config.peer_queue_len == 0
            || config.inbound_queue_len == 0
            || config.client_queue_len == 0
            || config.max_batch_frames == 0
            || config.max_inbound_connections == 0
        {
            return Err(TransportError::InvalidConfig(
                "frame, queue, batch and connection limits must be positive".into(),
            ));
        }
        if config.backoff_min.is_zero() || config.backoff_min > config.backoff_max {
            return Err(TransportError::InvalidConfig(
                "backoff_min must be positive and at most backoff_max".into(),
            ));
        }
        SnapshotStreams::validate(&config.snapshot).map_err(TransportError::InvalidConfig)?;
        let local_addr = listener.local_addr().map_err(TransportError::Listen)?;
        let snapshots = Arc::new(SnapshotStreams::new(
            config.snapshot.clone(),
            Dial {
                node_id: config.node_id,
                cluster_id: config.cluster_id,
                connect_timeout: config.connect_timeout,
                handshake_timeout: config.handshake_timeout,
                max_frame_bytes: config.max_frame_bytes,
                security: config.security.clone(),
            },
        ));
        let config = Arc::new(config);
        let stats = Arc::new(TransportStats::default());
        let (peer_tx, peer_rx) = mpsc::channel(config.inbound_queue_len);
        let (client_tx, client_rx) = mpsc::channel(config.client_queue_len);
        let node_span = tracing::info_span!("transport", node = config.node_id);
        // Accepted from the first connection on (the writers start in `set_peers` below).
        let peers: SharedPeers = Arc::new(RwLock::new(
            config
                .peers
                .keys()
                .copied()
                .filter(|&id| id != config.node_id)
                .collect(),
        ));
        let tasks = vec![tokio::spawn(
            accept_loop::<M>(
                listener,
                Arc::clone(&config),
                Arc::clone(&stats),
                Arc::clone(&peers),
                peer_tx,
                client_tx,
                Arc::clone(&snapshots),
            )
            .instrument(node_span.clone()),
        )];
        let mut transport = Transport {
            node_id: config.node_id,
            local_addr,
            queues: BTreeMap::new(),
            config: Arc::clone(&config),
            stats,
            tasks,
            peers,
            writers: BTreeMap::new(),
            node_span,
            snapshots,
        };
        transport.set_peers(&config.peers);
        info!(node = config.node_id, %local_addr, peers = transport.queues.len(), "transport started");
        Ok((transport, peer_rx, client_rx))
    }

    /// Makes `peers` (id → address; this node's own entry is ignored) the peers: a new one
    /// gets a writer, one whose address changed a new writer, and one no longer listed loses
    /// its writer and queue, and its connections are closed and refused from now on (a
    /// membership change, `docs/kv.md`).
    pub fn set_peers(&mut self, peers: &BTreeMap<u64, SocketAddr>) {
        let wanted: BTreeMap<u64, SocketAddr> = peers
            .iter()
            .filter(|(&id, _)| id != self.node_id)
            .map(|(&id, &addr)| (id, addr))
            .collect();
        if let Ok(mut allowed) = self.peers.write() {
            *allowed = wanted.keys().copied().collect();
        }
        let gone: Vec<u64> = self
            .writers
            .iter()
            .filter(|(id, (addr, _))| wanted.get(id) != Some(addr))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some((addr, task)) = self.writers.remove(&id) {
                task.abort();
                if !wanted.contains_key(&id) {
                    self.queues.remove(&id);
                    info!(peer = id, %addr, "peer removed: its connections are closed");
                }
            }
        }
        for (id, addr) in wanted {
            if self.writers.contains_key(&id) {
                continue;
            }
            let queue = Arc::clone(self.queues.entry(id).or_insert_with(|| {
                Arc::new(PeerQueue {
                    messages: Mutex::new(VecDeque::new()),
                    ready: Notify::new(),
                })
            }));
            let span = tracing::info_span!(parent: &self.node_span, "peer", peer = id, %addr);
            let task = tokio::spawn(
                peer_writer(
                    id,
                    addr,
                    queue,
                    Arc::clone(&self.config),
                    Arc::clone(&self.stats),
                )
                .instrument(span),
            );
            debug!(peer = id, %addr, "peer added");
            self.writers.insert(id, (addr, task));
        }
    }

    /// The peers now, with their addresses.
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.writers
            .iter()
            .map(|(&id, (addr, _))| (id, *addr))
            .collect()
    }

    /// Queues `msg` for peer `to`. Never blocks: when the peer's queue is full the configured
    /// [`DropPolicy`] applies and [`TransportStats::dropped_queue_full`] counts it.
    pub fn send(&self, to: u64, msg: M) -> Result<(), TransportError> {
        let queue = self
            .queues
            .get(&to)
            .ok_or(TransportError::UnknownPeer(to))?;
        queue.push(
            msg,
            self.config.peer_queue_len,
            self.config.drop_policy,
            &self.stats,
        );
        Ok(())
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The transport's counters.
    pub fn stats(&self) -> &TransportStats {
        &self.stats
    }

    /// Sends the snapshot of `msg` (an `InstallSnapshot`) on a snapshot stream of its own
    /// ([`crate::snapshot_stream`]): the message's in-memory data is dropped and the data
    /// directory's snapshot file is sent in chunks. Without a data directory
    /// ([`SnapshotStreamConfig::dir`]) or to an unknown peer, nothing is sent and the outcome
    /// comes back as a [`SnapshotEvent::SendFailed`].
    pub fn send_snapshot(&self, msg: shoal_raft::Message) {
        let to = msg.to.0;
        match self.writers.get(&to) {
            Some(&(addr, _)) if to != self.node_id => self.snapshots.send(msg, addr),
            _ => warn!(
                to,
                "snapshot addressed to a server that is not a configured peer"
            ),
        }
    }

    /// Whether snapshots go on streams of their own ([`Transport::send_snapshot`]): the
    /// configuration names a data directory.
    pub fn streams_snapshots(&self) -> bool {
        self.config.snapshot.dir.is_some()
    }

    /// The snapshot stream's events (received snapshots, finished and failed sends), for the
    /// one driver that takes them; `None` once taken.
    pub fn take_snapshot_events(&self) -> Option<mpsc::Receiver<SnapshotEvent>> {
        self.snapshots.take_events()
    }

    /// A view of the snapshot sends under way (bytes acknowledged of total, per follower).
    pub fn snapshot_progress(&self) -> SnapshotProgress {
        self.snapshots.progress().clone()
    }

    /// The snapshot stream's counters.
    pub fn snapshot_stats(&self) -> &SnapshotStreamStats {
        self.snapshots.stats()
    }

    /// Stops the listener, every connection and every writer.
    pub fn shutdown(self) {
        drop(self);
    }
}

/// Connects to a Shoal server as a client over plain TCP (sends a `Client` hello) and frames
/// the stream; [`connect_client_secure`] is the same with TLS when `security` says so.
pub async fn connect_client<In, Out>(
    addr: SocketAddr,
    cluster_id: u64,
    max_frame_bytes: usize,
    connect_timeout: Duration,
) -> Result<Framed<Stream, FrameCodec<In, Out>>, TransportError> {
    connect_client_secure(
        &Security::plain(),
        addr,
        cluster_id,
        max_frame_bytes,
        connect_timeout,
    )
    .await
}

/// Connects to a Shoal server as a client, plain or TLS as `security` says (sends a `Client`
/// hello), and frames the stream.
pub async fn connect_client_secure<In, Out>(
    security: &Security,
    addr: SocketAddr,
    cluster_id: u64,
    max_frame_bytes: usize,
    connect_timeout: Duration,
) -> Result<Framed<Stream, FrameCodec<In, Out>>, TransportError> {
    let mut stream = security
        .dial(addr, connect_timeout)
        .await
        .map_err(|source| TransportError::Connect { addr, source })?;
    write_hello(&mut stream, Hello::new(Role::Client, cluster_id))
        .await
        .map_err(|source| TransportError::Connect { addr, source })?;
    Ok(Framed::new(stream, FrameCodec::new(max_frame_bytes)))
}

async fn write_hello<S: AsyncWrite + Unpin>(stream: &mut S, hello: Hello) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(32);
    encode_frame(&hello, MAX_HELLO_FRAME_BYTES, &mut buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    stream.write_all(&buf).await?;
    // A TLS stream buffers what is written until flushed.
    stream.flush().await
}

/// Reads exactly the hello frame (no further bytes, so what follows stays in the socket).
async fn read_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Hello, String> {
    let mut frame = [0u8; FRAME_HEADER_BYTES + MAX_HELLO_FRAME_BYTES];
    stream
        .read_exact(&mut frame[..FRAME_HEADER_BYTES])
        .await
        .map_err(|e| format!("reading handshake header: {e}"))?;
    let len = peek_frame_len(&frame[..FRAME_HEADER_BYTES], MAX_HELLO_FRAME_BYTES)
        .map_err(|e| format!("handshake: {e}"))?
        .ok_or("handshake header incomplete")?;
    let total = FRAME_HEADER_BYTES + len;
    stream
        .read_exact(&mut frame[FRAME_HEADER_BYTES..total])
        .await
        .map_err(|e| format!("reading handshake payload: {e}"))?;
    match decode_frame::<Hello>(&frame[..total], MAX_HELLO_FRAME_BYTES) {
        Ok(Some((hello, _))) => Ok(hello),
        Ok(None) => Err("handshake frame incomplete".into()),
        // A newer build's handshake with a role this build does not know: say which
        // versions met, not that the bytes are malformed.
        Err(FrameError::Malformed(e)) => {
            Err(Hello::undecodable_reason(&frame[FRAME_HEADER_BYTES..total])
                .unwrap_or_else(|| format!("handshake: malformed frame payload: {e}")))
        }
        Err(e) => Err(format!("handshake: {e}")),
    }
}

/// Tells the caller why its connection is refused, then closes it. Errors are ignored: the
/// connection is being dropped anyway, and the refusal is only a courtesy to the caller.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, refusal: Refusal) {
    let mut buf = Vec::new();
    if encode_frame(&refusal, MAX_REFUSAL_FRAME_BYTES, &mut buf).is_err()
        || stream.write_all(&buf).await.is_err()
        || stream.shutdown().await.is_err()
    {
        return;
    }
    // Read what the caller still sends until it closes (or the linger ends), so the close
    // is a clean FIN and not a reset that could discard the refusal on its side.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Refuses a connection: with a [`Refusal`] for a client (which reads and can tell its user),
/// silently for a peer (a peer connection is one-way: the caller never reads it).
async fn refuse_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    hello: &Hello,
    config: &TransportConfig,
    reason: String,
) {
    if !matches!(hello.role, Role::Peer { .. } | Role::Snapshot { .. }) {
        refuse(
            stream,
            Refusal::new(config.cluster_id, &config.service, reason),
        )
        .await;
    }
}

/// Largest [`Refusal`] frame (its texts are short; this bounds a client's read of one).
pub const MAX_REFUSAL_FRAME_BYTES: usize = 4096;

async fn accept_loop<M>(
    listener: TcpListener,
    config: Arc<TransportConfig>,
    stats: Arc<TransportStats>,
    peers: SharedPeers,
    peer_tx: mpsc::Sender<(u64, M)>,
    client_tx: mpsc::Sender<ClientConnection>,
    snapshots: Arc<SnapshotStreams>,
) where
    M: DeserializeOwned + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(config.max_inbound_connections));
    // Owning the connection tasks here means aborting this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE or a connection reset before accept: keep serving.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            warn!(%remote, limit = config.max_inbound_connections, "too many inbound connections; closing");
            continue;
        };
        let span = tracing::info_span!("conn", %remote);
        connections.spawn(
            {
                let config = Arc::clone(&config);
                let stats = Arc::clone(&stats);
                let peers = Arc::clone(&peers);
                let peer_tx = peer_tx.clone();
                let client_tx = client_tx.clone();
                let snapshots = Arc::clone(&snapshots);
                async move {
                    serve_inbound(
                        stream, remote, &config, &stats, &peers, peer_tx, client_tx, &snapshots,
                    )
                    .await;
                    drop(permit);
                }
            }
            .instrument(span),
        );
    }
}

#[allow(clippy::too_many_arguments)] // the accept loop's shared state, passed by reference
async fn serve_inbound<M>(
    tcp: TcpStream,
    remote: SocketAddr,
    config: &TransportConfig,
    stats: &TransportStats,
    peers: &SharedPeers,
    peer_tx: mpsc::Sender<(u64, M)>,
    client_tx: mpsc::Sender<ClientConnection>,
    snapshots: &SnapshotStreams,
) where
    M: DeserializeOwned,
{
    let mut stream = match secure(tcp, remote, config, stats).await {
        Some(s) => s,
        None => return,
    };
    let hello = match tokio::time::timeout(config.handshake_timeout, read_hello(&mut stream)).await
    {
        Ok(Ok(h)) => h,
        Ok(Err(reason)) => {
            bump(&stats.rejected_handshakes);
            warn!(%remote, %reason, "rejecting connection: bad handshake");
            return;
        }
        Err(_) => {
            bump(&stats.rejected_handshakes);
            warn!(%remote, "rejecting connection: no handshake within the timeout");
            return;
        }
    };
    if hello.magic != shoal_wire::PROTOCOL_MAGIC {
        // Not a Shoal process at all (an HTTP client, a port scanner): nothing to tell it.
        bump(&stats.rejected_handshakes);
        warn!(%remote, "rejecting connection: not a Shoal handshake");
        return;
    }
    if let Err(reason) = hello.validate() {
        bump(&stats.rejected_handshakes);
        warn!(%remote, %reason, "rejecting connection");
        refuse_client(stream, &hello, config, reason).await;
        return;
    }
    if hello.cluster_id != config.cluster_id {
        bump(&stats.rejected_handshakes);
        warn!(%remote, theirs = hello.cluster_id, ours = config.cluster_id,
            "rejecting connection from another cluster");
        let reason = format!(
            "this server is cluster {}, not {}",
            config.cluster_id, hello.cluster_id
        );
        refuse_client(stream, &hello, config, reason).await;
        return;
    }
    if config.security.is_tls() && !stream.peer_certified() {
        bump(&stats.rejected_handshakes);
        warn!(%remote, role = ?hello.role,
            "rejecting connection: TLS without a client certificate (every peer and client must \
             present one signed by this server's --ca)");
        let reason = "this server requires a client certificate signed by the cluster's CA: \
                      give the client --cert and --key (make them with `shoal cert client`)";
        refuse_client(stream, &hello, config, reason.into()).await;
        return;
    }
    let from = match hello.role {
        Role::Peer { node_id } => node_id,
        Role::Snapshot { node_id } => {
            if node_id == config.node_id || !is_peer(peers, node_id) {
                bump(&stats.rejected_handshakes);
                warn!(%remote, claimed = node_id,
                    "rejecting snapshot stream: node id is not a configured peer");
                return;
            }
            debug!(%remote, peer = node_id, "accepted snapshot stream");
            snapshots.receive(stream, node_id, remote).await;
            return;
        }
        Role::Client | Role::Shuffle => {
            debug!(%remote, role = ?hello.role, "accepted client connection");
            let conn = ClientConnection {
                hello,
                peer_addr: remote,
                stream,
                max_frame_bytes: config.max_frame_bytes,
                max_message_bytes: config.max_message_bytes,
            };
            // Fails only when the service dropped its acceptor: the connection just closes.
            let _ = client_tx.send(conn).await;
            return;
        }
    };
    if from == config.node_id || !is_peer(peers, from) {
        bump(&stats.rejected_handshakes);
        warn!(%remote, claimed = from, "rejecting connection: node id is not a configured peer");
        return;
    }
    debug!(%remote, peer = from, "accepted peer connection");
    let mut frames = FramedRead::new(
        crate::metrics::CountingReader::new(stream, crate::metrics::peer_received(from)),
        FrameCodec::<PeerFrame<M>, ()>::new(config.max_frame_bytes),
    );
    // The parts of a message received so far.
    let mut partial: Vec<u8> = Vec::new();
    while let Some(frame) = frames.next().await {
        bump(&stats.frames_received);
        let msg = match frame {
            Ok(PeerFrame::Whole(msg)) if partial.is_empty() => msg,
            Ok(PeerFrame::Part { last, bytes }) => {
                if partial.len() + bytes.len() > config.max_message_bytes {
                    bump(&stats.bad_frames);
                    warn!(%remote, peer = from, limit = config.max_message_bytes,
                        "closing peer connection: message larger than the limit");
                    return;
                }
                partial.extend_from_slice(&bytes);
                if !last {
                    continue;
                }
                match postcard::from_bytes::<M>(&partial) {
                    Ok(msg) => {
                        partial = Vec::new();
                        msg
                    }
                    Err(e) => {
                        bump(&stats.bad_frames);
                        warn!(%remote, peer = from, error = %e,
                            "closing peer connection: malformed message in parts");
                        return;
                    }
                }
            }
            Ok(PeerFrame::Whole(_)) => {
                bump(&stats.bad_frames);
                warn!(%remote, peer = from, "closing peer connection: a message inside another");
                return;
            }
            Err(e) => {
                bump(&stats.bad_frames);
                warn!(%remote, peer = from, error = %e, "closing peer connection: bad frame");
                return;
            }
        };
        if !is_peer(peers, from) {
            warn!(%remote, peer = from, "closing peer connection: no longer a member");
            return;
        }
        if peer_tx.send((from, msg)).await.is_err() {
            return; // the node is shutting down
        }
    }
    debug!(%remote, peer = from, "peer connection closed");
}

/// Takes an accepted connection through [`Security::accept`] within the handshake timeout.
/// A plain caller on a TLS port is read up to its hello and refused in words; every other
/// failure is logged (at warn: a TLS failure is a misconfiguration an operator must see).
async fn secure(
    tcp: TcpStream,
    remote: SocketAddr,
    config: &TransportConfig,
    stats: &TransportStats,
) -> Option<Stream> {
    let accepted = tokio::time::timeout(config.handshake_timeout, config.security.accept(tcp));
    match accepted.await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(AcceptError::PlainOnTlsPort(mut tcp))) => {
            bump(&stats.rejected_handshakes);
            warn!(%remote, "rejecting connection: plain TCP on this TLS port (the caller needs \
                --ca, and --cert/--key)");
            let read = tokio::time::timeout(config.handshake_timeout, read_hello(&mut tcp));
            if let Ok(Ok(hello)) = read.await {
                if hello.magic == shoal_wire::PROTOCOL_MAGIC {
                    let reason = "this server requires TLS: give the client --ca (the cluster's \
                                  CA certificate) and --cert/--key (a client certificate)";
                    refuse_client(tcp, &hello, config, reason.into()).await;
                }
            }
            None
        }
        Ok(Err(AcceptError::Io(e))) => {
            debug!(%remote, error = %e, "connection closed before its handshake");
            None
        }
        Ok(Err(e)) => {
            bump(&stats.rejected_handshakes);
            warn!(%remote, error = %e, "rejecting connection");
            None
        }
        Err(_) => {
            bump(&stats.rejected_handshakes);
            warn!(%remote, "rejecting connection: no TLS handshake within the timeout");
            None
        }
    }
}

async fn peer_writer<M: Serialize>(
    id: u64,
    addr: SocketAddr,
    queue: Arc<PeerQueue<M>>,
    config: Arc<TransportConfig>,
    stats: Arc<TransportStats>,
) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    loop {
        match config.security.dial(addr, config.connect_timeout).await {
            Ok(stream) => {
                bump(&stats.connects);
                debug!("connected");
                let started = tokio::time::Instant::now();
                match run_peer_connection(stream, id, &queue, &config, &stats).await {
                    Ok(()) => debug!("peer closed the connection"),
                    // The peer refused this node's certificate: an operator must see it.
                    Err(e) if e.to_string().starts_with("TLS") => {
                        warn!(error = %e, "peer connection failed")
                    }
                    Err(e) => debug!(error = %e, "connection failed"),
                }
                // Only a connection that lasted resets the backoff, so a peer that accepts and
                // at once closes (it rejects us) is not hammered.
                if started.elapsed() >= config.backoff_max {
                    backoff.reset();
                }
            }
            Err(e) if e.to_string().starts_with("TLS") => {
                bump(&stats.connect_failures);
                warn!(error = %e, "cannot connect to peer");
            }
            Err(e) => {
                bump(&stats.connect_failures);
                debug!(error = %e, "connect failed");
            }
        }
        tokio::time::sleep(backoff.next_delay(&mut rng)).await;
    }
}

/// Exponential reconnection backoff: the delay doubles from `min` up to `max`, and each delay
/// is drawn uniformly from `[d/2, d]` so peers restarting together spread out.
#[derive(Debug, Clone)]
struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            current: min,
            min,
            max,
        }
    }

    fn reset(&mut self) {
        self.current = self.min;
    }

    fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let millis = u64::try_from(self.current.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.current = self.current.saturating_mul(2).min(self.max);
        Duration::from_millis(rng.gen_range(millis / 2..=millis))
    }
}

/// Sends queued messages until the connection fails. Messages taken from the queue but not
/// written are lost, which Raft tolerates.
async fn run_peer_connection<M: Serialize>(
    stream: Stream,
    peer: u64,
    queue: &PeerQueue<M>,
    config: &TransportConfig,
    stats: &TransportStats,
) -> std::io::Result<()> {
    let sent_bytes = crate::metrics::peer_sent(peer);
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = Vec::new();
    encode_frame(
        &Hello::new(
            Role::Peer {
                node_id: config.node_id,
            },
            config.cluster_id,
        ),
        MAX_HELLO_FRAME_BYTES,
        &mut buf,
    )
    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    writer.write_all(&buf).await?;
    writer.flush().await?;
    let mut probe = [0u8; 64];
    loop {
        buf.clear();
        let mut frames = 0u64;
        while frames < config.max_batch_frames as u64 && buf.len() < config.max_batch_bytes {
            let Some(msg) = queue.pop() else { break };
            let encoded =
                encode_frame(&PeerFrameRef::Whole(&msg), config.max_frame_bytes, &mut buf);
            match encoded {
                Ok(()) => frames += 1,
                Err(FrameError::TooLarge { .. }) => {
                    // Too big for one frame: what is batched goes first, then the parts.
                    let Some(bytes) = encode_whole(&msg, config, stats) else {
                        continue;
                    };
                    drop(msg);
                    writer.write_all(&buf).await?;
                    sent_bytes.inc_by((buf.len() + bytes.len()) as u64);
                    buf.clear();
                    frames += send_in_parts(&mut writer, &bytes, config, stats).await?;
                    writer.flush().await?;
                }
                Err(e) => {
                    bump(&stats.dropped_too_large);
                    warn!(error = %e, "dropping a message that does not encode");
                }
            }
        }
        if frames > 0 {
            writer.write_all(&buf).await?;
            sent_bytes.inc_by(buf.len() as u64);
            writer.flush().await?;
            stats.frames_sent.fetch_add(frames, Ordering::Relaxed);
            bump(&stats.batches_written);
            continue;
        }
        // Nothing to send: wait for work, watching the read half so a peer that closed (or
        // restarted) is noticed now rather than at the next write.
        tokio::select! {
            _ = queue.ready.notified() => {}
            read = reader.read(&mut probe) => match read {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "peer sent bytes on a send-only connection",
                )),
                Err(e) => return Err(e),
            },
        }
    }
}

/// Writes `first` and everything already waiting in `queue` to `sink`, then flushes once: a
/// batch of frames in one write instead of one write per frame (client connections, both
/// ends).
pub async fn send_queued<S, T>(
    sink: &mut S,
    first: T,
    queue: &mut mpsc::Receiver<T>,
) -> Result<(), S::Error>
where
    S: Sink<T> + Unpin,
{
    sink.feed(first).await?;
    while let Ok(more) = queue.try_recv() {
        sink.feed(more).await?;
    }
    sink.flush().await
}

/// Smallest `max_frame_bytes`: room for a part's header and some payload.
pub const MIN_FRAME_BYTES: usize = 256;

/// What one frame on a peer connection carries (decoding side).
#[derive(Debug, serde::Deserialize)]
pub enum PeerFrame<M> {
    /// A whole message.
    Whole(M),
    /// A piece of the postcard encoding of a message too large for one frame; `last` on the
    /// final piece, when the reader decodes the concatenation.
    Part {
        /// Whether this is the final piece.
        last: bool,
        /// The piece (`serde_bytes`: the same encoding as a sequence of bytes, decoded in one
        /// copy instead of a call per byte).
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// What one frame on a peer connection carries (encoding side, borrowing; the same encoding as
/// [`PeerFrame`]).
#[derive(Debug, Serialize)]
pub enum PeerFrameRef<'a, M> {
    /// A whole message.
    Whole(&'a M),
    /// A piece of a message too large for one frame.
    Part {
        /// Whether this is the final piece.
        last: bool,
        /// The piece.
        #[serde(with = "serde_bytes")]
        bytes: &'a [u8],
    },
}

/// The postcard encoding of a message to send in parts, or `None` (and a counted drop) if it
/// exceeds `max_message_bytes`.
fn encode_whole<M: Serialize>(
    msg: &M,
    config: &TransportConfig,
    stats: &TransportStats,
) -> Option<Vec<u8>> {
    match postcard::to_allocvec(msg) {
        Ok(e) if e.len() <= config.max_message_bytes => Some(e),
        Ok(e) => {
            bump(&stats.dropped_too_large);
            warn!(
                bytes = e.len(),
                limit = config.max_message_bytes,
                "dropping a message larger than the message limit"
            );
            None
        }
        Err(e) => {
            bump(&stats.dropped_too_large);
            warn!(error = %e, "dropping a message that does not encode");
            None
        }
    }
}

/// Writes an encoded message as consecutive [`PeerFrame::Part`] frames; returns their number.
async fn send_in_parts<W: AsyncWrite + Unpin>(
    writer: &mut W,
    encoded: &[u8],
    config: &TransportConfig,
    stats: &TransportStats,
) -> std::io::Result<u64> {
    // Room for the variant, the flag and the length prefix of the piece.
    let piece = config.max_frame_bytes - 16;
    let mut buf = Vec::with_capacity(config.max_frame_bytes + FRAME_HEADER_BYTES);
    let mut frames = 0;
    let mut chunks = encoded.chunks(piece).peekable();
    while let Some(bytes) = chunks.next() {
        buf.clear();
        let part: PeerFrameRef<'_, ()> = PeerFrameRef::Part {
            last: chunks.peek().is_none(),
            bytes,
        };
        encode_frame(&part, config.max_frame_bytes, &mut buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        writer.write_all(&buf).await?;
        frames += 1;
    }
    bump(&stats.sent_in_parts);
    debug!(
        bytes = encoded.len(),
        frames, "sent a large message in parts"
    );
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_jittered_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (min, max) = (Duration::from_millis(50), Duration::from_millis(2000));
        let mut b = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..20 {
            let d = b.next_delay(&mut rng);
            assert!(
                d <= ceiling && d >= ceiling / 2,
                "{d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(max);
        }
        assert_eq!(b.current, max);
        b.reset();
        assert!(b.next_delay(&mut rng) <= min);
    }

    #[test]
    fn full_queue_applies_the_drop_policy() {
        let stats = TransportStats::default();
        let q = PeerQueue {
            messages: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
        };
        for i in 0..5 {
            q.push(i, 3, DropPolicy::DropOldest, &stats);
        }
        assert_eq!(
            (q.pop(), q.pop(), q.pop(), q.pop()),
            (Some(2), Some(3), Some(4), None)
        );
        for i in 0..5 {
            q.push(i, 3, DropPolicy::DropNewest, &stats);
        }
        assert_eq!(
            (q.pop(), q.pop(), q.pop(), q.pop()),
            (Some(0), Some(1), Some(2), None)
        );
        assert_eq!(TransportStats::get(&stats.dropped_queue_full), 4);
    }
}
