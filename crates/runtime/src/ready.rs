//! What every tokio driver of a Raft core does the same way, whichever state machine sits on
//! top (the generic [`crate::node`] driver and the KV server's [`crate::kv::server`]): persist
//! a `Ready` with one fsync, run disk work without stalling the runtime, and seed the
//! election-timeout jitter.

use shoal_raft::{Message, Ready};
use shoal_storage::{DurableStorage, StdDisk};
use tracing::warn;

use crate::transport::Transport;

/// The seed of the core's election-timeout jitter. The core is deterministic given its seed;
/// in production nodes must not share one, so it mixes the node id with the wall clock and
/// the process id.
#[allow(clippy::disallowed_methods)] // the runtime is where real time and entropy come in
pub(crate) fn election_seed(id: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ id.rotate_left(32) ^ u64::from(std::process::id())
}

/// A role for a log field, in the words `shoal kv status` uses (not Rust's `PreCandidate`).
pub(crate) fn role_text(role: shoal_raft::Role) -> &'static str {
    match role {
        shoal_raft::Role::Follower => "follower",
        shoal_raft::Role::PreCandidate => "pre-candidate",
        shoal_raft::Role::Candidate => "candidate",
        shoal_raft::Role::Leader => "leader",
    }
}

/// A leader for a message or log field: its id, or `none` (not Rust's `Some(3)`).
pub(crate) fn leader_text(leader: Option<shoal_raft::NodeId>) -> String {
    leader.map_or_else(|| "none".to_string(), |l| l.0.to_string())
}

/// An error and its causes on one line (`outer: cause: root`), for a log or the CLI's last
/// line: errors such as "storage in DIR" keep their cause in `source()`, not in their message.
/// A cause whose text already ends the previous one is not repeated (some error types, of other
/// crates too, print their cause in their message and also return it from `source()`).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut previous = out.clone();
    let mut cause = err.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !previous.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        previous = text;
        cause = e.source();
    }
    out
}

/// Step 2 of a `Ready`: write the received snapshot, the new entries and the hard state, then
/// one fsync covers them all (group commit). Nothing to write: no fsync.
pub(crate) fn persist_ready(
    storage: &mut DurableStorage,
    disk: &mut StdDisk,
    rd: &Ready,
) -> Result<(), shoal_storage::Error> {
    if rd.snapshot.is_none() && rd.entries.is_empty() && rd.hard_state.is_none() {
        return Ok(());
    }
    in_place(|| {
        if let Some(s) = &rd.snapshot {
            storage.apply_snapshot(disk, s.clone())?;
        }
        storage.append(disk, &rd.entries)?;
        if let Some(hs) = rd.hard_state {
            storage.set_hard_state(disk, hs)?;
        }
        storage.sync(disk)
    })
}

/// Runs blocking disk work. On a multi-threaded runtime the worker thread is handed over for
/// the duration, so the transport's and the connections' tasks keep running during an fsync.
pub(crate) fn in_place<T>(op: impl FnOnce() -> T) -> T {
    let multi_thread = matches!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    if multi_thread {
        tokio::task::block_in_place(op)
    } else {
        op()
    }
}

/// Hands a message of the core to the transport.
pub(crate) fn send(transport: &Transport<Message>, m: Message) {
    let to = m.to.0;
    if let Err(e) = transport.send(to, m) {
        warn!(error = %e, "core addressed a message to an unknown server");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_names_every_cause_once() {
        let err = shoal_storage::Error::Disk(shoal_storage::DiskError::Io {
            op: "append",
            name: "seg-1.log".into(),
            source: std::io::Error::from_raw_os_error(28),
        });
        let text = super::error_chain(&err);
        assert!(
            text.starts_with("append seg-1.log: No space left on device"),
            "{text}"
        );
        assert_eq!(text.matches("No space left").count(), 1, "{text}");
        assert_eq!(super::leader_text(None), "none");
        assert_eq!(super::leader_text(Some(shoal_raft::NodeId(3))), "3");
    }
}
