//! A tokio-util [`Decoder`]/[`Encoder`] over [`crate::frame`], for drivers (runtime, workers).

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{decode_frame, encode_frame, peek_frame_len, FrameError, FRAME_HEADER_BYTES};

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
