//! Snapshots that stream (issue 15): a leader sends a snapshot to a follower on a connection
//! of its own, in chunks read from its snapshot file, so a large snapshot never holds back the
//! heartbeats and appends of the peer connection, and neither side holds it whole in memory
//! to send or receive it.
//!
//! **Sending.** The driver hands every `InstallSnapshot` the Raft core emits to
//! [`crate::Transport::send_snapshot`]. The message's in-memory data is dropped at once: what
//! is sent is the leader's snapshot file (`snapshot-v2` in its data directory, whose header
//! says which index it covers), read [`SnapshotStreamConfig::chunk_bytes`] at a time. One send
//! per follower at a time (a repeat while one runs is ignored), at most
//! [`SnapshotStreamConfig::max_concurrent_sends`] at once (the others wait for a slot). The
//! connection opens with the transport's handshake ([`Role::Snapshot`]); at most
//! [`SnapshotStreamConfig::window_bytes`] may be unacknowledged; no answer for
//! [`SnapshotStreamConfig::step_timeout`] fails the attempt; a failed attempt restarts from
//! the beginning on a new connection, up to [`SnapshotStreamConfig::attempts`] times, and then
//! the driver reports `snapshot failed` to Raft (`RawNode::report_snapshot_failed`, etcd's
//! `ReportSnapshot`), which probes the follower again and so sends a snapshot anew.
//!
//! **Receiving.** The accepting side writes the chunks to a temporary file in its data
//! directory (`snapshot-recv.<from>.<n>.tmp`, removed at the next open of the storage if a
//! crash leaves it), checks offsets, size and the CRC32C of the whole, fsyncs, renames it to
//! `snapshot-recv.<from>.<n>` (and fsyncs the directory), checks it as a snapshot file by
//! streaming through it (every record's checksum, the metadata the message announced), and
//! hands the driver the file's name with the `InstallSnapshot` message (no data: it stays in
//! the file). The driver stages the file with the storage and steps Raft; if Raft installs
//! the snapshot, the storage renames the file into place as its `snapshot-v2` (no second
//! write) and the state machine restores by streaming from it. Anything wrong refuses the
//! transfer and installs nothing. Neither side ever holds the snapshot in memory.
//!
//! **Progress.** Both sides log bytes done of total at info every
//! [`SnapshotStreamConfig::progress_log_interval`]; the sends under way are readable through
//! [`SnapshotProgress`] (for `kv member list`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use shoal_raft::{Message, MessageBody};
use shoal_wire::codec::FrameCodec;
use shoal_wire::frame::encode_frame;
use shoal_wire::snapshot::{SnapshotAck, SnapshotFrame, SnapshotFrameRef};
use shoal_wire::{Hello, Role};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};

/// The halves of a snapshot stream's connection (plain TCP or TLS).
type OwnedReadHalf = ReadHalf<crate::tls::Stream>;
type OwnedWriteHalf = WriteHalf<crate::tls::Stream>;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::{debug, info, warn, Instrument};

/// Default [`SnapshotStreamConfig::max_concurrent_sends`].
pub const DEFAULT_MAX_CONCURRENT_SNAPSHOT_SENDS: usize = 2;
/// Default [`SnapshotStreamConfig::chunk_bytes`]: 1 MiB.
pub const DEFAULT_SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// Default [`SnapshotStreamConfig::window_bytes`]: 8 MiB unacknowledged.
pub const DEFAULT_SNAPSHOT_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Default [`SnapshotStreamConfig::step_timeout`].
pub const DEFAULT_SNAPSHOT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`SnapshotStreamConfig::attempts`].
pub const DEFAULT_SNAPSHOT_ATTEMPTS: u32 = 3;
/// Default [`SnapshotStreamConfig::retry_delay`].
pub const DEFAULT_SNAPSHOT_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Default [`SnapshotStreamConfig::max_snapshot_bytes`]: 64 GiB.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 64 << 30;
/// Default [`SnapshotStreamConfig::progress_log_interval`].
pub const DEFAULT_SNAPSHOT_PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(3);
/// Events waiting for the driver (received snapshots, failed sends) before the stream tasks
/// wait for it.
const EVENT_QUEUE_LEN: usize = 16;
/// The snapshot file a sender reads (the storage's; see `shoal_storage::SNAPSHOT_FILE`).
const SNAPSHOT_FILE: &str = shoal_storage::SNAPSHOT_FILE;
/// Start of the names of received snapshot files (`snapshot-recv.<from>.<n>[.tmp]`); any left
/// by a crash are removed when the transport starts.
const RECEIVED_PREFIX: &str = "snapshot-recv.";
/// Room in a frame for a chunk's variant, offset and length prefix.
const CHUNK_FRAME_OVERHEAD: usize = 64;

