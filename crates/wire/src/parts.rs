//! Messages too large for one frame, sent as consecutive parts.
//!
//! A frame is bounded ([`crate::DEFAULT_MAX_FRAME_BYTES`]) so that a decoder never allocates
//! more than a frame's worth on a length prefix. A protocol whose messages may be larger (the
//! shard group protocol: a migration's Export answer and Install request carry a whole shard)
//! gives its envelope a last variant `Part { last: bool, bytes: Vec<u8> }` (with
//! `serde_bytes`): a piece of the postcard encoding of one message of the same type. The
//! pieces of one message follow each other on the connection, the final one with `last`; the
//! reader concatenates them, up to a message limit, and decodes the concatenation. Messages
//! that fit in a frame travel as before, byte for byte.
//!
//! [`InParts`] tells a codec whether a message type has such a variant and how to take one
//! apart; `shoal_wire::codec::PartCodec` (feature `codec`) is the codec that uses it on both
//! sides of a connection.

use crate::frame::{FrameError, FRAME_HEADER_BYTES};

/// A message type that can travel in parts over several frames.
pub trait InParts: Sized {
    /// The postcard variant index of the type's `Part { last, bytes }` variant, or `None` when
    /// the type has none (its messages must each fit in one frame).
    const PART_VARIANT: Option<u32>;

    /// `Ok((last, bytes))` if the message is a part, else the message itself.
    fn into_part(self) -> Result<(bool, Vec<u8>), Self>;
}

/// Bytes in front of a piece in a part frame's payload, at most: the variant index (a varint
/// of up to 5 bytes), the `last` flag (1) and the piece's length (a varint of up to 10 bytes).
pub const PART_OVERHEAD_BYTES: usize = 16;

/// Appends LEB128 (postcard's varint) of `v` to `out`.
fn push_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The frame (header included) carrying `Part { last, bytes: piece }` of an envelope whose
/// part variant is `variant`: its header, then the payload's head (variant, flag, length),
/// then `piece`, which is not copied here. Exactly the encoding of the derived `Serialize` of
/// that variant (postcard writes an enum's variant index, a `bool` and a byte string's length
/// as these varints), so a part decodes as the envelope type itself.
///
/// Fails with [`FrameError::TooLarge`] if the frame's payload would exceed `max_frame_bytes`.
pub fn part_frame_head(
    variant: u32,
    last: bool,
    piece: &[u8],
    max_frame_bytes: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut head = Vec::with_capacity(FRAME_HEADER_BYTES + PART_OVERHEAD_BYTES);
    head.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    push_varint(u64::from(variant), &mut head);
    head.push(u8::from(last));
    push_varint(piece.len() as u64, &mut head);
    let len = head.len() - FRAME_HEADER_BYTES + piece.len();
    if len > max_frame_bytes || len > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[FRAME_HEADER_BYTES..]), piece);
    head[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(head)
}

/// Why a message in parts was refused by its reader. The connection should be closed: nothing
/// of the message is used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartsError {
    /// The parts received so far exceed the message limit.
    #[error("message in parts of more than {max} bytes (at least {len}): over the message limit (raise it on both sides if such messages are legitimate)")]
    TooLarge {
        /// Bytes received with the part that crossed the limit.
        len: usize,
        /// The message limit in force.
        max: usize,
    },
    /// The concatenated parts are not one message of the expected type.
    #[error("malformed message in parts ({len} bytes): {reason}")]
    Malformed {
        /// Bytes of the concatenation.
        len: usize,
        /// What is wrong.
        reason: String,
    },
    /// A whole message arrived between the parts of another one.
    #[error("a whole message arrived between the parts of another ({len} bytes of parts so far)")]
    Interleaved {
        /// Bytes of parts received before it.
        len: usize,
    },
    /// Parts arrived on a connection whose messages never travel in parts.
    #[error("a part of a message, on a connection whose messages never travel in parts")]
    Unexpected,
}

/// Reassembles the parts of one message at a time, never holding more than was received
/// (growing as parts arrive) nor more than `max_message_bytes`.
#[derive(Debug)]
pub struct Reassembly {
    max_message_bytes: usize,
    partial: Vec<u8>,
    /// Whether a part was received since the last whole message (an empty part counts).
    started: bool,
}

