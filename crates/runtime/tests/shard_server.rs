//! The shard group server on tokio, over real sockets (127.0.0.1) and files: two groups of
//! three servers in one process, driven by a tiny test client that speaks the wire protocol
//! (`ToGroup`/`FromGroup`) by hand, playing the controller's part (Adopt, Freeze, Export,
//! Install, Delete) and the routing client's (register, put, get).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use shoal_runtime::shard::{run_shard_server, ShardServerConfig, ShardServerError};
use shoal_shard::{diff, join, shard_of, Config};
use shoal_wire::kv::{Expected, KvOp, KvResult};
use shoal_wire::shard::{
    ControlOp, ControlReply, ControlRequest, ControlStatus, FromGroup, ShardReply, ShardRequest,
    ToGroup,
};
use shoal_wire::{encode_frame, Hello, Refusal, Role, SHARD_SERVICE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const CLUSTER: u64 = 11;
const SHARDS: u32 = 4;
/// Bound on every wait (for a leader, an answer, a close); generous for a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// One running server.
struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ShardServerError>>,
}

impl Server {
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

fn config(gid: u64, id: u64, peers: &BTreeMap<u64, SocketAddr>, dir: &Path) -> ShardServerConfig {
    let mut c = ShardServerConfig::new(
        gid,
        id,
        CLUSTER,
        peers.clone(),
        dir.join(format!("g{gid}n{id}")),
        SHARDS,
    );
    c.tick_interval = Duration::from_millis(10);
    c
}

async fn start(config: ShardServerConfig, listener: TcpListener) -> Server {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_shard_server(config, listener, async move {
        let _ = stopped.await;
    }));
    Server {
        stop: Some(stop),
        task,
    }
}

/// Binds `addr` again once the stopped server's listener is gone (its task is dropped
/// asynchronously after the stop).
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "rebinding {addr}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A group of three servers.
struct Group {
    gid: u64,
    peers: BTreeMap<u64, SocketAddr>,
    servers: Vec<Server>,
}

impl Group {
    async fn start(gid: u64, dir: &Path) -> Group {
        let mut listeners = Vec::new();
        let mut peers = BTreeMap::new();
        for id in 1..=3u64 {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            peers.insert(id, l.local_addr().expect("address"));
            listeners.push(l);
        }
        let mut servers = Vec::new();
        for (id, l) in (1..=3u64).zip(listeners) {
            servers.push(start(config(gid, id, &peers, dir), l).await);
        }
        Group {
            gid,
            peers,
            servers,
        }
    }

    /// Restarts every server from its data directory, on its address.
    async fn restart(&mut self, dir: &Path) {
        for s in self.servers.drain(..) {
            s.stop().await;
        }
        for (&id, &addr) in &self.peers {
            let l = rebind(addr).await;
            self.servers
                .push(start(config(self.gid, id, &self.peers, dir), l).await);
        }
    }

    fn addrs(&self) -> Vec<String> {
        self.peers.values().map(|a| a.to_string()).collect()
    }

