//! The event trace: a running hash of every event (for determinism checks), a ring buffer
//! of the most recent events (for failure reports and `shoal sim`), and a summary of every
//! fault applied over the whole run ([`FaultSummary`]), which a short tail would miss.

use std::collections::{BTreeMap, VecDeque};
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

/// A kind of fault, or of repair, the simulator applied (by the nemesis or by a test).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// A node crashed.
    Crash,
    /// A crashed node booted again.
    Restart,
    /// Links were cut to a partition shape.
    Partition,
    /// Every link was reconnected.
    Heal,
    /// A node was paused (like SIGSTOP).
    Pause,
    /// A paused node was resumed.
    Resume,
    /// Every link's network model changed (delays, loss, duplication, reordering).
    NetChange,
    /// One directed link was cut, reconnected or given another network model.
    LinkChange,
}

impl FaultKind {
    /// A short lower-case name, as `shoal sim` prints it.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::Restart => "restart",
            FaultKind::Partition => "partition",
            FaultKind::Heal => "heal",
            FaultKind::Pause => "pause",
            FaultKind::Resume => "resume",
            FaultKind::NetChange => "net change",
            FaultKind::LinkChange => "link change",
        }
    }
}

/// One fault or repair, when and to what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Virtual time it was applied.
    pub at: SimTime,
    /// What it was.
    pub kind: FaultKind,
    /// What it concerned: a node (`n2`), a partition shape, a link; empty for cluster-wide ones.
    pub target: String,
}

/// How many faults of each kind a run applied, and the first few of each with their times.
///
/// Kept apart from the trace hash, so adding it changed no seed's hash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultSummary {
    counts: BTreeMap<FaultKind, u64>,
    first: BTreeMap<FaultKind, Vec<Fault>>,
}

impl FaultSummary {
    /// How many faults of each kind are kept with their times.
    pub const FIRST_KEPT: usize = 3;

    pub(crate) fn record(&mut self, at: SimTime, kind: FaultKind, target: String) {
        *self.counts.entry(kind).or_default() += 1;
        let first = self.first.entry(kind).or_default();
        if first.len() < Self::FIRST_KEPT {
            first.push(Fault { at, kind, target });
        }
    }

    /// How many faults of `kind` were applied.
    pub fn count(&self, kind: FaultKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// How many faults were applied in all.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The first [`FaultSummary::FIRST_KEPT`] faults of `kind`, in time order.
    pub fn first(&self, kind: FaultKind) -> &[Fault] {
        self.first.get(&kind).map_or(&[], Vec::as_slice)
    }

    /// Each kind that occurred with its count, in [`FaultKind`] order.
    pub fn counts(&self) -> impl Iterator<Item = (FaultKind, u64)> + '_ {
        self.counts.iter().map(|(&kind, &n)| (kind, n))
    }
}

/// One line per kind: `crash        4  1.200000s n2, 3.400000s n4, 7.000000s n1, ...`.
impl fmt::Display for FaultSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (kind, count) in self.counts() {
            write!(f, "  {:<12}{count:>5} ", kind.name())?;
            for (i, fault) in self.first(kind).iter().enumerate() {
                let sep = if i == 0 { " " } else { ", " };
                write!(f, "{sep}{}", fault.at)?;
                if !fault.target.is_empty() {
                    write!(f, " {}", fault.target)?;
                }
            }
            if count > self.first(kind).len() as u64 {
                write!(f, ", ...")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// The trace of one simulation.
pub(crate) struct Trace<M> {
    hash: u64,
    len: u64,
    tail: VecDeque<TraceEntry<M>>,
    tail_capacity: usize,
    keep_messages: bool,
    faults: FaultSummary,
}

impl<M: Clone> Trace<M> {
    pub(crate) fn new(tail_capacity: usize, keep_messages: bool) -> Self {
        Trace {
            hash: 0x5348_4f41_4c53_494d, // "SHOALSIM"
            len: 0,
            tail: VecDeque::with_capacity(tail_capacity.min(4096)),
            tail_capacity,
            keep_messages,
            faults: FaultSummary::default(),
        }
    }

    pub(crate) fn faults(&self) -> &FaultSummary {
        &self.faults
    }

    /// Counts a fault for [`FaultSummary`]; the event itself is recorded (and hashed) as before.
    pub(crate) fn record_fault(&mut self, at: SimTime, kind: FaultKind, target: String) {
        self.faults.record(at, kind, target);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_summary_counts_all_and_keeps_the_first_few() {
        let mut summary = FaultSummary::default();
        for i in 0..5u64 {
            summary.record(
                SimTime::from_nanos(i * 1_000_000_000),
                FaultKind::Crash,
                format!("n{i}"),
            );
        }
        summary.record(SimTime::from_nanos(7), FaultKind::Heal, String::new());
        assert_eq!(summary.count(FaultKind::Crash), 5);
        assert_eq!(summary.count(FaultKind::Pause), 0);
        assert_eq!(summary.total(), 6);
        assert_eq!(
            summary.first(FaultKind::Crash).len(),
            FaultSummary::FIRST_KEPT
        );
        assert_eq!(summary.first(FaultKind::Crash)[1].target, "n1");
        let text = summary.to_string();
        assert_eq!(
            text,
            "  crash           5  0.000000s n0, 1.000000s n1, 2.000000s n2, ...\n  heal            1  0.000000s\n"
        );
    }
}
