//! The network model: per directed link loss, delay (with a long tail that reorders),
//! duplication and connectivity, plus per-link and per-node counters.

use std::fmt;
use std::time::Duration;

use rand::Rng;

/// How long a message spends in flight before any long-delay tail is added.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Delay {
    /// Always exactly this long.
    Fixed(Duration),
    /// Uniform in `[min, max)` (exactly `min` if `max <= min`), with nanosecond resolution.
    Uniform {
        /// Shortest delay.
        min: Duration,
        /// Upper bound (exclusive).
        max: Duration,
    },
}

/// A long-delay tail: with `probability`, a message is held an extra
/// `base + U[0, 1 + U[0, max_extra))` — the lab's "long reordering" shape, which makes late
/// messages overtake many later ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LongDelay {
    /// Chance in `[0, 1]` that a message gets the tail.
    pub probability: f64,
    /// Fixed part of the extra delay.
    pub base: Duration,
    /// Bound of the nested uniform part of the extra delay.
    pub max_extra: Duration,
}

/// The behaviour of one directed link (or the default for all links).
///
/// Loss and duplication are per message: like the lab's network, the simulator cannot tell
/// a request from a reply, so both directions use their own link's probabilities.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NetConfig {
    /// Chance in `[0, 1]` that a message is dropped.
    pub loss_probability: f64,
    /// Chance in `[0, 1]` that a message that is not dropped is delivered twice (each copy
    /// gets its own delay).
    pub duplicate_probability: f64,
    /// Base delay of every message.
    pub delay: Delay,
    /// Optional long-delay tail added on top of `delay`.
    pub long_delay: Option<LongDelay>,
}

/// The lab's unreliable delay bound: U[0, 27) ms.
pub const UNRELIABLE_MAX_DELAY: Duration = Duration::from_millis(27);
/// The lab's unreliable loss probability (per message).
pub const UNRELIABLE_LOSS_PROBABILITY: f64 = 0.1;
/// The lab's long-reordering probability: 600/900.
pub const LONG_REORDER_PROBABILITY: f64 = 600.0 / 900.0;
/// The lab's long-reordering fixed extra delay.
pub const LONG_REORDER_BASE: Duration = Duration::from_millis(200);
/// The lab's long-reordering nested uniform bound.
pub const LONG_REORDER_MAX_EXTRA: Duration = Duration::from_millis(2_000);
/// Delay bound of the reliable preset: messages arrive within U[0, 1) ms, in order per link
/// only by chance.
pub const RELIABLE_MAX_DELAY: Duration = Duration::from_millis(1);

impl NetConfig {
    /// No loss, no duplication, delay U[0, 1) ms.
    pub fn reliable() -> Self {
        NetConfig {
            loss_probability: 0.0,
            duplicate_probability: 0.0,
            delay: Delay::Uniform {
                min: Duration::ZERO,
                max: RELIABLE_MAX_DELAY,
            },
            long_delay: None,
        }
    }

    /// The lab's unreliable network: delay U[0, 27) ms and 10% loss per message (which covers
    /// both the lab's request loss and its reply loss, since replies are messages too).
    pub fn unreliable() -> Self {
        NetConfig {
            loss_probability: UNRELIABLE_LOSS_PROBABILITY,
            duplicate_probability: 0.0,
            delay: Delay::Uniform {
                min: Duration::ZERO,
                max: UNRELIABLE_MAX_DELAY,
            },
            long_delay: None,
        }
    }

    /// Adds the lab's long reordering to `self`: with p = 600/900 a message is delayed an
    /// extra 200 + U[0, 1 + U[0, 2000)) ms.
    pub fn with_long_reordering(mut self) -> Self {
        self.long_delay = Some(LongDelay {
            probability: LONG_REORDER_PROBABILITY,
            base: LONG_REORDER_BASE,
            max_extra: LONG_REORDER_MAX_EXTRA,
        });
        self
    }

    /// `self` with the given per-message loss probability.
    pub fn with_loss(mut self, loss_probability: f64) -> Self {
        self.loss_probability = loss_probability;
        self
    }

    /// `self` with the given per-message duplication probability.
    pub fn with_duplication(mut self, duplicate_probability: f64) -> Self {
        self.duplicate_probability = duplicate_probability;
        self
    }

    /// `self` with the given base delay.
    pub fn with_delay(mut self, delay: Delay) -> Self {
        self.delay = delay;
        self
    }

    /// The largest delay this configuration can produce.
    pub fn max_delay(&self) -> Duration {
        let base = match self.delay {
            Delay::Fixed(d) => d,
            Delay::Uniform { min, max } => min.max(max),
        };
        match self.long_delay {
            Some(tail) => base + tail.base + tail.max_extra + Duration::from_millis(1),
            None => base,
        }
    }

    /// Samples one delay in nanoseconds.
    pub(crate) fn sample_delay_nanos<R: Rng>(&self, rng: &mut R) -> u64 {
        let mut nanos = match self.delay {
            Delay::Fixed(d) => crate::time::duration_nanos(d),
            Delay::Uniform { min, max } => {
                let lo = crate::time::duration_nanos(min);
                let hi = crate::time::duration_nanos(max);
                if hi > lo {
                    rng.gen_range(lo..hi)
                } else {
                    lo
                }
            }
        };
        if let Some(tail) = self.long_delay {
            if chance(rng, tail.probability) {
                let extra_bound = crate::time::duration_nanos(tail.max_extra);
                let inner = if extra_bound > 0 {
                    rng.gen_range(0..extra_bound)
                } else {
                    0
                };
                // 1 + U[0, max_extra) in the lab is in milliseconds: keep that 1 ms.
                let outer = rng.gen_range(0..inner + 1_000_000);
                nanos = nanos
                    .saturating_add(crate::time::duration_nanos(tail.base))
                    .saturating_add(outer);
            }
        }
        nanos
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::reliable()
    }
}