/// Limits of the snapshot stream (a part of [`crate::TransportConfig`]).
#[derive(Debug, Clone)]
pub struct SnapshotStreamConfig {
    /// The node's data directory: where the sender reads `snapshot-v2` and the receiver
    /// writes what it receives. `None`: no streaming (snapshots travel whole on the peer
    /// connection, and snapshot connections are refused).
    pub dir: Option<PathBuf>,
    /// Snapshot sends under way at once from this node; more wait for a slot.
    pub max_concurrent_sends: usize,
    /// Bytes of the file per chunk frame (less if the transport's frame limit is smaller).
    pub chunk_bytes: usize,
    /// Bytes sent but not yet acknowledged by the receiver before the sender waits.
    pub window_bytes: u64,
    /// Longest wait for the other side (a chunk, an acknowledgement, the final answer) before
    /// the attempt fails.
    pub step_timeout: Duration,
    /// Attempts of one send before Raft is told the snapshot failed.
    pub attempts: u32,
    /// Delay before the second attempt (doubled for each further one).
    pub retry_delay: Duration,
    /// Largest snapshot a receiver accepts, in bytes.
    pub max_snapshot_bytes: u64,
    /// How often both sides log their progress.
    pub progress_log_interval: Duration,
}

impl Default for SnapshotStreamConfig {
    fn default() -> Self {
        SnapshotStreamConfig {
            dir: None,
            max_concurrent_sends: DEFAULT_MAX_CONCURRENT_SNAPSHOT_SENDS,
            chunk_bytes: DEFAULT_SNAPSHOT_CHUNK_BYTES,
            window_bytes: DEFAULT_SNAPSHOT_WINDOW_BYTES,
            step_timeout: DEFAULT_SNAPSHOT_STEP_TIMEOUT,
            attempts: DEFAULT_SNAPSHOT_ATTEMPTS,
            retry_delay: DEFAULT_SNAPSHOT_RETRY_DELAY,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            progress_log_interval: DEFAULT_SNAPSHOT_PROGRESS_LOG_INTERVAL,
        }
    }
}

/// What the snapshot stream tells the driver.
#[derive(Debug)]
pub enum SnapshotEvent {
    /// A snapshot arrived whole and checked: stage `file` with the storage, then step Raft
    /// with this `InstallSnapshot` message.
    Received {
        /// The sender, proved by the handshake.
        from: u64,
        /// The message, whose snapshot has no data (it is in `file`).
        message: Message,
        /// The received snapshot file, in the data directory (a file of the `snapshot-v2`
        /// format, fsynced, checked), named relative to it.
        file: String,
    },
    /// Every attempt to send a snapshot to `to` failed: tell Raft.
    SendFailed {
        /// The follower.
        to: u64,
        /// Why the last attempt failed.
        reason: String,
    },
    /// A snapshot was delivered to `to` (Raft learns it from the follower's answer).
    Sent {
        /// The follower.
        to: u64,
        /// Bytes sent.
        bytes: u64,
    },
}

/// One snapshot send under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSendStatus {
    /// The follower.
    pub to: u64,
    /// Index the snapshot covers (0 until the file is opened).
    pub index: u64,
    /// Bytes the follower acknowledged.
    pub sent_bytes: u64,
    /// Bytes of the snapshot file (0 until it is opened).
    pub total_bytes: u64,
    /// The attempt under way (1 for the first; 0 while waiting for a slot).
    pub attempt: u32,
}

/// A cloneable view of the snapshot sends under way and of the stream's counters (for status
/// pages and `kv member list`).
#[derive(Debug, Clone, Default)]
pub struct SnapshotProgress {
    sends: Arc<Mutex<BTreeMap<u64, SnapshotSendStatus>>>,
    stats: Arc<SnapshotStreamStats>,
}

impl SnapshotProgress {
    /// The sends under way, by follower.
    pub fn sends(&self) -> Vec<SnapshotSendStatus> {
        self.lock().values().cloned().collect()
    }

