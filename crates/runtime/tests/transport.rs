//! The transport over real 127.0.0.1 sockets: delivery, reconnection, batching, and every kind
//! of bad input rejected while good peers keep being served.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_runtime::transport::{
    DropPolicy, Inbound, PeerFrameRef, Transport, TransportConfig, TransportStats,
};
use shoal_wire::{encode_frame, Hello, Refusal, Role, PROTOCOL_MAGIC, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLUSTER: u64 = 77;
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Msg {
    seq: u64,
    body: Vec<u8>,
}

fn msg(seq: u64) -> Msg {
    Msg {
        seq,
        body: seq.to_le_bytes().to_vec(),
    }
}

async fn listeners(n: usize) -> (Vec<TcpListener>, BTreeMap<u64, SocketAddr>) {
    let mut ls = Vec::new();
    let mut peers = BTreeMap::new();
    for i in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(i as u64 + 1, l.local_addr().unwrap());
        ls.push(l);
    }
    (ls, peers)
}

fn config(id: u64, peers: &BTreeMap<u64, SocketAddr>) -> TransportConfig {
    let mut c = TransportConfig::new(id, CLUSTER, peers.clone());
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(100);
    c.max_frame_bytes = 64 * 1024;
    c
}

async fn recv(inbound: &mut Inbound<Msg>) -> (u64, Msg) {
    tokio::time::timeout(WAIT, inbound.recv())
        .await
        .expect("no message within the liveness bound")
        .expect("inbound closed")
}

/// Sends fresh messages from `t` to `to` until one arrives at `inbound`.
async fn until_delivered(t: &Transport<Msg>, to: u64, inbound: &mut Inbound<Msg>, from: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seq = 1_000_000;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "peer never reachable"
        );
        seq += 1;
        t.send(to, msg(seq)).unwrap();
        if let Ok(Some((f, m))) =
            tokio::time::timeout(Duration::from_millis(100), inbound.recv()).await
        {
            assert_eq!(f, from);
            assert!(m.seq > 1_000_000);
            // Drain anything else already in flight.
            while inbound.try_recv().is_ok() {}
            return;
        }
    }
}

