//! Messages of the sharded key/value database (`shoal-shard`): a client's request to the
//! replica group that serves a key's shard, and that group's reply.
//!
//! The operations and their outcomes are the KV database's own ([`KvOp`], [`KvResult`]):
//! a group runs one KV state machine per shard it serves. A request also names the shard
//! (the client computes it from the key) and the configuration number the client routed
//! it with, so a group that does not (or no longer) serve the shard answers
//! [`ShardReply::WrongGroup`] with its own configuration number, telling the client to ask
//! the controller for a newer configuration.

use serde::{Deserialize, Serialize};

use crate::kv::{KvOp, KvResult};
use crate::parts::InParts;

/// A client's request to a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRequest {
    /// Writes: the session id from [`KvResult::Registered`] (sessions are per shard, and move
    /// with it). Reads and [`KvOp::Register`]: any id the client picks to recognise the reply.
    pub client: u64,
    /// Increases with each new operation of the client; retries reuse it.
    pub request: u64,
    /// The shard the key belongs to.
    pub shard: u32,
    /// The number of the configuration the client routed the request with (its cached one).
    pub config: u64,
    /// What to do.
    pub op: KvOp,
    /// Reads only: answer from this server's state without confirming leadership (may be
    /// stale; never for writes).
    pub serializable: bool,
}

/// A group server's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardReply {
    /// The operation was decided.
    Done {
        /// Echo of the request's client.
        client: u64,
        /// Echo of the request id.
        request: u64,
        /// The outcome.
        result: KvResult,
    },
    /// This group does not serve the shard (never did, has not received it yet, or handed it
    /// over): nothing was done. The client fetches a configuration newer than `config`.
    WrongGroup {
        /// Echo of the request's client.
        client: u64,
        /// Echo of the request id.
        request: u64,
        /// The configuration number the group is at.
        config: u64,
    },
    /// This server is not the group's leader (or lost leadership before the request was
    /// decided: a write may still have applied). `leader` is a hint where to go.
    WrongLeader {
        /// Echo of the request's client.
        client: u64,
        /// Echo of the request id.
        request: u64,
        /// The leader this server knows of (a server id), if any.
        leader: Option<u64>,
    },
}

impl ShardReply {
    /// The (client, request) the reply answers.
    pub fn ids(&self) -> (u64, u64) {
        match self {
            ShardReply::Done {
                client, request, ..
            }
            | ShardReply::WrongGroup {
                client, request, ..
            }
            | ShardReply::WrongLeader {
                client, request, ..
            } => (*client, *request),
        }
    }
}

