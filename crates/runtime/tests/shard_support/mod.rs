//! A sharded cluster in one tokio runtime for the runtime's tests: a controller store of
//! three KV servers and groups of three shard servers, over real sockets (127.0.0.1) and
//! files, each server stopped when the test's [`Running`] says so.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shoal_runtime::kv::{run_server, KvServerConfig};
use shoal_runtime::shard::{run_shard_server, ShardServerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The servers started so far: [`Running::stop`] stops them all.
#[derive(Default)]
pub struct Running {
    stops: Vec<oneshot::Sender<()>>,
}

impl Running {
    pub fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
    }

    fn stopper(&mut self) -> impl std::future::Future<Output = ()> {
        let (tx, rx) = oneshot::channel::<()>();
        self.stops.push(tx);
        async move {
            let _ = rx.await;
        }
    }
}

/// `n` listeners on free ports, and their addresses by server id (1..=n).
pub async fn listeners(n: usize) -> (Vec<TcpListener>, BTreeMap<u64, SocketAddr>) {
    let mut ls = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=n as u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        peers.insert(id, l.local_addr().expect("address"));
        ls.push(l);
    }
    (ls, peers)
}

/// The controller store: three KV servers (10 ms ticks); their addresses in id order.
pub async fn store(dir: &Path, cluster: u64, running: &mut Running) -> Vec<SocketAddr> {
    let (ls, peers) = listeners(3).await;
    for (id, l) in (1..=3u64).zip(ls) {
        let mut c = KvServerConfig::new(id, cluster, peers.clone(), dir.join(format!("s{id}")));
        c.tick_interval = Duration::from_millis(10);
        tokio::spawn(run_server(c, l, running.stopper()));
    }
    peers.values().copied().collect()
}

/// Group `gid`: three shard servers of `shards` shards, each config adjusted by `tweak`;
/// their addresses as a configuration names them.
pub async fn group(
    gid: u64,
    dir: &Path,
    cluster: u64,
    shards: u32,
    running: &mut Running,
    tweak: impl Fn(&mut ShardServerConfig),
) -> Vec<String> {
    let (ls, peers) = listeners(3).await;
    for (id, l) in (1..=3u64).zip(ls) {
        let mut c = ShardServerConfig::new(
            gid,
            id,
            cluster,
            peers.clone(),
            dir.join(format!("g{gid}n{id}")),
            shards,
        );
        tweak(&mut c);
        tokio::spawn(run_shard_server(c, l, running.stopper()));
    }
    peers.values().map(|a| a.to_string()).collect()
}
