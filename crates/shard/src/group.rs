//! A replica group's shard-aware state machine ([`ShardMachine`]), hosted by the replica shell
//! (`shoal_replica::Replica`) the way the KV server hosts `shoal_kv::KvMachine`.
//!
//! The group's log carries [`GroupEntry`]s: client requests for one shard, the configurations
//! the group adopts, and the three migration steps (freeze at the old owner, install at the new
//! owner, delete at the old owner), each fenced by a configuration number and idempotent. The
//! semantics are the table of `docs/sharding.md`, "Groups".
//!
//! **Positions.** Each shard's [`KvStore`] numbers its own applies: the machine applies a client
//! request at `store.applied() + 1`, never at the group's log index. The counter is part of the
//! store's snapshot, so it travels with the shard: after a migration the new owner's log index
//! may be far below the old owner's (a `KvStore` asserts growing positions), and two groups'
//! indexes collide. Session ids (the positions of their registrations) are therefore per
//! shard, and a client registers once per shard it writes to.
//!
//! **Leases** are refused in a sharded cluster for now ([`KvResult::Refused`]): a lease's keys
//! may span shards and its expiry follows positions, which are per shard here.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shoal_kv::{KvStore, Limits};
use shoal_raft::LogIndex;
use shoal_wire::kv::{KvOp, KvRequest, KvResult};
use shoal_wire::shard::{CopiedItem, DeltaChunk, ShardChunk};

use crate::{diff, shard_of, Config, Gid, ShardId, NO_GROUP};

/// The format version byte in front of every encoded [`GroupEntry`].
pub const ENTRY_FORMAT: u8 = 1;
/// The format version byte in front of a [`ShardMachine`] snapshot (4: with the delta rounds
/// of copies in progress, [`CopyTrack::round`] and [`CopyTrack::pending`], and the round of
/// each staged copy; 3, with the copies in progress but no rounds, 2, with the staged copies
/// of shards moving in but no copy tracking, and 1, without either, are still restored).
pub const MACHINE_SNAPSHOT_FORMAT: u8 = 4;
/// The format byte in front of a shard exported whole by [`ShardMachine::export`].
pub const EXPORT_FORMAT: u8 = 1;
/// The format byte in front of the tail of a shard copied in chunks
/// ([`ShardMachine::export_chunk`]'s last chunk): an Install's data that serves the staged copy.
pub const TAIL_FORMAT: u8 = 2;
/// The format byte in front of the tail of a shard copied while it served (a
/// [`GroupEntry::CopyStart`] before its freeze): [`TAIL_FORMAT`]'s tail plus every key
/// written since the copy started, with its value at the freeze or its absence.
pub const TAIL_TOUCHED_FORMAT: u8 = 3;
/// The most bytes of keys and values one chunk carries, whatever the request asks (a chunk
/// must fit in one frame and one modest log entry; one key larger than this still goes alone).
pub const MAX_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

/// The reason given with [`KvResult::Refused`] to a lease operation.
pub const LEASES_REFUSED: &str =
    "leases are not supported in a sharded cluster (yet): a lease's keys may span shards";

/// Errors of the group state machine: bytes that are no entry, snapshot or export of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// Encoded by an unknown format version.
    #[error("unknown {what} format version {version}")]
    Format {
        /// `entry`, `snapshot` or `export`.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
    /// Bytes that do not decode, or decode to something that breaks an invariant.
    #[error("{what} does not decode: {reason}")]
    Decode {
        /// `entry`, `snapshot` or `export`.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// One entry of a group's Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupEntry {
    /// A client's request for `shard`, routed by configuration `config` (the request is judged
    /// against the group's own adopted configuration; `config` only tells what the client knew).
    Client {
        /// The shard the request is for (every key it names must be in it).
        shard: ShardId,
        /// The configuration the client routed by.
        config: u64,
        /// The request.
        request: KvRequest,
    },
    /// The group learns configuration `config.num` (it must follow the adopted one).
    Adopt {
        /// The new configuration.
        config: Config,
    },
    /// Old owner: stop serving `shard` from configuration `config` on.
    Freeze {
        /// The shard.
        shard: ShardId,
        /// The configuration that moves it away.
        config: u64,
    },
    /// New owner: serve `shard` with `data` (from [`ShardMachine::export`] at the old owner).
    Install {
        /// The shard.
        shard: ShardId,
        /// The configuration that moves it here.
        config: u64,
        /// The shard's exported bytes (`serde_bytes`: the same encoding as a plain `Vec<u8>`,
        /// in one copy instead of a call per byte — this is a whole shard).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Old owner: forget the frozen `shard` (after it is installed at its new owner).
    Delete {
        /// The shard.
        shard: ShardId,
        /// The configuration that moved it away.
        config: u64,
    },
    /// New owner: write a chunk of `shard` (moving here at `config`) into its staging copy,
    /// which is not served until an [`GroupEntry::Install`] of the tail.
    Stage {
        /// The shard.
        shard: ShardId,
        /// The configuration that moves it here.
        config: u64,
        /// Keys with their values and versions, from [`ShardMachine::export_chunk`].
        items: Vec<CopiedItem>,
    },
    /// Old owner, before it adopts `config`: record the keys of `shard` written from now on,
    /// so that the shard can be copied while it serves (see [`CopyTrack`]).
    CopyStart {
        /// The shard.
        shard: ShardId,
        /// The configuration that will move it away.
        config: u64,
    },
    /// Old owner, while `shard` is copied live for `config`: start delta round `round` (see
    /// [`CopyTrack`]): the previous round's keys are staged at the new owner, the keys
    /// written since it began become this round's, and recording starts afresh.
    CopyRound {
        /// The shard.
        shard: ShardId,
        /// The configuration that will move it away.
        config: u64,
        /// One more than the track's round.
        round: u32,
    },
    /// New owner: [`GroupEntry::Stage`] of a chunk read in copy round `round` (0: the live
    /// copy, 1…: a delta round, [`shoal_wire::shard::FROZEN_ROUND`]: the frozen shard), which
    /// also removes the `absent` keys. Ignored (`Stale`) when the staged copy has taken a
    /// newer round. The last variant, so older entries keep their bytes.
    StageRound {
        /// The shard.
        shard: ShardId,
        /// The configuration that moves it here.
        config: u64,
        /// The round the chunk was read in.
        round: u32,
        /// Keys with their values and versions.
        items: Vec<CopiedItem>,
        /// Keys absent when the chunk was read.
        absent: Vec<Vec<u8>>,
    },
}

impl GroupEntry {
    /// The encoding: [`ENTRY_FORMAT`], then the entry in postcard.
    pub fn encode(&self) -> Vec<u8> {
        let out = vec![ENTRY_FORMAT];
        // Integers, byte vectors, strings and maps always serialize into a Vec.
        postcard::to_extend(self, out).expect("a GroupEntry always serializes")
    }

    /// Decodes [`GroupEntry::encode`]'s bytes. Never panics: an unknown version, truncated or
    /// trailing bytes, and an adopted configuration breaking the invariants are errors.
    pub fn decode(bytes: &[u8]) -> Result<GroupEntry, GroupError> {
        let rest = check_version("entry", ENTRY_FORMAT, bytes)?;
        let entry: GroupEntry = take_all("entry", rest)?;
        if let GroupEntry::Adopt { config } = &entry {
            config.check().map_err(|e| GroupError::Decode {
                what: "entry",
                reason: e.to_string(),
            })?;
        }
        Ok(entry)
    }
}

fn check_version<'a>(
    what: &'static str,
    expected: u8,
    bytes: &'a [u8],
) -> Result<&'a [u8], GroupError> {
    let (&version, rest) = bytes.split_first().ok_or(GroupError::Decode {
        what,
        reason: "no bytes".into(),
    })?;
    if version != expected {
        return Err(GroupError::Format { what, version });
    }
    Ok(rest)
}

