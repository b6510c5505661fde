//! Shoal's benchmarks, the library behind `shoal bench kv`, `shoal bench raft` and
//! `shoal bench mr` (`bench check` and `bench sim` stay next to the checker's and the
//! simulator's commands in the `shoal` crate).
//!
//! Each module holds its clap arguments (`BenchArgs`, flattened into the CLI by `shoal`) and a
//! `bench` function that runs it. They run inside the `shoal` binary: the servers, nodes and
//! workers they start are `std::env::current_exe()` (this same binary) with the matching
//! subcommand, supervised by `shoal-cluster`.

pub mod bench_util;
pub mod kv_bench;
pub mod mr_bench;
pub mod mr_sort_bench;
pub mod raft_bench;
pub mod shard_bench;
pub mod snapshot_bench;
mod svg;
