//! Length-prefixed, checksummed frames carrying postcard-encoded messages.

use serde::{de::DeserializeOwned, Serialize};

/// Bytes of the frame header: payload length (u32 LE) then CRC32C of the payload (u32 LE).
pub const FRAME_HEADER_BYTES: usize = 8;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The header announces a payload larger than the limit; nothing was allocated.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced (or attempted) payload length in bytes.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload's CRC32C does not match the header: the bytes were corrupted.
    #[error("frame checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    Checksum {
        /// CRC32C from the header.
        expected: u32,
        /// CRC32C computed over the payload.
        actual: u32,
    },
    /// The payload is not a valid encoding of the expected message type.
    #[error("malformed frame payload: {0}")]
    Malformed(String),
}

/// Appends one frame carrying `message` to `out`.
///
/// Fails with [`FrameError::TooLarge`] (and leaves `out` as it was) if the encoded message is
/// larger than `max_frame_bytes`.
pub fn encode_frame<T: Serialize>(
    message: &T,
    max_frame_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    let encoded = postcard::to_extend(message, std::mem::take(out));
    *out = match encoded {
        Ok(buf) => buf,
        Err(e) => return Err(FrameError::Malformed(e.to_string())),
    };
    let len = out.len() - start - FRAME_HEADER_BYTES;
    if len > max_frame_bytes || len > u32::MAX as usize {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    let crc = crc32c::crc32c(&out[start + FRAME_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Reads one frame from the front of `buf`.
///
/// Returns `Ok(None)` if `buf` does not yet hold a whole frame (read more bytes and call again),
/// or `Ok(Some((message, consumed)))` with the number of bytes the frame occupied. The length
/// is checked against `max_frame_bytes` as soon as the header is present, so an oversized
/// frame is rejected before its payload arrives. Never panics.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max_frame_bytes: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(len) = peek_frame_len(buf, max_frame_bytes)? else {
        return Ok(None);
    };
    let total = FRAME_HEADER_BYTES + len;
    if buf.len() < total {
        return Ok(None);
    }
    let expected = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let payload = &buf[FRAME_HEADER_BYTES..total];
    let actual = crc32c::crc32c(payload);
    if actual != expected {
        return Err(FrameError::Checksum { expected, actual });
    }
    let (message, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(Some((message, total)))
}

/// Returns the payload length announced by the header at the front of `buf`, or `None` if the
/// header is incomplete. Fails if the length exceeds `max_frame_bytes`.
pub fn peek_frame_len(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping(u64),
        Data { key: String, value: Vec<u8> },
    }

    #[test]
    fn round_trip_two_frames_in_one_buffer() {
        let mut buf = Vec::new();
        encode_frame(&Msg::Ping(7), 1024, &mut buf).unwrap();
        encode_frame(
            &Msg::Data {
                key: "k".into(),
                value: vec![1, 2, 3],
            },
            1024,
            &mut buf,
        )
        .unwrap();
        let (a, n) = decode_frame::<Msg>(&buf, 1024).unwrap().unwrap();
        assert_eq!(a, Msg::Ping(7));
        let (b, m) = decode_frame::<Msg>(&buf[n..], 1024).unwrap().unwrap();
        assert_eq!(
            b,
            Msg::Data {
                key: "k".into(),
                value: vec![1, 2, 3]
            }
        );
        assert_eq!(n + m, buf.len());
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let mut buf = Vec::new();
        encode_frame(&Msg::Ping(1), 1024, &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert_eq!(decode_frame::<Msg>(&buf[..cut], 1024).unwrap(), None);
        }
    }

    #[test]
    fn oversized_frames_are_rejected_from_the_header_alone() {
        let header = [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0];
        assert_eq!(
            decode_frame::<Msg>(&header, 1024),
            Err(FrameError::TooLarge {
                len: 0x7fff_ffff,
                max: 1024
            })
        );
        let mut out = vec![9];
        let big = Msg::Data {
            key: String::new(),
            value: vec![0; 2000],
        };
        assert!(matches!(
            encode_frame(&big, 1024, &mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(out, vec![9], "a failed encode leaves the buffer as it was");
    }

    #[test]
    fn corruption_is_detected() {
        let mut buf = Vec::new();
        encode_frame(&Msg::Ping(42), 1024, &mut buf).unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        assert!(matches!(
            decode_frame::<Msg>(&buf, 1024),
            Err(FrameError::Checksum { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_frame::<Msg>(&bytes, 1024);
        }

        #[test]
        fn decoder_never_panics_on_valid_crc_garbage(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = (payload.len() as u32).to_le_bytes().to_vec();
            buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            let _ = decode_frame::<Msg>(&buf, 1024);
        }

        #[test]
        fn round_trip(n in any::<u64>(), key in ".{0,20}", value in proptest::collection::vec(any::<u8>(), 0..100)) {
            for m in [Msg::Ping(n), Msg::Data { key: key.clone(), value: value.clone() }] {
                let mut buf = Vec::new();
                encode_frame(&m, 1 << 20, &mut buf).unwrap();
                let (d, used) = decode_frame::<Msg>(&buf, 1 << 20).unwrap().unwrap();
                prop_assert_eq!(d, m);
                prop_assert_eq!(used, buf.len());
            }
        }
    }
}
