//! Shoal's simulation lab: what every simulation of our protocols shares, in library code.
//!
//! **Owns:** the Figure-3 invariant checkers of Raft ([`invariants`]), the simulated servers
//! ([`raft_node`]: a bare Raft server; [`kv_node`]: the KV servers, replicated and single), the
//! simulated KV client actor and the checks of what clients saw ([`kv_client`]), the sharded
//! KV's simulated world ([`shard`]: replica-group servers, the controller's store, the
//! per-event shard invariant), membership changes as a fault ([`membership`]), MapReduce's
//! simulated coordinator and workers ([`mr`]), and the workloads
//! `shoal sim --workload raft|kv|shard|mr` runs ([`workload`]). The simulation tests of
//! `shoal-raft` and `shoal-kv` use it as a dev-dependency.
//!
//! **Must never:** read the wall clock, use unseeded randomness or iterate hash maps (a seed
//! must replay a run byte for byte), or do real I/O: it runs only inside `shoal-sim`. (One
//! exception, outside the simulated world: the mr workload's sequential reference runs
//! `shoal mr seq`'s engine on temporary files before the simulation starts.)
//!
//! The server drivers are one module each so that a driver over a shared replica shell can
//! replace them in one place.

#![warn(missing_docs)]

pub mod invariants;
pub mod kv_client;
pub mod kv_node;
pub mod membership;
pub mod mr;
pub mod raft_node;
pub mod shard;
pub mod workload;

pub use workload::{run_kv, run_raft, run_shard, Report, Workload};