/// True with probability `p` (clamped to `[0, 1]`); draws nothing when `p` is 0 or 1, so a
/// reliable network consumes no randomness.
pub(crate) fn chance<R: Rng>(rng: &mut R, p: f64) -> bool {
    if p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        rng.gen::<f64>() < p
    }
}

/// Why the network did not deliver a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The link was cut by a partition when the message was sent.
    Partitioned,
    /// The message was lost at random (`loss_probability`).
    Lost,
    /// The destination was down when the message was sent or when it arrived, or it
    /// restarted while the message was in flight (its connections were reset).
    DestinationDown,
    /// No node has that id.
    UnknownDestination,
    /// The message could not be encoded as a frame (too large or unserializable).
    EncodeFailed,
    /// The sender crashed while the message was held behind an fsync barrier.
    SenderCrashed,
    /// The test's message filter ([`crate::Sim::set_message_filter`]) rejected it.
    Filtered,
}

impl DropReason {
    /// Short lower-case name for traces.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Partitioned => "partitioned",
            DropReason::Lost => "lost",
            DropReason::DestinationDown => "destination down",
            DropReason::UnknownDestination => "unknown destination",
            DropReason::EncodeFailed => "encode failed",
            DropReason::SenderCrashed => "sender crashed",
            DropReason::Filtered => "filtered by the test",
        }
    }
}

/// Counters of one directed link. Bytes are frame bytes: exactly what the TCP transport
/// would write (header + postcard payload).
///
/// Like the lab, a message counts as sent as soon as it enters the network, even if the link
/// is cut or the message is then lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Messages sent on the link.
    pub msgs_sent: u64,
    /// Frame bytes sent on the link.
    pub bytes_sent: u64,
    /// Messages handed to the destination (duplicates count twice).
    pub msgs_delivered: u64,
    /// Frame bytes handed to the destination.
    pub bytes_delivered: u64,
    /// Messages dropped (partition, loss, destination down).
    pub msgs_dropped: u64,
    /// Extra copies created by duplication.
    pub msgs_duplicated: u64,
}

impl LinkStats {
    pub(crate) fn add(&mut self, other: &LinkStats) {
        self.msgs_sent += other.msgs_sent;
        self.bytes_sent += other.bytes_sent;
        self.msgs_delivered += other.msgs_delivered;
        self.bytes_delivered += other.bytes_delivered;
        self.msgs_dropped += other.msgs_dropped;
        self.msgs_duplicated += other.msgs_duplicated;
    }
}

/// Counters of one node, summed over its links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Totals over the node's outgoing links.
    pub outgoing: LinkStats,
    /// Totals over the node's incoming links.
    pub incoming: LinkStats,
}

/// One partition shape, applied with [`crate::Sim::apply_partition`].
///
/// Links between nodes named in the shape are set as it says; links touching any node it does
/// not name (clients, say) are left as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partition {
    /// Cut every link to and from this node (all other nodes, named or not).
    Isolate(crate::NodeId),
    /// Two nodes can talk iff some group contains both. Overlapping groups express a bridge
    /// (`[[a, b, x], [x, c, d]]`: `x` talks to all, the sides only through `x`).
    Groups(Vec<Vec<crate::NodeId>>),
    /// A ring: each node talks only to its two neighbours in the list (which wraps around).
    Ring(Vec<crate::NodeId>),
    /// Cut only the directed link `from -> to` (an asymmetric fault).
    OneWay {
        /// Sender side of the cut link.
        from: crate::NodeId,
        /// Receiver side of the cut link.
        to: crate::NodeId,
    },
}

/// Short and readable: `isolate n3`, `n0 n1 | n2 n3 n4`, `ring n0 n2 n1 n3`, `cut n1->n2`.
impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes = |ids: &[crate::NodeId]| {
            ids.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            Partition::Isolate(id) => write!(f, "isolate {id}"),
            Partition::Groups(groups) => {
                let groups: Vec<String> = groups.iter().map(|g| nodes(g)).collect();
                write!(f, "{}", groups.join(" | "))
            }
            Partition::Ring(ring) => write!(f, "ring {}", nodes(ring)),
            Partition::OneWay { from, to } => write!(f, "cut {from}->{to}"),
        }
    }
}

impl Partition {
    /// Majority/minority split (or any two-way split): `a` and `b` cannot talk across.
    pub fn split(a: &[crate::NodeId], b: &[crate::NodeId]) -> Self {
        Partition::Groups(vec![a.to_vec(), b.to_vec()])
    }

    /// `left` and `right` can only reach each other through `bridge`, which talks to all.
    pub fn bridge(left: &[crate::NodeId], bridge: crate::NodeId, right: &[crate::NodeId]) -> Self {
        let mut l = left.to_vec();
        l.push(bridge);
        let mut r = right.to_vec();
        r.push(bridge);
        Partition::Groups(vec![l, r])
    }
}
