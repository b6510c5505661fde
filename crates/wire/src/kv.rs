//! Messages of the key/value database (`shoal-kv`): client requests and replies, and the
//! envelope that carries them next to Raft's messages between servers.
//!
//! Every request carries a client id and a request id; the reply echoes both, so a client
//! can drop answers to requests it has given up on. Writes are deduplicated by client
//! *session* (Raft thesis §6.3): a client first registers ([`KvOp::Register`], answered
//! [`KvResult::Registered`]), then sends every write with `client` set to that session id and
//! `request` to a sequence number that increases with each new write. A write from an unknown
//! or expired session is refused with [`KvResult::SessionExpired`] and never applied.

use serde::{Deserialize, Serialize};

/// The version a conditional put or delete expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Expected {
    /// Unconditional.
    Any,
    /// Apply only if the key is at this version; `0` means "the key must be missing".
    Version(u64),
}

/// One operation on the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    /// Read a key.
    Get {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Store a value if the version matches.
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The version the key must be at.
        expected: Expected,
    },
    /// Remove a key if the version matches.
    Delete {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The version the key must be at.
        expected: Expected,
    },
    /// Read keys in `[start, end)` (no end: to the last key) in key order, at most `limit`.
    Scan {
        /// First key (inclusive).
        #[serde(with = "serde_bytes")]
        start: Vec<u8>,
        /// Last key (exclusive); `None` for no bound.
        #[serde(with = "serde_bytes")]
        end: Option<Vec<u8>>,
        /// Most pairs returned.
        limit: u32,
    },
    /// Open a client session (a write through the log). Answered [`KvResult::Registered`]
    /// with the new session id, which later writes carry in [`KvRequest::client`].
    Register,
    /// Ask the server that receives it about itself (role, term, leader, indexes). Answered
    /// at once by that server, leader or not, with [`KvResult::Status`]; never replicated.
    Status,
    // Lease operations (etcd's model; see `docs/kv.md`, "Leases"). Appended after the
    // original variants: postcard encodes the variant index, so old messages and old log
    // entries still decode.
    /// Grant a lease of `ttl_ms` milliseconds (a write through the log). Answered
    /// [`KvResult::LeaseGranted`] with the new lease's id, or [`KvResult::Refused`] when the
    /// TTL is out of the server's bounds or the lease table is full.
    LeaseGrant {
        /// Time to live in milliseconds, renewed to this by every keep-alive.
        ttl_ms: u64,
    },
    /// Renew a lease to its full TTL (a write through the log, so a deposed leader can never
    /// acknowledge one). Answered [`KvResult::LeaseKept`] or [`KvResult::LeaseNotFound`].
    LeaseKeepAlive {
        /// The lease.
        id: u64,
    },
    /// End a lease now and delete every key attached to it. Answered
    /// [`KvResult::LeaseRevoked`] or [`KvResult::LeaseNotFound`].
    LeaseRevoke {
        /// The lease.
        id: u64,
    },
    /// List the live leases (a read). Answered [`KvResult::Leases`].
    LeaseList,
    /// [`KvOp::Put`] that attaches the key to lease `lease`: the key is deleted when the
    /// lease expires or is revoked. A put with an unknown or expired lease is refused with
    /// [`KvResult::LeaseNotFound`]. A key created by this put starts at the version equal to
    /// the log index of the put (so the versions of a lock key only grow, across deletions:
    /// a fencing token); an existing key's version increases by one as with `Put`.
    PutLease {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The version the key must be at.
        expected: Expected,
        /// The lease to attach the key to.
        lease: u64,
    },
    /// Internal, proposed only by the leader when lease `id`'s deadline passed: ends the lease
    /// and deletes its keys, **if** it was not renewed since (`renewals` is the lease's
    /// renewal counter when the leader decided; a keep-alive applied in between makes this a
    /// no-op). Refused from clients.
    LeaseExpire {
        /// The lease.
        id: u64,
        /// Its renewal counter when the leader decided it expired.
        renewals: u64,
    },
    /// Internal, proposed only by the leader periodically: the remaining time of each lease,
    /// replicated so that a new leader honours it. Refused from clients.
    LeaseCheckpoint {
        /// The leases' remaining times.
        leases: Vec<LeaseCheckpoint>,
    },
    // Appended after the lease variants (postcard encodes the variant index).
    /// A consistent copy of the whole state machine (a backup: `shoal kv snapshot save`), a
    /// read confirmed like a get (read-index on the leader; never serializable). Answered
    /// [`KvResult::Snapshot`], which the server sends in [`KvReply::Part`]s when it exceeds
    /// a frame.
    Snapshot,
    // Membership (issue 15), appended after `Snapshot` (postcard encodes the variant index).
    /// The members of the cluster: id, address, voter or learner, replication progress.
    /// Answered at once by the leader ([`KvResult::Members`]), never replicated; other servers
    /// answer [`KvReply::WrongLeader`].
    MemberList,
    /// Add server `id`, reachable at `addr` (`host:port`), as a learner or a voter: a
    /// membership change through the leader's log, answered [`KvResult::Members`] once it is
    /// committed, or [`KvResult::Refused`] saying why not (id in use, a change in flight).
    MemberAdd {
        /// The new server's id (not 0, not in use).
        id: u64,
        /// Where the others reach it.
        addr: String,
        /// Add it as a non-voting learner (promote it later).
        learner: bool,
    },
    /// Turn learner `id` into a voter; refused while it is behind the leader's log.
    MemberPromote {
        /// The learner.
        id: u64,
    },
    /// Remove server `id` (a voter or a learner); refused for the last voter.
    MemberRemove {
        /// The member.
        id: u64,
    },
    /// Internal, proposed only by the leader right after each membership change: the address
    /// of every member, replicated (and kept in snapshots) so that every server, a joining
    /// one and a restarted one included, can reach the others. Refused from clients.
    MemberAddresses {
        /// `(id, address)` of every member, sorted by id.
        members: Vec<(u64, String)>,
    },
}

