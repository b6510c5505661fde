//! Shoal's wire format.
//!
//! This crate owns every byte that crosses a process boundary: the message types of each
//! protocol (one module per protocol), the frame format that carries them, the limits that
//! bound them, and the protocol version exchanged in each connection's handshake.
//!
//! A frame is
//!
//! ```text
//! +----------------+----------------+---------------------------+
//! | len: u32 LE    | crc: u32 LE    | payload: `len` bytes       |
//! +----------------+----------------+---------------------------+
//! ```
//!
//! where `payload` is a [postcard] encoding of one message and `crc` is the CRC32C of the
//! payload. The length is checked against a hard maximum *before* anything is allocated, and a
//! decoder never panics: every malformed input is a [`FrameError`].
//!
//! This crate must never do I/O, read a clock or depend on tokio (the optional `codec` feature
//! adds a tokio-util adapter for drivers only).

#![warn(missing_docs)]

pub mod frame;
pub mod handshake;
pub mod kv;
pub mod mr;
pub mod parts;
pub mod raft;
pub mod shard;
pub mod snapshot;

#[cfg(feature = "codec")]
pub mod codec;

pub use frame::{decode_frame, encode_frame, FrameError, FRAME_HEADER_BYTES};
pub use handshake::{
    Hello, Refusal, Role, KV_SERVICE, PROTOCOL_MAGIC, PROTOCOL_VERSION, SHARD_SERVICE,
};

/// Default hard maximum of a frame's payload, in bytes (16 MiB). Every protocol may choose a
/// smaller limit; nothing larger is ever allocated by a decoder.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
