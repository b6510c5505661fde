//! Snapshots streamed on connections of their own (issue 15), over real TCP and real files:
//!
//! - a follower far behind gets a multi-chunk snapshot over the stream while the leader's
//!   heartbeats keep flowing on the peer connection (no election, the term does not move);
//! - a connection cut mid-transfer is retried from the start and completes;
//! - a corrupt, truncated, misplaced or undecodable chunk is refused, and nothing is installed
//!   (no event for the driver, no file left in the data directory).
//!
//! Bounds are generous and only timeouts; nothing is timed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use shoal_raft::{LogIndex, Message, MessageBody, NodeId, Role, Snapshot, SnapshotMeta, Term};
use shoal_runtime::snapshot_stream::{SnapshotEvent, SnapshotStreamConfig};
use shoal_runtime::{Node, NodeConfig, StateMachine, Transport, TransportConfig};
use shoal_wire::codec::FrameCodec;
use shoal_wire::frame::encode_frame;
use shoal_wire::snapshot::{SnapshotAck, SnapshotFrame};
use shoal_wire::Hello;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;

const CLUSTER: u64 = 15;
const POLL: Duration = Duration::from_millis(20);
/// Liveness bound of every wait: 60 s.
const MAX_POLLS: u32 = 3000;

/// A state machine whose state is every command applied, concatenated: its snapshot is as
/// large as what was written.
#[derive(Clone, Default)]
struct Blob(Arc<Mutex<Vec<u8>>>);

impl Blob {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl StateMachine for Blob {
    fn apply(&mut self, _index: LogIndex, command: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(command);
    }
    fn snapshot(&self) -> Vec<u8> {
        self.bytes()
    }
    fn restore(&mut self, _index: LogIndex, data: &[u8]) -> Result<(), String> {
        *self.0.lock().unwrap() = data.to_vec();
        Ok(())
    }
}

fn small_chunks() -> SnapshotStreamConfig {
    SnapshotStreamConfig {
        chunk_bytes: 64 * 1024,
        window_bytes: 256 * 1024,
        step_timeout: Duration::from_secs(10),
        retry_delay: Duration::from_millis(100),
        ..SnapshotStreamConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_catches_up_over_the_stream_without_an_election() {
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, l.local_addr().unwrap());
        listeners.push(l);
    }
    let dirs = tempfile::tempdir().unwrap();
    let config = |id: u64| {
        let mut c = NodeConfig::new(
            NodeId(id),
            CLUSTER,
            peers.clone(),
            dirs.path().join(format!("n{id}")),
        );
        c.tick_interval = Duration::from_millis(10);
        c.snapshot_every = Some(8);
        c.transport.snapshot = small_chunks();
        c
    };
    let late_listener = listeners.pop().unwrap();
    let mut nodes = Vec::new();
    let mut blobs = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let blob = Blob::default();
        nodes.push(
            Node::start(config(i as u64 + 1), l, blob.clone())
                .await
                .unwrap(),
        );
        blobs.push(blob);
    }
    let leader = wait_for_leader(&nodes).await;
    let before = nodes[leader].handle.status().await.unwrap();
    // About 2.5 MiB of state, compacted every 8 entries: node 3 can only catch up by snapshot,
    // of about 40 chunks of 64 KiB.
    for i in 0..40u8 {
        nodes[leader]
            .handle
            .propose_and_wait(vec![i; 64 * 1024])
            .await
            .unwrap();
    }
    let want = blobs[leader].bytes();

