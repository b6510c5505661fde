//! The sharded key/value database on tokio: the server of one replica group ([`server`]),
//! which runs the sans-IO `shoal_shard::GroupHost` over TCP and real disks on the same replica
//! driver as the KV server; the routing client ([`client`]), the sans-IO `ShardClerk` over
//! TCP; and the controller's driver ([`controller`]), the sans-IO `Controller` as a task any
//! process can run for its changes.

pub mod client;
pub mod controller;
mod link;
pub mod server;

pub use client::{ShardClient, ShardClientConfig, ShardClientPool};
pub use controller::{
    group_server_shards_secure, group_server_status_secure, read_config_secure, read_latest_secure,
};
pub use controller::{
    group_server_status, read_config, read_latest, ControllerDriverConfig, GroupServerStatus,
    ShardController, CONTROLLER_MAX_FRAME_BYTES, CONTROLLER_MAX_MESSAGE_BYTES,
};
pub use server::{run_shard_server, ShardServerConfig, ShardServerError, GROUP_FILE};