#[tokio::test]
async fn delivers_and_reconnects_after_peer_restart() {
    let (mut ls, peers) = listeners(2).await;
    let l2 = ls.pop().unwrap();
    let l1 = ls.pop().unwrap();
    let (t1, _in1, _c1) = Transport::<Msg>::start(config(1, &peers), l1).unwrap();
    let (t2, mut in2, _c2) = Transport::<Msg>::start(config(2, &peers), l2).unwrap();

    t1.send(2, msg(1)).unwrap();
    assert_eq!(recv(&mut in2).await, (1, msg(1)));
    assert!(
        t1.send(9, msg(2)).is_err(),
        "unknown destination is an error"
    );

    // Node 2 goes away and comes back on the same address.
    t2.shutdown();
    drop(in2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let l2 = TcpListener::bind(peers[&2]).await.unwrap();
    let (_t2, mut in2, _c2) = Transport::<Msg>::start(config(2, &peers), l2).unwrap();
    until_delivered(&t1, 2, &mut in2, 1).await;
    assert!(TransportStats::get(&t1.stats().connects) >= 2);
}

#[tokio::test]
async fn batches_many_small_messages_in_order() {
    let (mut ls, peers) = listeners(2).await;
    let l2 = ls.pop().unwrap();
    let l1 = ls.pop().unwrap();
    // Node 2 is not listening yet, so everything queues up and then drains in batches.
    drop(l2);
    let (t1, _in1, _c1) = Transport::<Msg>::start(config(1, &peers), l1).unwrap();
    const N: u64 = 3000;
    for seq in 0..N {
        t1.send(2, msg(seq)).unwrap();
    }
    let l2 = TcpListener::bind(peers[&2]).await.unwrap();
    let (_t2, mut in2, _c2) = Transport::<Msg>::start(config(2, &peers), l2).unwrap();
    for seq in 0..N {
        assert_eq!(recv(&mut in2).await, (1, msg(seq)));
    }
    let batches = TransportStats::get(&t1.stats().batches_written);
    assert!(
        batches * 10 <= N,
        "{N} queued messages went out in {batches} writes: not batched"
    );
    assert_eq!(TransportStats::get(&t1.stats().dropped_queue_full), 0);
}

#[tokio::test]
async fn full_queue_drops_and_counts() {
    let (mut ls, peers) = listeners(2).await;
    drop(ls.pop()); // node 2 never comes up
    let mut c = config(1, &peers);
    c.peer_queue_len = 10;
    let (t1, _in1, _c1) = Transport::<Msg>::start(c, ls.pop().unwrap()).unwrap();
    for seq in 0..100 {
        t1.send(2, msg(seq)).unwrap();
    }
    assert_eq!(TransportStats::get(&t1.stats().dropped_queue_full), 90);
}

fn hello_bytes(hello: &Hello) -> Vec<u8> {
    let mut b = Vec::new();
    encode_frame(hello, 64, &mut b).unwrap();
    b
}

fn peer_hello(node_id: u64) -> Vec<u8> {
    hello_bytes(&Hello::new(Role::Peer { node_id }, CLUSTER))
}

/// Writes `bytes` to the server and expects it to close the connection.
async fn expect_closed(addr: SocketAddr, bytes: &[u8], what: &str) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may close before reading everything; a failed write is a close too.
    if s.write_all(bytes).await.is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(WAIT, async {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => {}
            Ok(_) => panic!("{what}: server sent bytes on a peer connection"),
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: connection was not closed");
}

#[tokio::test]
async fn bad_input_is_rejected_and_good_peers_still_served() {
    let (mut ls, peers) = listeners(3).await;
    let l3 = ls.pop().unwrap();
    let l2 = ls.pop().unwrap();
    let l1 = ls.pop().unwrap();
    drop(l3); // node 3 is configured but absent: it is only impersonated below
    let mut c1 = config(1, &peers);
    c1.max_message_bytes = c1.max_frame_bytes; // a message in parts may not exceed 64 KiB
    let (t1, mut in1, _c1) = Transport::<Msg>::start(c1, l1).unwrap();
    let (t2, _in2, _c2) = Transport::<Msg>::start(config(2, &peers), l2).unwrap();
    let server = t1.local_addr();
    until_delivered(&t2, 1, &mut in1, 2).await;

    let mut good_frame = Vec::new();
    encode_frame(&PeerFrameRef::Whole(&msg(5)), 1024, &mut good_frame).unwrap();
    let mut bad_crc = good_frame.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    let junk_payload = [0xffu8; 12];
    let mut malformed = (junk_payload.len() as u32).to_le_bytes().to_vec();
    malformed.extend_from_slice(&crc32c_of(&junk_payload).to_le_bytes());
    malformed.extend_from_slice(&junk_payload);
    let oversized_header = [0x00, 0x00, 0x00, 0x40, 0, 0, 0, 0]; // 1 GiB announced

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "http garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("oversized hello header", oversized_header.to_vec()),
        (
            "wrong magic",
            hello_bytes(&Hello {
                magic: PROTOCOL_MAGIC ^ 1,
                version: PROTOCOL_VERSION,
                role: Role::Peer { node_id: 3 },
                cluster_id: CLUSTER,
            }),
        ),
        (
            "wrong version",
            hello_bytes(&Hello {
                magic: PROTOCOL_MAGIC,
                version: PROTOCOL_VERSION + 1,
                role: Role::Peer { node_id: 3 },
                cluster_id: CLUSTER,
            }),
        ),
        (
            "wrong cluster",
            hello_bytes(&Hello::new(Role::Peer { node_id: 3 }, CLUSTER + 1)),
        ),
        ("a newer version's role this build does not know", {
            // magic, version, role variant 9 (unknown), its node id, the cluster.
            let mut payload =
                postcard::to_allocvec(&(PROTOCOL_MAGIC, PROTOCOL_VERSION + 1)).unwrap();
            payload.extend_from_slice(&[9, 3, CLUSTER as u8]);
            let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&crc32c_of(&payload).to_le_bytes());
            frame.extend_from_slice(&payload);
            frame
        }),
        ("unknown peer id", peer_hello(42)),
        ("peer claiming our own id", peer_hello(1)),
        (
            "oversized frame header",
            [peer_hello(3), oversized_header.to_vec()].concat(),
        ),
        ("bad crc", [peer_hello(3), bad_crc].concat()),
        ("malformed payload", [peer_hello(3), malformed].concat()),
        (
            "parts beyond the message limit",
            [peer_hello(3), parts(&vec![7u8; 100 * 1024], 3)].concat(),
        ),
        (
            "parts that decode to no message",
            [peer_hello(3), parts(&[0xff; 64], 2)].concat(),
        ),
        (
            "a whole message between parts",
            [
                peer_hello(3),
                part_frame(&[1, 2, 3], false),
                good_frame.clone(),
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in &cases {
        expect_closed(server, bytes, what).await;
        // The listener still serves the good peer.
        until_delivered(&t2, 1, &mut in1, 2).await;
    }
    // A good frame from an impersonated but configured peer is delivered, attributed to it.
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(&[peer_hello(3), good_frame].concat())
        .await
        .unwrap();
    assert_eq!(recv(&mut in1).await, (3, msg(5)));

    let st = t1.stats();
    assert_eq!(TransportStats::get(&st.rejected_handshakes), 8);
    assert_eq!(TransportStats::get(&st.bad_frames), 6);
}

/// One `Part` frame carrying `bytes`.
fn part_frame(bytes: &[u8], last: bool) -> Vec<u8> {
    let mut b = Vec::new();
    let part: PeerFrameRef<'_, ()> = PeerFrameRef::Part { last, bytes };
    encode_frame(&part, 1 << 20, &mut b).unwrap();
    b
}

/// `bytes` cut into `n` part frames.
fn parts(bytes: &[u8], n: usize) -> Vec<u8> {
    let size = bytes.len().div_ceil(n);
    let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .flat_map(|(i, c)| part_frame(c, i == last))
        .collect()
}

#[tokio::test]
async fn a_message_larger_than_a_frame_arrives_in_parts_between_small_ones() {
    let (mut ls, peers) = listeners(2).await;
    let l2 = ls.pop().unwrap();
    let l1 = ls.pop().unwrap();
    let (t1, _in1, _c1) = Transport::<Msg>::start(config(1, &peers), l1).unwrap();
    let (_t2, mut in2, _c2) = Transport::<Msg>::start(config(2, &peers), l2).unwrap();
    // 64 KiB frames; a 1 MiB message (a snapshot, say) needs 17 of them.
    let big = Msg {
        seq: 2,
        body: (0..1024 * 1024).map(|i| (i % 251) as u8).collect(),
    };
    t1.send(2, msg(1)).unwrap();
    t1.send(2, big.clone()).unwrap();
    t1.send(2, msg(3)).unwrap();
    assert_eq!(recv(&mut in2).await, (1, msg(1)));
    assert_eq!(recv(&mut in2).await, (1, big));
    assert_eq!(recv(&mut in2).await, (1, msg(3)));
    assert_eq!(TransportStats::get(&t1.stats().sent_in_parts), 1);
    assert_eq!(TransportStats::get(&t1.stats().dropped_too_large), 0);
}

#[tokio::test]
async fn a_message_beyond_the_message_limit_is_dropped_and_counted() {
    let (mut ls, peers) = listeners(2).await;
    let l2 = ls.pop().unwrap();
    let l1 = ls.pop().unwrap();
    let mut c = config(1, &peers);
    c.max_message_bytes = 256 * 1024;
    let (t1, _in1, _c1) = Transport::<Msg>::start(c, l1).unwrap();
    let (_t2, mut in2, _c2) = Transport::<Msg>::start(config(2, &peers), l2).unwrap();
    let huge = Msg {
        seq: 2,
        body: vec![1; 512 * 1024],
    };
    t1.send(2, huge).unwrap();
    t1.send(2, msg(3)).unwrap();
    assert_eq!(recv(&mut in2).await, (1, msg(3)));
    assert_eq!(TransportStats::get(&t1.stats().dropped_too_large), 1);
}

#[tokio::test]
async fn client_connections_are_handed_to_the_service() {
    let (mut ls, peers) = listeners(1).await;
    let (_t1, _in1, mut clients) =
        Transport::<Msg>::start(config(1, &peers), ls.pop().unwrap()).unwrap();
    let server = peers[&1];
    let client = tokio::spawn(async move {
        use futures::{SinkExt, StreamExt};
        let mut c = shoal_runtime::connect_client::<Msg, Msg>(
            server,
            CLUSTER,
            1024,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        c.send(msg(7)).await.unwrap();
        c.next().await.unwrap().unwrap()
    });
    let conn = tokio::time::timeout(WAIT, clients.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conn.hello.role, Role::Client);
    let mut framed = conn.framed::<Msg, Msg>();
    {
        use futures::{SinkExt, StreamExt};
        let req = framed.next().await.unwrap().unwrap();
        framed.send(msg(req.seq + 1)).await.unwrap();
    }
    assert_eq!(client.await.unwrap(), msg(8));
}

fn crc32c_of(bytes: &[u8]) -> u32 {
    // CRC32C (Castagnoli), bitwise; test-only, to build a frame with a valid checksum.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn truncated_frames_silence_and_connection_floods_are_bounded() {
    let (mut ls, peers) = listeners(3).await;
    let l3 = ls.pop().unwrap();
    let l2 = ls.pop().unwrap();
    drop(l3);
    let mut c = config(1, &peers);
    c.handshake_timeout = Duration::from_millis(200);
    c.max_inbound_connections = 3;
    let (t1, mut in1, _c1) = Transport::<Msg>::start(c, ls.pop().unwrap()).unwrap();
    let (t2, _in2, _c2) = Transport::<Msg>::start(config(2, &peers), l2).unwrap();
    let server = t1.local_addr();
    until_delivered(&t2, 1, &mut in1, 2).await;

    // A frame cut short by the end of the stream.
    let mut frame = Vec::new();
    encode_frame(&PeerFrameRef::Whole(&msg(1)), 1024, &mut frame).unwrap();
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(&[peer_hello(3), frame[..frame.len() - 3].to_vec()].concat())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "truncated frame: not closed");

    // A hello cut short, and a connection that never says anything: closed (the latter
    // after the handshake timeout).
    expect_closed(
        server,
        &peer_hello(3)[..5],
        "truncated hello (silence after)",
    )
    .await;
    let idle = TcpStream::connect(server).await.unwrap();
    expect_closed(server, &[], "silent connection").await;
    drop(idle);

    // One good peer connection is open; two idle ones fill the limit of 3, so a fourth is
    // closed at once, before its handshake.
    let _a = TcpStream::connect(server).await.unwrap();
    let _b = TcpStream::connect(server).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    expect_closed(server, &peer_hello(3), "connection over the limit").await;
    // Once the idle ones time out, the good peer is still served.
    until_delivered(&t2, 1, &mut in1, 2).await;

    let st = t1.stats();
    assert!(TransportStats::get(&st.bad_frames) >= 1);
    assert!(TransportStats::get(&st.rejected_handshakes) >= 2);
}

#[tokio::test]
async fn drop_newest_keeps_the_oldest() {
    let (mut ls, peers) = listeners(2).await;
    let l2 = ls.pop().unwrap();
    drop(l2);
    let mut c = config(1, &peers);
    c.peer_queue_len = 5;
    c.drop_policy = DropPolicy::DropNewest;
    let (t1, _in1, _c1) = Transport::<Msg>::start(c, ls.pop().unwrap()).unwrap();
    for seq in 0..20 {
        t1.send(2, msg(seq)).unwrap();
    }
    assert_eq!(TransportStats::get(&t1.stats().dropped_queue_full), 15);
    let l2 = TcpListener::bind(peers[&2]).await.unwrap();
    let (_t2, mut in2, _c2) = Transport::<Msg>::start(config(2, &peers), l2).unwrap();
    for seq in 0..5 {
        assert_eq!(recv(&mut in2).await, (1, msg(seq)));
    }
}

/// A client of another cluster or protocol version is told why before the close (a peer is
/// not: its connection is one-way), and the transport's service name comes with it.
#[tokio::test]
async fn a_refused_client_is_told_why() {
    let (mut ls, peers) = listeners(1).await;
    let mut c = config(1, &peers);
    c.service = "Test service".into();
    let (t1, _in1, _c1) = Transport::<Msg>::start(c, ls.pop().unwrap()).unwrap();
    let server = t1.local_addr();
    let cases = [
        (
            Hello::new(Role::Client, CLUSTER + 1),
            format!("this server is cluster {CLUSTER}, not {}", CLUSTER + 1),
        ),
        (
            Hello {
                version: PROTOCOL_VERSION + 1,
                ..Hello::new(Role::Client, CLUSTER)
            },
            "protocol version".to_string(),
        ),
    ];
    for (hello, reason) in cases {
        let mut s = TcpStream::connect(server).await.unwrap();
        s.write_all(&hello_bytes(&hello)).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut got))
            .await
            .expect("the server closes after its refusal")
            .expect("a clean close, not a reset");
        let (refusal, used) = shoal_wire::decode_frame::<Refusal>(&got, 4096)
            .expect("a well-formed frame")
            .expect("a whole frame");
        assert_eq!(used, got.len(), "nothing after the refusal");
        assert_eq!(refusal.magic, PROTOCOL_MAGIC);
        assert_eq!(refusal.cluster_id, CLUSTER);
        assert_eq!(refusal.service, "Test service");
        assert!(refusal.reason.contains(&reason), "{refusal:?}");
    }
}

/// A membership change at runtime: a peer added later is reached and accepted; a removed
/// peer's queue is gone (sending to it is an error), its open connection is closed at its
/// next frame, and its reconnections are refused.
#[tokio::test]
async fn peers_added_and_removed_at_runtime() {
    let (mut ls, all) = listeners(3).await;
    let l3 = ls.pop().unwrap();
    let l2 = ls.pop().unwrap();
    let l1 = ls.pop().unwrap();
    // 1 and 2 start knowing only each other; 3 knows everyone.
    let first: BTreeMap<u64, SocketAddr> = all
        .iter()
        .filter(|(&id, _)| id != 3)
        .map(|(&i, &a)| (i, a))
        .collect();
    let (mut t1, mut in1, _c1) = Transport::<Msg>::start(config(1, &first), l1).unwrap();
    let (t2, _in2, _c2) = Transport::<Msg>::start(config(2, &first), l2).unwrap();
    let (t3, _in3, _c3) = Transport::<Msg>::start(config(3, &all), l3).unwrap();
    until_delivered(&t2, 1, &mut in1, 2).await;
    assert!(t1.send(3, msg(1)).is_err(), "3 is not a peer of 1 yet");
    // 3 is refused by 1 until 1 learns of it.
    t3.send(1, msg(7)).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), in1.recv())
            .await
            .is_err(),
        "a message from a stranger was delivered"
    );
    t1.set_peers(&all);
    assert_eq!(t1.peers().len(), 2);
    until_delivered(&t3, 1, &mut in1, 3).await;
    // 2 is removed: 1 no longer sends to it, and drops what 2 sends.
    let without_2: BTreeMap<u64, SocketAddr> = all
        .iter()
        .filter(|(&id, _)| id != 2)
        .map(|(&i, &a)| (i, a))
        .collect();
    t1.set_peers(&without_2);
    assert!(t1.send(2, msg(2)).is_err(), "2 was removed");
    for seq in 0..20 {
        t2.send(1, msg(seq)).unwrap();
    }
    let got = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match in1.recv().await {
                Some((2, _)) => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    })
    .await;
    assert!(got.is_err(), "a removed peer's message was delivered");
}
