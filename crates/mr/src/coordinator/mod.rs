//! The MapReduce coordinator: a sans-IO state machine ([`core`]) and its tokio driver
//! ([`run_job`]): a TCP server for workers, a timer, and the commit of reduce outputs.
//! Between them, [`machine`] turns connections, wire messages and timer ticks into the core's
//! inputs and its outputs into actions: one `handle(event) -> actions` that every driver (the
//! tokio one here, the simulator's in `shoal-lab`) runs.

pub mod core;
mod driver;
pub mod machine;

pub use self::core::{CommitError, Coordinator, CoordinatorConfig, Disposition, Output, WorkerId};
pub use self::machine::{Action, ConnId, Event, JobEnd, JobMachine};
pub use driver::{
    prepare_job, run_job, CoordinatorError, JobOptions, JobReport, PreparedJob, TICK_INTERVAL,
};