/// What the shard controller asks of a group (through the group's Raft log, except
/// [`ControlOp::Export`] and [`ControlOp::Adopted`], which are reads). Every step names the
/// configuration it belongs to and is idempotent: a replay answers
/// [`ControlStatus::AlreadyDone`], an older number [`ControlStatus::Stale`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlOp {
    /// Learn the next configuration (its encoding, `shoal_shard::Config::encode`). A group
    /// adopts configurations one number at a time, in order.
    Adopt {
        /// The encoded configuration.
        #[serde(with = "serde_bytes")]
        config: Vec<u8>,
    },
    /// Stop serving `shard` (old owner) as of configuration `config`.
    Freeze {
        /// The shard.
        shard: u32,
        /// The configuration that moves it away.
        config: u64,
    },
    /// Read the shard frozen at `config` (a linearizable read at the old owner's leader).
    Export {
        /// The shard.
        shard: u32,
        /// The configuration it was frozen at.
        config: u64,
    },
    /// Serve `shard` from `data` (the export) as of configuration `config` (new owner).
    Install {
        /// The shard.
        shard: u32,
        /// The configuration that moves it here.
        config: u64,
        /// The old owner's export of the shard frozen at `config`.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Drop the frozen copy of `shard` (old owner), once installed at the new owner.
    Delete {
        /// The shard.
        shard: u32,
        /// The configuration it was frozen at.
        config: u64,
    },
    /// Which configuration has the group adopted? (Answered by the leader from its applied
    /// state, with no log entry: the number only grows, so a stale answer is merely low.)
    Adopted,
    /// Read a bounded chunk of the shard frozen at `config` (old owner, a linearizable read):
    /// its keys after `after` in order, up to about `max_bytes`; answered
    /// [`ControlReply::Chunk`]. The chunks are [`ControlOp::Stage`]d at the new owner, and the
    /// last one carries the tail for its [`ControlOp::Install`].
    ExportChunk {
        /// The shard.
        shard: u32,
        /// The configuration it was frozen at.
        config: u64,
        /// The last key of the previous chunk (`None`: from the first key).
        #[serde(with = "serde_bytes")]
        after: Option<Vec<u8>>,
        /// About how many bytes of keys and values to send (at least one key is sent).
        max_bytes: u64,
    },
    /// New owner: write a chunk of the shard moving here at `config` into its staging store
    /// (not served; the shard is served from it once installed).
    Stage {
        /// The shard.
        shard: u32,
        /// The configuration that moves it here.
        config: u64,
        /// The keys, values and versions (from [`ControlReply::Chunk`]).
        items: Vec<CopiedItem>,
    },
    /// Old owner, before it adopts `config`: start recording which keys of `shard` are
    /// written from now on, so that the shard can be copied in chunks while it still serves
    /// ([`ControlOp::ExportChunk`] then reads the live shard) and only the keys written since
    /// travel after the freeze, in the tail. Idempotent; refused once the group has adopted
    /// `config` (the shard is then copied frozen). New variants are appended after the
    /// others: older frames keep their bytes.
    CopyStart {
        /// The shard.
        shard: u32,
        /// The configuration that moves it away.
        config: u64,
    },
    /// Old owner, while `shard` is still copied live for `config`: a **delta round**. The
    /// keys of the previous round (round - 1) are staged at the new owner (acknowledged), and
    /// the keys written since that round began become round `round`'s, to be read with
    /// [`ControlOp::ExportDelta`]; recording starts afresh. Idempotent by `round` (a replay
    /// answers [`ControlStatus::AlreadyDone`]); refused once the group adopted `config`.
    CopyRound {
        /// The shard.
        shard: u32,
        /// The configuration that moves it away.
        config: u64,
        /// The round to start (1, 2, …: one more than the last).
        round: u32,
    },
    /// Old owner: read a bounded chunk of the current delta round of `shard` copied live for
    /// `config` (a linearizable read): its keys after `after` with their values now, or their
    /// absence; answered [`ControlReply::Delta`].
    ExportDelta {
        /// The shard.
        shard: u32,
        /// The configuration that moves it away.
        config: u64,
        /// The last key of the previous chunk (`None`: from the first key).
        #[serde(with = "serde_bytes")]
        after: Option<Vec<u8>>,
        /// About how many bytes of keys and values to send (at least one key is sent).
        max_bytes: u64,
    },
    /// New owner: [`ControlOp::Stage`] of a chunk read in copy round `round` (0: the live
    /// copy, 1…: delta rounds, [`FROZEN_ROUND`]: the frozen shard), also removing the `absent`
    /// keys. A stage of a round older than one already staged is ignored (its values may be
    /// older than the newer round's).
    StageRound {
        /// The shard.
        shard: u32,
        /// The configuration that moves it here.
        config: u64,
        /// The round the chunk was read in.
        round: u32,
        /// Keys with their values and versions.
        items: Vec<CopiedItem>,
        /// Keys absent when the chunk was read.
        absent: Vec<Vec<u8>>,
    },
    /// How many shards does this server's group have? (Answered by any server, leader or not,
    /// from its data directory's shard count: [`ControlReply::Shards`].) A join checks it
    /// before recording a configuration the group would refuse.
    Shards,
}

/// The copy round of chunks read from a frozen shard: they hold its final values, so they are
/// staged whatever round came before, and no live or delta round is staged after them.
pub const FROZEN_ROUND: u32 = u32::MAX;

/// A chunk of a delta round, the answer to [`ControlOp::ExportDelta`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaChunk {
    /// The old owner's current round (the chunk belongs to it; it may be past the one the
    /// controller asked for, when an earlier controller went further).
    pub round: u32,
    /// The round's keys present, after the request's `after`, in order.
    pub items: Vec<CopiedItem>,
    /// The round's keys absent now, in order.
    pub absent: Vec<Vec<u8>>,
    /// No key of the round comes after this chunk's.
    pub last: bool,
}

