//! Small pieces every server of the runtime shares: the election-timeout seed, and how roles,
//! leaders and errors are written in logs and messages. (The `Ready` pipeline itself is in
//! [`crate::driver`].)

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