/// One member in a [`KvResult::Members`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The server id.
    pub id: u64,
    /// Its address (empty if the leader does not know it).
    pub addr: String,
    /// A voter (else a learner).
    pub voter: bool,
    /// The highest log index known replicated on it (the leader's last index for itself).
    pub match_index: u64,
    /// How many entries its log is behind the leader's (0 for the leader).
    pub behind: u64,
}

/// A snapshot the leader is sending to a member (`kv member list`'s progress column), in a
/// [`KvResult::Members`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotTransfer {
    /// The member receiving it.
    pub to: u64,
    /// The last log index the snapshot covers (0 until the leader opened its file).
    pub index: u64,
    /// Bytes the member acknowledged so far.
    pub sent_bytes: u64,
    /// Bytes of the whole snapshot (0 until the leader opened its file).
    pub total_bytes: u64,
    /// The attempt under way (1 for the first; 0 while it waits for a free send slot).
    pub attempt: u32,
    /// Average rate since the answering server first saw this transfer, in bytes per
    /// second (0 when not yet known).
    pub bytes_per_sec: u64,
}

/// One lease's remaining time in a [`KvOp::LeaseCheckpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseCheckpoint {
    /// The lease.
    pub id: u64,
    /// Its renewal counter when the leader measured (a stale entry is ignored).
    pub renewals: u64,
    /// Milliseconds left before it expires, as the leader saw it.
    pub remaining_ms: u64,
}

/// One live lease in a [`KvResult::Leases`] answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The lease id.
    pub id: u64,
    /// Its TTL in milliseconds.
    pub ttl_ms: u64,
    /// Milliseconds left before it expires, as the answering server knows it (the leader's
    /// clock for a linearizable read).
    pub remaining_ms: u64,
    /// Keys attached to it.
    pub keys: u64,
}

impl KvOp {
    /// Whether the operation only reads (served by read-index, never written to the log).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            KvOp::Get { .. } | KvOp::Scan { .. } | KvOp::LeaseList | KvOp::Snapshot
        )
    }

    /// Whether only the leader itself may propose the operation (lease expiry and
    /// checkpoints); servers refuse it from clients.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            KvOp::LeaseExpire { .. } | KvOp::LeaseCheckpoint { .. } | KvOp::MemberAddresses { .. }
        )
    }

    /// A membership request of a client (list, add, promote, remove): answered by the leader,
    /// outside any client session.
    pub fn is_membership(&self) -> bool {
        matches!(
            self,
            KvOp::MemberList
                | KvOp::MemberAdd { .. }
                | KvOp::MemberPromote { .. }
                | KvOp::MemberRemove { .. }
        )
    }
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRequest {
    /// Writes (puts, deletes): the session id from [`KvResult::Registered`]. Reads and
    /// [`KvOp::Register`]: any id the client picks to recognise the reply.
    pub client: u64,
    /// Increases with each new operation of the client (the session's sequence number for
    /// writes); retries reuse it.
    pub request: u64,
    /// What to do.
    pub op: KvOp,
    /// Reads only: answer from this server's state without confirming leadership (may be
    /// stale; never for writes).
    pub serializable: bool,
}

