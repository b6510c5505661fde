//! TEMPORARY: the lead's API (i14api.md) until main has it. Removed at the merge.
#![allow(dead_code, unused_variables, clippy::unused_async)]
use std::net::SocketAddr;
use std::time::Duration;

use shoal_runtime::kv::ClientError;

pub struct ControllerDriverConfig {
    pub store: Vec<SocketAddr>,
    pub cluster_id: u64,
    pub shards: u32,
    pub name: String,
}
impl ControllerDriverConfig {
    pub fn new(store: Vec<SocketAddr>, shards: u32) -> Self {
        ControllerDriverConfig {
            store,
            cluster_id: 1,
            shards,
            name: String::new(),
        }
    }
}
pub struct ShardController;
impl ShardController {
    pub fn start(config: ControllerDriverConfig) -> Result<ShardController, anyhow::Error> {
        anyhow::bail!("stub")
    }
    pub async fn submit(&self, op: shoal_shard::Op) -> Result<u64, String> {
        Err("stub".into())
    }
    pub fn status(&self) -> shoal_shard::ControllerStatus {
        todo!()
    }
    pub async fn stop(self) {}
}
pub async fn read_latest(
    store: &[SocketAddr],
    cluster_id: u64,
    timeout: Duration,
) -> Result<Option<shoal_shard::layout::Record>, ClientError> {
    Ok(None)
}
pub async fn read_config(
    store: &[SocketAddr],
    cluster_id: u64,
    num: u64,
    timeout: Duration,
) -> Result<Option<shoal_shard::Config>, ClientError> {
    Ok(None)
}
pub async fn group_server_status(
    addr: SocketAddr,
    gid: u64,
    cluster_id: u64,
    timeout: Duration,
) -> Result<GroupServerStatus, String> {
    Err("stub".into())
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupServerStatus {
    pub leader: bool,
    pub adopted: u64,
    pub leader_hint: Option<u64>,
}