    /// Sends `message` to each server in turn until one that is not a follower answers. A
    /// WrongGroup from a configuration older than the request's is retried too, as the
    /// routing client does: a leader just elected (after a restart) answers from the state it
    /// has applied so far, which may not yet include the adoptions in its log.
    async fn ask(&self, message: ToGroup) -> FromGroup {
        let deadline = tokio::time::Instant::now() + WAIT;
        let routed = match &message {
            ToGroup::Request(r) => r.config,
            ToGroup::Control(_) | ToGroup::Part { .. } => 0,
        };
        loop {
            for addr in self.peers.values() {
                if let Ok(reply) = call(*addr, message.clone()).await {
                    let follower = match &reply {
                        FromGroup::Reply(ShardReply::WrongLeader { .. })
                        | FromGroup::Control(ControlReply::NotLeader { .. }) => true,
                        FromGroup::Reply(ShardReply::WrongGroup { config, .. }) => *config < routed,
                        _ => false,
                    };
                    if !follower {
                        return reply;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "group {} answered nothing but 'not the leader' for {WAIT:?}",
                self.gid
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn control(&self, tag: u64, op: ControlOp) -> ControlReply {
        let req = ControlRequest {
            tag,
            gid: self.gid,
            op,
        };
        match self.ask(ToGroup::Control(req)).await {
            FromGroup::Control(r) => {
                assert_eq!(r.tag(), tag, "the reply echoes the tag");
                r
            }
            other => panic!("a control request answered {other:?}"),
        }
    }

    async fn request(
        &self,
        client: u64,
        request: u64,
        shard: u32,
        cfg: u64,
        op: KvOp,
    ) -> ShardReply {
        let req = ShardRequest {
            client,
            request,
            shard,
            config: cfg,
            op,
            serializable: false,
        };
        match self.ask(ToGroup::Request(req)).await {
            FromGroup::Reply(r) => {
                assert_eq!(r.ids(), (client, request), "the reply echoes the ids");
                r
            }
            other => panic!("a client request answered {other:?}"),
        }
    }

    async fn stop(self) {
        for s in self.servers {
            s.stop().await;
        }
    }
}

/// One request on a fresh connection, one reply.
async fn call(addr: SocketAddr, message: ToGroup) -> Result<FromGroup, String> {
    let mut framed = shoal_runtime::connect_client::<FromGroup, ToGroup>(
        addr,
        CLUSTER,
        shoal_wire::DEFAULT_MAX_FRAME_BYTES,
        Duration::from_secs(2),
    )
    .await
    .map_err(|e| e.to_string())?;
    framed.send(message).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), framed.next()).await {
        Ok(Some(Ok(reply))) => Ok(reply),
        Ok(Some(Err(e))) => Err(e.to_string()),
        Ok(None) => Err("closed".into()),
        Err(_) => Err("no answer".into()),
    }
}

fn done(reply: ShardReply) -> KvResult {
    match reply {
        ShardReply::Done { result, .. } => result,
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

fn value(i: u32) -> Vec<u8> {
    format!("value-{i}").into_bytes()
}

/// Registers a session for every shard at `group` (sessions are per shard).
async fn sessions(group: &Group, shards: &[u32], cfg: u64) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for (i, &shard) in shards.iter().enumerate() {
        let reply = group
            .request(1000 + i as u64, 1, shard, cfg, KvOp::Register)
            .await;
        match done(reply) {
            KvResult::Registered { session } => {
                out.insert(shard, session);
            }
            other => panic!("register answered {other:?}"),
        }
    }
    out
}

async fn get(group: &Group, shard: u32, cfg: u64, k: Vec<u8>) -> ShardReply {
    group
        .request(77, rand_id(), shard, cfg, KvOp::Get { key: k })
        .await
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn adopted_ok(reply: ControlReply, want: u64) {
    match reply {
        ControlReply::Done {
            status: ControlStatus::Applied | ControlStatus::AlreadyDone,
            adopted,
            ..
        } => assert_eq!(adopted, want),
        other => panic!("adopt answered {other:?}"),
    }
}

fn applied(reply: ControlReply, what: &str) {
    assert!(
        matches!(
            reply,
            ControlReply::Done {
                status: ControlStatus::Applied,
                ..
            }
        ),
        "{what} answered {reply:?}"
    );
}

/// Two groups: configuration 1 gives group 1 every shard; puts and gets through it;
/// configuration 2 moves half the shards to group 2, carried out step by step over TCP
/// (Freeze → Export → Install → Delete); the new owner serves the data, the old owner answers
/// WrongGroup; group 2 restarted from its data directories still serves it; a data directory
/// started as another gid is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_adopt_move_and_restart() {
    // The servers' logs (migration steps at info) show with a failure, or with --nocapture.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::INFO)
        .try_init();
    let dir = tempfile::tempdir().expect("temp dir");
    let g1 = Group::start(1, dir.path()).await;
    let mut g2 = Group::start(2, dir.path()).await;
    let c1 = join(
        &Config::empty(SHARDS).expect("config 0"),
        &BTreeMap::from([(1, g1.addrs())]),
    )
    .expect("config 1");
    let c2 = join(&c1, &BTreeMap::from([(2, g2.addrs())])).expect("config 2");
    assert!(c1.shards.iter().all(|&g| g == 1));
    let moves = diff(&c1, &c2).expect("diff");
    assert!(!moves.is_empty() && moves.iter().all(|m| m.from == 1 && m.to == 2));

    // Configuration 1 at both groups (group 2 owns nothing in it, but adopts in order).
    for g in [&g1, &g2] {
        adopted_ok(
            g.control(
                1,
                ControlOp::Adopt {
                    config: c1.encode(),
                },
            )
            .await,
            1,
        );
        match g.control(2, ControlOp::Adopted).await {
            ControlReply::Adopted { adopted, .. } => assert_eq!(adopted, 1),
            other => panic!("adopted? answered {other:?}"),
        }
    }

    // Puts and gets through group 1.
    let all: Vec<u32> = (0..SHARDS).collect();
    let sess = sessions(&g1, &all, 1).await;
    const KEYS: u32 = 24;
    for i in 0..KEYS {
        let shard = shard_of(&key(i), SHARDS);
        let op = KvOp::Put {
            key: key(i),
            value: value(i),
            expected: Expected::Any,
        };
        let reply = g1
            .request(sess[&shard], 1 + u64::from(i), shard, 1, op)
            .await;
        assert!(matches!(done(reply), KvResult::Written { version: 1 }));
    }
    for i in 0..KEYS {
        let shard = shard_of(&key(i), SHARDS);
        let got = done(get(&g1, shard, 1, key(i)).await);
        assert_eq!(
            got,
            KvResult::Found {
                value: value(i),
                version: 1
            }
        );
    }
    // Group 2 does not serve anything in configuration 1.
    let reply = get(&g2, 0, 1, key(0)).await;
    assert!(
        matches!(reply, ShardReply::WrongGroup { config: 1, .. }),
        "{reply:?}"
    );

    // Configuration 2, and the migration of every moved shard.
    for g in [&g1, &g2] {
        adopted_ok(
            g.control(
                3,
                ControlOp::Adopt {
                    config: c2.encode(),
                },
            )
            .await,
            2,
        );
    }
    for (n, m) in moves.iter().enumerate() {
        let tag = 100 + 10 * n as u64;
        let (shard, config) = (m.shard, c2.num);
        applied(
            g1.control(tag, ControlOp::Freeze { shard, config }).await,
            "freeze",
        );
        // Frozen: the old owner no longer serves the shard.
        let moved_key = (0..KEYS).find(|&i| shard_of(&key(i), SHARDS) == shard);
        if let Some(i) = moved_key {
            let reply = get(&g1, shard, 2, key(i)).await;
            assert!(matches!(reply, ShardReply::WrongGroup { .. }), "{reply:?}");
        }
        let data = match g1
            .control(tag + 1, ControlOp::Export { shard, config })
            .await
        {
            ControlReply::Exported { data: Some(d), .. } => d,
            other => panic!("export answered {other:?}"),
        };
        applied(
            g2.control(
                tag + 2,
                ControlOp::Install {
                    shard,
                    config,
                    data,
                },
            )
            .await,
            "install",
        );
        applied(
            g1.control(tag + 3, ControlOp::Delete { shard, config })
                .await,
            "delete",
        );
        // Deleted: nothing left to export.
        let again = g1
            .control(tag + 4, ControlOp::Export { shard, config })
            .await;
        assert!(
            matches!(again, ControlReply::Exported { data: None, .. }),
            "{again:?}"
        );
    }

    // Every key at its owner in configuration 2; the old owner refuses the moved ones.
    for i in 0..KEYS {
        let shard = shard_of(&key(i), SHARDS);
        let (owner, other) = if c2.owner(shard) == Some(2) {
            (&g2, &g1)
        } else {
            (&g1, &g2)
        };
        let got = done(get(owner, shard, 2, key(i)).await);
        assert_eq!(
            got,
            KvResult::Found {
                value: value(i),
                version: 1
            },
            "key {i}"
        );
        let reply = get(other, shard, 2, key(i)).await;
        assert!(
            matches!(reply, ShardReply::WrongGroup { config: 2, .. }),
            "{reply:?}"
        );
    }
    // A write at the new owner, with the session that moved with the shard.
    let moved = moves[0].shard;
    let written = (0..KEYS)
        .find(|&i| shard_of(&key(i), SHARDS) == moved)
        .expect("a moved key");
    let op = KvOp::Put {
        key: key(written),
        value: b"after the move".to_vec(),
        expected: Expected::Version(1),
    };
    let reply = g2.request(sess[&moved], 1000, moved, 2, op).await;
    assert_eq!(done(reply), KvResult::Written { version: 2 });

    // Group 2 restarted from its data directories still serves what it installed.
    g2.restart(dir.path()).await;
    for i in 0..KEYS {
        let shard = shard_of(&key(i), SHARDS);
        if c2.owner(shard) != Some(2) || i == written {
            continue;
        }
        let got = done(get(&g2, shard, 2, key(i)).await);
        assert_eq!(
            got,
            KvResult::Found {
                value: value(i),
                version: 1
            },
            "key {i} after restart"
        );
    }
    match done(get(&g2, moved, 2, key(written)).await) {
        KvResult::Found { value, version } => {
            assert_eq!((value, version), (b"after the move".to_vec(), 2))
        }
        other => panic!("the moved write after restart: {other:?}"),
    }
    g1.stop().await;
    let peers = g2.peers.clone();
    g2.stop().await;

    // A data directory of group 2 started as group 1: refused, naming the group file.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut wrong = config(2, 1, &peers, dir.path());
    wrong.gid = 1;
    let err = run_shard_server(wrong, l, std::future::pending())
        .await
        .expect_err("another gid's directory is refused");
    let text = err.to_string();
    assert!(matches!(err, ShardServerError::OtherGroup { .. }), "{text}");
    assert!(
        text.contains("shard-group") && text.contains("gid 2"),
        "{text}"
    );
}

/// Reads one frame's payload from `stream` (bounded), or `None` at the close.
async fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await.ok()?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    assert!(len < 64 * 1024, "a refusal is small");
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some(payload)
}

/// Sends `bytes` after a client hello and returns the server's refusal.
async fn refused_after(addr: SocketAddr, bytes: &[u8]) -> Refusal {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut hello = Vec::new();
    encode_frame(&Hello::new(Role::Client, CLUSTER), 64, &mut hello).expect("hello");
    stream.write_all(&hello).await.expect("hello sent");
    stream.write_all(bytes).await.expect("bytes sent");
    let payload = tokio::time::timeout(WAIT, read_frame(&mut stream))
        .await
        .expect("the server answers")
        .expect("a refusal frame before the close");
    let refusal: Refusal = postcard::from_bytes(&payload).expect("a refusal");
    // Then the server closes the connection.
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(WAIT, stream.read(&mut rest))
        .await
        .expect("the server closes");
    assert!(matches!(n, Ok(0) | Err(_)), "nothing follows the refusal");
    refusal
}

/// Garbage on a client connection (a frame whose payload is a truncated put, an oversized
/// frame header) gets a refusal that says what is wrong and a close; the put does not apply
/// and the group keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_are_refused_and_nothing_applies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let g = Group::start(1, dir.path()).await;
    let c1 = join(
        &Config::empty(SHARDS).expect("config 0"),
        &BTreeMap::from([(1, g.addrs())]),
    )
    .expect("config 1");
    adopted_ok(
        g.control(
            1,
            ControlOp::Adopt {
                config: c1.encode(),
            },
        )
        .await,
        1,
    );
    let shard = shard_of(b"victim", SHARDS);
    let sess = sessions(&g, &[shard], 1).await;

    // A put, cut short, in a frame with a valid checksum: malformed.
    let put = ToGroup::Request(ShardRequest {
        client: sess[&shard],
        request: 1,
        shard,
        config: 1,
        op: KvOp::Put {
            key: b"victim".to_vec(),
            value: b"garbage".to_vec(),
            expected: Expected::Any,
        },
        serializable: false,
    });
    let encoded = postcard::to_stdvec(&put).expect("encode");
    let cut = &encoded[..encoded.len() - 3];
    let mut frame = (cut.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&crc32c::crc32c(cut).to_le_bytes());
    frame.extend_from_slice(cut);
    for addr in g.peers.values() {
        let refusal = refused_after(*addr, &frame).await;
        assert_eq!(refusal.service, SHARD_SERVICE);
        assert!(refusal.reason.contains("bad frame"), "{}", refusal.reason);
    }
    // An oversized frame: refused from its header alone.
    let huge = [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0];
    let addr = *g.peers.values().next().expect("a server");
    let refusal = refused_after(addr, &huge).await;
    assert!(refusal.reason.contains("exceeds"), "{}", refusal.reason);

    // Nothing applied: the key is missing, and the session's request 1 is still unused.
    assert_eq!(
        done(get(&g, shard, 1, b"victim".to_vec()).await),
        KvResult::NoKey
    );
    let op = KvOp::Put {
        key: b"victim".to_vec(),
        value: b"real".to_vec(),
        expected: Expected::Version(0),
    };
    let reply = g.request(sess[&shard], 1, shard, 1, op).await;
    assert_eq!(done(reply), KvResult::Written { version: 1 });
    g.stop().await;
}

/// A KV server's data directory (a Raft log, no group file) is refused by a shard server
/// before it serves, with an error naming the directory; the directory is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_servers_directory_is_refused() {
    use shoal_runtime::kv::{run_server, Client, ClientConfig, KvServerConfig};
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("kv");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let peers = BTreeMap::from([(1, addr)]);
    let mut kv = KvServerConfig::new(1, CLUSTER, peers.clone(), data.clone());
    kv.tick_interval = Duration::from_millis(10);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_server(kv, listener, async move {
        let _ = stopped.await;
    }));
    let mut config = ClientConfig::new(vec![addr]);
    config.cluster_id = CLUSTER;
    config.op_timeout = WAIT;
    let mut client = Client::new(config).expect("client");
    client.put(b"k", b"v", Expected::Any).await.expect("a put");
    let _ = stop.send(());
    task.await.expect("kv task").expect("kv server ran cleanly");
    let files_before = std::fs::read_dir(&data).expect("list").count();

