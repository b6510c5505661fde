//! MapReduce (Dean & Ghemawat, OSDI 2004): apps, the map and reduce task engines with
//! sort/spill/merge, the coordinator (a sans-IO state machine), workers and the shuffle.
//!
//! Two halves meet at a small interface: the *data path* (`app`, `apps`, `split`, `task`,
//! `seq`, `sortdata`) runs one task on local files and knows nothing of networks; the *distribution*
//! (`coordinator`, `worker`, `shuffle`, `status`, `local`) schedules tasks over TCP and moves
//! the files, treating map output as opaque bytes.

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
pub mod metrics;
pub mod net;
pub mod shuffle;
pub mod status;
pub mod worker;