/// One key of a scan's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanItem {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Its value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Its version.
    pub version: u64,
}

/// The outcome of an operation, as the state machine decides it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResult {
    /// A get found the key.
    Found {
        /// Its value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Its version.
        version: u64,
    },
    /// The key is missing (get; put expecting a version > 0; delete).
    NoKey,
    /// A put applied; the key is now at `version`.
    Written {
        /// The new version.
        version: u64,
    },
    /// A delete applied.
    Deleted,
    /// A put or delete found another version and did nothing.
    VersionMismatch,
    /// A scan's answer, in key order.
    Scanned {
        /// The pairs.
        items: Vec<ScanItem>,
    },
    /// The key or value exceeds the server's limit; nothing was stored.
    TooLarge {
        /// `"key"` or `"value"`.
        what: String,
        /// Its size in bytes.
        bytes: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The request is older than the client's latest one; nobody waits for this answer.
    Stale,
    /// A session was opened; writes carry `session` as their client id.
    Registered {
        /// The new session id (the log index of the registration; never 0).
        session: u64,
    },
    /// The write's session is unknown or has expired: it was **not** applied now. An earlier
    /// send of the same write may have applied; the client reports it as "maybe" and registers
    /// a new session.
    SessionExpired,
    /// The answer to [`KvOp::Status`].
    Status(ServerStatus),
    // Lease answers, appended (see `KvOp::LeaseGrant`).
    /// A lease was granted.
    LeaseGranted {
        /// Its id (the log index of the grant; never 0).
        id: u64,
        /// Its TTL in milliseconds.
        ttl_ms: u64,
    },
    /// A keep-alive renewed the lease to its full TTL.
    LeaseKept {
        /// The lease.
        id: u64,
        /// Its TTL (the time it now has left) in milliseconds.
        ttl_ms: u64,
    },
    /// The lease does not exist (never granted, expired or revoked): nothing was done.
    LeaseNotFound {
        /// The lease asked for.
        id: u64,
    },
    /// A lease was revoked and its keys deleted.
    LeaseRevoked {
        /// The lease.
        id: u64,
        /// How many keys were deleted.
        keys: u64,
    },
    /// The answer to [`KvOp::LeaseList`], by lease id.
    Leases {
        /// The live leases.
        leases: Vec<LeaseInfo>,
    },
    /// The request breaks a limit or a rule of the server (a TTL out of bounds, too many
    /// leases, too many keys on a lease, an internal operation from a client); nothing was
    /// done.
    Refused {
        /// What was wrong, for a person.
        reason: String,
    },
    // Appended (see `KvOp::Snapshot`).
    /// The answer to [`KvOp::Snapshot`]: the state machine's snapshot (its own format, see
    /// `shoal_kv::store`) as of log index `index`, which the leader had applied after
    /// confirming its leadership, so every write acknowledged before the request is in it.
    Snapshot {
        /// The last log index the state covers.
        index: u64,
        /// The term of the entry at `index`.
        term: u64,
        /// The voting members at `index`.
        voters: Vec<u64>,
        /// The id of the server that took it (the leader).
        server: u64,
        /// The state machine's serialized state.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    // Appended (see `KvOp::MemberList`).
    /// The members, by id, as the leader `leader` knows them: the answer to
    /// [`KvOp::MemberList`] and to a membership change once it is committed.
    Members {
        /// The leader that answered.
        leader: u64,
        /// Every voter and learner.
        members: Vec<MemberInfo>,
        /// The snapshots the answering server is sending, by member (appended last, protocol
        /// version 4; filled in by the server's driver, which sees its transport).
        transfers: Vec<SnapshotTransfer>,
    },
}

/// A server's role in its Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServerRole {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asks whether it could win an election (pre-vote), without starting one.
    PreCandidate,
    /// Runs for leader.
    Candidate,
    /// Leads: serves reads and writes.
    Leader,
}

impl std::fmt::Display for ServerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerRole::Follower => "follower",
            ServerRole::PreCandidate => "pre-candidate",
            ServerRole::Candidate => "candidate",
            ServerRole::Leader => "leader",
        })
    }
}

