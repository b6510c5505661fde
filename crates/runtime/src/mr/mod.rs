//! MapReduce's drivers (DESIGN.md §1): the pure coordinator, data path and shuffle rules are
//! in `shoal_mr`; here is what runs them against the world.
//!
//! - [`coordinator`]: the coordinator's loop — a TCP (or TLS) server for workers, a timer, the
//!   commit of reduce outputs into the output directory — around `shoal_mr`'s `JobMachine`;
//! - [`worker`]: the worker process — registers, runs tasks on blocking threads while
//!   heartbeats continue, serves its output;
//! - [`shuffle`]: the shuffle's servers and fetchers (map outputs, reduce outputs, job inputs);
//! - [`status_http`]: where the status is published and the status page's HTTP server;
//! - [`net`]: dialling and accepting through one `Security` (plain TCP or mutual TLS);
//! - [`metrics`]: a worker's Prometheus metrics.

pub mod coordinator;
pub mod metrics;
pub mod net;
pub mod shuffle;
pub mod status_http;
pub mod worker;

pub use coordinator::{run_job, TICK_INTERVAL};
pub use status_http::{bind_status, serve_status, status_channel, StatusFeed, StatusPublisher};
pub use worker::{
    remove_dirs_of_dead_processes, run_worker, WorkerError, WorkerExit, WorkerOptions,
};
