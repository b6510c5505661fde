//! The KV server driver and the async client in one process, over real sockets and files:
//! the client library's operations and lock, and bad input (garbage, unknown protocol
//! versions, peer messages on a client connection, a peer id not in the cluster) that closes
//! the connection while the server keeps serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use shoal_kv::Lock;
use shoal_raft::{Message, MessageBody, NodeId, Term};
use shoal_runtime::kv::{
    run_server, Client, ClientConfig, ClientError, ClientPool, DeleteOutcome, KvServerConfig,
    PutOutcome,
};
use shoal_wire::kv::{Expected, KvReply};
use shoal_wire::{encode_frame, Hello, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const CLUSTER: u64 = 7;
/// Bound on every wait for the server to answer or close.
const WAIT: Duration = Duration::from_secs(20);

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), shoal_runtime::kv::KvServerError>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    /// [`Server::start`] with `tweak` applied to the configuration.
    async fn start_with(tweak: impl FnOnce(&mut KvServerConfig)) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = KvServerConfig::new(
            1,
            CLUSTER,
            BTreeMap::from([(1, addr)]),
            dir.path().join("n1"),
        );
        config.tick_interval = Duration::from_millis(10);
        config.rsm.limits.max_value_bytes = 100;
        tweak(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_server(config, listener, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    fn client(&self) -> Client {
        let mut config = ClientConfig::new(vec![self.addr]);
        config.cluster_id = CLUSTER;
        config.op_timeout = WAIT;
        Client::new(config).expect("client")
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops");
        result.expect("server task").expect("server ran cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_operations_and_lock() {
    let server = Server::start().await;
    let mut c = server.client();
    assert_eq!(c.get(b"k").await.expect("get"), None);
    assert_eq!(
        c.put(b"k", b"v1", Expected::Version(0)).await.expect("put"),
        PutOutcome::Written(1)
    );
    assert_eq!(
        c.put(b"k", b"v2", Expected::Version(0)).await.expect("put"),
        PutOutcome::Mismatch
    );
    assert_eq!(
        c.put(b"gone", b"x", Expected::Version(4))
            .await
            .expect("put"),
        PutOutcome::NoKey
    );
    assert_eq!(
        c.put(b"k", b"v2", Expected::Any).await.expect("put"),
        PutOutcome::Written(2)
    );
    assert_eq!(c.get(b"k").await.expect("get"), Some((b"v2".to_vec(), 2)));
    c.put(b"j", b"jj", Expected::Any).await.expect("put");
    let items = c.scan(b"", None, 10).await.expect("scan");
    let keys: Vec<_> = items.iter().map(|i| i.key.clone()).collect();
    assert_eq!(keys, vec![b"j".to_vec(), b"k".to_vec()]);
    assert_eq!(
        c.delete(b"j", Expected::Version(1)).await.expect("delete"),
        DeleteOutcome::Deleted
    );
    match c.put(b"big", &[0u8; 101], Expected::Any).await {
        Err(ClientError::TooLarge { what, .. }) => assert_eq!(what, "value"),
        other => panic!("oversized value: {other:?}"),
    }
    assert_eq!(c.get(b"big").await.expect("get"), None);

    let mut lock = Lock::new(b"lock/a".to_vec(), b"owner-1".to_vec());
    c.acquire(&mut lock).await.expect("acquire");
    assert!(lock.is_held());
    assert_eq!(
        c.get(b"lock/a").await.expect("get"),
        Some((b"owner-1".to_vec(), 1))
    );
    c.release(&mut lock).await.expect("release");
    assert!(!lock.is_held());
    assert_eq!(c.get(b"lock/a").await.expect("get"), Some((Vec::new(), 2)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_clients_share_one_connection_and_each_gets_its_own_answers() {
    let server = Server::start().await;
    let mut config = ClientConfig::new(vec![server.addr]);
    config.cluster_id = CLUSTER;
    config.op_timeout = WAIT;
    let pool = ClientPool::new(config);
    // 40 clients of one pool, each in its own session, interleaving writes and reads of its
    // own key and compare-and-sets of a shared counter.
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::with_pool(&pool).expect("client");
            let key = format!("key{i}").into_bytes();
            let mut wins = 0;
            for round in 1..=20u64 {
                let value = format!("{i}-{round}").into_bytes();
                let put = c.put(&key, &value, Expected::Version(round - 1)).await;
                assert_eq!(put.expect("put"), PutOutcome::Written(round));
                let got = c.get(&key).await.expect("get");
                assert_eq!(got, Some((value, round)), "client {i} got another's answer");
                let counter = c.get(b"counter").await.expect("get counter");
                let version = counter.map_or(0, |(_, v)| v);
                if c.put(b"counter", b"x", Expected::Version(version))
                    .await
                    .expect("cas")
                    == PutOutcome::Written(version + 1)
                {
                    wins += 1;
                }
            }
            wins
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.expect("client task");
    }
    // Every successful compare-and-set advanced the counter by exactly one version.
    let mut c = server.client();
    let (_, version) = c
        .get(b"counter")
        .await
        .expect("get")
        .expect("counter exists");
    assert_eq!(version, wins);
    assert!(wins > 0);
    server.stop().await;
}

/// Waits until the server closes `stream` (EOF or reset), discarding anything it sends.
async fn expect_closed(mut stream: TcpStream) {
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server did not close the connection");
}

async fn hello(addr: SocketAddr, hello: Hello) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut buf = Vec::new();
    encode_frame(&hello, 64, &mut buf).expect("encode hello");
    stream.write_all(&buf).await.expect("write hello");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_the_connection_and_the_server_keeps_serving() {
    let server = Server::start().await;
    let mut c = server.client();
    c.put(b"k", b"v", Expected::Any).await.expect("put");

    // Garbage instead of a handshake.
    let mut garbage = TcpStream::connect(server.addr).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    expect_closed(garbage).await;

    // An unknown protocol version.
    let mut future = Hello::new(Role::Client, CLUSTER);
    future.version = u16::MAX;
    expect_closed(hello(server.addr, future).await).await;

    // A peer id that is not in the cluster.
    expect_closed(hello(server.addr, Hello::new(Role::Peer { node_id: 99 }, CLUSTER)).await).await;

    // Another cluster.
    expect_closed(hello(server.addr, Hello::new(Role::Client, CLUSTER + 1)).await).await;

    // A client connection that carries a Raft message instead of a request.
    let mut framed = shoal_runtime::connect_client::<KvReply, Message>(
        server.addr,
        CLUSTER,
        shoal_wire::DEFAULT_MAX_FRAME_BYTES,
        WAIT,
    )
    .await
    .expect("connect as a client");
    framed
        .send(Message {
            from: NodeId(2),
            to: NodeId(1),
            term: Term(100),
            body: MessageBody::TimeoutNow,
        })
        .await
        .expect("send");
    let next = tokio::time::timeout(WAIT, framed.next())
        .await
        .expect("the server closes the connection");
    assert!(
        !matches!(next, Some(Ok(_))),
        "no answer to a peer message: {next:?}"
    );

    // A valid client hello followed by a malformed frame.
    let mut stream = hello(server.addr, Hello::new(Role::Client, CLUSTER)).await;
    stream
        .write_all(&[0xff; 64])
        .await
        .expect("write a malformed frame");
    expect_closed(stream).await;

    // Still serving, with its data.
    assert_eq!(c.get(b"k").await.expect("get"), Some((b"v".to_vec(), 1)));
    let mut fresh = server.client();
    assert_eq!(
        fresh
            .put(b"k", b"w", Expected::Version(1))
            .await
            .expect("put"),
        PutOutcome::Written(2)
    );
    server.stop().await;
}

/// A backup larger than a frame travels in parts (here 4 KiB frames and a ~30 KB state) and
/// holds every write acknowledged before it, with its version; a client whose message limit
/// is smaller refuses it instead of allocating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_larger_than_a_frame_arrives_in_parts() {
    const FRAME: usize = 4096;
    let server = Server::start_with(|c| c.transport.max_frame_bytes = FRAME).await;
    let mut c = server.client();
    for i in 0..300u32 {
        let key = format!("key{i:04}");
        let value = vec![b'a' + (i % 26) as u8; 90];
        let want = PutOutcome::Written(1);
        assert_eq!(
            c.put(key.as_bytes(), &value, Expected::Any).await.unwrap(),
            want
        );
    }
    assert_eq!(
        c.put(b"key0000", b"again", Expected::Version(1))
            .await
            .unwrap(),
        PutOutcome::Written(2)
    );
    let mut config = ClientConfig::new(vec![server.addr]);
    config.cluster_id = CLUSTER;
    config.op_timeout = WAIT;
    config.max_frame_bytes = FRAME;
    let backup = Client::new(config.clone())
        .unwrap()
        .backup(1 << 20, WAIT)
        .await
        .expect("backup");
    assert!(backup.data.len() > 5 * FRAME, "{} bytes", backup.data.len());
    assert_eq!((backup.server, backup.voters.as_slice()), (1, &[1u64][..]));
    let mut store = shoal_kv::store::KvStore::new(shoal_kv::store::Limits::default());
    store.restore(&backup.data).expect("the state decodes");
    assert_eq!(store.len(), 300);
    assert!(store.applied() <= backup.index);
    let get = |key: &[u8]| shoal_wire::kv::KvOp::Get { key: key.to_vec() };
    assert_eq!(
        store.read(&get(b"key0000")).unwrap(),
        shoal_wire::kv::KvResult::Found {
            value: b"again".to_vec(),
            version: 2
        }
    );
    // Over the client's message limit: refused at once, never allocated.
    let small = Client::new(config)
        .unwrap()
        .backup(2 * FRAME, Duration::from_secs(5))
        .await
        .map(|b| b.data.len());
    assert!(
        matches!(&small, Err(ClientError::TooLarge { what, .. }) if what == "backup"),
        "{small:?}"
    );
    server.stop().await;
}
