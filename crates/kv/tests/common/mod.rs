//! Simulation support shared by the KV tests. The client actor, the server actors and the
//! history checks live in `shoal-lab` (`kv_client`, `kv_node`), where `shoal sim --workload kv`
//! uses them too; this module re-exports them and keeps the tests' history check with its
//! 10 s budget.

#![allow(dead_code, unused_imports)]

use std::time::Duration;

use shoal_check::Budget;
use shoal_sim::{Failure, Sim};

pub use shoal_lab::kv_client::{
    all_finished, check_lock_intervals, client_violation, put_counts, server_sim, Client, SimId,
    Work, M,
};
pub use shoal_lab::kv_node::{
    raft_state_bytes, snapshot_file_bytes, RaftNode, SingleNode, ELECTION_TICKS, HEARTBEAT_TICKS,
    TICK,
};

/// Checks the recorded history against the versioned-KV model (10 s of wall time at most: a
/// check that gives up is reported on stderr, not failed).
pub fn check_history(sim: &Sim<M>) -> Result<usize, Failure> {
    let checked =
        shoal_lab::kv_client::check_kv_history(sim, Budget::time(Duration::from_secs(10)))?;
    if let Some(r) = checked.gave_up {
        eprintln!("seed {}: linearizability check gave up: {r}", sim.seed());
    }
    Ok(checked.ops)
}