    let blob3 = Blob::default();
    let node3 = Node::start(config(3), late_listener, blob3.clone())
        .await
        .unwrap();
    let mut polls = 0;
    while blob3.len() < want.len() {
        polls += 1;
        assert!(
            polls < MAX_POLLS,
            "node 3 did not catch up: {} of {} bytes",
            blob3.len(),
            want.len()
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        blob3.bytes()[..want.len()],
        want[..],
        "node 3's state differs"
    );
    let after = nodes[leader].handle.status().await.unwrap();
    assert_eq!(after.role, Role::Leader, "the leader lost its leadership");
    assert_eq!(
        after.term, before.term,
        "an election happened during the transfer"
    );
    let sent = nodes[leader].handle.snapshot_progress_stats();
    let received = node3.handle.snapshot_progress_stats();
    assert!(
        sent.0 >= 1,
        "the leader completed no snapshot send: {sent:?}"
    );
    assert!(
        received.1 >= 1,
        "node 3 received no streamed snapshot: {received:?}"
    );
    assert!(nodes[leader].handle.snapshot_sends().is_empty());
    assert_no_received_files(&dirs.path().join("n3"));
}

/// `(sends completed, snapshots received)` of a node.
trait StreamCounters {
    fn snapshot_progress_stats(&self) -> (u64, u64);
}

impl StreamCounters for shoal_runtime::NodeHandle {
    fn snapshot_progress_stats(&self) -> (u64, u64) {
        let s = self.snapshot_stats();
        (
            s.sends_completed.load(std::sync::atomic::Ordering::Relaxed),
            s.received.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

async fn wait_for_leader(nodes: &[Node]) -> usize {
    for _ in 0..MAX_POLLS {
        for (i, n) in nodes.iter().enumerate() {
            if n.handle.status().await.unwrap().role == Role::Leader {
                return i;
            }
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("no leader within the bound");
}

fn assert_no_received_files(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot-recv."))
        .collect();
    assert!(left.is_empty(), "received files left behind: {left:?}");
}

/// Writes a snapshot file of `data` at `index` as the storage does, in `dir`.
fn write_snapshot_file(dir: &Path, index: u64, data: Vec<u8>) -> SnapshotMeta {
    let mut disk = shoal_storage::StdDisk::new(dir).unwrap();
    let meta = SnapshotMeta {
        index: LogIndex(index),
        term: Term(2),
        voters: vec![NodeId(1), NodeId(2)],
        ..SnapshotMeta::default()
    };
    let prepared = shoal_storage::prepare_snapshot(
        &mut disk,
        Snapshot {
            meta: meta.clone(),
            data,
        },
    )
    .unwrap();
    std::fs::rename(
        dir.join(prepared.file_name()),
        dir.join(shoal_storage::SNAPSHOT_FILE),
    )
    .unwrap();
    meta
}

fn install_message(meta: SnapshotMeta) -> Message {
    Message {
        from: NodeId(1),
        to: NodeId(2),
        term: Term(2),
        body: MessageBody::InstallSnapshot {
            snapshot: Snapshot {
                meta,
                data: Vec::new(),
            },
        },
    }
}

/// Forwards connections to `target`; the first one to carry `cut_after` bytes from the caller
/// is cut there (the peer connection to the same address carries less and is left alone).
async fn cutting_proxy(target: SocketAddr, cut_after: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cut_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            let cut_done = Arc::clone(&cut_done);
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let (mut ir, mut iw) = inbound.split();
                let (mut or, mut ow) = outbound.split();
                let up = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut total = 0usize;
                    loop {
                        let n = match ir.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if total + n >= cut_after
                            && !cut_done.swap(true, std::sync::atomic::Ordering::SeqCst)
                        {
                            let _ = ow.write_all(&buf[..cut_after - total]).await;
                            return; // cut: both connections are dropped
                        }
                        total += n;
                        if ow.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = async {
                    let _ = tokio::io::copy(&mut or, &mut iw).await;
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    addr
}

fn transport_config(id: u64, peers: &BTreeMap<u64, SocketAddr>, dir: &Path) -> TransportConfig {
    let mut c = TransportConfig::new(id, CLUSTER, peers.clone());
    c.snapshot = SnapshotStreamConfig {
        dir: Some(dir.to_path_buf()),
        ..small_chunks()
    };
    c
}

async fn next_event(rx: &mut tokio::sync::mpsc::Receiver<SnapshotEvent>) -> SnapshotEvent {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("an event within the bound")
        .expect("events open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_retried_and_the_transfer_completes() {
    let dirs = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (dirs.path().join("n1"), dirs.path().join("n2"));
    std::fs::create_dir_all(&dir1).unwrap();
    std::fs::create_dir_all(&dir2).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let meta = write_snapshot_file(&dir1, 77, data.clone());

    let (l1, l2) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (a1, a2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
    let proxy = cutting_proxy(a2, 1_000_000).await;
    let sender_view = BTreeMap::from([(1, a1), (2, proxy)]);
    let receiver_view = BTreeMap::from([(1, a1), (2, a2)]);
    let (t1, _in1, _c1) =
        Transport::<Message>::start(transport_config(1, &sender_view, &dir1), l1).unwrap();
    let (t2, _in2, _c2) =
        Transport::<Message>::start(transport_config(2, &receiver_view, &dir2), l2).unwrap();
    let mut sent = t1.take_snapshot_events().unwrap();
    let mut received = t2.take_snapshot_events().unwrap();

    t1.send_snapshot(install_message(meta.clone()));
    // A repeat while the send runs is ignored (one send per follower at a time).
    t1.send_snapshot(install_message(meta.clone()));
    match next_event(&mut received).await {
        SnapshotEvent::Received {
            from,
            message,
            file,
        } => {
            assert_eq!(from, 1);
            let MessageBody::InstallSnapshot { snapshot } = message.body else {
                panic!("not a snapshot: {message:?}");
            };
            assert_eq!(snapshot.meta, meta);
            assert!(snapshot.data.is_empty(), "the data stays in the file");
            // The received file is a whole snapshot file of the data, left for the driver to
            // stage (the storage renames it into place).
            let disk = shoal_storage::StdDisk::new(&dir2).unwrap();
            let got = shoal_storage::read_snapshot_file(&disk, &file).unwrap();
            assert_eq!(got.meta, meta);
            assert!(got.data == data, "the data differs");
            std::fs::remove_file(dir2.join(&file)).unwrap();
        }
        other => panic!("unexpected {other:?}"),
    }
    match next_event(&mut sent).await {
        SnapshotEvent::Sent { to, .. } => assert_eq!(to, 2),
        other => panic!("unexpected {other:?}"),
    }
    let stats = t1.snapshot_stats();
    assert_eq!(
        stats.attempts.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the cut attempt and its retry"
    );
    assert_eq!(
        t2.snapshot_stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the cut transfer was refused by the receiver"
    );
    assert_no_received_files(&dir2);
}

/// Opens a snapshot stream to `addr` as node 1 and sends `frames` (already encoded), then
/// returns the receiver's final answer (or `None` if it closed without one).
async fn fake_sender(addr: SocketAddr, raw: Vec<u8>) -> Option<SnapshotAck> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    encode_frame(
        &Hello::new(shoal_wire::Role::Snapshot { node_id: 1 }, CLUSTER),
        64,
        &mut buf,
    )
    .unwrap();
    buf.extend_from_slice(&raw);
    s.write_all(&buf).await.unwrap();
    let (r, _w) = s.into_split();
    let mut acks = FramedRead::new(r, FrameCodec::<SnapshotAck, ()>::new(1 << 20));
    let mut last = None;
    while let Ok(Some(Ok(ack))) = tokio::time::timeout(Duration::from_secs(30), acks.next()).await {
        last = Some(ack);
    }
    last
}

fn frames(list: &[SnapshotFrame]) -> Vec<u8> {
    let mut buf = Vec::new();
    for f in list {
        encode_frame(f, 1 << 20, &mut buf).unwrap();
    }
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunks_are_refused_and_nothing_is_installed() {
    let dirs = tempfile::tempdir().unwrap();
    let dir2 = dirs.path().join("n2");
    std::fs::create_dir_all(&dir2).unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a2 = l2.local_addr().unwrap();
    let peers = BTreeMap::from([(1, "127.0.0.1:9".parse().unwrap()), (2, a2)]);
    let (t2, _in2, _c2) =
        Transport::<Message>::start(transport_config(2, &peers, &dir2), l2).unwrap();
    let mut events = t2.take_snapshot_events().unwrap();

    // A real snapshot file's bytes, to send good and bad versions of.
    let src = dirs.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let meta = write_snapshot_file(&src, 9, vec![5u8; 200_000]);
    let file = std::fs::read(src.join(shoal_storage::SNAPSHOT_FILE)).unwrap();
    let begin = SnapshotFrame::Begin {
        message: install_message(meta.clone()),
        total_bytes: file.len() as u64,
    };
    let crc = crc32c::crc32c(&file);
    let (a, b) = file.split_at(100_000);
    let chunk = |offset: usize, bytes: &[u8]| SnapshotFrame::Chunk {
        offset: offset as u64,
        bytes: bytes.to_vec(),
    };
    let mut flipped = b.to_vec();
    flipped[500] ^= 1;
    // The same file with a record's checksum broken, announced with the right CRC of what is
    // sent: the stream's checks pass, the snapshot file's do not.
    let mut bad_record = file.clone();
    let last = bad_record.len() - 1;
    bad_record[last] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "flipped byte",
            frames(&[
                begin.clone(),
                chunk(0, a),
                chunk(a.len(), &flipped),
                SnapshotFrame::End { crc32c: crc },
            ]),
        ),
        (
            "truncated",
            frames(&[
                begin.clone(),
                chunk(0, a),
                SnapshotFrame::End { crc32c: crc },
            ]),
        ),
        (
            "misplaced chunk",
            frames(&[
                begin.clone(),
                chunk(0, a),
                chunk(a.len() + 1, b),
                SnapshotFrame::End { crc32c: crc },
            ]),
        ),
        (
            "chunks past the announced size",
            frames(&[
                begin.clone(),
                chunk(0, &file),
                chunk(file.len(), b"x"),
                SnapshotFrame::End { crc32c: crc },
            ]),
        ),
        (
            "corrupt snapshot record",
            frames(&[
                SnapshotFrame::Begin {
                    message: install_message(meta.clone()),
                    total_bytes: bad_record.len() as u64,
                },
                chunk(0, &bad_record),
                SnapshotFrame::End {
                    crc32c: crc32c::crc32c(&bad_record),
                },
            ]),
        ),
        ("garbage frame", {
            let mut raw = frames(std::slice::from_ref(&begin));
            raw.extend_from_slice(&[0, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
            raw
        }),
    ];
    for (name, raw) in cases {
        match fake_sender(a2, raw).await {
            Some(SnapshotAck::Refused { reason }) => eprintln!("{name}: refused: {reason}"),
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
        assert!(
            events.try_recv().is_err(),
            "{name}: something was handed to Raft"
        );
        assert_no_received_files(&dir2);
    }
    // The intact file goes through, so the refusals above are about the damage.
    let good = frames(&[
        begin,
        chunk(0, a),
        chunk(a.len(), b),
        SnapshotFrame::End { crc32c: crc },
    ]);
    assert_eq!(fake_sender(a2, good).await, Some(SnapshotAck::Accepted));
    match next_event(&mut events).await {
        SnapshotEvent::Received { from: 1, file, .. } => {
            std::fs::remove_file(dir2.join(file)).unwrap();
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_no_received_files(&dir2);
}
