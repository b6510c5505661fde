//! TEMPORARY stub of the lead's API (i14api.md) so the bench type-checks before the merge.
#![allow(dead_code, unused_variables)]
use std::net::SocketAddr;
use std::time::Duration;

use shoal_runtime::kv::{ClientError, PutOutcome};
use shoal_shard::Op;
use shoal_wire::kv::Expected;

pub struct ShardClientConfig {
    pub controller: Vec<SocketAddr>,
}
impl ShardClientConfig {
    pub fn new(controller: Vec<SocketAddr>) -> ShardClientConfig {
        ShardClientConfig { controller }
    }
}
#[derive(Clone)]
pub struct ShardClientPool;
impl ShardClientPool {
    pub fn new(config: ShardClientConfig) -> ShardClientPool {
        ShardClientPool
    }
}
pub struct ShardClient;
impl ShardClient {
    pub fn with_pool(pool: &ShardClientPool) -> Result<ShardClient, ClientError> {
        todo!()
    }
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        todo!()
    }
    pub async fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        expected: Expected,
    ) -> Result<PutOutcome, ClientError> {
        todo!()
    }
}
pub struct ControllerDriverConfig;
impl ControllerDriverConfig {
    pub fn new(store: Vec<SocketAddr>, shards: u32) -> Self {
        ControllerDriverConfig
    }
}
pub struct ShardController;
impl ShardController {
    pub fn start(config: ControllerDriverConfig) -> Result<ShardController, anyhow::Error> {
        todo!()
    }
    pub async fn submit(&self, op: Op) -> Result<u64, String> {
        todo!()
    }
    pub fn status(&self) -> String {
        todo!()
    }
    pub async fn stop(self) {}
}
pub async fn read_latest(
    store: &[SocketAddr],
    cluster_id: u64,
    timeout: Duration,
) -> Result<Option<shoal_shard::layout::Record>, ClientError> {
    todo!()
}
