//! Shoal's sharded key/value database, protocol layer (sans-IO): the model the shard controller,
//! the shard groups and the routing clients share.
//!
//! **Owns:** the shard function ([`shard_of`]: FNV-1a 32 of the key modulo the shard count)
//! and the shard-count rules ([`DEFAULT_SHARDS`], [`validate_shards`]); the numbered
//! configuration ([`Config`]: owner of every shard, servers of every group) and its versioned
//! encoding; the controller's operations as pure functions from the latest configuration to
//! the next ([`join`], [`leave`], [`move_shard`], one [`Op`] applied by [`apply`]) with their
//! rebalancing rule (fewest shard moves, groups within one shard of each other); the moves a
//! migration has to carry out ([`diff`]); and the history of configurations the controller
//! keeps ([`History`]); and the replica groups' shard-aware state machine ([`ShardMachine`],
//! module [`group`]): per-shard stores and states, the log entries of a migration
//! ([`GroupEntry`]: adopt, freeze, install, delete, fenced by configuration numbers) and the
//! export of a frozen shard; and the group's host ([`GroupHost`], module [`host`]): client
//! requests in (`shoal_wire::shard`), proposals and read-index reads, replies out. It builds on `shoal-kv`'s `KvStore` (one per shard),
//! `shoal-wire`'s KV messages and `shoal-replica`'s `StateMachine` (the shell hosts it).
//!
//! **Must never:** do I/O, read a clock, spawn, use an unseeded RNG or iterate a std hash map
//! (every map here is a `BTreeMap`, every tie is broken by gid or shard number). Every replica
//! of the controller applies the same operation to the same configuration and must get the
//! same next configuration, bit for bit. The group state machine must never apply a client
//! request at the group's log index (each shard's store numbers its own applies), never apply
//! a request for a shard it does not serve, and never panic on an entry, snapshot or export
//! (bad bytes are errors).
//!
//! **Also owns:** the shard controller ([`Controller`], module [`controller`]): the configurations in a
//! Shoal KV store under a leased lock, the recovery of an incomplete change, the migrations
//! driven at the groups. And the routing client ([`ShardClerk`], module [`client`]): key → shard
//! → owner group from a configuration cached from the controller's store, per-shard sessions,
//! retries across migrations with the same request id, scans merged across shards.
//!
//! The simulator drives all of them (crate `shoal-lab`, `shoal sim --workload shard`); the tokio
//! drivers, processes and CLI are issue 14. See `docs/sharding.md`.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod controller;
pub mod group;
pub mod history;
pub mod host;
pub mod layout;
pub mod ops;
pub mod shard;

pub use client::{ClientAction, ClientError, ShardClerk, ShardClerkConfig};
pub use config::{diff, Config, ShardMove, CONFIG_FORMAT};
pub use controller::{
    Controller, ControllerConfig, ControllerError, ControllerStatus, CtlAction, CtlPhase,
};
pub use group::{
    ControlOutcome, GroupEntry, GroupError, GroupOutput, GroupSnapshot, Shard, ShardMachine,
    ShardState,
};
pub use history::History;
pub use host::{control_status, ControlResult, GroupHost, HostError};
pub use ops::{apply, join, leave, move_shard, Op};
pub use shard::{fnv1a32, shard_of, validate_shards, DEFAULT_SHARDS, MAX_SHARDS};

/// A replica group's id. `0` is not a group: it marks a shard that no group owns
/// ([`NO_GROUP`]).
pub type Gid = u64;

/// A shard's number, `0..shards`.
pub type ShardId = u32;

/// The owner of a shard that no group owns (only before the first group has joined).
pub const NO_GROUP: Gid = 0;

/// Errors of the shard model. An operation that fails produces no new configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A shard count outside `1..=MAX_SHARDS`.
    #[error("invalid shard count {0}: it must be between 1 and {max}", max = MAX_SHARDS)]
    ShardCount(u64),
    /// A request that names no group.
    #[error("the request names no group")]
    NoGroups,
    /// Gid 0 means "no owner" and cannot be a group.
    #[error("gid 0 is reserved (it means \"no owner\")")]
    ReservedGid,
    /// A group given without any server.
    #[error("group {0} has no servers")]
    NoServers(Gid),
    /// Join of a group that is already a member.
    #[error("group {0} is already a member")]
    AlreadyMember(Gid),
    /// Leave or Move naming a group that is not a member.
    #[error("group {0} is not a member")]
    NotMember(Gid),
    /// The same gid twice in one Leave.
    #[error("group {0} is named twice")]
    DuplicateGid(Gid),
    /// A Leave that would leave no group: every shard needs an owner.
    #[error("refused: leaving would remove the last group(s); every shard needs an owner")]
    LastGroup,
    /// A shard number not below the shard count.
    #[error("unknown shard {shard}: there are {shards} shards")]
    UnknownShard {
        /// The shard asked for.
        shard: ShardId,
        /// The shard count of the configuration.
        shards: u32,
    },
    /// Configurations with different shard counts cannot be compared or chained.
    #[error("shard counts differ: {0} and {1}")]
    ShardCountMismatch(u32, u32),
    /// A configuration number past `u64::MAX`.
    #[error("configuration numbers are exhausted")]
    NumOverflow,
    /// A configuration that breaks the model's invariants (decoded or built by hand).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Encoded by an unknown format version.
    #[error("unknown configuration format version {0}")]
    FormatVersion(u8),
    /// Bytes that do not decode.
    #[error("configuration does not decode: {0}")]
    Decode(String),
    /// A query for a configuration the history does not hold.
    #[error("no configuration {asked}: the history holds 0..={latest}")]
    UnknownConfig {
        /// The number asked for.
        asked: u64,
        /// The latest configuration's number (0 before the first change).
        latest: u64,
    },
    /// A configuration appended out of order.
    #[error("configuration {got} does not follow {latest}")]
    OutOfOrder {
        /// The latest number held.
        latest: u64,
        /// The number given.
        got: u64,
    },
}
