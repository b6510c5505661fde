//! Shoal's key/value database, protocol layer (sans-IO).
//!
//! **Owns:** the versioned KV state machine with its bounded at-most-once session table and
//! snapshots ([`KvStore`]); the single-server service ([`SingleServer`], the classic kvsrv);
//! the replicated state machine glue over Raft ([`KvRsm`]: submit, apply at the proposed
//! index, read-index reads, snapshots, the leader's lease clock); leases (etcd's model: keys
//! that go when their lease is revoked or not kept alive); the client ([`Clerk`]: leader
//! finding, retries, backoff, the "maybe" rule); and the lock built only on the KV ([`Lock`],
//! optionally under a lease). Messages are in `shoal_wire::kv`.
//!
//! **Must never:** do I/O, read a clock, spawn, use an unseeded RNG or iterate a std hash map.
//! Time is given by the driver (ticks, timer callbacks), persistence is the driver's job
//! (described by Raft's `Ready`). The simulator and the tokio runtime drive the same objects.
//!
//! See `docs/kv.md` for the semantics and the tests.

#![warn(missing_docs)]

pub mod clerk;
pub mod lock;
mod members;
pub mod rsm;
pub mod server;
pub mod store;

pub use clerk::{Action, Clerk, ClerkConfig, Outcome};
pub use lock::{Lock, LockStep};
pub use rsm::{KvMachine, KvRsm, PendingBackup, RsmConfig, SnapshotJob, StoreSnapshot, Waiter};
pub use server::SingleServer;
pub use store::{KvStore, LeaseStatus, Limits};

/// Errors of the KV layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write was passed where only reads are allowed.
    #[error("not a read operation")]
    NotARead,
    /// The snapshot was written by an unknown format version.
    #[error("unknown snapshot format version {0}")]
    SnapshotVersion(u8),
    /// The snapshot's bytes do not decode.
    #[error("snapshot does not decode: {0}")]
    SnapshotDecode(String),
    /// The clerk already has an operation in flight.
    #[error("an operation is already in flight")]
    Busy,
    /// A clerk needs at least one server.
    #[error("no servers given")]
    NoServers,
    /// The Raft core refused.
    #[error(transparent)]
    Raft(#[from] shoal_raft::Error),
    /// The durable storage failed.
    #[error(transparent)]
    Storage(shoal_storage::Error),
    /// Raft handed the state machine something committed that it cannot use: a snapshot or a
    /// log entry that does not decode. Skipping it on one replica would make the replicas
    /// diverge, so the replica must stop (its driver reports this, naming its data directory)
    /// and be repaired: moved aside, it re-syncs from the others.
    #[error("the committed {what} at index {index} is unusable: {reason}")]
    Unusable {
        /// `snapshot` or `log entry`.
        what: &'static str,
        /// Its Raft index.
        index: u64,
        /// Why it does not decode.
        reason: String,
    },
}