impl DeltaChunk {
    /// The greatest key the chunk covers (the next chunk starts after it).
    pub fn last_key(&self) -> Option<&[u8]> {
        let a = self.items.last().map(|i| i.key.as_slice());
        let b = self.absent.last().map(|k| k.as_slice());
        a.max(b)
    }

    /// Bytes of keys and values the chunk carries.
    pub fn bytes(&self) -> u64 {
        let items: usize = self.items.iter().map(|i| i.key.len() + i.value.len()).sum();
        let absent: usize = self.absent.iter().map(|k| k.len()).sum();
        (items + absent) as u64
    }
}

/// One key of a shard being copied, with its value and version: the same record (and
/// encoding) as a scan's answer.
pub type CopiedItem = crate::kv::ScanItem;

/// A chunk of a frozen shard, the answer to [`ControlOp::ExportChunk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardChunk {
    /// Keys in order, after the request's `after`.
    pub items: Vec<CopiedItem>,
    /// On the last chunk only: the data of the [`ControlOp::Install`] that serves the staged
    /// shard (its session table, its position counter, and how many keys and bytes the
    /// staged copy must hold).
    #[serde(with = "serde_bytes")]
    pub tail: Option<Vec<u8>>,
}

/// A request from the controller to one server of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// Chosen by the controller to match the reply; echoed.
    pub tag: u64,
    /// The group the controller believes this server belongs to: a server of another group
    /// answers [`ControlReply::WrongGid`] and does nothing.
    pub gid: u64,
    /// What to do.
    pub op: ControlOp,
}

/// What a control entry did at the group (`shoal_shard::ControlOutcome` on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlStatus {
    /// The entry changed the group's state.
    Applied,
    /// Its effect already held (a replay): nothing changed.
    AlreadyDone,
    /// Older than what the shard (or group) has seen: ignored.
    Stale {
        /// The newer number it is at.
        seen: u64,
    },
    /// It does not fit the state; nothing changed.
    Refused {
        /// Why, for a person.
        reason: String,
    },
}

/// A group server's answer to a [`ControlRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// A log step (Adopt, Freeze, Install, Delete) was decided.
    Done {
        /// Echo.
        tag: u64,
        /// What it did.
        status: ControlStatus,
        /// The configuration the group has adopted, after it.
        adopted: u64,
    },
    /// The export: the shard's bytes, or `None` when the group does not hold the shard frozen
    /// at that configuration (not frozen yet, or deleted already).
    Exported {
        /// Echo.
        tag: u64,
        /// The bytes to [`ControlOp::Install`].
        #[serde(with = "serde_bytes")]
        data: Option<Vec<u8>>,
        /// The configuration the group has adopted.
        adopted: u64,
    },
    /// Answer to [`ControlOp::Adopted`].
    Adopted {
        /// Echo.
        tag: u64,
        /// The configuration the group has adopted.
        adopted: u64,
    },
    /// Not the leader (or it lost leadership before the outcome was known; a step may still
    /// have applied: steps are idempotent, retry).
    NotLeader {
        /// Echo.
        tag: u64,
        /// A hint: the leader's server id, if known.
        leader: Option<u64>,
    },
    /// This server is not in group `gid` of the request; nothing was done.
    WrongGid {
        /// Echo.
        tag: u64,
        /// The server's own gid.
        gid: u64,
    },
    /// The request cannot be carried out (for example an Adopt whose bytes do not decode).
    Invalid {
        /// Echo.
        tag: u64,
        /// Why, for a person.
        reason: String,
    },
    /// Answer to [`ControlOp::ExportChunk`]: the chunk, or `None` when the group does not
    /// hold the shard frozen at that configuration (not frozen yet, or deleted already).
    Chunk {
        /// Echo.
        tag: u64,
        /// The chunk.
        chunk: Option<ShardChunk>,
        /// The configuration the group has adopted.
        adopted: u64,
    },
    /// Answer to [`ControlOp::Shards`].
    Shards {
        /// Echo.
        tag: u64,
        /// The group's shard count.
        shards: u32,
    },
    /// Answer to [`ControlOp::ExportDelta`]: the chunk, or `None` when the shard is not (or
    /// no longer) copied live for that configuration here.
    Delta {
        /// Echo.
        tag: u64,
        /// The chunk.
        chunk: Option<DeltaChunk>,
        /// The configuration the group has adopted.
        adopted: u64,
    },
}