fn take_all<'a, T: Deserialize<'a>>(what: &'static str, bytes: &'a [u8]) -> Result<T, GroupError> {
    let (value, trailing) = postcard::take_from_bytes(bytes).map_err(|e| GroupError::Decode {
        what,
        reason: e.to_string(),
    })?;
    if !trailing.is_empty() {
        return Err(GroupError::Decode {
            what,
            reason: format!("{} trailing bytes", trailing.len()),
        });
    }
    Ok(value)
}

/// A shard's state in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardState {
    /// Requests for the shard are applied (while the adopted configuration gives it here).
    Serving,
    /// Frozen for a move: every request is refused; the data waits to be exported and deleted.
    Frozen,
}

/// A shard held by a group (an absent shard is not in the machine's map).
#[derive(Debug, Clone)]
pub struct Shard {
    /// Serving or frozen.
    pub state: ShardState,
    /// The configuration number that gave the shard this state.
    pub config: u64,
    /// The shard's data and session table; its `applied()` is the shard's own position.
    pub store: KvStore,
}

/// What a control entry (Adopt, Freeze, Install, Delete) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOutcome {
    /// The entry changed the state.
    Applied,
    /// Its effect already holds (a replay): nothing changed.
    AlreadyDone,
    /// It carries an older configuration number than the shard (or group) has seen: ignored.
    Stale {
        /// The newer number the shard (or the group) is at.
        seen: u64,
    },
    /// It does not fit the state (an Adopt that skips a configuration, a Freeze of a shard not
    /// held, data that is no export of this shard at this configuration): nothing changed.
    Refused {
        /// Why, for a person.
        reason: String,
    },
}

/// What applying a [`GroupEntry`] gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOutput {
    /// The shard's store answered the client's request.
    Kv(KvResult),
    /// The group does not serve the shard now; `config` is the configuration it knows.
    WrongGroup {
        /// The group's adopted configuration number.
        config: u64,
    },
    /// The outcome of a control entry.
    Control(ControlOutcome),
}

/// The copy of a shard moving in, staged chunk by chunk before its Install (not served).
#[derive(Debug, Clone)]
pub struct Staging {
    /// The configuration that moves the shard here.
    pub config: u64,
    /// The newest copy round staged (0: the live copy; see [`GroupEntry::StageRound`]): a
    /// chunk of an older round is not staged any more.
    pub round: u32,
    /// The keys staged so far (no sessions, position 0).
    pub store: KvStore,
}

/// A copy of a shard in progress while the shard still serves (old owner): from position
/// `p0` of the shard's store on, every key a client request writes or deletes is recorded,
/// so that chunks read from the live store after `p0` plus the **touched** keys' values at
/// the freeze make the shard as it was frozen (`docs/sharding.md`, "Copying while the shard
/// serves"). Started by [`GroupEntry::CopyStart`]; dropped at the shard's Delete, at a Freeze
/// or an Adopt of another (newer) configuration, and replaced by a newer CopyStart.
///
/// **Delta rounds** ([`GroupEntry::CopyRound`]) keep the tail small under heavy writes: round
/// r acknowledges that round r-1's keys are staged at the new owner (they leave `pending`),
/// moves the keys touched since round r-1 began into `pending` (read by
/// [`ShardMachine::export_delta`] and staged as round r) and starts `touched` afresh. The tail
/// carries `pending ∪ touched`: every key written since the last acknowledged round began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTrack {
    /// The configuration that will move the shard away.
    pub config: u64,
    /// The shard's position when the tracking began.
    pub p0: u64,
    /// The current delta round (0: none started).
    pub round: u32,
    /// The keys of the current round: touched before it began, not yet known to be staged.
    pub pending: BTreeSet<Vec<u8>>,
    /// The keys written or deleted since the current round began (since `p0` in round 0).
    pub touched: BTreeSet<Vec<u8>>,
}

/// The shard-aware state machine of one replica group.
#[derive(Debug, Clone)]
pub struct ShardMachine {
    gid: Gid,
    limits: Limits,
    /// The newest adopted configuration (configuration 0, with no owners, at first).
    config: Config,
    shards: BTreeMap<ShardId, Shard>,
    /// For each shard this group deleted, the configuration number of the delete: a replayed
    /// or delayed Install of that number or older must not bring stale data back.
    deleted: BTreeMap<ShardId, u64>,
    /// Shards moving in, copied in chunks (`Stage`) and not served until their Install.
    staging: BTreeMap<ShardId, Staging>,
    /// Shards moving out, copied while they serve: the keys written since the copy started.
    copies: BTreeMap<ShardId, CopyTrack>,
}

