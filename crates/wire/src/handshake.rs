//! The first frame on every connection: who is calling, and which protocol version it speaks.

use serde::{Deserialize, Serialize};

/// Constant at the start of every handshake, so a stray client (an HTTP request, a port
/// scanner) is recognised and dropped at once.
pub const PROTOCOL_MAGIC: u32 = 0x5348_4f4c; // "SHOL"

/// Version of the wire protocol. Bumped on any incompatible change to a message type; a peer
/// speaking another version is refused with a clear error.
/// 3: membership changes (`SnapshotMeta` gained learners, outgoing voters, auto-leave).
/// 4: snapshots stream on connections of their own ([`Role::Snapshot`]); `kv member list`
/// answers carry snapshot progress, wrong-leader answers the leader's address. Without this
/// bump a version-3 server would meet a newer one's snapshot connection as an undecodable
/// handshake ("malformed"), and its follower would never catch up; with it, every connection
/// between the two is refused at the version check, in words, on both sides.
pub const PROTOCOL_VERSION: u16 = 4;

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
        match version_mismatch(self.version) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// Why a handshake payload that does not decode as this build's [`Hello`] was refused,
    /// if it starts like a Shoal handshake of **another** protocol version (a newer build's
    /// [`Role`] this build does not know): the version mismatch, in the words of
    /// [`Hello::validate`], rather than a decoding error. `None` for anything else.
    pub fn undecodable_reason(payload: &[u8]) -> Option<String> {
        // Every version's handshake starts with the magic and the version (postcard writes
        // fields in order), so those two still decode.
        let (head, _) = postcard::take_from_bytes::<HelloHead>(payload).ok()?;
        if head.magic != PROTOCOL_MAGIC {
            return None;
        }
        version_mismatch(head.version)
    }
}

/// The fields every version's [`Hello`] starts with.
#[derive(Deserialize)]
struct HelloHead {
    magic: u32,
    version: u16,
}

/// The refusal of a peer speaking protocol `version`, if it is not this build's.
fn version_mismatch(version: u16) -> Option<String> {
    (version != PROTOCOL_VERSION).then(|| {
        format!(
            "peer speaks protocol version {version}, this build speaks {PROTOCOL_VERSION}: \
             upgrade the older side (every server and client of a cluster must run the same \
             protocol version)"
        )
    })
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

    /// What a version-3 build decodes a handshake with: its `Role` had no `Snapshot`.
    #[derive(Debug, Deserialize)]
    enum RoleV3 {
        Client,
        Peer {
            #[allow(dead_code)]
            node_id: u64,
        },
        Shuffle,
    }

    #[derive(Debug, Deserialize)]
    struct HelloV3 {
        magic: u32,
        version: u16,
        #[allow(dead_code)]
        role: RoleV3,
        #[allow(dead_code)]
        cluster_id: u64,
    }

    /// Why version 4 exists: a version-3 server decodes this build's peer and client
    /// handshakes and refuses them at its version check, in words; without the bump it would
    /// have accepted the peer connection and then met the snapshot connection's handshake as
    /// undecodable bytes.
    #[test]
    fn a_version_3_build_reads_this_builds_handshake_and_refuses_it_by_version() {
        for role in [Role::Peer { node_id: 2 }, Role::Client, Role::Shuffle] {
            let bytes = postcard::to_allocvec(&Hello::new(role, 7)).expect("encode");
            let old: HelloV3 = postcard::from_bytes(&bytes).expect("a v3 build decodes it");
            assert_eq!((old.magic, old.version), (PROTOCOL_MAGIC, 4));
            assert_ne!(old.version, 3, "so its version check refuses it");
        }
        let snapshot =
            postcard::to_allocvec(&Hello::new(Role::Snapshot { node_id: 2 }, 7)).expect("encode");
        assert!(postcard::from_bytes::<HelloV3>(&snapshot).is_err());
    }

    /// This build meeting a version-3 peer or client, and a newer build's handshake with a
    /// role it does not know: the version mismatch, said plainly.
    #[test]
    fn another_protocol_version_is_refused_in_words() {
        let v3 = Hello {
            version: 3,
            ..Hello::new(Role::Peer { node_id: 2 }, 7)
        };
        assert_eq!(
            v3.validate().unwrap_err(),
            "peer speaks protocol version 3, this build speaks 4: upgrade the older side \
             (every server and client of a cluster must run the same protocol version)"
        );
        assert_eq!(Hello::new(Role::Client, 7).validate(), Ok(()));
        // A version-5 handshake whose role (variant 9) this build does not know.
        let mut newer = postcard::to_allocvec(&(PROTOCOL_MAGIC, 5u16)).expect("encode");
        newer.extend_from_slice(&[9, 1, 7]);
        assert!(postcard::from_bytes::<Hello>(&newer).is_err());
        let reason = Hello::undecodable_reason(&newer).expect("a reason");
        assert!(
            reason.starts_with("peer speaks protocol version 5, this build speaks 4"),
            "{reason}"
        );
        // Not a handshake at all, or this version's bytes broken: no version story to tell.
        assert_eq!(Hello::undecodable_reason(b"GET / HTTP/1.1"), None);
        let mut broken = postcard::to_allocvec(&(PROTOCOL_MAGIC, PROTOCOL_VERSION)).unwrap();
        broken.push(9);
        assert_eq!(Hello::undecodable_reason(&broken), None);
        assert_eq!(Hello::undecodable_reason(&[]), None);
    }

    #[test]
    fn a_refusal_starts_with_bytes_no_enum_can_start_with() {
        let bytes = postcard::to_allocvec(&Refusal::new(1, KV_SERVICE, "x")).expect("encode");
        assert_eq!(&bytes[..5], &[0xcc, 0x9e, 0xa1, 0x9a, 0x05]);
        // Decoded as a KV reply (what an older client does), it is malformed, not an answer.
        assert!(postcard::from_bytes::<crate::kv::KvReply>(&bytes).is_err());
        assert!(postcard::from_bytes::<crate::mr::ToWorker>(&bytes).is_err());
    }
}
