//! Shoal's tokio runtime: the driver that runs the sans-IO protocols (DESIGN.md §1) against the
//! real world — TCP sockets, the wall clock, files.
//!
//! **What this crate owns:** the [`transport`] (one listener per node for peers and clients,
//! one outbound connection per peer with jittered exponential backoff, bounded per-peer
//! queues, batched writes, handshake validation); the one tokio driver of a replica shell
//! (`shoal_replica::Replica`, in the private `driver` module: ticker, batching of events per
//! `Ready`, the shell's pipeline with its durability barrier, snapshot jobs on a thread of
//! their own), on which run the generic Raft [`node`] (proposals, reads, clean shutdown) and
//! the [`kv`] server and the [`shard`] group server; the demo replicated log behind `shoal raft node`;
//! and MapReduce's drivers ([`mr`]: the coordinator loop around `shoal_mr`'s event machine, the
//! worker, the shuffle servers and fetchers, the status page's HTTP server).
//!
//! **What it must never do:** contain protocol logic (a decision about terms, logs or votes
//! belongs in the protocol crates, where the simulator can test it), send a message that
//! depends on state before that state is durable, panic or corrupt state on bad input from the
//! network, or grow any buffer without a bound. The clock is read only here, in the items that
//! say so.

#![warn(missing_docs)]

pub mod demo;
pub mod demo_node;
mod driver;
pub mod kv;
pub mod metrics;
pub mod mr;
pub mod node;
mod ready;
mod serving;
pub mod shard;
pub mod snapshot_stream;
/// TLS for every connection: the `shoal-tls` crate (shared with MapReduce).
pub use shoal_tls as tls;
pub mod transport;

pub use driver::{DEFAULT_TICK_INTERVAL, MAX_EVENTS_PER_READY};
pub use node::{Node, NodeConfig, NodeError, NodeHandle, ProposeError, Proposed, StateMachine};
pub use ready::error_chain;

pub use transport::{
    connect_client, ClientAcceptor, ClientConnection, DropPolicy, Inbound, Transport,
    TransportConfig, TransportError, TransportStats,
};