/// What a server says of itself ([`KvOp::Status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    /// The server's id.
    pub id: u64,
    /// Its role.
    pub role: ServerRole,
    /// Its current term.
    pub term: u64,
    /// The leader it knows of in that term.
    pub leader: Option<u64>,
    /// Its commit index.
    pub commit: u64,
    /// The last log index applied to its state machine.
    pub applied: u64,
    /// The last index of its log.
    pub last_index: u64,
}

/// A server's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvReply {
    /// The operation was decided.
    Done {
        /// Echo of the request's client.
        client: u64,
        /// Echo of the request id.
        request: u64,
        /// The outcome.
        result: KvResult,
    },
    /// This server cannot serve the request (not the leader, or lost leadership before it
    /// was decided: a write may still have applied). `leader` is a hint where to go.
    WrongLeader {
        /// Echo of the request's client.
        client: u64,
        /// Echo of the request id.
        request: u64,
        /// The leader this server knows of (a server id), if any.
        leader: Option<u64>,
        /// The leader's address (`host:port`) from the server's member address table, if it
        /// knows it: a client dials it even if it is not among its endpoints. Appended last
        /// (protocol version 4).
        leader_addr: Option<String>,
    },
    /// A piece of the postcard encoding of a reply too large for one frame (only a
    /// [`KvResult::Snapshot`] is): see [`crate::parts`]. Appended last.
    Part {
        /// Whether this is the reply's last piece.
        last: bool,
        /// The piece.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// Requests always fit in one frame (a value is at most 1 MiB by default): they have no part
/// variant, and a part from a client is refused.
impl crate::parts::InParts for KvRequest {
    const PART_VARIANT: Option<u32> = None;

    fn into_part(self) -> Result<(bool, Vec<u8>), KvRequest> {
        Err(self)
    }
}

/// A reply larger than a frame (a [`KvResult::Snapshot`]) travels in [`KvReply::Part`]s; every
/// other reply fits in one frame and is sent whole, as before.
impl crate::parts::InParts for KvReply {
    const PART_VARIANT: Option<u32> = Some(2);

    fn into_part(self) -> Result<(bool, Vec<u8>), KvReply> {
        match self {
            KvReply::Part { last, bytes } => Ok((last, bytes)),
            other => Err(other),
        }
    }
}

impl KvReply {
    /// The (client, request) the reply answers (`(0, 0)` for a [`KvReply::Part`], which
    /// answers nothing on its own: the reassembled reply does).
    pub fn ids(&self) -> (u64, u64) {
        match self {
            KvReply::Done {
                client, request, ..
            }
            | KvReply::WrongLeader {
                client, request, ..
            } => (*client, *request),
            KvReply::Part { .. } => (0, 0),
        }
    }
}

/// Everything a KV server sends or receives: Raft traffic between servers, and client traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvMessage {
    /// Between servers.
    Raft(crate::raft::Message),
    /// Client to server.
    Request(KvRequest),
    /// Server to client.
    Reply(KvReply),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serde_bytes` on the byte fields writes one length and a memcpy instead of one call per
    /// byte, and the bytes on the wire (and on disk) are exactly the sequence encoding they had
    /// before: a mirror of the types with plain `Vec<u8>` decodes them, and the other way round.
    #[test]
    fn byte_fields_keep_the_sequence_encoding() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        enum PlainOp {
            Get {
                key: Vec<u8>,
            },
            Put {
                key: Vec<u8>,
                value: Vec<u8>,
                expected: Expected,
            },
            Delete {
                key: Vec<u8>,
                expected: Expected,
            },
            Scan {
                start: Vec<u8>,
                end: Option<Vec<u8>>,
                limit: u32,
            },
        }
        let value: Vec<u8> = (0..=255).collect();
        let cases = [
            (
                KvOp::Put {
                    key: b"k\x00\xff".to_vec(),
                    value: value.clone(),
                    expected: Expected::Version(7),
                },
                PlainOp::Put {
                    key: b"k\x00\xff".to_vec(),
                    value: value.clone(),
                    expected: Expected::Version(7),
                },
            ),
            (
                KvOp::Get { key: Vec::new() },
                PlainOp::Get { key: Vec::new() },
            ),
            (
                KvOp::Delete {
                    key: vec![200; 300],
                    expected: Expected::Any,
                },
                PlainOp::Delete {
                    key: vec![200; 300],
                    expected: Expected::Any,
                },
            ),
            (
                KvOp::Scan {
                    start: b"a".to_vec(),
                    end: Some(b"z".to_vec()),
                    limit: 9,
                },
                PlainOp::Scan {
                    start: b"a".to_vec(),
                    end: Some(b"z".to_vec()),
                    limit: 9,
                },
            ),
            (
                KvOp::Scan {
                    start: Vec::new(),
                    end: None,
                    limit: 1,
                },
                PlainOp::Scan {
                    start: Vec::new(),
                    end: None,
                    limit: 1,
                },
            ),
        ];
        for (fast, plain) in cases {
            let a = postcard::to_stdvec(&fast).unwrap();
            let b = postcard::to_stdvec(&plain).unwrap();
            assert_eq!(a, b, "{fast:?}");
            assert_eq!(postcard::from_bytes::<KvOp>(&b).unwrap(), fast);
            assert_eq!(postcard::from_bytes::<PlainOp>(&a).unwrap(), plain);
        }
        let found = KvResult::Found {
            value: value.clone(),
            version: 3,
        };
        let scanned = KvResult::Scanned {
            items: vec![ScanItem {
                key: b"k".to_vec(),
                value,
                version: 4,
            }],
        };
        for r in [found, scanned] {
            let bytes = postcard::to_stdvec(&r).unwrap();
            assert_eq!(postcard::from_bytes::<KvResult>(&bytes).unwrap(), r);
        }
    }

    /// The lease variants are appended: every older variant keeps its index (postcard's
    /// first byte), so old messages and log entries decode as before.
    #[test]
    fn lease_variants_are_appended() {
        let tag = |op: &KvOp| postcard::to_stdvec(op).unwrap()[0];
        assert_eq!(tag(&KvOp::Register), 4);
        assert_eq!(tag(&KvOp::Status), 5);
        assert_eq!(tag(&KvOp::LeaseGrant { ttl_ms: 1 }), 6);
        assert_eq!(tag(&KvOp::LeaseCheckpoint { leases: vec![] }), 12);
        let rtag = |r: &KvResult| postcard::to_stdvec(r).unwrap()[0];
        assert_eq!(rtag(&KvResult::SessionExpired), 9);
        assert_eq!(rtag(&KvResult::LeaseGranted { id: 1, ttl_ms: 1 }), 11);
        let ops = [
            KvOp::PutLease {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                expected: Expected::Version(0),
                lease: 9,
            },
            KvOp::LeaseCheckpoint {
                leases: vec![LeaseCheckpoint {
                    id: 1,
                    renewals: 2,
                    remaining_ms: 3,
                }],
            },
            KvOp::LeaseList,
        ];
        for op in ops {
            let bytes = postcard::to_stdvec(&op).unwrap();
            assert_eq!(postcard::from_bytes::<KvOp>(&bytes).unwrap(), op);
        }
        assert!(
            KvOp::LeaseList.is_read() && KvOp::LeaseExpire { id: 1, renewals: 0 }.is_internal()
        );
    }

    /// The backup variants are appended last: older variants keep their index, and the
    /// reply's `Part` variant is the one [`crate::parts::InParts`] names.
    #[test]
    fn snapshot_variants_are_appended_and_replies_split_into_parts() {
        use crate::parts::{InParts, Reassembly};
        assert_eq!(postcard::to_stdvec(&KvOp::Snapshot).unwrap()[0], 13);
        let reply = KvReply::Done {
            client: 7,
            request: 8,
            result: KvResult::Snapshot {
                index: 10,
                term: 2,
                voters: vec![1, 2, 3],
                server: 1,
                data: (0..5000u32).map(|i| i as u8).collect(),
            },
        };
        let bytes = postcard::to_stdvec(&reply).unwrap();
        assert_eq!(bytes[0], 0, "Done keeps its index");
        let part = KvReply::Part {
            last: true,
            bytes: vec![],
        };
        assert_eq!(
            u32::from(postcard::to_stdvec(&part).unwrap()[0]),
            KvReply::PART_VARIANT.unwrap()
        );
        // Cut into pieces of 1000 bytes and reassembled: the same reply.
        let mut r = Reassembly::new(1 << 20);
        let chunks: Vec<&[u8]> = bytes.chunks(1000).collect();
        let mut got = None;
        for (i, c) in chunks.iter().enumerate() {
            let piece = KvReply::Part {
                last: i + 1 == chunks.len(),
                bytes: c.to_vec(),
            };
            got = r.push(piece).unwrap();
        }
        assert_eq!(got, Some(reply));
    }
}