    let listener = rebind(addr).await;
    let mut config = ShardServerConfig::new(1, 1, CLUSTER, peers, data.clone(), SHARDS);
    config.tick_interval = Duration::from_millis(10);
    let err = run_shard_server(config, listener, std::future::pending())
        .await
        .expect_err("a KV server's directory is refused");
    assert!(
        matches!(err, ShardServerError::NotAGroupDir { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&data.display().to_string()),
        "{err}"
    );
    assert!(!data.join("shard-group").exists());
    assert_eq!(
        std::fs::read_dir(&data).expect("list").count(),
        files_before
    );
}

/// A damaged data directory stops the server before it serves, with an error that names the
/// directory and (in its cause) the damaged file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_directory_stops_the_server_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let g = Group::start(3, dir.path()).await;
    let c1 = join(
        &Config::empty(SHARDS).expect("config 0"),
        &BTreeMap::from([(3, g.addrs())]),
    )
    .expect("config 1");
    adopted_ok(
        g.control(
            1,
            ControlOp::Adopt {
                config: c1.encode(),
            },
        )
        .await,
        1,
    );
    let peers = g.peers.clone();
    g.stop().await;
    let data = dir.path().join("g3n1");
    std::fs::write(data.join("identity"), b"not an identity").expect("damage");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let err = run_shard_server(
        config(3, 1, &peers, dir.path()),
        listener,
        std::future::pending(),
    )
    .await
    .expect_err("a damaged directory is refused");
    let text = shoal_runtime::error_chain(&err);
    assert!(text.contains(&data.display().to_string()), "{text}");
    assert!(text.contains("identity"), "{text}");
}