    /// The stream's counters.
    pub fn stats(&self) -> &SnapshotStreamStats {
        &self.stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SnapshotSendStatus>> {
        match self.sends.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn update(&self, to: u64, f: impl FnOnce(&mut SnapshotSendStatus)) {
        if let Some(s) = self.lock().get_mut(&to) {
            f(s);
        }
    }
}

/// Counters of the snapshot stream, for tests and metrics.
#[derive(Debug, Default)]
pub struct SnapshotStreamStats {
    /// Send attempts started.
    pub attempts: AtomicU64,
    /// Sends that completed.
    pub sends_completed: AtomicU64,
    /// Sends given up after every attempt.
    pub sends_failed: AtomicU64,
    /// Snapshots received whole and handed to the driver.
    pub received: AtomicU64,
    /// Transfers the receiver refused (bad frame, size, checksum, file).
    pub refused: AtomicU64,
}

/// What the transport needs to know to dial a peer for a snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Dial {
    pub(crate) node_id: u64,
    pub(crate) cluster_id: u64,
    pub(crate) connect_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_frame_bytes: usize,
    /// Plain TCP or TLS: the transport's own ([`crate::tls`]).
    pub(crate) security: crate::tls::Security,
}

/// The snapshot stream's state, shared by the transport's sending side and its listener.
pub(crate) struct SnapshotStreams {
    pub(crate) config: SnapshotStreamConfig,
    dial: Dial,
    progress: SnapshotProgress,
    permits: Arc<Semaphore>,
    events_tx: mpsc::Sender<SnapshotEvent>,
    events_rx: Mutex<Option<mpsc::Receiver<SnapshotEvent>>>,
    sends: Mutex<JoinSet<()>>,
    next_receive: AtomicU64,
}

impl std::fmt::Debug for SnapshotStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStreams")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl SnapshotStreams {
    pub(crate) fn new(config: SnapshotStreamConfig, dial: Dial) -> SnapshotStreams {
        if let Some(dir) = &config.dir {
            remove_leftovers(dir);
        }
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE_LEN);
        SnapshotStreams {
            permits: Arc::new(Semaphore::new(config.max_concurrent_sends.max(1))),
            config,
            dial,
            progress: SnapshotProgress::default(),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            sends: Mutex::new(JoinSet::new()),
            next_receive: AtomicU64::new(0),
        }
    }

    /// Checks the limits (called by the transport's `start`).
    pub(crate) fn validate(config: &SnapshotStreamConfig) -> Result<(), String> {
        if config.chunk_bytes == 0
            || config.max_concurrent_sends == 0
            || config.attempts == 0
            || config.window_bytes == 0
        {
            return Err(
                "snapshot chunk_bytes, max_concurrent_sends, attempts and window_bytes \
                must be positive"
                    .into(),
            );
        }
        Ok(())
    }

    /// Bytes per chunk: the configured size, or less to fit the frame limit.
    fn chunk_bytes(&self) -> usize {
        self.config
            .chunk_bytes
            .min(
                self.dial
                    .max_frame_bytes
                    .saturating_sub(CHUNK_FRAME_OVERHEAD),
            )
            .max(1)
    }

    pub(crate) fn take_events(&self) -> Option<mpsc::Receiver<SnapshotEvent>> {
        lock(&self.events_rx).take()
    }

    pub(crate) fn progress(&self) -> &SnapshotProgress {
        &self.progress
    }

    pub(crate) fn stats(&self) -> &SnapshotStreamStats {
        &self.progress.stats
    }

    /// Stops every send (the transport is dropped).
    pub(crate) fn abort_all(&self) {
        lock(&self.sends).abort_all();
    }

    /// Starts sending the snapshot of `msg` (an `InstallSnapshot`) to `addr`, unless a send to
    /// that follower is under way. Drops the message's in-memory data at once.
    pub(crate) fn send(self: &Arc<Self>, mut msg: Message, addr: SocketAddr) {
        let to = msg.to.0;
        let MessageBody::InstallSnapshot { snapshot } = &mut msg.body else {
            return;
        };
        // The file is what travels: free the core's copy now.
        snapshot.data = Vec::new();
        {
            let mut sends = self.progress.lock();
            if sends.contains_key(&to) {
                debug!(
                    to,
                    "a snapshot send to this follower is under way; repeat ignored"
                );
                return;
            }
            sends.insert(
                to,
                SnapshotSendStatus {
                    to,
                    index: 0,
                    sent_bytes: 0,
                    total_bytes: 0,
                    attempt: 0,
                },
            );
        }
        let span = tracing::info_span!("snapshot_send", to, %addr);
        let me = Arc::clone(self);
        let mut sends = lock(&self.sends);
        while sends.try_join_next().is_some() {}
        sends.spawn(async move { me.run_send(msg, addr).await }.instrument(span));
    }

    async fn run_send(self: Arc<Self>, msg: Message, addr: SocketAddr) {
        let to = msg.to.0;
        let permit = Arc::clone(&self.permits).acquire_owned().await;
        let mut delay = self.config.retry_delay;
        let mut outcome = Err(String::new());
        for attempt in 1..=self.config.attempts {
            self.stats().attempts.fetch_add(1, Ordering::Relaxed);
            self.progress.update(to, |s| {
                s.attempt = attempt;
                s.sent_bytes = 0;
            });
            match self.attempt_send(&msg, addr).await {
                Ok(bytes) => {
                    outcome = Ok(bytes);
                    break;
                }
                Err(e) => {
                    warn!(attempt, attempts = self.config.attempts, error = %e,
                        "snapshot send attempt failed");
                    outcome = Err(e);
                    if attempt < self.config.attempts {
                        tokio::time::sleep(delay).await;
                        delay = delay.saturating_mul(2);
                    }
                }
            }
        }
        self.progress.lock().remove(&to);
        drop(permit);
        let event = match outcome {
            Ok(bytes) => {
                self.stats().sends_completed.fetch_add(1, Ordering::Relaxed);
                SnapshotEvent::Sent { to, bytes }
            }
            Err(reason) => {
                self.stats().sends_failed.fetch_add(1, Ordering::Relaxed);
                warn!(error = %reason, "snapshot failed after every attempt; Raft will retry");
                SnapshotEvent::SendFailed { to, reason }
            }
        };
        let _ = self.events_tx.send(event).await;
    }

    /// One attempt: the whole file on a new connection. `Ok(bytes sent)` once the follower
    /// accepted it.
    async fn attempt_send(&self, msg: &Message, addr: SocketAddr) -> Result<u64, String> {
        let to = msg.to.0;
        let dir = self
            .config
            .dir
            .as_ref()
            .ok_or("no data directory to read the snapshot from")?;
        let path = dir.join(SNAPSHOT_FILE);
        let (file, _pin, meta, total) = open_snapshot_file(path.clone()).await?;
        let mut msg = msg.clone();
        let MessageBody::InstallSnapshot { snapshot } = &mut msg.body else {
            return Err("not an InstallSnapshot".into());
        };
        if meta.index < snapshot.meta.index {
            return Err(format!(
                "{} covers index {}, older than the snapshot Raft sends ({})",
                path.display(),
                meta.index,
                snapshot.meta.index
            ));
        }
        // The file may be newer than the core's message (a snapshot taken since): send the
        // file, described by its own header; a follower that gets more than asked is fine.
        snapshot.meta = meta;
        let index = snapshot.meta.index.0;
        self.progress.update(to, |s| {
            s.index = index;
            s.total_bytes = total;
        });
        let mut file = tokio::fs::File::from_std(file);
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| format!("seeking {}: {e}", path.display()))?;

        let stream = self
            .dial
            .security
            .dial(addr, self.dial.connect_timeout)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (reader, mut writer) = tokio::io::split(stream);
        let mut acks = FramedRead::new(
            reader,
            FrameCodec::<SnapshotAck, ()>::new(self.dial.max_frame_bytes),
        );
        let mut buf = Vec::with_capacity(self.chunk_bytes() + CHUNK_FRAME_OVERHEAD);
        encode_frame(
            &Hello::new(
                Role::Snapshot {
                    node_id: self.dial.node_id,
                },
                self.dial.cluster_id,
            ),
            crate::transport::MAX_HELLO_FRAME_BYTES,
            &mut buf,
        )
        .map_err(|e| e.to_string())?;
        write_frame(
            &mut writer,
            &mut buf,
            &SnapshotFrameRef::Begin {
                message: &msg,
                total_bytes: total,
            },
            self.dial.max_frame_bytes,
            self.config.step_timeout,
        )
        .await?;
        info!(index, total_bytes = total, "snapshot send started");

        let mut chunk = vec![0u8; self.chunk_bytes()];
        let (mut offset, mut acked, mut crc) = (0u64, 0u64, 0u32);
        let mut last_log = Instant::now();
        while offset < total {
            while offset - acked >= self.config.window_bytes {
                acked = self.next_ack(&mut acks, offset, to).await?;
            }
            let n = (total - offset).min(chunk.len() as u64) as usize;
            file.read_exact(&mut chunk[..n])
                .await
                .map_err(|e| format!("reading {} at {offset}: {e}", path.display()))?;
            crc = crc32c::crc32c_append(crc, &chunk[..n]);
            buf.clear();
            write_frame(
                &mut writer,
                &mut buf,
                &SnapshotFrameRef::Chunk {
                    offset,
                    bytes: &chunk[..n],
                },
                self.dial.max_frame_bytes,
                self.config.step_timeout,
            )
            .await?;
            offset += n as u64;
            if last_log.elapsed() >= self.config.progress_log_interval {
                last_log = Instant::now();
                info!(
                    index,
                    sent_bytes = offset,
                    acked_bytes = acked,
                    total_bytes = total,
                    "snapshot send progress"
                );
            }
        }
        buf.clear();
        write_frame(
            &mut writer,
            &mut buf,
            &SnapshotFrameRef::End { crc32c: crc },
            self.dial.max_frame_bytes,
            self.config.step_timeout,
        )
        .await?;
        loop {
            match self.read_ack(&mut acks).await? {
                SnapshotAck::Received { bytes } if bytes <= total => {
                    self.progress.update(to, |s| s.sent_bytes = bytes);
                }
                SnapshotAck::Received { bytes } => {
                    return Err(format!("follower acknowledged {bytes} of {total} bytes"));
                }
                SnapshotAck::Accepted => {
                    info!(index, total_bytes = total, "snapshot sent and accepted");
                    return Ok(total);
                }
                SnapshotAck::Refused { reason } => {
                    return Err(format!("follower refused the snapshot: {reason}"));
                }
            }
        }
    }

    async fn read_ack(
        &self,
        acks: &mut FramedRead<OwnedReadHalf, FrameCodec<SnapshotAck, ()>>,
    ) -> Result<SnapshotAck, String> {
        match tokio::time::timeout(self.config.step_timeout, acks.next()).await {
            Err(_) => Err(format!(
                "no answer from the follower within {:?}",
                self.config.step_timeout
            )),
            Ok(None) => Err("the follower closed the connection".into()),
            Ok(Some(Err(e))) => Err(format!("bad answer from the follower: {e}")),
            Ok(Some(Ok(ack))) => Ok(ack),
        }
    }

    /// Waits for the next `Received` acknowledgement; returns the bytes acknowledged.
    async fn next_ack(
        &self,
        acks: &mut FramedRead<OwnedReadHalf, FrameCodec<SnapshotAck, ()>>,
        sent: u64,
        to: u64,
    ) -> Result<u64, String> {
        match self.read_ack(acks).await? {
            SnapshotAck::Received { bytes } if bytes <= sent => {
                self.progress.update(to, |s| s.sent_bytes = bytes);
                Ok(bytes)
            }
            SnapshotAck::Received { bytes } => Err(format!(
                "follower acknowledged {bytes} bytes of {sent} sent"
            )),
            SnapshotAck::Accepted => Err("follower accepted a snapshot not yet sent whole".into()),
            SnapshotAck::Refused { reason } => {
                Err(format!("follower refused the snapshot: {reason}"))
            }
        }
    }

    /// Serves an accepted [`Role::Snapshot`] connection from peer `from`.
    pub(crate) async fn receive(&self, stream: crate::tls::Stream, from: u64, remote: SocketAddr) {
        let Some(dir) = self.config.dir.clone() else {
            warn!(%remote, peer = from, "refusing a snapshot stream: this node streams no snapshots");
            return;
        };
        let n = self.next_receive.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{RECEIVED_PREFIX}{from}.{n}.tmp"));
        let done_name = format!("{RECEIVED_PREFIX}{from}.{n}");
        let (reader, mut writer) = tokio::io::split(stream);
        let mut frames = FramedRead::new(
            reader,
            FrameCodec::<SnapshotFrame, ()>::new(self.dial.max_frame_bytes),
        );
        let result = self
            .receive_file(&mut frames, &mut writer, from, &dir, &tmp, &done_name)
            .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(dir.join(&done_name)).await;
        }
        let answer = match result {
            Ok(message) => {
                let index = snapshot_index(&message);
                let delivered = self
                    .events_tx
                    .send(SnapshotEvent::Received {
                        from,
                        message,
                        file: done_name.clone(),
                    })
                    .await;
                if delivered.is_ok() {
                    self.stats().received.fetch_add(1, Ordering::Relaxed);
                    info!(peer = from, index, "snapshot received and handed to Raft");
                    SnapshotAck::Accepted
                } else {
                    let _ = tokio::fs::remove_file(dir.join(&done_name)).await;
                    SnapshotAck::Refused {
                        reason: "the node is shutting down".into(),
                    }
                }
            }
            Err(reason) => {
                self.stats().refused.fetch_add(1, Ordering::Relaxed);
                warn!(%remote, peer = from, %reason, "snapshot refused; nothing installed");
                SnapshotAck::Refused { reason }
            }
        };
        let mut buf = Vec::new();
        let _ = write_frame(
            &mut writer,
            &mut buf,
            &answer,
            self.dial.max_frame_bytes,
            self.config.step_timeout,
        )
        .await;
        let _ = writer.shutdown().await;
    }

    async fn receive_file(
        &self,
        frames: &mut FramedRead<OwnedReadHalf, FrameCodec<SnapshotFrame, ()>>,
        writer: &mut OwnedWriteHalf,
        from: u64,
        dir: &Path,
        tmp: &Path,
        done_name: &str,
    ) -> Result<Message, String> {
        let done = dir.join(done_name);
        let (mut message, total) =
            match self.next_frame(frames, self.dial.handshake_timeout).await? {
                SnapshotFrame::Begin {
                    message,
                    total_bytes,
                } => (message, total_bytes),
                _ => return Err("the stream does not start with Begin".into()),
            };
        if message.from.0 != from || message.to.0 != self.dial.node_id {
            return Err(format!(
                "message from {} to {} on a stream from {from} to {}",
                message.from, message.to, self.dial.node_id
            ));
        }
        let MessageBody::InstallSnapshot { snapshot } = &message.body else {
            return Err(format!(
                "a {} message on a snapshot stream",
                message.body.name()
            ));
        };
        let index = snapshot.meta.index.0;
        if total > self.config.max_snapshot_bytes {
            return Err(format!(
                "snapshot of {total} bytes over this node's limit of {}",
                self.config.max_snapshot_bytes
            ));
        }
        info!(
            peer = from,
            index,
            total_bytes = total,
            "snapshot receive started"
        );
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let (mut received, mut crc) = (0u64, 0u32);
        let mut buf = Vec::new();
        let mut last_log = Instant::now();
        let crc_end = loop {
            match self.next_frame(frames, self.config.step_timeout).await? {
                SnapshotFrame::Chunk { offset, bytes } => {
                    if offset != received {
                        return Err(format!("chunk at offset {offset}, expected {received}"));
                    }
                    if received + bytes.len() as u64 > total {
                        return Err(format!("chunks run past the announced {total} bytes"));
                    }
                    file.write_all(&bytes)
                        .await
                        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
                    crc = crc32c::crc32c_append(crc, &bytes);
                    received += bytes.len() as u64;
                    buf.clear();
                    write_frame(
                        writer,
                        &mut buf,
                        &SnapshotAck::Received { bytes: received },
                        self.dial.max_frame_bytes,
                        self.config.step_timeout,
                    )
                    .await?;
                    if last_log.elapsed() >= self.config.progress_log_interval {
                        last_log = Instant::now();
                        info!(
                            peer = from,
                            index,
                            received_bytes = received,
                            total_bytes = total,
                            "snapshot receive progress"
                        );
                    }
                }
                SnapshotFrame::End { crc32c } => break crc32c,
                SnapshotFrame::Begin { .. } => return Err("a second Begin".into()),
            }
        };
        if received != total {
            return Err(format!("truncated: {received} of {total} bytes"));
        }
        if crc_end != crc {
            return Err(format!(
                "checksum mismatch: received {crc:#010x}, sender says {crc_end:#010x}"
            ));
        }
        file.sync_all()
            .await
            .map_err(|e| format!("fsync {}: {e}", tmp.display()))?;
        drop(file);
        tokio::fs::rename(tmp, &done)
            .await
            .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), done.display()))?;
        let (dir, name) = (dir.to_path_buf(), done_name.to_string());
        // Checked by streaming through it (one chunk in memory at a time); it stays on disk.
        let checked = tokio::task::spawn_blocking(move || {
            sync_dir(&dir).and_then(|()| {
                let disk = shoal_storage::StdDisk::new(&dir).map_err(|e| e.to_string())?;
                shoal_storage::check_snapshot_file(&disk, &name).map_err(|e| e.to_string())
            })
        })
        .await
        .map_err(|e| format!("checking task: {e}"))??;
        let MessageBody::InstallSnapshot { snapshot } = &mut message.body else {
            unreachable!("checked above");
        };
        if checked != snapshot.meta {
            return Err(format!(
                "the file covers index {} term {}, the message says index {} term {}",
                checked.index, checked.term, snapshot.meta.index, snapshot.meta.term
            ));
        }
        snapshot.data = Vec::new();
        Ok(message)
    }

    async fn next_frame(
        &self,
        frames: &mut FramedRead<OwnedReadHalf, FrameCodec<SnapshotFrame, ()>>,
        timeout: Duration,
    ) -> Result<SnapshotFrame, String> {
        match tokio::time::timeout(timeout, frames.next()).await {
            Err(_) => Err(format!("nothing from the sender within {timeout:?}")),
            Ok(None) => Err("the sender closed the connection mid-transfer".into()),
            Ok(Some(Err(e))) => Err(format!("bad frame: {e}")),
            Ok(Some(Ok(frame))) => Ok(frame),
        }
    }
}

