//! The MapReduce coordinator: a sans-IO state machine ([`core`]), the event machine around it
//! ([`machine`]) that turns connections, wire messages and timer ticks into the core's inputs
//! and its outputs into actions — one `handle(event) -> actions` that every driver runs — and
//! the job's preparation and description ([`job`]).
//!
//! The drivers live elsewhere: the tokio one (real TCP, real files, the wall clock) in
//! `shoal_runtime::mr::coordinator`, the simulator's in `shoal-lab` (`shoal sim --workload mr`).

pub mod core;
pub mod job;
pub mod machine;

pub use self::core::{CommitError, Coordinator, CoordinatorConfig, Disposition, Output, WorkerId};
pub use self::job::{
    commit_error, describe_split, fetched_path, is_leftover_output, output_path, prepare_job,
    CoordinatorError, JobOptions, JobReport, PreparedJob, MAX_HEARTBEAT_INTERVAL,
};
pub use self::machine::{Action, ConnId, Event, JobEnd, JobMachine};