impl ControlReply {
    /// The tag the reply answers.
    pub fn tag(&self) -> u64 {
        match self {
            ControlReply::Done { tag, .. }
            | ControlReply::Exported { tag, .. }
            | ControlReply::Adopted { tag, .. }
            | ControlReply::NotLeader { tag, .. }
            | ControlReply::WrongGid { tag, .. }
            | ControlReply::Invalid { tag, .. }
            | ControlReply::Chunk { tag, .. }
            | ControlReply::Shards { tag, .. }
            | ControlReply::Delta { tag, .. } => *tag,
        }
    }
}

/// Everything a client or the shard controller sends a group server on one client connection
/// (after a `Client` [`crate::Hello`]). Versioned by the handshake's
/// [`crate::PROTOCOL_VERSION`]; new kinds are appended as new variants (postcard encodes the
/// variant index), so an older server reads a newer kind as a malformed frame, which it
/// answers with a [`crate::Refusal`] naming the problem before it closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToGroup {
    /// A client's key/value request, answered [`FromGroup::Reply`].
    Request(ShardRequest),
    /// A migration step or query from the controller, answered [`FromGroup::Control`].
    Control(ControlRequest),
    /// A piece of the postcard encoding of one `ToGroup` too large for one frame (an
    /// [`ControlOp::Install`] of a large shard); `last` on the final piece. See
    /// [`crate::parts`]: a reader reassembles the pieces, and never answers a part itself.
    Part {
        /// Whether this is the final piece.
        last: bool,
        /// The piece.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// The index of [`ToGroup::Part`] and [`FromGroup::Part`] among their enums' variants.
const PART_VARIANT: u32 = 2;

impl InParts for ToGroup {
    const PART_VARIANT: Option<u32> = Some(PART_VARIANT);

    fn into_part(self) -> Result<(bool, Vec<u8>), ToGroup> {
        match self {
            ToGroup::Part { last, bytes } => Ok((last, bytes)),
            other => Err(other),
        }
    }
}

/// Everything a group server sends back on a client connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromGroup {
    /// The answer to a [`ToGroup::Request`].
    Reply(ShardReply),
    /// The answer to a [`ToGroup::Control`].
    Control(ControlReply),
    /// A piece of the postcard encoding of one `FromGroup` too large for one frame (the
    /// [`ControlReply::Exported`] of a large shard); `last` on the final piece (see
    /// [`crate::parts`]).
    Part {
        /// Whether this is the final piece.
        last: bool,
        /// The piece.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

impl InParts for FromGroup {
    const PART_VARIANT: Option<u32> = Some(PART_VARIANT);

    fn into_part(self) -> Result<(bool, Vec<u8>), FromGroup> {
        match self {
            FromGroup::Part { last, bytes } => Ok((last, bytes)),
            other => Err(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Expected;
    use proptest::prelude::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let requests = [
            ShardRequest {
                client: 7,
                request: 3,
                shard: 9,
                config: 4,
                op: KvOp::Put {
                    key: b"k\x00".to_vec(),
                    value: vec![1, 2, 3],
                    expected: Expected::Version(2),
                },
                serializable: false,
            },
            ShardRequest {
                client: u64::MAX,
                request: 0,
                shard: u32::MAX,
                config: 0,
                op: KvOp::Get { key: Vec::new() },
                serializable: true,
            },
            ShardRequest {
                client: 1,
                request: 1,
                shard: 0,
                config: 1,
                op: KvOp::Register,
                serializable: false,
            },
        ];
        for r in requests {
            let bytes = postcard::to_stdvec(&r).unwrap();
            assert_eq!(postcard::from_bytes::<ShardRequest>(&bytes).unwrap(), r);
        }
        let replies = [
            ShardReply::Done {
                client: 7,
                request: 3,
                result: KvResult::Written { version: 3 },
            },
            ShardReply::Done {
                client: 1,
                request: 2,
                result: KvResult::Found {
                    value: b"v".to_vec(),
                    version: 1,
                },
            },
            ShardReply::WrongGroup {
                client: 5,
                request: 6,
                config: 12,
            },
            ShardReply::WrongLeader {
                client: 5,
                request: 6,
                leader: Some(2),
            },
            ShardReply::WrongLeader {
                client: 0,
                request: 0,
                leader: None,
            },
        ];
        for r in replies {
            let bytes = postcard::to_stdvec(&r).unwrap();
            let back = postcard::from_bytes::<ShardReply>(&bytes).unwrap();
            assert_eq!(back.ids(), r.ids());
            assert_eq!(back, r);
        }
    }

    #[test]
    fn control_messages_round_trip() {
        let requests = [
            ControlRequest {
                tag: 1,
                gid: 2,
                op: ControlOp::Adopt {
                    config: vec![1, 0, 3],
                },
            },
            ControlRequest {
                tag: 2,
                gid: 2,
                op: ControlOp::Freeze {
                    shard: 3,
                    config: 4,
                },
            },
            ControlRequest {
                tag: 3,
                gid: 2,
                op: ControlOp::Export {
                    shard: 3,
                    config: 4,
                },
            },
            ControlRequest {
                tag: 4,
                gid: 2,
                op: ControlOp::Install {
                    shard: 3,
                    config: 4,
                    data: vec![9; 40],
                },
            },
            ControlRequest {
                tag: 5,
                gid: 2,
                op: ControlOp::Delete {
                    shard: 3,
                    config: 4,
                },
            },
            ControlRequest {
                tag: u64::MAX,
                gid: u64::MAX,
                op: ControlOp::Adopted,
            },
            ControlRequest {
                tag: 6,
                gid: 2,
                op: ControlOp::ExportChunk {
                    shard: 3,
                    config: 4,
                    after: Some(b"k".to_vec()),
                    max_bytes: 1 << 20,
                },
            },
            ControlRequest {
                tag: 7,
                gid: 2,
                op: ControlOp::Stage {
                    shard: 3,
                    config: 4,
                    items: vec![CopiedItem {
                        key: b"k".to_vec(),
                        value: vec![7; 9],
                        version: 3,
                    }],
                },
            },
            ControlRequest {
                tag: 8,
                gid: 2,
                op: ControlOp::CopyStart {
                    shard: 3,
                    config: 4,
                },
            },
            ControlRequest {
                tag: 9,
                gid: 2,
                op: ControlOp::CopyRound {
                    shard: 3,
                    config: 4,
                    round: 2,
                },
            },
            ControlRequest {
                tag: 10,
                gid: 2,
                op: ControlOp::ExportDelta {
                    shard: 3,
                    config: 4,
                    after: Some(b"k".to_vec()),
                    max_bytes: 1 << 20,
                },
            },
            ControlRequest {
                tag: 11,
                gid: 2,
                op: ControlOp::StageRound {
                    shard: 3,
                    config: 4,
                    round: FROZEN_ROUND,
                    items: vec![CopiedItem {
                        key: b"a".to_vec(),
                        value: b"v".to_vec(),
                        version: 3,
                    }],
                    absent: vec![b"b".to_vec()],
                },
            },
            ControlRequest {
                tag: 12,
                gid: 2,
                op: ControlOp::Shards,
            },
        ];
        // New variants come last: the frames of older variants keep their bytes.
        let freeze = postcard::to_stdvec(&requests[1].op).unwrap();
        assert_eq!(freeze, vec![1, 3, 4]);
        let copy_start = postcard::to_stdvec(&requests[8].op).unwrap();
        assert_eq!(copy_start, vec![8, 3, 4]);
        // The delta rounds' variants come after it.
        let copy_round = postcard::to_stdvec(&requests[9].op).unwrap();
        assert_eq!(copy_round, vec![9, 3, 4, 2]);
        for r in requests {
            let bytes = postcard::to_stdvec(&r).unwrap();
            assert_eq!(postcard::from_bytes::<ControlRequest>(&bytes).unwrap(), r);
        }
        let replies = [
            ControlReply::Done {
                tag: 1,
                status: ControlStatus::Applied,
                adopted: 3,
            },
            ControlReply::Done {
                tag: 1,
                status: ControlStatus::AlreadyDone,
                adopted: 3,
            },
            ControlReply::Done {
                tag: 1,
                status: ControlStatus::Stale { seen: 9 },
                adopted: 3,
            },
            ControlReply::Done {
                tag: 1,
                status: ControlStatus::Refused {
                    reason: "gap".into(),
                },
                adopted: 3,
            },
            ControlReply::Exported {
                tag: 2,
                data: Some(vec![1, 2]),
                adopted: 4,
            },
            ControlReply::Exported {
                tag: 2,
                data: None,
                adopted: 4,
            },
            ControlReply::Adopted { tag: 3, adopted: 0 },
            ControlReply::NotLeader {
                tag: 4,
                leader: Some(2),
            },
            ControlReply::WrongGid { tag: 5, gid: 7 },
            ControlReply::Invalid {
                tag: 6,
                reason: "bad".into(),
            },
            ControlReply::Chunk {
                tag: 7,
                chunk: Some(ShardChunk {
                    items: vec![CopiedItem {
                        key: b"a".to_vec(),
                        value: Vec::new(),
                        version: 1,
                    }],
                    tail: Some(vec![2, 1]),
                }),
                adopted: 4,
            },
            ControlReply::Chunk {
                tag: 7,
                chunk: None,
                adopted: 4,
            },
            ControlReply::Delta {
                tag: 8,
                chunk: Some(DeltaChunk {
                    round: 2,
                    items: vec![CopiedItem {
                        key: b"a".to_vec(),
                        value: b"xy".to_vec(),
                        version: 1,
                    }],
                    absent: vec![b"c".to_vec()],
                    last: true,
                }),
                adopted: 4,
            },
            ControlReply::Delta {
                tag: 8,
                chunk: None,
                adopted: 4,
            },
            ControlReply::Shards {
                tag: 9,
                shards: 128,
            },
        ];
        if let ControlReply::Delta { chunk: Some(c), .. } = &replies[replies.len() - 3] {
            assert_eq!(c.last_key(), Some(&b"c"[..]));
            assert_eq!(c.bytes(), 4);
        }
        for r in replies {
            let bytes = postcard::to_stdvec(&r).unwrap();
            let back = postcard::from_bytes::<ControlReply>(&bytes).unwrap();
            assert_eq!(back.tag(), r.tag());
            assert_eq!(back, r);
        }
    }

    #[test]
    fn connection_envelopes_round_trip_and_a_refusal_is_not_an_answer() {
        let to = [
            ToGroup::Request(ShardRequest {
                client: 1,
                request: 2,
                shard: 3,
                config: 4,
                op: KvOp::Get { key: b"k".to_vec() },
                serializable: false,
            }),
            ToGroup::Control(ControlRequest {
                tag: 9,
                gid: 2,
                op: ControlOp::Install {
                    shard: 1,
                    config: 2,
                    data: vec![7; 10],
                },
            }),
        ];
        for m in to {
            let bytes = postcard::to_stdvec(&m).unwrap();
            assert_eq!(postcard::from_bytes::<ToGroup>(&bytes).unwrap(), m);
        }
        let from = [
            FromGroup::Reply(ShardReply::WrongGroup {
                client: 1,
                request: 2,
                config: 3,
            }),
            FromGroup::Control(ControlReply::Adopted { tag: 4, adopted: 5 }),
        ];
        for m in from {
            let bytes = postcard::to_stdvec(&m).unwrap();
            assert_eq!(postcard::from_bytes::<FromGroup>(&bytes).unwrap(), m);
        }
        let refusal =
            postcard::to_stdvec(&crate::Refusal::new(1, crate::SHARD_SERVICE, "x")).unwrap();
        assert!(postcard::from_bytes::<FromGroup>(&refusal).is_err());
    }

    proptest! {
        /// Garbage decodes to an error or to some message, never a panic.
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = postcard::from_bytes::<ShardRequest>(&bytes);
            let _ = postcard::from_bytes::<ShardReply>(&bytes);
            let _ = postcard::from_bytes::<ControlRequest>(&bytes);
            let _ = postcard::from_bytes::<ControlReply>(&bytes);
            let _ = postcard::from_bytes::<ToGroup>(&bytes);
            let _ = postcard::from_bytes::<FromGroup>(&bytes);
        }
    }
}
