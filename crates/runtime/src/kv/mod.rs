//! The key/value database on tokio: the server driver ([`server`]) that runs the sans-IO
//! `shoal_kv::KvRsm` over TCP and real disks, and the async [`client`] library that runs the
//! sans-IO `shoal_kv::Clerk`.

pub mod client;
pub mod server;

pub use client::{Backup, GrantOutcome, LeasePutOutcome, DEFAULT_MAX_BACKUP_BYTES};
pub use client::{Client, ClientConfig, ClientError, ClientPool, DeleteOutcome, PutOutcome};
pub use server::{run_server, KvServerConfig, KvServerError};
