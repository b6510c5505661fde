//! Node configuration: identity, timing in ticks, and every limit by name (DESIGN.md §7).

use crate::{Error, LogIndex, NodeId};

/// How [`crate::RawNode::read_index`] confirms leadership (thesis §6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOnlyOption {
    /// One heartbeat round to a majority per read batch; safe under any clock behaviour.
    Safe,
    /// Serve reads from the leader's lease (thesis §6.4.1) without a round trip. Needs
    /// `check_quorum`, and is only safe if clocks drift less than the election timeout.
    LeaseBased,
}

/// Default [`Config::election_tick`].
pub const DEFAULT_ELECTION_TICK: u32 = 10;
/// Default [`Config::heartbeat_tick`].
pub const DEFAULT_HEARTBEAT_TICK: u32 = 1;
/// Default [`Config::max_inflight_appends`].
pub const DEFAULT_MAX_INFLIGHT_APPENDS: usize = 64;
/// Default [`Config::max_entries_bytes_per_append`] (1 MiB).
pub const DEFAULT_MAX_ENTRIES_BYTES_PER_APPEND: usize = 1024 * 1024;
/// Default [`Config::max_committed_bytes_per_ready`] (16 MiB).
pub const DEFAULT_MAX_COMMITTED_BYTES_PER_READY: usize = 16 * 1024 * 1024;
/// Default [`Config::max_uncommitted_entries`].
pub const DEFAULT_MAX_UNCOMMITTED_ENTRIES: u64 = 100_000;
/// Default [`Config::max_learner_lag_entries`].
pub const DEFAULT_MAX_LEARNER_LAG_ENTRIES: u64 = 1000;
/// Default [`Config::max_pending_reads`].
pub const DEFAULT_MAX_PENDING_READS: usize = 10_000;

/// Configuration of one Raft node.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id (never 0).
    pub id: NodeId,
    /// The bootstrap membership: every voter, this node included. It is used only while
    /// neither the snapshot nor an applied log entry says otherwise (the log decides after
    /// that, see `docs/raft.md` "Membership changes"). Empty for a server that joins an
    /// existing cluster: it learns the membership from the leader's log or snapshot and
    /// never campaigns before.
    pub voters: Vec<NodeId>,
    /// Ticks without hearing from a leader before a follower campaigns. The actual timeout is
    /// drawn uniformly from `[election_tick, 2 * election_tick)` (paper §5.2).
    pub election_tick: u32,
    /// Ticks between a leader's heartbeats; must be less than `election_tick`.
    pub heartbeat_tick: u32,
    /// Seed of the node's random number generator (election timeouts). The driver hands it in
    /// so a simulation replays exactly.
    pub rng_seed: u64,
    /// Run a pre-vote round before campaigning (thesis §9.6).
    pub pre_vote: bool,
    /// A leader steps down if it has not heard from a majority within an election timeout, and
    /// a node that heard from a leader within an election timeout refuses votes (thesis §6.2).
    pub check_quorum: bool,
    /// How read-index reads confirm leadership.
    pub read_only: ReadOnlyOption,
    /// Appends in flight to one follower before the leader waits for acknowledgements.
    pub max_inflight_appends: usize,
    /// Entry bytes in one AppendEntries (at least one entry is always sent).
    pub max_entries_bytes_per_append: usize,
    /// Committed-entry bytes handed to the driver in one [`crate::Ready`] (at least one entry).
    pub max_committed_bytes_per_ready: usize,
    /// Uncommitted entries a leader holds before it refuses proposals.
    pub max_uncommitted_entries: u64,
    /// Read-index requests a node queues before it refuses more.
    pub max_pending_reads: usize,
    /// A learner is promoted only if its match index is at most this many entries behind the
    /// leader's last index ([`crate::Error::LearnerBehind`] otherwise), so a promotion never
    /// leaves the cluster waiting on a voter that must first catch up.
    pub max_learner_lag_entries: u64,
    /// The last index the state machine has applied when the node is (re)started, e.g. the
    /// index of the snapshot it was restored from.
    pub applied: LogIndex,
}

impl Config {
    /// A configuration with the documented defaults.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Config {
        Config {
            id,
            voters,
            election_tick: DEFAULT_ELECTION_TICK,
            heartbeat_tick: DEFAULT_HEARTBEAT_TICK,
            rng_seed: id.0,
            pre_vote: true,
            check_quorum: true,
            read_only: ReadOnlyOption::Safe,
            max_inflight_appends: DEFAULT_MAX_INFLIGHT_APPENDS,
            max_entries_bytes_per_append: DEFAULT_MAX_ENTRIES_BYTES_PER_APPEND,
            max_committed_bytes_per_ready: DEFAULT_MAX_COMMITTED_BYTES_PER_READY,
            max_uncommitted_entries: DEFAULT_MAX_UNCOMMITTED_ENTRIES,
            max_pending_reads: DEFAULT_MAX_PENDING_READS,
            max_learner_lag_entries: DEFAULT_MAX_LEARNER_LAG_ENTRIES,
            applied: LogIndex(0),
        }
    }

    /// Checks the configuration is usable.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |why: &str| Err(Error::InvalidConfig(why.to_string()));
        if self.id.0 == 0 {
            return bad("node id 0 is reserved");
        }
        if !self.voters.is_empty() && !self.voters.contains(&self.id) {
            return bad("voters must include this node (or be empty for a server that joins)");
        }
        if self.voters.iter().any(|v| v.0 == 0) {
            return bad("node id 0 is reserved");
        }
        if self.heartbeat_tick == 0 || self.election_tick <= self.heartbeat_tick {
            return bad("need 0 < heartbeat_tick < election_tick");
        }
        if self.max_inflight_appends == 0 {
            return bad("max_inflight_appends must be positive");
        }
        if self.read_only == ReadOnlyOption::LeaseBased && !self.check_quorum {
            return bad("lease-based reads need check_quorum");
        }
        Ok(())
    }
}

/// SplitMix64: a tiny, well-studied generator, enough for election jitter and fully determined
/// by its seed (no dependency, no global state).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`; `hi > lo`.
    pub(crate) fn range(&mut self, lo: u32, hi: u32) -> u32 {
        debug_assert!(hi > lo);
        lo + (self.next_u64() % u64::from(hi - lo)) as u32
    }
}
