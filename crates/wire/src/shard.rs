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

    proptest! {
        /// Garbage decodes to an error or to some message, never a panic.
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = postcard::from_bytes::<ShardRequest>(&bytes);
            let _ = postcard::from_bytes::<ShardReply>(&bytes);
        }
    }
}
