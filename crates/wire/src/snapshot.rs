//! The snapshot stream: how a leader sends a snapshot to a follower on a connection of its own
//! (a [`crate::Role::Snapshot`] hello), in chunks with flow control, instead of as one
//! `InstallSnapshot` message on the peer connection that carries heartbeats and appends.
//!
//! The sender sends [`SnapshotFrame::Begin`] (the Raft message with the snapshot's metadata
//! and empty data, and the number of bytes to follow), then [`SnapshotFrame::Chunk`]s of the
//! leader's snapshot file in order, then [`SnapshotFrame::End`] with the CRC32C of all the
//! bytes. The receiver answers each chunk with [`SnapshotAck::Received`] (the sender keeps a
//! bounded number of bytes unacknowledged), and the end with [`SnapshotAck::Accepted`] once
//! the file is durable and decodes, or [`SnapshotAck::Refused`]. Every frame is a normal
//! length-prefixed, checksummed frame ([`crate::frame`]); a frame that does not decode closes
//! the stream and nothing is installed.

use serde::{Deserialize, Serialize};

use crate::raft::Message;

/// Sender to receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotFrame {
    /// Opens a transfer.
    Begin {
        /// The leader's `InstallSnapshot` message: sender, receiver, term and the snapshot's
        /// metadata; its data is empty (it follows in chunks).
        message: Message,
        /// Bytes the chunks carry in all (the size of the snapshot file).
        total_bytes: u64,
    },
    /// The next bytes of the snapshot file.
    Chunk {
        /// Offset of the first byte in the file: must equal the bytes received so far.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Closes a transfer: every byte was sent.
    End {
        /// CRC32C of all the chunks' bytes, in order.
        crc32c: u32,
    },
}

/// Receiver to sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotAck {
    /// The bytes received so far (written to the receiver's temporary file).
    Received {
        /// Bytes received.
        bytes: u64,
    },
    /// The whole snapshot arrived, checked, durable: handed to Raft.
    Accepted,
    /// The transfer is refused (bad size, checksum, frame, or the receiver could not write):
    /// nothing was installed.
    Refused {
        /// Why, for a person.
        reason: String,
    },
}

/// The borrowing twin of [`SnapshotFrame::Chunk`] (the same encoding): the sender encodes a
/// chunk straight from its read buffer.
#[derive(Debug, Serialize)]
pub enum SnapshotFrameRef<'a> {
    /// See [`SnapshotFrame::Begin`].
    Begin {
        /// See [`SnapshotFrame::Begin`].
        message: &'a Message,
        /// See [`SnapshotFrame::Begin`].
        total_bytes: u64,
    },
    /// See [`SnapshotFrame::Chunk`].
    Chunk {
        /// See [`SnapshotFrame::Chunk`].
        offset: u64,
        /// See [`SnapshotFrame::Chunk`].
        #[serde(with = "serde_bytes")]
        bytes: &'a [u8],
    },
    /// See [`SnapshotFrame::End`].
    End {
        /// See [`SnapshotFrame::End`].
        crc32c: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{MessageBody, NodeId, Snapshot, Term};
    use proptest::prelude::*;

    fn message() -> Message {
        Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(3),
            body: MessageBody::InstallSnapshot {
                snapshot: Snapshot::default(),
            },
        }
    }

    #[test]
    fn the_borrowing_frames_encode_like_the_owned_ones() {
        let m = message();
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (
                postcard::to_allocvec(&SnapshotFrameRef::Begin {
                    message: &m,
                    total_bytes: 7,
                })
                .unwrap(),
                postcard::to_allocvec(&SnapshotFrame::Begin {
                    message: m.clone(),
                    total_bytes: 7,
                })
                .unwrap(),
            ),
            (
                postcard::to_allocvec(&SnapshotFrameRef::Chunk {
                    offset: 9,
                    bytes: &[1, 2, 3],
                })
                .unwrap(),
                postcard::to_allocvec(&SnapshotFrame::Chunk {
                    offset: 9,
                    bytes: vec![1, 2, 3],
                })
                .unwrap(),
            ),
            (
                postcard::to_allocvec(&SnapshotFrameRef::End { crc32c: 5 }).unwrap(),
                postcard::to_allocvec(&SnapshotFrame::End { crc32c: 5 }).unwrap(),
            ),
        ];
        for (borrowed, owned) in pairs {
            assert_eq!(borrowed, owned);
        }
    }

    proptest! {
        /// Decoders never panic on bad chunk frames: any bytes decode or fail cleanly, and a
        /// truncated valid frame fails.
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = postcard::from_bytes::<SnapshotFrame>(&bytes);
            let _ = postcard::from_bytes::<SnapshotAck>(&bytes);
        }

        #[test]
        fn a_truncated_chunk_does_not_decode(len in 1usize..64, cut in 1usize..8) {
            let frame = SnapshotFrame::Chunk { offset: 0, bytes: vec![7; len] };
            let bytes = postcard::to_allocvec(&frame).unwrap();
            let cut = cut.min(bytes.len());
            prop_assert!(postcard::from_bytes::<SnapshotFrame>(&bytes[..bytes.len() - cut]).is_err());
        }
    }
}
