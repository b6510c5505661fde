//! MapReduce (Dean & Ghemawat, OSDI 2004): apps, the map and reduce task engines with
//! sort/spill/merge, the coordinator (a sans-IO state machine), the shuffle's rules and the
//! status page.
//!
//! Two halves meet at a small interface: the *data path* (`app`, `apps`, `split`, `task`,
//! `seq`, `sortdata`) runs one task on local files and knows nothing of networks; the
//! *distribution* (`coordinator`, `shuffle`, `status`) decides what runs where, what may be
//! served and how the job looks, treating map output as opaque bytes.
//!
//! **What this crate must never do:** run an async runtime, open a socket or read the clock
//! (DESIGN.md §1). The drivers — the coordinator's TCP server and loop, the worker process,
//! the shuffle servers and fetchers, TLS, the status page's HTTP server and the worker's
//! metrics — are in `shoal_runtime::mr`; the simulator drives the same [`coordinator`] in
//! `shoal-lab`. (`cargo tree -p shoal-mr -e normal` shows no tokio or hyper.) Files it does
//! touch: the data path's inputs, spills and outputs, and the checks of a job's inputs and
//! output directory before it starts.

// --- data path -------------------------------------------------------------------------------
pub mod app;
pub mod apps;
pub mod seq;
pub mod sortdata;
pub mod split;
pub mod task;

// --- distribution ----------------------------------------------------------------------------
pub mod coordinator;
pub mod disk;
pub mod local;
pub mod shuffle;
pub mod status;
