//! The event trace: a running hash of every event (for determinism checks) and a ring buffer
//! of the most recent events (for failure reports and `shoal sim`).

use std::collections::VecDeque;
use std::fmt::{self, Debug, Write as _};

use crate::net::DropReason;
use crate::{NodeId, SimTime};

/// What happened in one trace event.
#[derive(Clone, Debug, PartialEq)]
pub enum TraceKind {
    /// The node booted (first start or restart) and ran `on_start`.
    Start {
        /// 0 for the first boot, then one more per crash.
        incarnation: u32,
    },
    /// The node crashed; `detail` says what its disk lost.
    Crash {
        /// What the crash did to the disk.
        detail: String,
    },
    /// The node sent a message that the network will deliver after `delay_nanos`
    /// (`copies` is 2 when it was duplicated).
    Send {
        /// Destination.
        to: NodeId,
        /// Frame bytes.
        bytes: u32,
        /// Delay of the first copy.
        delay_nanos: u64,
        /// 1, or 2 when duplicated.
        copies: u8,
    },
    /// The node's message was held behind its pending fsyncs ("persist is a barrier").
    Held {
        /// Destination.
        to: NodeId,
    },
    /// The node sent a message that the network dropped.
    Drop {
        /// Destination.
        to: NodeId,
        /// Why.
        reason: DropReason,
    },
    /// A message arrived and `on_message` ran.
    Deliver {
        /// Sender.
        from: NodeId,
        /// Frame bytes.
        bytes: u32,
    },
    /// A message arrived at a node that was down or had restarted since: discarded.
    DeliverDropped {
        /// Sender.
        from: NodeId,
        /// Why.
        reason: DropReason,
    },
    /// A timer fired and `on_timer` ran.
    Timer {
        /// The token the node gave.
        token: u64,
    },
    /// An fsync completed and `on_fsync_complete` ran.
    FsyncDone {
        /// Its id.
        fsync: u64,
    },
    /// A client invoked an operation (history).
    Invoke {
        /// Operation id.
        op: u64,
        /// `Debug` of the input.
        input: String,
    },
    /// A client's operation returned (history).
    Return {
        /// Operation id.
        op: u64,
        /// `Debug` of the output.
        output: String,
    },
    /// A fault or control action (partition, heal, net change, crash and restart requests).
    Control {
        /// Description.
        action: String,
    },
    /// A note from a node (`Ctx::note`) or a test (`Sim::note`).
    Note {
        /// The text.
        text: String,
    },
}

/// One recorded event.
#[derive(Clone, Debug)]
pub struct TraceEntry<M> {
    /// Position in the trace, from 0.
    pub index: u64,
    /// Virtual time.
    pub at: SimTime,
    /// The node it concerns (`NodeId::NONE` for cluster-wide control actions).
    pub node: NodeId,
    /// What happened.
    pub kind: TraceKind,
    /// The message of `Send`, `Held` and `Deliver` events, when the simulator keeps them.
    pub msg: Option<M>,
}

impl<M: Debug> fmt::Display for TraceEntry<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:>12}] #{:<7} {} ",
            self.at.to_string(),
            self.index,
            self.node
        )?;
        match &self.kind {
            TraceKind::Start { incarnation } => write!(f, "start (incarnation {incarnation})")?,
            TraceKind::Crash { detail } => write!(f, "CRASH ({detail})")?,
            TraceKind::Send {
                to,
                bytes,
                delay_nanos,
                copies,
            } => {
                write!(
                    f,
                    "-> {to} send {bytes}B delay {:.3}ms",
                    *delay_nanos as f64 / 1e6
                )?;
                if *copies > 1 {
                    write!(f, " DUPLICATED")?;
                }
            }
            TraceKind::Held { to } => write!(f, "-> {to} held until fsync")?,
            TraceKind::Drop { to, reason } => write!(f, "-> {to} DROPPED ({})", reason.as_str())?,
            TraceKind::Deliver { from, bytes } => write!(f, "<- {from} recv {bytes}B")?,
            TraceKind::DeliverDropped { from, reason } => {
                write!(f, "<- {from} DISCARDED ({})", reason.as_str())?
            }
            TraceKind::Timer { token } => write!(f, "timer {token}")?,
            TraceKind::FsyncDone { fsync } => write!(f, "fsync {fsync} done")?,
            TraceKind::Invoke { op, input } => write!(f, "invoke op {op}: {input}")?,
            TraceKind::Return { op, output } => write!(f, "return op {op}: {output}")?,
            TraceKind::Control { action } => write!(f, "nemesis/control: {action}")?,
            TraceKind::Note { text } => write!(f, "note: {text}")?,
        }
        if let Some(m) = &self.msg {
            write!(f, " {m:?}")?;
        }
        Ok(())
    }
}

