//! The first frame on every connection: who is calling, and which protocol version it speaks.

use serde::{Deserialize, Serialize};

/// Constant at the start of every handshake, so a stray client (an HTTP request, a port
/// scanner) is recognised and dropped at once.
pub const PROTOCOL_MAGIC: u32 = 0x5348_4f4c; // "SHOL"

/// Version of the wire protocol. Bumped on any incompatible change to a message type; a peer
/// speaking another version is refused with a clear error.
pub const PROTOCOL_VERSION: u16 = 2;

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
