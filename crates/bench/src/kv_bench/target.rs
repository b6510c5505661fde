//! The systems under test, each behind [`KvTarget`]: the harness only knows "open a
//! connection for one requester, then put and get through it". Swapping the Shoal client (for
//! one shared, pipelining client, say) means another `KvTarget`, not another harness.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use shoal_runtime::kv::{Client, ClientConfig, ClientError, ClientPool, PutOutcome};
use shoal_runtime::shard::{ShardClient, ShardClientConfig, ShardClientPool};
use shoal_wire::kv::Expected;

/// Which system a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum TargetKind {
    /// Shoal's KV database (`shoal kv server`), through `shoal_runtime::kv::Client`.
    Shoal,
    /// etcd v3 (3.4 is what Debian ships), through the `etcd-client` crate (needs the `etcd`
    /// cargo feature).
    Etcd,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Shoal => "shoal",
            TargetKind::Etcd => "etcd",
        }
    }
}

/// What an answered operation tells the harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The server that answered, when the client can tell (etcd: the response header's
    /// member id; Shoal: the server id, `Client::last_server`).
    pub server: Option<u64>,
    /// Gets: whether the key existed (puts: always true).
    pub found: bool,
}

/// One requester's connection: one operation at a time, closed loop.
pub trait KvConn: Send + 'static {
    /// An unconditional put.
    fn put(&mut self, key: &[u8], value: &[u8]) -> impl Future<Output = Result<Answer>> + Send;
    /// A linearizable get.
    fn get(&mut self, key: &[u8]) -> impl Future<Output = Result<Answer>> + Send;
}

/// A system under test: hands out one [`KvConn`] per requester.
pub trait KvTarget: Send + Sync + 'static {
    /// A requester's connection.
    type Conn: KvConn;
    /// Which system this is.
    fn kind(&self) -> TargetKind;
    /// A connection for one more requester.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn>> + Send;
}

/// Shoal: one `Client` per requester (a client runs one operation at a time, in its own
/// session), all sharing one `ClientPool`, so the requests of every requester travel over one
/// connection per server, written in batches, as etcd's requests share one gRPC channel. On a
/// sharded cluster ([`ShoalTarget::sharded`]) the same with the routing client: one
/// `ShardClient` per requester, all sharing one `ShardClientPool` (one connection per server
/// of every group).
pub struct ShoalTarget {
    pool: ShoalPool,
}

enum ShoalPool {
    Group(ClientPool),
    Sharded(ShardClientPool),
}

impl ShoalTarget {
    /// One group (one Raft cluster) at `endpoints`.
    pub fn new(endpoints: Vec<SocketAddr>, cluster_id: u64, op_timeout: Duration) -> ShoalTarget {
        let plain = shoal_runtime::tls::Security::plain();
        ShoalTarget::with_security(endpoints, cluster_id, op_timeout, plain)
    }

    /// One group at `endpoints`, over TLS when `security` says so.
    pub fn with_security(
        endpoints: Vec<SocketAddr>,
        cluster_id: u64,
        op_timeout: Duration,
        security: shoal_runtime::tls::Security,
    ) -> ShoalTarget {
        let mut config = ClientConfig::new(endpoints);
        config.cluster_id = cluster_id;
        config.op_timeout = op_timeout;
        config.security = security;
        ShoalTarget {
            pool: ShoalPool::Group(ClientPool::new(config)),
        }
    }

    /// A sharded cluster whose controller store is at `controller`.
    pub fn sharded(
        controller: Vec<SocketAddr>,
        cluster_id: u64,
        op_timeout: Duration,
    ) -> ShoalTarget {
        let mut config = ShardClientConfig::new(controller);
        config.cluster_id = cluster_id;
        config.op_timeout = op_timeout;
        ShoalTarget {
            pool: ShoalPool::Sharded(ShardClientPool::new(config)),
        }
    }
}

pub enum ShoalConn {
    Group(Box<Client>),
    Sharded(Box<ShardClient>),
}

/// Turns the client's "too large" into the one-line error the CLI prints.
fn shoal_error(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::TooLarge { what, bytes, limit } => {
            anyhow!("the server refuses a {what} of {bytes} bytes: its limit is {limit} bytes")
        }
        other => anyhow::Error::new(other),
    }
}

impl KvConn for ShoalConn {
    async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<Answer> {
        let (outcome, server) = match self {
            ShoalConn::Group(c) => (c.put(key, value, Expected::Any).await, c.last_server()),
            // Which server of which group answered is not one number: none.
            ShoalConn::Sharded(c) => (c.put(key, value, Expected::Any).await, None),
        };
        match outcome.map_err(shoal_error)? {
            PutOutcome::Written(_) => Ok(Answer {
                server,
                found: true,
            }),
            other => bail!("unconditional put answered {other:?}"),
        }
    }

    async fn get(&mut self, key: &[u8]) -> Result<Answer> {
        let (found, server) = match self {
            ShoalConn::Group(c) => (c.get(key).await, c.last_server()),
            ShoalConn::Sharded(c) => (c.get(key).await, None),
        };
        Ok(Answer {
            server,
            found: found.map_err(shoal_error)?.is_some(),
        })
    }
}

impl KvTarget for ShoalTarget {
    type Conn = ShoalConn;

    fn kind(&self) -> TargetKind {
        TargetKind::Shoal
    }

    async fn connect(&self) -> Result<ShoalConn> {
        Ok(match &self.pool {
            ShoalPool::Group(p) => ShoalConn::Group(Box::new(Client::with_pool(p)?)),
            ShoalPool::Sharded(p) => ShoalConn::Sharded(Box::new(ShardClient::with_pool(p)?)),
        })
    }
}

#[cfg(feature = "etcd")]
pub use etcd::EtcdTarget;

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use anyhow::Context;

    /// etcd through one `etcd_client::Client` for all requesters: one HTTP/2 connection per
    /// endpoint, requests multiplexed as gRPC streams and spread over the endpoints by tonic's
    /// balancer (a follower forwards a put to the leader, as with any etcd client).
    pub struct EtcdTarget {
        client: etcd_client::Client,
    }

    impl EtcdTarget {
        /// Connects (lazily: errors surface on the first request) to the client URLs.
        pub async fn connect(endpoints: &[String], op_timeout: Duration) -> Result<EtcdTarget> {
            let options = etcd_client::ConnectOptions::new()
                .with_timeout(op_timeout)
                .with_connect_timeout(Duration::from_secs(2));
            let client = etcd_client::Client::connect(endpoints, Some(options))
                .await
                .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
            Ok(EtcdTarget { client })
        }
    }

    pub struct EtcdConn {
        kv: etcd_client::KvClient,
    }

    fn member(header: Option<&etcd_client::ResponseHeader>) -> Option<u64> {
        header.map(|h| h.member_id())
    }

    impl KvConn for EtcdConn {
        async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<Answer> {
            let response = self.kv.put(key, value, None).await?;
            Ok(Answer {
                server: member(response.header()),
                found: true,
            })
        }

        async fn get(&mut self, key: &[u8]) -> Result<Answer> {
            // No options: serializable = false, a linearizable read.
            let response = self.kv.get(key, None).await?;
            Ok(Answer {
                server: member(response.header()),
                found: !response.kvs().is_empty(),
            })
        }
    }

    impl KvTarget for EtcdTarget {
        type Conn = EtcdConn;

        fn kind(&self) -> TargetKind {
            TargetKind::Etcd
        }

        async fn connect(&self) -> Result<EtcdConn> {
            Ok(EtcdConn {
                kv: self.client.kv_client(),
            })
        }
    }
}