/// A 64-bit mixing step (the SplitMix64 finaliser): cheap, and every input bit affects
/// every output bit.
#[inline]
pub(crate) fn mix(h: u64, x: u64) -> u64 {
    let mut z = h.wrapping_add(x).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn mix_str(mut h: u64, s: &str) -> u64 {
    for chunk in s.as_bytes().chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix(h, u64::from_le_bytes(word));
    }
    mix(h, s.len() as u64)
}

/// The trace of one simulation.
pub(crate) struct Trace<M> {
    hash: u64,
    len: u64,
    tail: VecDeque<TraceEntry<M>>,
    tail_capacity: usize,
    keep_messages: bool,
}

impl<M: Clone> Trace<M> {
    pub(crate) fn new(tail_capacity: usize, keep_messages: bool) -> Self {
        Trace {
            hash: 0x5348_4f41_4c53_494d, // "SHOALSIM"
            len: 0,
            tail: VecDeque::with_capacity(tail_capacity.min(4096)),
            tail_capacity,
            keep_messages,
        }
    }

    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn tail(&self) -> &VecDeque<TraceEntry<M>> {
        &self.tail
    }

    /// Records an event. `msg_hash` is the CRC32C of the message's encoded bytes (0 if none),
    /// so the trace hash covers message contents without formatting them.
    #[inline]
    pub(crate) fn record(
        &mut self,
        at: SimTime,
        node: NodeId,
        kind: TraceKind,
        msg_hash: u32,
        msg: Option<&M>,
    ) {
        let mut h = mix(self.hash, at.as_nanos());
        h = mix(h, u64::from(node.0));
        h = match &kind {
            TraceKind::Start { incarnation } => mix(mix(h, 1), u64::from(*incarnation)),
            TraceKind::Crash { detail } => mix_str(mix(h, 2), detail),
            TraceKind::Send {
                to,
                bytes,
                delay_nanos,
                copies,
            } => mix(
                mix(
                    mix(mix(h, 3), u64::from(to.0) << 32 | u64::from(*bytes)),
                    *delay_nanos,
                ),
                u64::from(*copies),
            ),
            TraceKind::Held { to } => mix(mix(h, 4), u64::from(to.0)),
            TraceKind::Drop { to, reason } => mix(mix(mix(h, 5), u64::from(to.0)), *reason as u64),
            TraceKind::Deliver { from, bytes } => {
                mix(mix(h, 6), u64::from(from.0) << 32 | u64::from(*bytes))
            }
            TraceKind::DeliverDropped { from, reason } => {
                mix(mix(mix(h, 7), u64::from(from.0)), *reason as u64)
            }
            TraceKind::Timer { token } => mix(mix(h, 8), *token),
            TraceKind::FsyncDone { fsync } => mix(mix(h, 9), *fsync),
            TraceKind::Invoke { op, input } => mix_str(mix(mix(h, 10), *op), input),
            TraceKind::Return { op, output } => mix_str(mix(mix(h, 11), *op), output),
            TraceKind::Control { action } => mix_str(mix(h, 12), action),
            TraceKind::Note { text } => mix_str(mix(h, 13), text),
        };
        self.hash = mix(h, u64::from(msg_hash));
        if self.tail_capacity > 0 {
            if self.tail.len() == self.tail_capacity {
                self.tail.pop_front();
            }
            self.tail.push_back(TraceEntry {
                index: self.len,
                at,
                node,
                kind,
                msg: if self.keep_messages {
                    msg.cloned()
                } else {
                    None
                },
            });
        }
        self.len += 1;
    }
}

/// Formats the last `n` entries of `entries`, one per line.
pub(crate) fn format_tail<M: Debug>(entries: &VecDeque<TraceEntry<M>>, n: usize) -> String {
    let mut out = String::new();
    let skip = entries.len().saturating_sub(n);
    for e in entries.iter().skip(skip) {
        let _ = writeln!(out, "{e}");
    }
    out
}
