//! Built-in models: [`Register`], [`VersionedKv`] and [`AppendKv`].
//!
//! An answer of the wrong kind for its operation (a read answering "written") is impossible in
//! every state: the checker then reports the history as not linearizable.

mod append_kv;
mod key_map;
mod register;
mod versioned_kv;

pub use append_kv::{AppendKv, AppendKvInput, AppendKvOutput};
pub use key_map::KeyMap;
pub use register::{Register, RegisterInput, RegisterOutput};
pub use versioned_kv::{Expected, KvInput, KvOutput, VersionedKv};