/// Removes received snapshot files a crash left behind (best effort).
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(RECEIVED_PREFIX)
        {
            debug!(file = %entry.path().display(), "removing a leftover received snapshot");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn snapshot_index(m: &Message) -> u64 {
    match &m.body {
        MessageBody::InstallSnapshot { snapshot } => snapshot.meta.index.0,
        _ => 0,
    }
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("fsync {}: {e}", dir.display()))
}

/// Opens the snapshot file, pins it (so the storage does not cut it down while it is read,
/// should a newer snapshot replace it) and reads its header: the file (positioned anywhere),
/// its pin, what it covers, and its size. The open handle keeps reading the same file even if
/// a newer snapshot replaces it meanwhile (a rename). A file already being cut down (its size
/// is not the one its header announces) is opened again: by then the name holds the new one.
async fn open_snapshot_file(path: PathBuf) -> Result<OpenSnapshot, String> {
    tokio::task::spawn_blocking(move || {
        let mut last_error = String::new();
        for _ in 0..OPEN_ATTEMPTS {
            let mut file = std::fs::File::open(&path).map_err(|e| {
                format!("opening {} (no snapshot written yet?): {e}", path.display())
            })?;
            let pin = shoal_storage::FilePin::new(&file)
                .map_err(|e| format!("reading the identity of {}: {e}", path.display()))?;
            let total = file
                .metadata()
                .map_err(|e| format!("reading the size of {}: {e}", path.display()))?
                .len();
            let (meta, intact) =
                shoal_storage::read_snapshot_meta(&mut std::io::BufReader::new(&mut file))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            if intact == total {
                return Ok((file, pin, meta, total));
            }
            last_error = format!(
                "{} has {total} bytes where its header announces {intact}",
                path.display()
            );
            drop(pin);
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(last_error)
    })
    .await
    .map_err(|e| format!("opening the snapshot file: {e}"))?
}

/// An open snapshot file, its pin, its metadata and its size.
type OpenSnapshot = (
    std::fs::File,
    shoal_storage::FilePin,
    shoal_raft::SnapshotMeta,
    u64,
);

/// Tries of [`open_snapshot_file`] when it finds the file being replaced.
const OPEN_ATTEMPTS: usize = 20;

/// Appends `value`'s frame to `buf`, writes all of `buf` within `timeout`, clears `buf`.
async fn write_frame<T: serde::Serialize>(
    writer: &mut OwnedWriteHalf,
    buf: &mut Vec<u8>,
    value: &T,
    max_frame_bytes: usize,
    timeout: Duration,
) -> Result<(), String> {
    encode_frame(value, max_frame_bytes, buf).map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, writer.write_all(buf)).await {
        Err(_) => return Err(format!("the other side read nothing for {timeout:?}")),
        Ok(Err(e)) => return Err(format!("writing to the connection: {e}")),
        Ok(Ok(())) => {}
    }
    buf.clear();
    Ok(())
}
