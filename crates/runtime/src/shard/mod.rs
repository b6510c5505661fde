//! The sharded key/value database on tokio: the server of one replica group ([`server`]),
//! which runs the sans-IO `shoal_shard::GroupHost` over TCP and real disks on the same replica
//! driver as the KV server.

pub mod server;

pub use server::{run_shard_server, ShardServerConfig, ShardServerError, GROUP_FILE};
