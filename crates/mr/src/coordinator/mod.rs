//! The MapReduce coordinator: a sans-IO state machine ([`core`]) and its tokio driver
//! ([`run_job`]): a TCP server for workers, a timer, and the commit of reduce outputs.

pub mod core;
mod driver;

pub use self::core::{CommitError, Coordinator, CoordinatorConfig, Disposition, Output, WorkerId};
pub use driver::{
    prepare_job, run_job, CoordinatorError, JobOptions, JobReport, PreparedJob, TICK_INTERVAL,
};