/// A snapshot in the making: O(1) copies of the stores (`KvStore` shares its nodes), serialized
/// off the loop by [`shoal_replica::SnapshotData::into_bytes`].
#[derive(Debug, Clone)]
pub struct GroupSnapshot(ShardMachine);

impl shoal_replica::SnapshotData for GroupSnapshot {
    fn into_bytes(self) -> Vec<u8> {
        self.0.encode_snapshot()
    }
}

#[derive(Serialize, Deserialize)]
struct ShardImage {
    shard: ShardId,
    state: ShardState,
    config: u64,
    /// `serde_bytes`: see [`GroupEntry::Install`]'s data.
    #[serde(with = "serde_bytes")]
    store: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct MachineImageV1 {
    gid: Gid,
    config: Config,
    shards: Vec<ShardImage>,
    deleted: Vec<(ShardId, u64)>,
}

#[derive(Serialize, Deserialize)]
struct StagingImageV2 {
    shard: ShardId,
    config: u64,
    #[serde(with = "serde_bytes")]
    store: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct MachineImageV2 {
    gid: Gid,
    config: Config,
    shards: Vec<ShardImage>,
    deleted: Vec<(ShardId, u64)>,
    staging: Vec<StagingImageV2>,
}

#[derive(Serialize, Deserialize)]
struct CopyImageV3 {
    shard: ShardId,
    config: u64,
    p0: u64,
    touched: Vec<serde_bytes::ByteBuf>,
}

#[derive(Serialize, Deserialize)]
struct MachineImageV3 {
    gid: Gid,
    config: Config,
    shards: Vec<ShardImage>,
    deleted: Vec<(ShardId, u64)>,
    staging: Vec<StagingImageV2>,
    copies: Vec<CopyImageV3>,
}

#[derive(Serialize, Deserialize)]
struct StagingImage {
    shard: ShardId,
    config: u64,
    round: u32,
    #[serde(with = "serde_bytes")]
    store: Vec<u8>,
}

impl From<StagingImageV2> for StagingImage {
    fn from(old: StagingImageV2) -> StagingImage {
        StagingImage {
            shard: old.shard,
            config: old.config,
            round: 0,
            store: old.store,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CopyImage {
    shard: ShardId,
    config: u64,
    p0: u64,
    round: u32,
    pending: Vec<serde_bytes::ByteBuf>,
    touched: Vec<serde_bytes::ByteBuf>,
}

#[derive(Serialize, Deserialize)]
struct MachineImage {
    gid: Gid,
    config: Config,
    shards: Vec<ShardImage>,
    deleted: Vec<(ShardId, u64)>,
    staging: Vec<StagingImage>,
    copies: Vec<CopyImage>,
}

/// A key written since a copy started, with its value and version at the freeze (`None`:
/// absent then).
#[derive(Serialize, Deserialize)]
struct TouchedItem {
    #[serde(with = "serde_bytes")]
    key: Vec<u8>,
    value: Option<(serde_bytes::ByteBuf, u64)>,
}

/// [`TailImage`] of a shard copied while it served ([`TAIL_TOUCHED_FORMAT`]).
#[derive(Serialize, Deserialize)]
struct TouchedTailImage {
    tail: TailImage,
    touched: Vec<TouchedItem>,
}

/// The tail of a shard copied in chunks: what its Install adds to the staged keys.
#[derive(Serialize, Deserialize)]
struct TailImage {
    shard: ShardId,
    config: u64,
    /// How many keys, and bytes of keys and values, the staged copy must hold: a copy with a
    /// chunk missing is refused instead of served.
    keys: u64,
    data_bytes: u64,
    /// The store without its data ([`KvStore::meta_snapshot`]): sessions, position counter.
    #[serde(with = "serde_bytes")]
    meta: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct ExportImage {
    shard: ShardId,
    config: u64,
    /// `serde_bytes`: see [`GroupEntry::Install`]'s data.
    #[serde(with = "serde_bytes")]
    store: Vec<u8>,
}

fn key_of(op: &KvOp) -> Option<&[u8]> {
    match op {
        KvOp::Get { key }
        | KvOp::Put { key, .. }
        | KvOp::Delete { key, .. }
        | KvOp::PutLease { key, .. } => Some(key),
        _ => None,
    }
}

pub(crate) fn is_lease_op(op: &KvOp) -> bool {
    matches!(
        op,
        KvOp::LeaseGrant { .. }
            | KvOp::LeaseKeepAlive { .. }
            | KvOp::LeaseRevoke { .. }
            | KvOp::LeaseList
            | KvOp::PutLease { .. }
            | KvOp::LeaseExpire { .. }
            | KvOp::LeaseCheckpoint { .. }
    )
}

impl ShardMachine {
    /// A group `gid` of a cluster with `shards` shards, at configuration 0 (holding nothing).
    /// Every replica of every group must use the same `limits` (stores migrate between groups).
    pub fn new(gid: Gid, shards: u32, limits: Limits) -> Result<ShardMachine, crate::Error> {
        if gid == NO_GROUP {
            return Err(crate::Error::ReservedGid);
        }
        Ok(ShardMachine {
            gid,
            limits,
            config: Config::empty(shards)?,
            shards: BTreeMap::new(),
            deleted: BTreeMap::new(),
            staging: BTreeMap::new(),
            copies: BTreeMap::new(),
        })
    }

    /// The copy of `shard` in progress while it serves, if any (old owner).
    pub fn copy_track(&self, shard: ShardId) -> Option<&CopyTrack> {
        self.copies.get(&shard)
    }

    /// The staged copy of `shard` if it is moving in chunk by chunk.
    pub fn staging(&self, shard: ShardId) -> Option<&Staging> {
        self.staging.get(&shard)
    }

    /// The group's id.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// The newest adopted configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The shard if this group holds it (serving or frozen).
    pub fn shard(&self, shard: ShardId) -> Option<&Shard> {
        self.shards.get(&shard)
    }

    /// The shards held, in order.
    pub fn shards(&self) -> impl Iterator<Item = (ShardId, &Shard)> {
        self.shards.iter().map(|(&s, sh)| (s, sh))
    }

    /// Whether requests for `shard` are served here now: the shard is Serving and the adopted
    /// configuration gives it to this group.
    pub fn serves(&self, shard: ShardId) -> bool {
        self.config.owner(shard) == Some(self.gid)
            && self
                .shards
                .get(&shard)
                .is_some_and(|s| s.state == ShardState::Serving)
    }

    /// Answers a read (get, scan) of `shard` once read-index confirmed it: `WrongGroup` unless
    /// the shard is served here.
    pub fn read(&self, shard: ShardId, op: &KvOp) -> GroupOutput {
        if is_lease_op(op) {
            return GroupOutput::Kv(KvResult::Refused {
                reason: LEASES_REFUSED.into(),
            });
        }
        if let Some(refused) = self.misrouted(shard, op) {
            return refused;
        }
        match self.shards.get(&shard) {
            Some(s) if self.serves(shard) => {
                GroupOutput::Kv(s.store.read(op).unwrap_or(KvResult::Stale))
            }
            _ => self.wrong_group(),
        }
    }

    /// The bytes to install at the new owner: the shard's store (data, session table, its
    /// position counter) with the shard number and configuration, only when the shard is
    /// Frozen at `config` here.
    pub fn export(&self, shard: ShardId, config: u64) -> Option<Vec<u8>> {
        let s = self.shards.get(&shard)?;
        if s.state != ShardState::Frozen || s.config != config {
            return None;
        }
        let image = ExportImage {
            shard,
            config,
            store: s.store.snapshot(),
        };
        let out = vec![EXPORT_FORMAT];
        Some(postcard::to_extend(&image, out).expect("an export always serializes"))
    }

    /// A chunk of `shard` frozen at `config` here, for the new owner's `Stage`: its keys after
    /// `after` in order, up to about `max_bytes` (at most [`MAX_CHUNK_BYTES`], at least one
    /// key), and on the last chunk the tail (sessions, position counter, the key count and
    /// bytes) for the Install. `None` unless the shard is Frozen at `config` here.
    pub fn export_chunk(
        &self,
        shard: ShardId,
        config: u64,
        after: Option<&[u8]>,
        max_bytes: u64,
    ) -> Option<ShardChunk> {
        let s = self.shards.get(&shard)?;
        let track = self.copies.get(&shard).filter(|t| t.config == config);
        let frozen = s.state == ShardState::Frozen && s.config == config;
        // The live store of a shard whose copy to `config` started here (it serves until the
        // group adopts `config`, then waits for its freeze): chunks, never a tail.
        let live = s.state == ShardState::Serving && s.config < config && track.is_some();
        if !frozen && !live {
            return None;
        }
        let max = max_bytes.clamp(1, MAX_CHUNK_BYTES) as usize;
        let (items, last) = s.store.items_after(after, max);
        let items = items
            .into_iter()
            .map(|(key, value, version)| CopiedItem {
                key,
                value,
                version,
            })
            .collect();
        let tail = (last && frozen).then(|| {
            let tail = TailImage {
                shard,
                config,
                keys: s.store.len() as u64,
                data_bytes: s.store.data_bytes() as u64,
                meta: s.store.meta_snapshot(),
            };
            match track {
                None => postcard::to_extend(&tail, vec![TAIL_FORMAT]),
                Some(t) => {
                    // Every key written since the last acknowledged round began.
                    let touched = t
                        .pending
                        .union(&t.touched)
                        .map(|k| TouchedItem {
                            key: k.clone(),
                            value: s
                                .store
                                .get(k)
                                .map(|(v, ver)| (serde_bytes::ByteBuf::from(v.to_vec()), ver)),
                        })
                        .collect();
                    let image = TouchedTailImage { tail, touched };
                    postcard::to_extend(&image, vec![TAIL_TOUCHED_FORMAT])
                }
            }
            .expect("a tail always serializes")
        });
        Some(ShardChunk { items, tail })
    }

    /// A chunk of the current delta round of `shard`, copied live for `config` here (see
    /// [`CopyTrack`]): the round's keys after `after` in order, up to about `max_bytes` of keys
    /// and values (at most [`MAX_CHUNK_BYTES`], at least one key), each with its value and
    /// version now or its absence. `None` unless the shard still serves here, before the group
    /// adopts `config`, with a copy to `config` in progress.
    pub fn export_delta(
        &self,
        shard: ShardId,
        config: u64,
        after: Option<&[u8]>,
        max_bytes: u64,
    ) -> Option<DeltaChunk> {
        let s = self.shards.get(&shard)?;
        let t = self.copies.get(&shard).filter(|t| t.config == config)?;
        // Once the group adopted `config` no round starts: the keys left ride in the tail.
        if s.state != ShardState::Serving || s.config >= config || self.config.num >= config {
            return None;
        }
        let max = max_bytes.clamp(1, MAX_CHUNK_BYTES);
        let mut keys = match after {
            Some(a) => t
                .pending
                .range::<[u8], _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => t
                .pending
                .range::<[u8], _>((std::ops::Bound::Unbounded, std::ops::Bound::Unbounded)),
        }
        .peekable();
        let mut chunk = DeltaChunk {
            round: t.round,
            items: Vec::new(),
            absent: Vec::new(),
            last: false,
        };
        let mut bytes = 0u64;
        for k in keys.by_ref() {
            match s.store.get(k) {
                Some((value, version)) => {
                    bytes += (k.len() + value.len()) as u64;
                    chunk.items.push(CopiedItem {
                        key: k.clone(),
                        value: value.to_vec(),
                        version,
                    });
                }
                None => {
                    bytes += k.len() as u64;
                    chunk.absent.push(k.clone());
                }
            }
            if bytes >= max {
                break;
            }
        }
        chunk.last = keys.peek().is_none();
        Some(chunk)
    }

    /// How many keys written during a copy while serving an Install's `data` carries: `None`
    /// unless it is a [`TAIL_TOUCHED_FORMAT`] tail that decodes (for the simulator's counts).
    pub fn tail_touched_keys(data: &[u8]) -> Option<usize> {
        let rest = data.strip_prefix(&[TAIL_TOUCHED_FORMAT])?;
        let image: TouchedTailImage = take_all("tail", rest).ok()?;
        Some(image.touched.len())
    }

    fn wrong_group(&self) -> GroupOutput {
        GroupOutput::WrongGroup {
            config: self.config.num,
        }
    }

    /// A request whose key is not in `shard` (or a shard number past the count): refused, so
    /// that no key is ever stored in a shard it does not hash to.
    fn misrouted(&self, shard: ShardId, op: &KvOp) -> Option<GroupOutput> {
        let n = self.config.num_shards();
        if shard >= n {
            return Some(GroupOutput::Kv(KvResult::Refused {
                reason: format!("unknown shard {shard}: there are {n} shards"),
            }));
        }
        let key = key_of(op)?;
        let actual = shard_of(key, n);
        (actual != shard).then(|| {
            GroupOutput::Kv(KvResult::Refused {
                reason: format!("the key is in shard {actual}, not in shard {shard}"),
            })
        })
    }

    fn apply_client(&mut self, shard: ShardId, request: &KvRequest) -> GroupOutput {
        if is_lease_op(&request.op) {
            return GroupOutput::Kv(KvResult::Refused {
                reason: LEASES_REFUSED.into(),
            });
        }
        if matches!(request.op, KvOp::Status) {
            return GroupOutput::Kv(KvResult::Refused {
                reason: "status is answered by the server, never through the log".into(),
            });
        }
        if let Some(refused) = self.misrouted(shard, &request.op) {
            return refused;
        }
        if !self.serves(shard) {
            return self.wrong_group();
        }
        let Some(s) = self.shards.get_mut(&shard) else {
            return self.wrong_group();
        };
        // The shard's own counter, not the group's log index (see the module's comment).
        let position = s.store.applied() + 1;
        let out = s.store.apply(position, request);
        if let Some(t) = self.copies.get_mut(&shard) {
            if let KvOp::Put { key, .. } | KvOp::Delete { key, .. } = &request.op {
                // Recorded whatever the outcome (a refused or replayed write costs a key in
                // the tail, never a wrong value).
                if !t.touched.contains(key.as_slice()) {
                    t.touched.insert(key.clone());
                }
            }
        }
        GroupOutput::Kv(out)
    }

    fn adopt(&mut self, config: &Config) -> ControlOutcome {
        if config.num == self.config.num {
            if *config == self.config {
                return ControlOutcome::AlreadyDone;
            }
            return ControlOutcome::Refused {
                reason: format!(
                    "another configuration {} was adopted: configurations never change",
                    config.num
                ),
            };
        }
        if config.num < self.config.num {
            return ControlOutcome::Stale {
                seen: self.config.num,
            };
        }
        if config.num != self.config.num + 1 {
            return ControlOutcome::Refused {
                reason: format!(
                    "configuration {} does not follow the adopted {}: adopt them in order",
                    config.num, self.config.num
                ),
            };
        }
        if let Err(e) = config.check() {
            return ControlOutcome::Refused {
                reason: e.to_string(),
            };
        }
        let moves = match diff(&self.config, config) {
            Ok(m) => m,
            Err(e) => {
                return ControlOutcome::Refused {
                    reason: e.to_string(),
                }
            }
        };
        // Only shards that had no owner (the first Join) start here empty: a shard with an
        // owner before waits for its Install, a shard moving out keeps its state until Freeze.
        for m in moves {
            if m.from == NO_GROUP && m.to == self.gid && !self.shards.contains_key(&m.shard) {
                self.shards.insert(
                    m.shard,
                    Shard {
                        state: ShardState::Serving,
                        config: config.num,
                        store: KvStore::new(self.limits),
                    },
                );
            }
        }
        self.config = config.clone();
        // A copy towards an older configuration is over (its move completed before this
        // configuration was recorded).
        self.copies.retain(|_, t| t.config >= config.num);
        ControlOutcome::Applied
    }

    /// Starts recording the keys of `shard` written from now on, for its copy to `config`
    /// while it serves. Only at the group serving it before adopting `config`.
    fn copy_start(&mut self, shard: ShardId, config: u64) -> ControlOutcome {
        if let Some(r) = self.unknown_shard(shard) {
            return r;
        }
        let Some(s) = self.shards.get(&shard) else {
            return match self.deleted.get(&shard) {
                Some(&d) if d >= config => ControlOutcome::Stale { seen: d },
                _ => ControlOutcome::Refused {
                    reason: format!("shard {shard} is not held by group {}", self.gid),
                },
            };
        };
        if self.copies.get(&shard).is_some_and(|t| t.config == config) {
            return ControlOutcome::AlreadyDone;
        }
        if s.config >= config {
            return ControlOutcome::Stale { seen: s.config };
        }
        if self.copies.get(&shard).is_some_and(|t| t.config > config) {
            let seen = self.copies[&shard].config;
            return ControlOutcome::Stale { seen };
        }
        if self.config.num >= config {
            return ControlOutcome::Refused {
                reason: format!(
                    "group {} adopted configuration {} already: shard {shard} is copied frozen",
                    self.gid, self.config.num
                ),
            };
        }
        if self.config.num + 1 != config || !self.serves(shard) {
            return ControlOutcome::Refused {
                reason: format!(
                    "group {} (at configuration {}) does not serve shard {shard} before \
                     configuration {config}",
                    self.gid, self.config.num
                ),
            };
        }
        let p0 = s.store.applied();
        self.copies.insert(
            shard,
            CopyTrack {
                config,
                p0,
                round: 0,
                pending: BTreeSet::new(),
                touched: BTreeSet::new(),
            },
        );
        ControlOutcome::Applied
    }

    /// Starts delta round `round` of the copy of `shard` to `config` (see [`CopyTrack`]):
    /// only the round after the track's, and only while the group serves the shard before
    /// adopting `config` (afterwards every key left rides in the tail).
    fn copy_round(&mut self, shard: ShardId, config: u64, round: u32) -> ControlOutcome {
        if let Some(r) = self.unknown_shard(shard) {
            return r;
        }
        let seen = self
            .deleted
            .get(&shard)
            .copied()
            .max(self.shards.get(&shard).map(|s| s.config))
            .unwrap_or(0)
            .max(self.copies.get(&shard).map_or(0, |t| t.config));
        let Some(t) = self.copies.get(&shard).filter(|t| t.config == config) else {
            if seen >= config {
                return ControlOutcome::Stale { seen };
            }
            return ControlOutcome::Refused {
                reason: format!(
                    "no copy of shard {shard} to configuration {config} is in progress in                      group {}: start it with CopyStart",
                    self.gid
                ),
            };
        };
        if round <= t.round {
            return ControlOutcome::AlreadyDone;
        }
        if t.round.checked_add(1) != Some(round) {
            return ControlOutcome::Refused {
                reason: format!(
                    "the copy of shard {shard} is at round {}: round {round} skips one",
                    t.round
                ),
            };
        }
        if self.config.num + 1 != config || !self.serves(shard) {
            return ControlOutcome::Refused {
                reason: format!(
                    "group {} (at configuration {}) no longer serves shard {shard} before \
                     configuration {config}: the keys left travel in the tail",
                    self.gid, self.config.num
                ),
            };
        }
        let Some(t) = self.copies.get_mut(&shard) else {
            return ControlOutcome::Refused {
                reason: "no copy".into(),
            };
        };
        t.pending = std::mem::take(&mut t.touched);
        t.round = round;
        ControlOutcome::Applied
    }

    fn unknown_shard(&self, shard: ShardId) -> Option<ControlOutcome> {
        let n = self.config.num_shards();
        (shard >= n).then(|| ControlOutcome::Refused {
            reason: format!("unknown shard {shard}: there are {n} shards"),
        })
    }

    fn freeze(&mut self, shard: ShardId, config: u64) -> ControlOutcome {
        if let Some(r) = self.unknown_shard(shard) {
            return r;
        }
        let Some(s) = self.shards.get_mut(&shard) else {
            return match self.deleted.get(&shard) {
                Some(&d) if d == config => ControlOutcome::AlreadyDone,
                Some(&d) if d > config => ControlOutcome::Stale { seen: d },
                _ => ControlOutcome::Refused {
                    reason: format!("shard {shard} is not held by group {}", self.gid),
                },
            };
        };
        match s.state {
            ShardState::Frozen if s.config == config => ControlOutcome::AlreadyDone,
            _ if s.config >= config => ControlOutcome::Stale { seen: s.config },
            ShardState::Serving => {
                s.state = ShardState::Frozen;
                s.config = config;
                if self.copies.get(&shard).is_some_and(|t| t.config != config) {
                    self.copies.remove(&shard);
                }
                ControlOutcome::Applied
            }
            // Frozen at an older configuration: its data may not be current, so it is not
            // re-frozen (and so never exported) at a newer number.
            ShardState::Frozen => ControlOutcome::Refused {
                reason: format!(
                    "shard {shard} is frozen at configuration {}, not serving",
                    s.config
                ),
            },
        }
    }

    /// The fence of data moving in (`Install`, `Stage`) for `shard` at `config`: an unknown
    /// shard is refused; served here at `config` already is `AlreadyDone`; held or deleted at
    /// `config` or newer is `Stale` (old data never comes back). `None`: go on.
    fn incoming_fence(&self, shard: ShardId, config: u64) -> Option<ControlOutcome> {
        if let Some(r) = self.unknown_shard(shard) {
            return Some(r);
        }
        match self.shards.get(&shard) {
            Some(s) if s.config == config && s.state == ShardState::Serving => {
                return Some(ControlOutcome::AlreadyDone)
            }
            Some(s) if s.config >= config => return Some(ControlOutcome::Stale { seen: s.config }),
            _ => {}
        }
        match self.deleted.get(&shard) {
            Some(&d) if d >= config => Some(ControlOutcome::Stale { seen: d }),
            _ => None,
        }
    }

    fn install(&mut self, shard: ShardId, config: u64, data: &[u8]) -> ControlOutcome {
        if let Some(r) = self.incoming_fence(shard, config) {
            return r;
        }
        let store = if data.first() == Some(&TAIL_FORMAT) {
            self.decode_tail(shard, config, &data[1..])
        } else if data.first() == Some(&TAIL_TOUCHED_FORMAT) {
            self.decode_touched_tail(shard, config, &data[1..])
        } else {
            self.decode_export(shard, config, data)
        };
        let store = match store {
            Ok(store) => store,
            Err(reason) => return ControlOutcome::Refused { reason },
        };
        self.staging.remove(&shard);
        self.deleted.remove(&shard);
        self.copies.remove(&shard);
        self.shards.insert(
            shard,
            Shard {
                state: ShardState::Serving,
                config,
                store,
            },
        );
        ControlOutcome::Applied
    }

    fn decode_export(&self, shard: ShardId, config: u64, data: &[u8]) -> Result<KvStore, String> {
        let rest = check_version("export", EXPORT_FORMAT, data).map_err(|e| e.to_string())?;
        let image: ExportImage = take_all("export", rest).map_err(|e| e.to_string())?;
        if image.shard != shard || image.config != config {
            return Err(format!(
                "the data is shard {} frozen at configuration {}, not shard {shard} at {config}",
                image.shard, image.config
            ));
        }
        let mut store = KvStore::new(self.limits);
        store
            .restore(&image.store)
            .map_err(|e| format!("the shard's store: {e}"))?;
        Ok(store)
    }

    /// The staged copy of `shard` at `config` under the tail's sessions and counter, if the
    /// copy is complete (as many keys and bytes as the frozen shard holds).
    fn decode_tail(&self, shard: ShardId, config: u64, rest: &[u8]) -> Result<KvStore, String> {
        let image: TailImage = take_all("tail", rest).map_err(|e| e.to_string())?;
        self.tail_over_staged(shard, config, image, &[])
    }

    /// [`ShardMachine::decode_tail`] of a shard copied while it served: the touched keys'
    /// values at the freeze (or their absence) are written over the staged copy first.
    fn decode_touched_tail(
        &self,
        shard: ShardId,
        config: u64,
        rest: &[u8],
    ) -> Result<KvStore, String> {
        let image: TouchedTailImage = take_all("tail", rest).map_err(|e| e.to_string())?;
        let n = self.config.num_shards();
        if let Some(bad) = image.touched.iter().find(|t| shard_of(&t.key, n) != shard) {
            return Err(format!(
                "a key of the tail is in shard {}, not in shard {shard}",
                shard_of(&bad.key, n)
            ));
        }
        self.tail_over_staged(shard, config, image.tail, &image.touched)
    }

    fn tail_over_staged(
        &self,
        shard: ShardId,
        config: u64,
        image: TailImage,
        touched: &[TouchedItem],
    ) -> Result<KvStore, String> {
        if image.shard != shard || image.config != config {
            return Err(format!(
                "the tail is of shard {} frozen at configuration {}, not shard {shard} at {config}",
                image.shard, image.config
            ));
        }
        let empty;
        let staged = match self.staging.get(&shard) {
            Some(st) if st.config == config => &st.store,
            // An empty shard has no chunk to stage.
            _ if image.keys == 0 && image.data_bytes == 0 => {
                empty = KvStore::new(self.limits);
                &empty
            }
            Some(st) => {
                return Err(format!(
                    "shard {shard} is staged for configuration {}, not {config}: copy it again",
                    st.config
                ))
            }
            None => {
                return Err(format!(
                    "nothing of shard {shard} is staged for configuration {config}: copy it first"
                ))
            }
        };
        let mut staged = staged.clone();
        for t in touched {
            match &t.value {
                Some((value, version)) => staged.insert_copied(&t.key, value, *version),
                None => staged.remove_copied(&t.key),
            }
        }
        let (keys, bytes) = (staged.len() as u64, staged.data_bytes() as u64);
        if keys != image.keys || bytes != image.data_bytes {
            return Err(format!(
                "the staged copy of shard {shard} holds {keys} keys ({bytes} bytes), the frozen \
                 shard {} keys ({} bytes): copy it again",
                image.keys, image.data_bytes
            ));
        }
        staged
            .with_meta(&image.meta)
            .map_err(|e| format!("the tail's session table: {e}"))
    }

    /// Writes a chunk read in copy round `round` into the staged copy of `shard` moving here
    /// at `config`, and removes its `absent` keys; a round older than one staged is `Stale`.
    fn stage(
        &mut self,
        shard: ShardId,
        config: u64,
        round: u32,
        items: &[CopiedItem],
        absent: &[Vec<u8>],
    ) -> ControlOutcome {
        if let Some(r) = self.incoming_fence(shard, config) {
            return r;
        }
        // The next configuration too: a shard copied while it serves is staged before the
        // groups adopt the configuration that moves it (the staged copy is never served
        // before its Install).
        if config > self.config.num + 1 {
            return ControlOutcome::Refused {
                reason: format!(
                    "configuration {config} is not adopted here yet (adopted {}): adopt {} first",
                    self.config.num,
                    config - 1
                ),
            };
        }
        if config == self.config.num && self.config.owner(shard) != Some(self.gid) {
            return ControlOutcome::Refused {
                reason: format!(
                    "configuration {config} does not give shard {shard} to group {}",
                    self.gid
                ),
            };
        }
        let n = self.config.num_shards();
        let keys = items.iter().map(|i| &i.key).chain(absent);
        if let Some(bad) = keys.into_iter().find(|k| shard_of(k, n) != shard) {
            return ControlOutcome::Refused {
                reason: format!(
                    "a staged key is in shard {}, not in shard {shard}",
                    shard_of(bad, n)
                ),
            };
        }
        match self.staging.get(&shard) {
            Some(st) if st.config > config => return ControlOutcome::Stale { seen: st.config },
            // A chunk of an older round may hold values older than the newer round's, whose
            // keys are no longer tracked at the old owner: never staged over them.
            Some(st) if st.config == config && st.round > round => {
                return ControlOutcome::Stale { seen: config }
            }
            Some(st) if st.config == config => {}
            // None, or a copy for an older configuration (never installed): start afresh.
            _ => {
                self.staging.insert(
                    shard,
                    Staging {
                        config,
                        round,
                        store: KvStore::new(self.limits),
                    },
                );
            }
        }
        let Some(st) = self.staging.get_mut(&shard) else {
            return ControlOutcome::Refused {
                reason: "no staging".into(),
            };
        };
        st.round = round;
        for i in items {
            st.store.insert_copied(&i.key, &i.value, i.version);
        }
        for k in absent {
            st.store.remove_copied(k);
        }
        ControlOutcome::Applied
    }

    fn delete(&mut self, shard: ShardId, config: u64) -> ControlOutcome {
        if let Some(r) = self.unknown_shard(shard) {
            return r;
        }
        let Some(s) = self.shards.get(&shard) else {
            return ControlOutcome::AlreadyDone;
        };
        if s.config > config || (s.config == config && s.state == ShardState::Serving) {
            return ControlOutcome::Stale { seen: s.config };
        }
        if s.state != ShardState::Frozen || s.config != config {
            // Serving at an older number, or frozen for another move: deleting would lose
            // writes nobody has copied.
            return ControlOutcome::Refused {
                reason: format!(
                    "shard {shard} is not frozen at configuration {config} (it is {:?} at {})",
                    s.state, s.config
                ),
            };
        }
        self.shards.remove(&shard);
        self.copies.remove(&shard);
        self.deleted.insert(shard, config);
        ControlOutcome::Applied
    }

    /// Applies a decoded entry.
    pub fn apply_entry(&mut self, entry: &GroupEntry) -> GroupOutput {
        match entry {
            GroupEntry::Client { shard, request, .. } => self.apply_client(*shard, request),
            GroupEntry::Adopt { config } => GroupOutput::Control(self.adopt(config)),
            GroupEntry::Freeze { shard, config } => {
                GroupOutput::Control(self.freeze(*shard, *config))
            }
            GroupEntry::Install {
                shard,
                config,
                data,
            } => GroupOutput::Control(self.install(*shard, *config, data)),
            GroupEntry::Delete { shard, config } => {
                GroupOutput::Control(self.delete(*shard, *config))
            }
            GroupEntry::Stage {
                shard,
                config,
                items,
            } => GroupOutput::Control(self.stage(*shard, *config, 0, items, &[])),
            GroupEntry::CopyStart { shard, config } => {
                GroupOutput::Control(self.copy_start(*shard, *config))
            }
            GroupEntry::CopyRound {
                shard,
                config,
                round,
            } => GroupOutput::Control(self.copy_round(*shard, *config, *round)),
            GroupEntry::StageRound {
                shard,
                config,
                round,
                items,
                absent,
            } => GroupOutput::Control(self.stage(*shard, *config, *round, items, absent)),
        }
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        let image = MachineImage {
            gid: self.gid,
            config: self.config.clone(),
            shards: self
                .shards
                .iter()
                .map(|(&shard, s)| ShardImage {
                    shard,
                    state: s.state,
                    config: s.config,
                    store: s.store.snapshot(),
                })
                .collect(),
            deleted: self.deleted.iter().map(|(&s, &c)| (s, c)).collect(),
            staging: self
                .staging
                .iter()
                .map(|(&shard, st)| StagingImage {
                    shard,
                    config: st.config,
                    round: st.round,
                    store: st.store.snapshot(),
                })
                .collect(),
            copies: self
                .copies
                .iter()
                .map(|(&shard, t)| {
                    let keys = |set: &BTreeSet<Vec<u8>>| {
                        set.iter()
                            .map(|k| serde_bytes::ByteBuf::from(k.clone()))
                            .collect()
                    };
                    CopyImage {
                        shard,
                        config: t.config,
                        p0: t.p0,
                        round: t.round,
                        pending: keys(&t.pending),
                        touched: keys(&t.touched),
                    }
                })
                .collect(),
        };
        let out = vec![MACHINE_SNAPSHOT_FORMAT];
        postcard::to_extend(&image, out).expect("a machine snapshot always serializes")
    }

    /// Replaces the whole state with a snapshot's bytes. Never panics: another version,
    /// undecodable bytes, another group's snapshot, shards out of order or past the count,
    /// and an invalid configuration are errors, and leave the machine unchanged.
    pub fn restore_bytes(&mut self, bytes: &[u8]) -> Result<(), GroupError> {
        let bad = |reason: String| GroupError::Decode {
            what: "snapshot",
            reason,
        };
        let image: MachineImage = match bytes.first() {
            Some(1) => {
                let old: MachineImageV1 = take_all("snapshot", &bytes[1..])?;
                MachineImage {
                    gid: old.gid,
                    config: old.config,
                    shards: old.shards,
                    deleted: old.deleted,
                    staging: Vec::new(),
                    copies: Vec::new(),
                }
            }
            Some(2) => {
                let old: MachineImageV2 = take_all("snapshot", &bytes[1..])?;
                MachineImage {
                    gid: old.gid,
                    config: old.config,
                    shards: old.shards,
                    deleted: old.deleted,
                    staging: old.staging.into_iter().map(StagingImage::from).collect(),
                    copies: Vec::new(),
                }
            }
            Some(3) => {
                let old: MachineImageV3 = take_all("snapshot", &bytes[1..])?;
                MachineImage {
                    gid: old.gid,
                    config: old.config,
                    shards: old.shards,
                    deleted: old.deleted,
                    staging: old.staging.into_iter().map(StagingImage::from).collect(),
                    copies: old
                        .copies
                        .into_iter()
                        .map(|c| CopyImage {
                            shard: c.shard,
                            config: c.config,
                            p0: c.p0,
                            round: 0,
                            pending: Vec::new(),
                            touched: c.touched,
                        })
                        .collect(),
                }
            }
            _ => take_all(
                "snapshot",
                check_version("snapshot", MACHINE_SNAPSHOT_FORMAT, bytes)?,
            )?,
        };
        if image.gid != self.gid {
            return Err(bad(format!(
                "it is group {}'s, this is group {}",
                image.gid, self.gid
            )));
        }
        image.config.check().map_err(|e| bad(e.to_string()))?;
        let n = image.config.num_shards();
        let in_order = |ids: &mut dyn Iterator<Item = ShardId>| {
            let mut prev: Option<ShardId> = None;
            for s in ids {
                if s >= n || prev.is_some_and(|p| p >= s) {
                    return false;
                }
                prev = Some(s);
            }
            true
        };
        if !in_order(&mut image.shards.iter().map(|s| s.shard))
            || !in_order(&mut image.deleted.iter().map(|d| d.0))
            || !in_order(&mut image.staging.iter().map(|d| d.shard))
            || !in_order(&mut image.copies.iter().map(|d| d.shard))
        {
            return Err(bad(
                "shard numbers out of order, repeated or past the count".into(),
            ));
        }
        let mut shards = BTreeMap::new();
        for s in image.shards {
            let mut store = KvStore::new(self.limits);
            store
                .restore(&s.store)
                .map_err(|e| bad(format!("shard {}: {e}", s.shard)))?;
            shards.insert(
                s.shard,
                Shard {
                    state: s.state,
                    config: s.config,
                    store,
                },
            );
        }
        let mut staging = BTreeMap::new();
        for st in image.staging {
            let mut store = KvStore::new(self.limits);
            store
                .restore(&st.store)
                .map_err(|e| bad(format!("staged shard {}: {e}", st.shard)))?;
            staging.insert(
                st.shard,
                Staging {
                    config: st.config,
                    round: st.round,
                    store,
                },
            );
        }
        let copies = image
            .copies
            .into_iter()
            .map(|c| {
                let keys = |v: Vec<serde_bytes::ByteBuf>| v.into_iter().map(|k| k.into_vec());
                let track = CopyTrack {
                    config: c.config,
                    p0: c.p0,
                    round: c.round,
                    pending: keys(c.pending).collect(),
                    touched: keys(c.touched).collect(),
                };
                (c.shard, track)
            })
            .collect();
        self.config = image.config;
        self.shards = shards;
        self.deleted = image.deleted.into_iter().collect();
        self.staging = staging;
        self.copies = copies;
        Ok(())
    }
}

impl shoal_replica::StateMachine for ShardMachine {
    type Output = GroupOutput;
    type Snapshot = GroupSnapshot;

    fn apply(&mut self, _index: LogIndex, command: &[u8]) -> Result<Option<GroupOutput>, String> {
        if command.is_empty() {
            return Ok(None);
        }
        // Only the group's servers propose; a committed entry that does not decode means the
        // log is unusable here, and skipping it on one replica would diverge.
        let entry = GroupEntry::decode(command).map_err(|e| e.to_string())?;
        Ok(Some(self.apply_entry(&entry)))
    }

    fn snapshot(&self) -> GroupSnapshot {
        GroupSnapshot(self.clone())
    }

    fn restore(&mut self, _index: LogIndex, data: &mut dyn std::io::Read) -> Result<(), String> {
        // A group's image is read whole (its shards' stores are decoded from it); the file
        // is streamed by the storage, so this is the one copy.
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes)
            .map_err(|e| format!("reading the snapshot: {e}"))?;
        self.restore_bytes(&bytes).map_err(|e| e.to_string())
    }
}