impl Reassembly {
    /// A reassembly refusing messages larger than `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Reassembly {
        Reassembly {
            max_message_bytes,
            partial: Vec::new(),
            started: false,
        }
    }

    /// Whether parts of an unfinished message are held.
    pub fn in_progress(&self) -> bool {
        self.started
    }

    /// Bytes of the unfinished message held.
    pub fn held_bytes(&self) -> usize {
        self.partial.len()
    }

    /// Takes one decoded frame: `Ok(Some(message))` when it completes a message (a whole
    /// message, or the last part), `Ok(None)` when more parts are needed.
    pub fn push<T>(&mut self, frame: T) -> Result<Option<T>, PartsError>
    where
        T: InParts + serde::de::DeserializeOwned,
    {
        let (last, bytes) = match frame.into_part() {
            Err(whole) if !self.started => return Ok(Some(whole)),
            Err(_) => {
                let len = self.partial.len();
                self.reset();
                return Err(PartsError::Interleaved { len });
            }
            Ok(part) => part,
        };
        if T::PART_VARIANT.is_none() {
            self.reset();
            return Err(PartsError::Unexpected);
        }
        let len = self.partial.len().saturating_add(bytes.len());
        if len > self.max_message_bytes {
            self.reset();
            return Err(PartsError::TooLarge {
                len,
                max: self.max_message_bytes,
            });
        }
        if self.partial.is_empty() {
            self.partial = bytes;
        } else {
            self.partial.extend_from_slice(&bytes);
        }
        self.started = true;
        if !last {
            return Ok(None);
        }
        let whole = std::mem::take(&mut self.partial);
        self.started = false;
        let message = match postcard::take_from_bytes::<T>(&whole) {
            Ok((message, [])) => message,
            Ok((_, rest)) => {
                return Err(PartsError::Malformed {
                    len: whole.len(),
                    reason: format!("{} trailing bytes after the message", rest.len()),
                })
            }
            Err(e) => {
                return Err(PartsError::Malformed {
                    len: whole.len(),
                    reason: e.to_string(),
                })
            }
        };
        match message.into_part() {
            Ok(_) => Err(PartsError::Malformed {
                len: whole.len(),
                reason: "a part inside a message in parts".into(),
            }),
            Err(message) => Ok(Some(message)),
        }
    }

    fn reset(&mut self) {
        self.partial = Vec::new();
        self.started = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;
    use crate::shard::{FromGroup, ToGroup};

    /// The hand-written part frame is exactly the derived encoding of the envelopes' `Part`
    /// variant, for lengths around every varint boundary.
    #[test]
    fn a_part_frame_is_the_derived_encoding_of_the_part_variant() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 70_000] {
            let piece: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for last in [false, true] {
                let mut want = Vec::new();
                encode_frame(
                    &ToGroup::Part {
                        last,
                        bytes: piece.clone(),
                    },
                    1 << 20,
                    &mut want,
                )
                .unwrap();
                let mut got =
                    part_frame_head(ToGroup::PART_VARIANT.unwrap(), last, &piece, 1 << 20).unwrap();
                got.extend_from_slice(&piece);
                assert_eq!(got, want, "len {len} last {last}");
                let mut from = Vec::new();
                encode_frame(
                    &FromGroup::Part {
                        last,
                        bytes: piece.clone(),
                    },
                    1 << 20,
                    &mut from,
                )
                .unwrap();
                assert_eq!(got, from, "FromGroup's part variant has the same index");
            }
        }
        assert!(matches!(
            part_frame_head(2, true, &[0; 300], 256),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn reassembly_holds_only_what_arrived_and_refuses_a_part_inside_parts() {
        let whole = postcard::to_stdvec(&ToGroup::Part {
            last: true,
            bytes: vec![],
        })
        .unwrap();
        let mut r = Reassembly::new(1 << 20);
        let first = ToGroup::Part {
            last: false,
            bytes: whole[..1].to_vec(),
        };
        assert_eq!(r.push(first).unwrap(), None);
        assert!(r.in_progress());
        assert_eq!(r.held_bytes(), 1);
        // The concatenation is itself a part: refused.
        let rest = ToGroup::Part {
            last: true,
            bytes: whole[1..].to_vec(),
        };
        assert!(matches!(r.push(rest), Err(PartsError::Malformed { .. })));
        assert!(!r.in_progress());
        assert_eq!(r.held_bytes(), 0);
    }
}
