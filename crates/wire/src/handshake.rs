//! The first frame on every connection: who is calling, and which protocol version it speaks.

use serde::{Deserialize, Serialize};

/// Constant at the start of every handshake, so a stray client (an HTTP request, a port
/// scanner) is recognised and dropped at once.
pub const PROTOCOL_MAGIC: u32 = 0x5348_4f4c; // "SHOL"

/// Version of the wire protocol. Bumped on any incompatible change to a message type; a peer
/// speaking another version is refused with a clear error.
/// 3: membership changes (`SnapshotMeta` gained learners, outgoing voters, auto-leave).
pub const PROTOCOL_VERSION: u16 = 3;

/// What the caller is, which decides which messages the connection may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A client of a service (a KV client, a MapReduce worker talking to its coordinator).
    Client,
    /// A peer of the same cluster, identified by its node id.
    Peer {
        /// The caller's node id.
        node_id: u64,
    },
    /// A MapReduce worker fetching map output from another worker (the shuffle).
    Shuffle,
    /// A peer of the same cluster streaming a snapshot to this node on a connection of its
    /// own ([`crate::snapshot`]), beside its peer connection, so heartbeats and appends are
    /// never held back by a large snapshot.
    Snapshot {
        /// The caller's node id.
        node_id: u64,
    },
}

/// The handshake frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`PROTOCOL_MAGIC`].
    pub magic: u32,
    /// The caller's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The caller's role.
    pub role: Role,
    /// Identifies the cluster or job, so that a process of another cluster is refused.
    pub cluster_id: u64,
}

impl Hello {
    /// A handshake for this build's protocol version.
    pub fn new(role: Role, cluster_id: u64) -> Self {
        Hello {
            magic: PROTOCOL_MAGIC,
            version: PROTOCOL_VERSION,
            role,
            cluster_id,
        }
    }

    /// Checks magic and version, with an error a person can act on.
    pub fn validate(&self) -> Result<(), String> {
        if self.magic != PROTOCOL_MAGIC {
            return Err(format!(
                "not a Shoal peer (magic {:#010x}, expected {:#010x})",
                self.magic, PROTOCOL_MAGIC
            ));
        }
        if self.version != PROTOCOL_VERSION {
            return Err(format!(
                "peer speaks protocol version {}, this build speaks {}: upgrade the older side",
                self.version, PROTOCOL_VERSION
            ));
        }
        Ok(())
    }
}

/// What a server names itself as in a [`Refusal`] when it is a KV server.
pub const KV_SERVICE: &str = "Shoal KV server";

/// What a server names itself as in a [`Refusal`] when it is a server of a shard group.
pub const SHARD_SERVICE: &str = "Shoal shard group server";

/// Sent by a server, instead of closing silently, when it refuses a caller's [`Hello`] (another
/// cluster id, another protocol version) or the first request after it (a service that does
/// not speak the caller's protocol). The connection is closed after it.
///
/// It starts with [`PROTOCOL_MAGIC`], which no reply of any protocol can start with (postcard
/// encodes the magic as the varint bytes `cc 9e a1 9a 05`, an impossible enum variant index), so
/// a client tells it apart from an answer by decoding it first. Older clients read it as a
/// malformed answer and close, as they did when the server closed without a word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Must equal [`PROTOCOL_MAGIC`].
    pub magic: u32,
    /// The refusing server's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The refusing server's cluster id.
    pub cluster_id: u64,
    /// What the server is, for a person: [`KV_SERVICE`], "Raft demo node", ….
    pub service: String,
    /// Why it refused, for a person.
    pub reason: String,
}

impl Refusal {
    /// A refusal from this build's protocol version.
    pub fn new(cluster_id: u64, service: impl Into<String>, reason: impl Into<String>) -> Self {
        Refusal {
            magic: PROTOCOL_MAGIC,
            version: PROTOCOL_VERSION,
            cluster_id,
            service: service.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_starts_with_bytes_no_enum_can_start_with() {
        let bytes = postcard::to_allocvec(&Refusal::new(1, KV_SERVICE, "x")).expect("encode");
        assert_eq!(&bytes[..5], &[0xcc, 0x9e, 0xa1, 0x9a, 0x05]);
        // Decoded as a KV reply (what an older client does), it is malformed, not an answer.
        assert!(postcard::from_bytes::<crate::kv::KvReply>(&bytes).is_err());
        assert!(postcard::from_bytes::<crate::mr::ToWorker>(&bytes).is_err());
    }
}
