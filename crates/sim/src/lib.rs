//! Shoal's deterministic simulator.
//!
//! **Owns:** the virtual clock and event queue; the seeded randomness every run draws from;
//! the simulated network (per-link loss, delay with long-delay tails, duplication,
//! partitions of any shape, counters of messages and bytes); the simulated disks (a small
//! file-system API with fsync, directory fsync and precise crash damage); crash and restart
//! of nodes; client history recording; the nemesis; and the seed harness that replays a
//! failing seed.
//!
//! **Must never:** read the wall clock, use a non-seeded RNG, iterate a randomly seeded hash
//! map, spawn threads or tasks, or touch real files and sockets: a seed must replay a run
//! event for event. It knows no protocol: nodes are sans-IO state machines implementing
//! [`Node`] over one message type `M`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use shoal_sim::{Ctx, NetConfig, Node, NodeId, Sim, SimConfig};
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! enum Msg { Ping(u64), Pong(u64) }
//!
//! struct Pinger { pongs: u64 }
//!
//! impl Node<Msg> for Pinger {
//!     fn on_start(&mut self, ctx: &mut Ctx<'_, Msg>) {
//!         ctx.set_timer(Duration::from_millis(50), 0);
//!     }
//!     fn on_message(&mut self, ctx: &mut Ctx<'_, Msg>, from: NodeId, msg: Msg) {
//!         match msg {
//!             Msg::Ping(n) => ctx.send(from, Msg::Pong(n)),
//!             Msg::Pong(_) => self.pongs += 1,
//!         }
//!     }
//!     fn on_timer(&mut self, ctx: &mut Ctx<'_, Msg>, _token: u64) {
//!         let other = NodeId(1 - ctx.id().0);
//!         ctx.send(other, Msg::Ping(ctx.now().as_millis()));
//!         ctx.set_timer(Duration::from_millis(50), 0);
//!     }
//! }
//!
//! let run = |seed| {
//!     let mut sim = Sim::new(seed, SimConfig { net: NetConfig::unreliable(), ..SimConfig::default() });
//!     let a = sim.add_node(|_| Pinger { pongs: 0 });
//!     let _b = sim.add_node(|_| Pinger { pongs: 0 });
//!     sim.run_for(Duration::from_secs(10));
//!     assert!(sim.node::<Pinger>(a).map_or(0, |p| p.pongs) > 100);
//!     sim.trace_hash()
//! };
//! assert_eq!(run(7), run(7)); // same seed, same run
//! assert_ne!(run(7), run(8));
//! ```
//!
//! See `docs/simulator.md` for the model, the fault semantics and how to replay a seed.

#![warn(missing_docs)]

mod disk;
pub mod harness;
mod history;
mod nemesis;
mod net;
pub mod scenarios;
mod sim;
mod time;
mod trace;

pub use disk::{
    CrashPolicy, DiskError, SimDisk, MAX_FILE_BYTES, MAX_FILE_NAME_BYTES, SECTOR_BYTES,
};
pub use harness::{
    format_failure_report, run_seeds, take_panic_trace, try_run_seeds, Failure, TestId,
};
pub use history::{HistoryError, OpId, Operation};
pub use nemesis::{
    random_net, random_partition, NemesisConfig, DEFAULT_NEMESIS_MAX_INTERVAL,
    DEFAULT_NEMESIS_MIN_INTERVAL, NEMESIS_DUPLICATE_PROBABILITY,
};
pub use net::{
    Delay, DropReason, LinkStats, LongDelay, NetConfig, NodeStats, Partition, LONG_REORDER_BASE,
    LONG_REORDER_MAX_EXTRA, LONG_REORDER_PROBABILITY, RELIABLE_MAX_DELAY,
    UNRELIABLE_LOSS_PROBABILITY, UNRELIABLE_MAX_DELAY,
};
pub use sim::{
    Control, Ctx, FsyncId, Message, MessageFilter, Node, NodeId, Sim, SimConfig, SimError, TimerId,
    DEFAULT_FSYNC_MAX, DEFAULT_FSYNC_MIN, DEFAULT_TRACE_TAIL_LEN,
};
pub use time::SimTime;
pub use trace::{Fault, FaultKind, FaultSummary, TraceEntry, TraceKind};

/// Re-exported so nodes can name the type of [`Ctx::rng`] and use its traits.
pub use rand;
pub use rand_chacha::ChaCha8Rng;
