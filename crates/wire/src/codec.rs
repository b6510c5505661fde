//! A tokio-util [`Decoder`]/[`Encoder`] over [`crate::frame`], for drivers (runtime, workers).

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{decode_frame, encode_frame, peek_frame_len, FrameError, FRAME_HEADER_BYTES};
use crate::parts::{part_frame_head, InParts, PartsError, Reassembly, PART_OVERHEAD_BYTES};

/// Frames messages of type `In` (decoded) and `Out` (encoded) on a byte stream.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_frame_bytes: usize,
    scratch: Vec<u8>,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames larger than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec {
            max_frame_bytes,
            scratch: Vec::new(),
            _types: PhantomData,
        }
    }
}

/// Errors of a framed connection: I/O or a bad frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The underlying stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer sent a bad frame; the connection should be closed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A message in parts was refused (over the message limit, malformed, interleaved); the
    /// connection should be closed. Also a message to send that exceeds the message limit.
    #[error(transparent)]
    Parts(#[from] PartsError),
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match decode_frame::<In>(src, self.max_frame_bytes)? {
            Some((message, used)) => {
                src.advance(used);
                Ok(Some(message))
            }
            None => {
                // Reserve room for the whole frame once its (already bounded) length is known.
                if let Some(len) = peek_frame_len(src, self.max_frame_bytes)? {
                    src.reserve(FRAME_HEADER_BYTES + len - src.len().min(FRAME_HEADER_BYTES + len));
                }
                Ok(None)
            }
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.scratch.clear();
        encode_frame(&item, self.max_frame_bytes, &mut self.scratch)?;
        dst.extend_from_slice(&self.scratch);
        Ok(())
    }
}

/// Frames messages like [`FrameCodec`], and carries messages larger than a frame in parts
/// ([`crate::parts`]): an `Out` whose encoding exceeds `max_frame_bytes` is written as
/// consecutive part frames (if `Out` has a part variant; else it is refused as before, with
/// [`FrameError::TooLarge`]), and incoming parts are reassembled into one `In` of at most
/// `max_message_bytes`. The reader holds at most one frame (bounded by `max_frame_bytes`,
/// reserved once its length is known) plus the parts received so far: it never reserves more
/// than it received on the word of a length prefix. Messages that fit in a frame are encoded
/// exactly as [`FrameCodec`] encodes them, so both ends may mix the two codecs as long as no
/// message needs parts.
#[derive(Debug)]
pub struct PartCodec<In, Out> {
    frames: FrameCodec<In, Out>,
    max_frame_bytes: usize,
    max_message_bytes: usize,
    reassembly: Reassembly,
    scratch: Vec<u8>,
}

impl<In, Out> PartCodec<In, Out> {
    /// A codec with frames of at most `max_frame_bytes` and messages in parts of at most
    /// `max_message_bytes` (both ways).
    pub fn new(max_frame_bytes: usize, max_message_bytes: usize) -> Self {
        PartCodec {
            frames: FrameCodec::new(max_frame_bytes),
            max_frame_bytes,
            max_message_bytes,
            reassembly: Reassembly::new(max_message_bytes),
            scratch: Vec::new(),
        }
    }

    /// Bytes of an incoming message in parts held so far (0 between messages).
    pub fn held_bytes(&self) -> usize {
        self.reassembly.held_bytes()
    }
}

impl<In: DeserializeOwned + InParts, Out> Decoder for PartCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        loop {
            let Some(frame) = self.frames.decode(src)? else {
                return Ok(None);
            };
            if let Some(message) = self.reassembly.push(frame)? {
                return Ok(Some(message));
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.decode(src)? {
            Some(message) => Ok(Some(message)),
            None if src.is_empty() && !self.reassembly.in_progress() => Ok(None),
            None => Err(CodecError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed inside a message ({} bytes of frame, {} bytes of parts)",
                    src.len(),
                    self.reassembly.held_bytes()
                ),
            ))),
        }
    }
}

impl<In, Out: Serialize + InParts> Encoder<Out> for PartCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.scratch.clear();
        let encoded = postcard::to_extend(&item, std::mem::take(&mut self.scratch));
        drop(item);
        self.scratch = encoded.map_err(|e| FrameError::Malformed(e.to_string()))?;
        let result = self.write(dst);
        if self.scratch.capacity() > self.max_frame_bytes {
            // Do not keep a large message's buffer for the small ones that follow.
            self.scratch = Vec::new();
        }
        result
    }
}

impl<In, Out: InParts> PartCodec<In, Out> {
    /// Writes the encoding in `scratch` as one frame or as parts.
    fn write(&self, dst: &mut BytesMut) -> Result<(), CodecError> {
        let payload = &self.scratch;
        let len = payload.len();
        if len <= self.max_frame_bytes && len <= u32::MAX as usize {
            dst.reserve(FRAME_HEADER_BYTES + len);
            dst.extend_from_slice(&(len as u32).to_le_bytes());
            dst.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
            dst.extend_from_slice(payload);
            return Ok(());
        }
        let Some(variant) = Out::PART_VARIANT else {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            }
            .into());
        };
        if len > self.max_message_bytes {
            return Err(PartsError::TooLarge {
                len,
                max: self.max_message_bytes,
            }
            .into());
        }
        let piece = self
            .max_frame_bytes
            .saturating_sub(PART_OVERHEAD_BYTES)
            .max(1);
        let parts = len.div_ceil(piece);
        dst.reserve(len + parts * (FRAME_HEADER_BYTES + PART_OVERHEAD_BYTES));
        let mut chunks = payload.chunks(piece).peekable();
        while let Some(chunk) = chunks.next() {
            let head = part_frame_head(
                variant,
                chunks.peek().is_none(),
                chunk,
                self.max_frame_bytes,
            )?;
            dst.extend_from_slice(&head);
            dst.extend_from_slice(chunk);
        }
        Ok(())
    }
}
