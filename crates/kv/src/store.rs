//! The versioned key/value state machine with its at-most-once client session table.
//!
//! Deterministic: every replica that applies the same commands in the same order reaches the
//! same state, byte for byte (ordered maps only; session ids and expiry depend only on applied
//! indexes, never on a clock).
//!
//! **Sessions** (Raft thesis §6.3). A client registers ([`KvOp::Register`]); the session id is
//! the position (log index) of the registration. Each write carries (session, sequence
//! number); the table keeps, per session, the highest applied sequence number and its answer.
//! The table holds at most [`Limits::max_sessions`] sessions: a registration into a full table
//! expires the session used least recently (ordered by the position of its last registration
//! or write — the same on every replica). A write whose session is unknown or expired is
//! refused with [`KvResult::SessionExpired`] and **never applied**, so a late retry or a network
//! duplicate can never apply twice.
//!
//! **Leases** (etcd's model, `docs/kv.md` "Leases"). A lease has an id (the log index of its
//! grant), a TTL and the keys attached to it ([`KvOp::PutLease`]); revoking or expiring it
//! deletes those keys. The store has no clock: it records each lease's TTL, its renewal
//! counter and the remaining time last replicated (by a grant, keep-alive or leader
//! checkpoint); *when* a lease expires is decided by the leader's driver, which proposes
//! [`KvOp::LeaseExpire`] (see [`crate::KvRsm`]).

use std::io::Read as _;
use std::ops::Bound;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use serde_bytes::{ByteBuf, Bytes};
use smallvec::SmallVec;

use serde::{Deserialize, Serialize};
use shoal_wire::kv::{Expected, KvOp, KvRequest, KvResult, LeaseCheckpoint, LeaseInfo, ScanItem};

use crate::Error;

/// Default largest key, in bytes.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;
/// Default largest value, in bytes (1 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Default number of client sessions the table holds.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// Default largest number of pairs one scan returns.
pub const DEFAULT_MAX_SCAN_ITEMS: u32 = 1000;
/// Version byte at the start of every snapshot; bumped when the layout changes.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 4;
/// The format before the members' addresses (issue 15). Still restored, with no address.
pub const SNAPSHOT_FORMAT_VERSION_V3: u8 = 3;
/// The format before leases (no lease per key, no lease table). Still restored: its data
/// and sessions are kept, with no lease.
pub const SNAPSHOT_FORMAT_VERSION_V2: u8 = 2;
/// Default most live leases ([`Limits::max_leases`]). Every lease costs the leader a timer
/// entry and ~24 bytes in each checkpoint.
pub const DEFAULT_MAX_LEASES: usize = 10_000;
/// Default shortest TTL a grant may ask for, in ms ([`Limits::min_lease_ttl_ms`]): a lease
/// must outlive a leader election (etcd's minimum is 1.5 election timeouts) and a keep-alive
/// round trip, or it expires while its holder is doing everything right.
pub const DEFAULT_MIN_LEASE_TTL_MS: u64 = 1_000;
/// Default longest TTL, in ms ([`Limits::max_lease_ttl_ms`]): one day.
pub const DEFAULT_MAX_LEASE_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Default most keys attached to one lease ([`Limits::max_keys_per_lease`]): revoking a lease
/// deletes its keys in one apply step, which must stay short.
pub const DEFAULT_MAX_KEYS_PER_LEASE: usize = 10_000;
/// The previous snapshot format (per-client dedup entries, before sessions). Still restored:
/// its data is kept and its dedup entries are dropped, so every old client's next write is
/// refused with [`KvResult::SessionExpired`] (safe: never applied twice).
pub const SNAPSHOT_FORMAT_VERSION_V1: u8 = 1;
/// Approximate fixed cost of one session entry in bytes (ids, index, the reply's tag), used by
/// [`KvStore::session_bytes`].
pub const SESSION_ENTRY_OVERHEAD_BYTES: usize = 48;

/// Limits of a store. Every replica of a group must use the same limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest key in bytes; larger is refused with [`KvResult::TooLarge`].
    pub max_key_bytes: usize,
    /// Largest value in bytes; larger is refused with [`KvResult::TooLarge`].
    pub max_value_bytes: usize,
    /// Most client sessions held (a registration into a full table expires the least
    /// recently used one); `0` disables sessions and deduplication (the classic lab's kvsrv,
    /// where the versions alone make retries safe and the clerk reports "maybe"): every
    /// registration succeeds and every write applies.
    pub max_sessions: usize,
    /// Most pairs one scan returns (a request's `limit` is capped by it).
    pub max_scan_items: u32,
    /// Most live leases; a grant beyond is refused ([`KvResult::Refused`]).
    pub max_leases: usize,
    /// Shortest lease TTL in ms; a shorter grant is refused.
    pub min_lease_ttl_ms: u64,
    /// Longest lease TTL in ms; a longer grant is refused.
    pub max_lease_ttl_ms: u64,
    /// Most keys attached to one lease; a put attaching one more is refused.
    pub max_keys_per_lease: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_scan_items: DEFAULT_MAX_SCAN_ITEMS,
            max_leases: DEFAULT_MAX_LEASES,
            min_lease_ttl_ms: DEFAULT_MIN_LEASE_TTL_MS,
            max_lease_ttl_ms: DEFAULT_MAX_LEASE_TTL_MS,
            max_keys_per_lease: DEFAULT_MAX_KEYS_PER_LEASE,
        }
    }
}

/// A key, its value and its version, as [`KvStore::items_after`] copies them.
pub type CopiedEntry = (Vec<u8>, Vec<u8>, u64);

/// A key as the store holds it: up to 24 bytes inline, so that the comparisons of a lookup
/// read the tree node itself instead of chasing a pointer per key (with heap keys, lookups
/// and their `memcmp` cache misses were a fifth of the leader's CPU under a put load).
type Key = SmallVec<[u8; 24]>;

/// A key's value and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Item {
    /// Shared, so that copying a tree node (a write while a snapshot holds a copy of the
    /// store) copies pointers, not every value of the node: with owned vectors those copies
    /// were a burst of allocations on every server at each snapshot.
    #[serde(with = "shared_bytes")]
    value: Arc<[u8]>,
    version: u64,
    /// The lease the key is attached to (`0`: none).
    lease: u64,
}

/// A key's value and version in a format-2 snapshot (before leases).
#[derive(Debug, Clone, Deserialize)]
struct ItemV2 {
    #[serde(with = "shared_bytes")]
    value: Arc<[u8]>,
    version: u64,
}

/// One lease, as replicated. Its keys are not stored here but found from the items (the
/// `keys` index is rebuilt at restore).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    /// Its TTL in ms.
    ttl_ms: u64,
    /// Remaining time in ms when last replicated (grant, keep-alive: the TTL; a leader's
    /// checkpoint: what that leader measured). A new leader starts from it.
    remaining_ms: u64,
    /// Keep-alives applied so far: fences a stale expiry or checkpoint.
    renewals: u64,
}

/// One client session: its highest applied write, the order of last use, and the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Sequence number of the latest applied write (`0`: none yet).
    request: u64,
    /// Position of the apply that last touched this session (the log index under Raft).
    last_used: u64,
    /// The answer of write `request` (`None` before the first write).
    result: Option<KvResult>,
}

/// The serialized form of a format-1 store (only its data is restored).
#[derive(Deserialize)]
struct SnapshotBodyV1 {
    applied: u64,
    items: Vec<(Vec<u8>, ItemV2)>,
    #[allow(dead_code)] // decoded to validate the layout; dedup entries do not carry over
    sessions: Vec<(u64, (u64, u64, KvResult))>,
}

/// The serialized form of a format-2 store (before leases).
#[derive(Deserialize)]
struct SnapshotBodyV2 {
    applied: u64,
    items: Vec<(ByteBuf, ItemV2)>,
    sessions: Vec<(u64, Session)>,
}

/// The serialized form of a format-3 store (before the members' addresses).
#[derive(Deserialize)]
struct SnapshotBodyV3 {
    applied: u64,
    items: Vec<(ByteBuf, Item)>,
    sessions: Vec<(u64, Session)>,
    leases: Vec<(u64, Lease)>,
}

/// The serialized form of a store (after the format version byte).
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    applied: u64,
    items: Vec<(ByteBuf, Item)>,
    sessions: Vec<(u64, Session)>,
    leases: Vec<(u64, Lease)>,
    members: Vec<(u64, String)>,
}

/// What follows the data in a format-4 snapshot (read whole by [`KvStore::restore_from`]).
#[derive(Deserialize)]
struct SnapshotTail {
    sessions: Vec<(u64, Session)>,
    leases: Vec<(u64, Lease)>,
    members: Vec<(u64, String)>,
}

/// What follows the data in a format-3 snapshot.
#[derive(Deserialize)]
struct SnapshotTailV3 {
    sessions: Vec<(u64, Session)>,
    leases: Vec<(u64, Lease)>,
}

/// Largest allocation [`KvStore::restore_from`] makes on a length it read, before the bytes
/// arrive (a damaged length must not allocate gigabytes).
const PREALLOCATE_MAX_BYTES: u64 = 4 << 20;

/// Buffer of [`KvStore::restore_from`]'s reader.
const RESTORE_BUFFER_BYTES: usize = 256 * 1024;

fn truncated(e: std::io::Error) -> Error {
    Error::SnapshotDecode(format!("reading the snapshot: {e}"))
}

/// Reads up to `buf.len()` bytes (fewer only at the end of the input).
fn read_some(r: &mut impl std::io::Read, buf: &mut [u8]) -> Result<usize, Error> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(truncated(e)),
        }
    }
    Ok(n)
}

/// A postcard varint (LEB128) `u64`.
fn read_varint(r: &mut impl std::io::Read) -> Result<u64, Error> {
    let mut value = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        if read_some(r, &mut b)? == 0 {
            return Err(Error::SnapshotDecode("the snapshot ends mid-number".into()));
        }
        let bits = u64::from(b[0] & 0x7f);
        if i == 9 && b[0] > 1 {
            return Err(Error::SnapshotDecode("a number overflows 64 bits".into()));
        }
        value |= bits << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Error::SnapshotDecode("a number overflows 64 bits".into()))
}

/// A postcard byte string (varint length, then the bytes). The buffer grows as bytes
/// arrive, so a damaged length allocates no more than the input holds.
fn read_byte_string(r: &mut impl std::io::Read) -> Result<Vec<u8>, Error> {
    let len = read_varint(r)?;
    // Sized for the string up to a bound, so a value is read without regrowing.
    let mut out = Vec::with_capacity(len.min(PREALLOCATE_MAX_BYTES) as usize);
    r.take(len).read_to_end(&mut out).map_err(truncated)?;
    if out.len() as u64 != len {
        return Err(Error::SnapshotDecode(format!(
            "the snapshot ends inside a string of {len} bytes"
        )));
    }
    Ok(out)
}

/// [`SnapshotBody`]'s encoding, borrowing the store's maps.
#[derive(Serialize)]
struct SnapshotBodyRef<'a> {
    applied: u64,
    items: Items<'a>,
    sessions: Seq<'a, u64, Session>,
    leases: Seq<'a, u64, Lease>,
    members: Seq<'a, u64, String>,
}

/// A map serialized as a sequence of `(key, value)` pairs, as a `Vec<(K, V)>` is.
struct Seq<'a, K, V>(&'a OrdMap<K, V>);

impl<K: Serialize + Ord + Clone, V: Serialize + Clone> Serialize for Seq<'_, K, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

/// The items as a sequence of `(key, item)` pairs, the keys written as bytes (one memcpy
/// each; the same encoding as a sequence of `u8`).
struct Items<'a>(&'a OrdMap<Key, Item>);

impl Serialize for Items<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(k, v)| (Bytes::new(k.as_slice()), v)))
    }
}

/// The versioned key/value state machine.
///
/// Writes go through [`KvStore::apply`] with a position (the Raft log index, or a counter in
/// the single server) that orders them; reads through [`KvStore::read`].
///
/// The maps are persistent B-trees (`imbl::OrdMap`): `clone` is O(1) and shares every node
/// until one side writes to it, so a server can snapshot a copy on another thread while it
/// keeps applying (`docs/kv.md`, "Snapshots"). Between snapshots no node is shared and writes
/// cost what a `BTreeMap`'s do.
#[derive(Debug, Clone)]
pub struct KvStore {
    limits: Limits,
    items: OrdMap<Key, Item>,
    sessions: OrdMap<u64, Session>,
    /// Sessions ordered by last use, for eviction: (last_used, client).
    by_use: OrdSet<(u64, u64)>,
    /// Live leases by id.
    leases: OrdMap<u64, Lease>,
    /// The keys attached to each lease (an index of `items`' `lease` fields).
    lease_keys: OrdMap<u64, OrdSet<Key>>,
    /// Position of the last applied write.
    applied: u64,
    data_bytes: usize,
    /// Every member's address as the leader last replicated it ([`KvOp::MemberAddresses`]).
    members: OrdMap<u64, String>,
}

/// A live lease as the store holds it ([`KvStore::leases`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The lease id (the position of its grant).
    pub id: u64,
    /// Its TTL in ms.
    pub ttl_ms: u64,
    /// Its remaining time in ms when last replicated (grant, keep-alive or checkpoint).
    pub remaining_ms: u64,
    /// Keep-alives applied so far (the fence of expiry and checkpoints).
    pub renewals: u64,
    /// Keys attached to it.
    pub keys: usize,
}

/// What an apply did to leases, for the replicated state machine's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Lease `id` was granted or kept alive: it has `ttl_ms` from now.
    Renewed {
        /// The lease.
        id: u64,
        /// Its TTL in ms.
        ttl_ms: u64,
    },
    /// A checkpoint recorded lease `id`'s remaining time.
    Checkpointed {
        /// The lease.
        id: u64,
        /// Remaining ms as replicated.
        remaining_ms: u64,
    },
    /// Lease `id` ended (revoked or expired).
    Ended {
        /// The lease.
        id: u64,
    },
}

impl KvStore {
    /// An empty store.
    pub fn new(limits: Limits) -> KvStore {
        KvStore {
            limits,
            items: OrdMap::new(),
            sessions: OrdMap::new(),
            by_use: OrdSet::new(),
            leases: OrdMap::new(),
            lease_keys: OrdMap::new(),
            applied: 0,
            data_bytes: 0,
            members: OrdMap::new(),
        }
    }

    /// The members' addresses as last replicated (id → `host:port`); may name servers that
    /// have since been removed (the Raft membership says who is a member).
    pub fn member_addresses(&self) -> &OrdMap<u64, String> {
        &self.members
    }

    /// The store's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Position of the last applied write.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes of keys and values stored.
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// Number of sessions in the table (at most `limits.max_sessions`).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Approximate bytes of the session table: a fixed cost per entry plus the bytes of the
    /// remembered answers.
    pub fn session_bytes(&self) -> usize {
        self.sessions
            .values()
            .map(|s| SESSION_ENTRY_OVERHEAD_BYTES + s.result.as_ref().map_or(0, result_bytes))
            .sum()
    }

    /// The value and version of `key`.
    pub fn get(&self, key: &[u8]) -> Option<(&[u8], u64)> {
        self.items.get(key).map(|i| (&i.value[..], i.version))
    }

    /// The lease `key` is attached to, if any.
    pub fn key_lease(&self, key: &[u8]) -> Option<u64> {
        self.items.get(key).map(|i| i.lease).filter(|&l| l != 0)
    }

    /// Number of live leases.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The live leases, by id.
    pub fn leases(&self) -> Vec<LeaseStatus> {
        self.leases
            .iter()
            .map(|(id, l)| LeaseStatus {
                id: *id,
                ttl_ms: l.ttl_ms,
                remaining_ms: l.remaining_ms,
                renewals: l.renewals,
                keys: self.lease_keys.get(id).map_or(0, OrdSet::len),
            })
            .collect()
    }

    /// Lease `id`'s renewal counter, if it is live.
    pub fn lease_renewals(&self, id: u64) -> Option<u64> {
        self.leases.get(&id).map(|l| l.renewals)
    }

    /// Whether session `session` is open (registered and not expired).
    pub fn has_session(&self, session: u64) -> bool {
        self.sessions.contains_key(&session)
    }

    /// The answer a write would get for exceeding a size limit, if it does (`None` for
    /// reads, registrations and writes within the limits). Lets a server refuse it before it
    /// takes log space.
    pub fn size_error(&self, op: &KvOp) -> Option<KvResult> {
        match op {
            KvOp::Put { key, value, .. } => self.check_sizes(key, Some(value)),
            KvOp::Delete { key, .. } => self.check_sizes(key, None),
            KvOp::PutLease { key, value, .. } => self.check_sizes(key, Some(value)),
            KvOp::Get { .. }
            | KvOp::Scan { .. }
            | KvOp::Register
            | KvOp::Status
            | KvOp::LeaseGrant { .. }
            | KvOp::LeaseKeepAlive { .. }
            | KvOp::LeaseRevoke { .. }
            | KvOp::LeaseList
            | KvOp::LeaseExpire { .. }
            | KvOp::LeaseCheckpoint { .. }
            | KvOp::Snapshot
            | KvOp::MemberList
            | KvOp::MemberAdd { .. }
            | KvOp::MemberPromote { .. }
            | KvOp::MemberRemove { .. }
            | KvOp::MemberAddresses { .. } => None,
        }
    }

    /// Checks sizes against the limits.
    fn check_sizes(&self, key: &[u8], value: Option<&[u8]>) -> Option<KvResult> {
        if key.len() > self.limits.max_key_bytes {
            return Some(KvResult::TooLarge {
                what: "key".into(),
                bytes: key.len() as u64,
                limit: self.limits.max_key_bytes as u64,
            });
        }
        if let Some(v) = value {
            if v.len() > self.limits.max_value_bytes {
                return Some(KvResult::TooLarge {
                    what: "value".into(),
                    bytes: v.len() as u64,
                    limit: self.limits.max_value_bytes as u64,
                });
            }
        }
        None
    }

    /// Answers a read (get or scan) from the current state. Writes are refused with
    /// [`Error::NotARead`].
    pub fn read(&self, op: &KvOp) -> Result<KvResult, Error> {
        match op {
            KvOp::Get { key } => Ok(match self.items.get(key.as_slice()) {
                Some(i) => KvResult::Found {
                    value: i.value.to_vec(),
                    version: i.version,
                },
                None => KvResult::NoKey,
            }),
            KvOp::Scan { start, end, limit } => {
                let limit = (*limit).min(self.limits.max_scan_items) as usize;
                let items = self
                    .items
                    .range::<_, [u8]>((Bound::Included(start.as_slice()), Bound::Unbounded))
                    .take_while(|(k, _)| end.as_ref().is_none_or(|e| k.as_slice() < e.as_slice()))
                    .take(limit)
                    .map(|(k, i)| ScanItem {
                        key: k.to_vec(),
                        value: i.value.to_vec(),
                        version: i.version,
                    })
                    .collect();
                Ok(KvResult::Scanned { items })
            }
            KvOp::LeaseList => Ok(KvResult::Leases {
                leases: self
                    .leases()
                    .into_iter()
                    .map(|l| LeaseInfo {
                        id: l.id,
                        ttl_ms: l.ttl_ms,
                        remaining_ms: l.remaining_ms,
                        keys: l.keys as u64,
                    })
                    .collect(),
            }),
            _ => Err(Error::NotARead),
        }
    }

    /// Applies a request at position `index` (strictly increasing; the Raft log index).
    ///
    /// Reads are answered from the state. [`KvOp::Register`] opens a session whose id is
    /// `index`. Writes are deduplicated per session (`req.client`): a write from an unknown or
    /// expired session gets [`KvResult::SessionExpired`] and is not applied; a retry of the
    /// session's latest write gets the remembered answer without applying again; an older
    /// request gets [`KvResult::Stale`].
    pub fn apply(&mut self, index: u64, req: &KvRequest) -> KvResult {
        self.apply_with_events(index, req, &mut Vec::new())
    }

    /// [`KvStore::apply`], also telling what happened to leases (for the leader's timers).
    ///
    /// The leader's own [`KvOp::LeaseExpire`] and [`KvOp::LeaseCheckpoint`] carry no session
    /// (they are not client writes, and are idempotent by their fences).
    pub fn apply_with_events(
        &mut self,
        index: u64,
        req: &KvRequest,
        events: &mut Vec<LeaseEvent>,
    ) -> KvResult {
        assert!(
            index > self.applied,
            "apply at {index} after {}: out of order",
            self.applied
        );
        self.applied = index;
        match &req.op {
            KvOp::LeaseExpire { id, renewals } => {
                if self.lease_renewals(*id) != Some(*renewals) {
                    // Renewed (or ended) since the leader decided: nothing to do.
                    return KvResult::LeaseNotFound { id: *id };
                }
                let keys = self.end_lease(*id, events);
                tracing::debug!(lease = id, keys, "lease expired");
                return KvResult::LeaseRevoked { id: *id, keys };
            }
            KvOp::LeaseCheckpoint { leases } => {
                self.checkpoint(leases, events);
                return KvResult::Stale;
            }
            KvOp::MemberAddresses { members } => {
                self.members = members.iter().cloned().collect();
                return KvResult::Stale;
            }
            _ => {}
        }
        if req.op.is_read() {
            return self.read(&req.op).unwrap_or(KvResult::Stale);
        }
        if matches!(req.op, KvOp::Register) {
            if self.limits.max_sessions > 0 {
                self.register(index);
            }
            return KvResult::Registered { session: index };
        }
        if self.limits.max_sessions == 0 {
            return self.write(index, &req.op, events);
        }
        let Some(s) = self.sessions.get(&req.client) else {
            tracing::debug!(
                session = req.client,
                "write from an unknown or expired session"
            );
            return KvResult::SessionExpired;
        };
        if req.request < s.request || (req.request == s.request && s.result.is_none()) {
            return KvResult::Stale;
        }
        if req.request == s.request {
            let result = s.result.clone().unwrap_or(KvResult::Stale);
            self.touch(req.client, index, None);
            return result;
        }
        let result = self.write(index, &req.op, events);
        self.touch(req.client, index, Some((req.request, result.clone())));
        result
    }

    /// Records a leader's checkpoint: each lease not renewed since gets its remaining time.
    fn checkpoint(&mut self, leases: &[LeaseCheckpoint], events: &mut Vec<LeaseEvent>) {
        for c in leases {
            if let Some(l) = self.leases.get_mut(&c.id) {
                if l.renewals == c.renewals {
                    l.remaining_ms = c.remaining_ms.min(l.ttl_ms);
                    events.push(LeaseEvent::Checkpointed {
                        id: c.id,
                        remaining_ms: l.remaining_ms,
                    });
                }
            }
        }
    }

    /// Ends lease `id`: deletes its keys and forgets it. Returns how many keys went.
    fn end_lease(&mut self, id: u64, events: &mut Vec<LeaseEvent>) -> u64 {
        let keys = self.lease_keys.remove(&id).unwrap_or_default();
        let n = keys.len() as u64;
        for k in keys {
            if let Some(old) = self.items.remove(k.as_slice()) {
                self.data_bytes -= k.len() + old.value.len();
            }
        }
        if self.leases.remove(&id).is_some() {
            events.push(LeaseEvent::Ended { id });
        }
        n
    }

    /// Detaches `key` from the lease it is attached to (`lease`, 0: none).
    fn detach(&mut self, key: &[u8], lease: u64) {
        if lease == 0 {
            return;
        }
        if let Some(keys) = self.lease_keys.get_mut(&lease) {
            keys.remove(key);
        }
    }

    /// Applies a lease operation (grant, keep-alive, revoke) at `index`.
    fn lease_op(&mut self, index: u64, op: &KvOp, events: &mut Vec<LeaseEvent>) -> KvResult {
        match op {
            KvOp::LeaseGrant { ttl_ms } => {
                let (min, max) = (self.limits.min_lease_ttl_ms, self.limits.max_lease_ttl_ms);
                if *ttl_ms < min || *ttl_ms > max {
                    return KvResult::Refused {
                        reason: format!(
                            "lease TTL {ttl_ms} ms is outside this server's bounds [{min}, {max}] ms"
                        ),
                    };
                }
                if self.leases.len() >= self.limits.max_leases {
                    return KvResult::Refused {
                        reason: format!(
                            "too many leases: the server holds at most {}",
                            self.limits.max_leases
                        ),
                    };
                }
                // Positions strictly increase, so `index` is never a live lease's id.
                self.leases.insert(
                    index,
                    Lease {
                        ttl_ms: *ttl_ms,
                        remaining_ms: *ttl_ms,
                        renewals: 0,
                    },
                );
                events.push(LeaseEvent::Renewed {
                    id: index,
                    ttl_ms: *ttl_ms,
                });
                KvResult::LeaseGranted {
                    id: index,
                    ttl_ms: *ttl_ms,
                }
            }
            KvOp::LeaseKeepAlive { id } => match self.leases.get_mut(id) {
                Some(l) => {
                    l.renewals += 1;
                    l.remaining_ms = l.ttl_ms;
                    let ttl_ms = l.ttl_ms;
                    events.push(LeaseEvent::Renewed { id: *id, ttl_ms });
                    KvResult::LeaseKept { id: *id, ttl_ms }
                }
                None => KvResult::LeaseNotFound { id: *id },
            },
            KvOp::LeaseRevoke { id } => {
                if !self.leases.contains_key(id) {
                    return KvResult::LeaseNotFound { id: *id };
                }
                let keys = self.end_lease(*id, events);
                KvResult::LeaseRevoked { id: *id, keys }
            }
            _ => KvResult::Stale,
        }
    }

    /// Opens session `index`, first expiring the least recently used sessions while the table
    /// is full.
    fn register(&mut self, index: u64) {
        // Expiry rule: the table holds at most `max_sessions` sessions; a registration into a
        // full table expires the session whose last registration or write applied earliest.
        // It depends only on the log, so every replica expires the same session.
        while self.sessions.len() >= self.limits.max_sessions {
            let Some(&(used, victim)) = self.by_use.get_min() else {
                break;
            };
            self.by_use.remove(&(used, victim));
            self.sessions.remove(&victim);
            tracing::debug!(session = victim, "session expired");
        }
        // Positions strictly increase, so `index` is never an open session's id.
        assert!(
            self.sessions
                .insert(
                    index,
                    Session {
                        request: 0,
                        last_used: index,
                        result: None,
                    },
                )
                .is_none(),
            "session {index} registered twice"
        );
        self.by_use.insert((index, index));
        assert!(self.sessions.len() <= self.limits.max_sessions);
        debug_assert_eq!(self.sessions.len(), self.by_use.len());
    }

    /// Marks a session used at `index` and, with `latest`, records its newest write's
    /// sequence number and answer.
    fn touch(&mut self, session: u64, index: u64, latest: Option<(u64, KvResult)>) {
        if let Some(s) = self.sessions.get_mut(&session) {
            self.by_use.remove(&(s.last_used, session));
            s.last_used = index;
            if let Some((request, result)) = latest {
                s.request = request;
                s.result = Some(result);
            }
            self.by_use.insert((index, session));
        }
    }

    /// Applies a write without deduplication, at position `index`.
    fn write(&mut self, index: u64, op: &KvOp, events: &mut Vec<LeaseEvent>) -> KvResult {
        match op {
            KvOp::Put {
                key,
                value,
                expected,
            } => self.put(index, key, value, *expected, 0),
            KvOp::PutLease {
                key,
                value,
                expected,
                lease,
            } => {
                if *lease == 0 || !self.leases.contains_key(lease) {
                    return KvResult::LeaseNotFound { id: *lease };
                }
                let already = self.key_lease(key) == Some(*lease);
                let attached = self.lease_keys.get(lease).map_or(0, OrdSet::len);
                if !already && attached >= self.limits.max_keys_per_lease {
                    return KvResult::Refused {
                        reason: format!(
                            "lease {lease} already has {attached} keys, the most this server \
                             attaches to one lease"
                        ),
                    };
                }
                self.put(index, key, value, *expected, *lease)
            }
            KvOp::LeaseGrant { .. } | KvOp::LeaseKeepAlive { .. } | KvOp::LeaseRevoke { .. } => {
                self.lease_op(index, op, events)
            }
            KvOp::Delete { key, expected } => {
                if let Some(e) = self.check_sizes(key, None) {
                    return e;
                }
                let Some(current) = self.items.get(key.as_slice()).map(|i| i.version) else {
                    return KvResult::NoKey;
                };
                match expected {
                    Expected::Version(e) if *e != current => KvResult::VersionMismatch,
                    _ => {
                        if let Some(old) = self.items.remove(key.as_slice()) {
                            self.data_bytes -= key.len() + old.value.len();
                            self.detach(key, old.lease);
                        }
                        KvResult::Deleted
                    }
                }
            }
            KvOp::Get { .. }
            | KvOp::Scan { .. }
            | KvOp::Register
            | KvOp::Status
            | KvOp::LeaseList
            | KvOp::LeaseExpire { .. }
            | KvOp::LeaseCheckpoint { .. }
            | KvOp::Snapshot
            | KvOp::MemberAddresses { .. } => self.read(op).unwrap_or(KvResult::Stale),
            KvOp::MemberList
            | KvOp::MemberAdd { .. }
            | KvOp::MemberPromote { .. }
            | KvOp::MemberRemove { .. } => KvResult::Refused {
                reason: "membership requests are answered by a KV server's leader".into(),
            },
        }
    }

    /// A put at position `index`, attaching the key to `lease` (0: detaching it).
    fn put(
        &mut self,
        index: u64,
        key: &[u8],
        value: &[u8],
        expected: Expected,
        lease: u64,
    ) -> KvResult {
        if let Some(e) = self.check_sizes(key, Some(value)) {
            return e;
        }
        // One walk down the tree for a key that exists (the common case), two for a
        // new one.
        if let Some(item) = self.items.get_mut(key) {
            let version = match expected {
                Expected::Version(e) if e != item.version => return KvResult::VersionMismatch,
                _ => item.version + 1,
            };
            self.data_bytes = self.data_bytes + value.len() - item.value.len();
            item.value = Arc::from(value);
            item.version = version;
            let old_lease = std::mem::replace(&mut item.lease, lease);
            if old_lease != lease {
                self.detach(key, old_lease);
                self.attach(key, lease);
            }
            return KvResult::Written { version };
        }
        if let Expected::Version(v) = expected {
            if v != 0 {
                return KvResult::NoKey;
            }
        }
        // A key created under a lease starts at the position of its creation, so its
        // versions only grow across deletions (a lock key's version is a fencing
        // token); a plain key starts at 1 as it always did.
        let version = if lease == 0 { 1 } else { index.max(1) };
        let item = Item {
            value: Arc::from(value),
            version,
            lease,
        };
        self.data_bytes += key.len() + value.len();
        self.items.insert(Key::from_slice(key), item);
        self.attach(key, lease);
        KvResult::Written { version }
    }

    /// Attaches `key` to `lease` (0: none) in the index.
    fn attach(&mut self, key: &[u8], lease: u64) {
        if lease != 0 {
            self.lease_keys
                .entry(lease)
                .or_default()
                .insert(Key::from_slice(key));
        }
    }

    /// Serializes the whole state (data, sessions, applied position): one format version
    /// byte, then postcard.
    pub fn snapshot(&self) -> Vec<u8> {
        let out = vec![SNAPSHOT_FORMAT_VERSION];
        // Encoding plain vectors and integers into a Vec cannot fail.
        postcard::to_extend(&self.snapshot_body(), out).expect("snapshot encodes")
    }

    /// The same encoding as `SnapshotBody`, written straight from the maps: no copy of any
    /// key or value before the one into the output (it used to clone the store twice over).
    fn snapshot_body(&self) -> SnapshotBodyRef<'_> {
        SnapshotBodyRef {
            applied: self.applied,
            items: Items(&self.items),
            sessions: Seq(&self.sessions),
            leases: Seq(&self.leases),
            members: Seq(&self.members),
        }
    }

    /// The length of [`KvStore::snapshot`]'s bytes, computed without making them (one pass
    /// over the maps).
    pub fn snapshot_len(&self) -> u64 {
        /// Counts the bytes written to it.
        struct Count(u64);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len() as u64;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // Encoding plain vectors and integers into a counter cannot fail.
        let counted = postcard::to_io(&self.snapshot_body(), Count(0)).expect("snapshot encodes");
        1 + counted.0
    }

    /// Writes [`KvStore::snapshot`]'s bytes to `w` as they are made, never holding them
    /// whole (a snapshot streamed into its file; [`KvStore::snapshot_len`] bytes).
    pub fn write_snapshot(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        w.write_all(&[SNAPSHOT_FORMAT_VERSION])?;
        postcard::to_io(&self.snapshot_body(), w)
            .map(|_| ())
            .map_err(|e| std::io::Error::other(format!("writing the snapshot: {e}")))
    }

    /// Replaces the state with a snapshot made by [`KvStore::snapshot`] (any format version
    /// [`KvStore::restore`] reads), decoded as it is read from `r`, one key at a time: the
    /// snapshot is never held whole, only the store being built (and, at the end, the small
    /// part after the data: sessions, leases, members). An empty input is the empty store.
    /// On error (a read error, a damaged or truncated snapshot) the store is left unchanged.
    pub fn restore_from(&mut self, r: &mut dyn std::io::Read) -> Result<(), Error> {
        let mut r = std::io::BufReader::with_capacity(RESTORE_BUFFER_BYTES, r);
        let mut fresh = KvStore::new(self.limits);
        let mut first = [0u8; 1];
        if read_some(&mut r, &mut first)? == 0 {
            *self = fresh;
            return Ok(());
        }
        let version = first[0];
        if !matches!(
            version,
            SNAPSHOT_FORMAT_VERSION_V1
                | SNAPSHOT_FORMAT_VERSION_V2
                | SNAPSHOT_FORMAT_VERSION_V3
                | SNAPSHOT_FORMAT_VERSION
        ) {
            return Err(Error::SnapshotVersion(version));
        }
        fresh.applied = read_varint(&mut r)?;
        let count = read_varint(&mut r)?;
        // Formats 3 and 4 carry each key's lease; the leases come after the data, so keys
        // attached to one are checked and indexed once the leases are known.
        let has_lease = version >= SNAPSHOT_FORMAT_VERSION_V3;
        let mut leased = Vec::new();
        for _ in 0..count {
            let key = read_byte_string(&mut r)?;
            let value = read_byte_string(&mut r)?;
            let item_version = read_varint(&mut r)?;
            let lease = if has_lease { read_varint(&mut r)? } else { 0 };
            fresh.data_bytes += key.len() + value.len();
            let key = Key::from_vec(key);
            if lease != 0 {
                leased.push((key.clone(), lease));
            }
            let item = Item {
                value: Arc::from(value),
                version: item_version,
                lease,
            };
            fresh.items.insert(key, item);
        }
        let mut tail = Vec::new();
        r.read_to_end(&mut tail)
            .map_err(|e| Error::SnapshotDecode(format!("reading the snapshot: {e}")))?;
        let decode = |e: postcard::Error| Error::SnapshotDecode(e.to_string());
        let tail: SnapshotTail = match version {
            SNAPSHOT_FORMAT_VERSION_V1 => {
                // Dedup entries of format 1 do not carry over (decoded to check the layout).
                let _: Vec<(u64, (u64, u64, KvResult))> =
                    postcard::from_bytes(&tail).map_err(decode)?;
                *self = fresh;
                return Ok(());
            }
            SNAPSHOT_FORMAT_VERSION_V2 => SnapshotTail {
                sessions: postcard::from_bytes(&tail).map_err(decode)?,
                leases: Vec::new(),
                members: Vec::new(),
            },
            SNAPSHOT_FORMAT_VERSION_V3 => {
                let t: SnapshotTailV3 = postcard::from_bytes(&tail).map_err(decode)?;
                SnapshotTail {
                    sessions: t.sessions,
                    leases: t.leases,
                    members: Vec::new(),
                }
            }
            _ => postcard::from_bytes(&tail).map_err(decode)?,
        };
        fresh.members = tail.members.into_iter().collect();
        for (id, l) in tail.leases {
            fresh.leases.insert(id, l);
        }
        for (key, lease) in leased {
            if !fresh.leases.contains_key(&lease) {
                return Err(Error::SnapshotDecode(format!(
                    "a key is attached to lease {lease}, which the snapshot does not hold"
                )));
            }
            fresh.attach(&key, lease);
        }
        for (c, s) in tail.sessions {
            if fresh.by_use.insert((s.last_used, c)).is_some() {
                return Err(Error::SnapshotDecode(format!("session {c}: duplicate use")));
            }
            fresh.sessions.insert(c, s);
        }
        *self = fresh;
        Ok(())
    }

    /// Keys after `after` (from the first key when `None`) in order, with their values and
    /// versions, up to `max_bytes` of keys and values (at least one key, whatever its size),
    /// and whether they reach the last key. A shard copied in bounded chunks
    /// (`docs/sharding.md`, "Large shards travel in chunks"). Keys attached to a lease are
    /// copied without it (the sharded cluster, the only user, refuses leases).
    pub fn items_after(&self, after: Option<&[u8]>, max_bytes: usize) -> (Vec<CopiedEntry>, bool) {
        let start = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut range = self.items.range::<_, [u8]>((start, Bound::Unbounded));
        for (k, item) in range.by_ref() {
            out.push((k.to_vec(), item.value.to_vec(), item.version));
            bytes += k.len() + item.value.len();
            if bytes >= max_bytes {
                break;
            }
        }
        let last = range.next().is_none();
        (out, last)
    }

    /// Sets `key` to `value` at `version` as a copy (no position, no session: the store of a
    /// shard being staged at its new owner). Replaces what the key held.
    pub fn insert_copied(&mut self, key: &[u8], value: &[u8], version: u64) {
        let item = Item {
            value: Arc::from(value),
            version,
            lease: 0,
        };
        if let Some(old) = self.items.insert(Key::from_slice(key), item) {
            self.data_bytes -= key.len() + old.value.len();
            if old.lease != 0 {
                self.detach(key, old.lease);
            }
        }
        self.data_bytes += key.len() + value.len();
    }

    /// Removes a copied `key` (see [`KvStore::insert_copied`]).
    pub fn remove_copied(&mut self, key: &[u8]) {
        if let Some(old) = self.items.remove(key) {
            self.data_bytes -= key.len() + old.value.len();
            if old.lease != 0 {
                self.detach(key, old.lease);
            }
        }
    }

    /// [`KvStore::snapshot`] without the data: the session table, the leases and the position
    /// counter (the small part of a shard, sent when it is frozen; its keys travelled before).
    pub fn meta_snapshot(&self) -> Vec<u8> {
        let body = SnapshotBodyRef {
            applied: self.applied,
            items: Items(&OrdMap::new()),
            sessions: Seq(&self.sessions),
            leases: Seq(&self.leases),
            members: Seq(&self.members),
        };
        let out = vec![SNAPSHOT_FORMAT_VERSION];
        postcard::to_extend(&body, out).expect("snapshot encodes")
    }

    /// This store's data (copied with [`KvStore::insert_copied`]) under the session table,
    /// leases and position counter of `meta` (a [`KvStore::meta_snapshot`]): the shard whole
    /// again. An error if `meta` does not decode or holds data.
    pub fn with_meta(self, meta: &[u8]) -> Result<KvStore, Error> {
        let mut fresh = KvStore::new(self.limits);
        fresh.restore(meta)?;
        if !fresh.items.is_empty() {
            return Err(Error::SnapshotDecode(
                "the session table and counter came with data".into(),
            ));
        }
        fresh.items = self.items;
        fresh.data_bytes = self.data_bytes;
        Ok(fresh)
    }

    /// Replaces the state with a snapshot made by [`KvStore::snapshot`]. An empty snapshot is
    /// the empty store.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let mut fresh = KvStore::new(self.limits);
        if bytes.is_empty() {
            *self = fresh;
            return Ok(());
        }
        if bytes[0] == SNAPSHOT_FORMAT_VERSION_V1 {
            let body: SnapshotBodyV1 = postcard::from_bytes(&bytes[1..])
                .map_err(|e| Error::SnapshotDecode(e.to_string()))?;
            fresh.applied = body.applied;
            for (k, item) in body.items {
                fresh.data_bytes += k.len() + item.value.len();
                let item = Item {
                    value: item.value,
                    version: item.version,
                    lease: 0,
                };
                fresh.items.insert(Key::from_vec(k), item);
            }
            *self = fresh;
            return Ok(());
        }
        let decode = |e: postcard::Error| Error::SnapshotDecode(e.to_string());
        let body: SnapshotBody = match bytes[0] {
            SNAPSHOT_FORMAT_VERSION => postcard::from_bytes(&bytes[1..]).map_err(decode)?,
            SNAPSHOT_FORMAT_VERSION_V2 => {
                // Before leases: the same data and sessions, no key attached to a lease.
                let old: SnapshotBodyV2 = postcard::from_bytes(&bytes[1..]).map_err(decode)?;
                SnapshotBody {
                    applied: old.applied,
                    items: old
                        .items
                        .into_iter()
                        .map(|(k, i)| {
                            let item = Item {
                                value: i.value,
                                version: i.version,
                                lease: 0,
                            };
                            (k, item)
                        })
                        .collect(),
                    sessions: old.sessions,
                    leases: Vec::new(),
                    members: Vec::new(),
                }
            }
            SNAPSHOT_FORMAT_VERSION_V3 => {
                // Before the members' addresses: the same state, no address.
                let old: SnapshotBodyV3 = postcard::from_bytes(&bytes[1..]).map_err(decode)?;
                SnapshotBody {
                    applied: old.applied,
                    items: old.items,
                    sessions: old.sessions,
                    leases: old.leases,
                    members: Vec::new(),
                }
            }
            v => return Err(Error::SnapshotVersion(v)),
        };
        fresh.applied = body.applied;
        fresh.members = body.members.into_iter().collect();
        for (id, l) in body.leases {
            fresh.leases.insert(id, l);
        }
        for (k, item) in body.items {
            fresh.data_bytes += k.len() + item.value.len();
            if item.lease != 0 {
                if !fresh.leases.contains_key(&item.lease) {
                    return Err(Error::SnapshotDecode(format!(
                        "a key is attached to lease {}, which the snapshot does not hold",
                        item.lease
                    )));
                }
                fresh.attach(&k, item.lease);
            }
            fresh.items.insert(Key::from_vec(k.into_vec()), item);
        }
        for (c, s) in body.sessions {
            if fresh.by_use.insert((s.last_used, c)).is_some() {
                return Err(Error::SnapshotDecode(format!("session {c}: duplicate use")));
            }
            fresh.sessions.insert(c, s);
        }
        *self = fresh;
        Ok(())
    }
}

/// `Arc<[u8]>` as bytes: one length and a memcpy (the same encoding as a sequence of `u8`).
mod shared_bytes {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::ByteBuf;

    pub fn serialize<S: Serializer>(v: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        Ok(Arc::from(ByteBuf::deserialize(d)?.into_vec()))
    }
}

/// Heap bytes of a remembered answer.
fn result_bytes(r: &KvResult) -> usize {
    match r {
        KvResult::Found { value, .. } => value.len(),
        KvResult::Scanned { items } => items.iter().map(|i| i.key.len() + i.value.len() + 8).sum(),
        KvResult::TooLarge { what, .. } => what.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(client: u64, request: u64, key: &str, value: &str, expected: Expected) -> KvRequest {
        KvRequest {
            client,
            request,
            op: KvOp::Put {
                key: key.into(),
                value: value.into(),
                expected,
            },
            serializable: false,
        }
    }

    /// An item of the formats before leases (1 and 2), for writing one in a test.
    #[derive(Serialize)]
    struct OldItem {
        value: Vec<u8>,
        version: u64,
    }

    /// The format-1 layout, for writing one in a test.
    #[derive(Serialize)]
    struct SnapshotBodyV1Out {
        applied: u64,
        items: Vec<(Vec<u8>, OldItem)>,
        sessions: Vec<(u64, (u64, u64, KvResult))>,
    }

    /// The format-2 layout (before leases), for writing one in a test.
    #[derive(Serialize)]
    struct SnapshotBodyV2Out {
        applied: u64,
        items: Vec<(Vec<u8>, OldItem)>,
        sessions: Vec<(u64, Session)>,
    }

    fn del(client: u64, request: u64, key: &str) -> KvRequest {
        KvRequest {
            client,
            request,
            op: KvOp::Delete {
                key: key.into(),
                expected: Expected::Any,
            },
            serializable: false,
        }
    }

    /// Registers at `index`; returns the session id.
    fn register(s: &mut KvStore, index: u64) -> u64 {
        let r = s.apply(
            index,
            &KvRequest {
                client: 0,
                request: 1,
                op: KvOp::Register,
                serializable: false,
            },
        );
        let KvResult::Registered { session } = r else {
            panic!("{r:?}")
        };
        assert_eq!(session, index);
        session
    }

    #[test]
    fn put_semantics() {
        let mut s = KvStore::new(Limits::default());
        let c = register(&mut s, 1);
        assert_eq!(
            s.apply(2, &put(c, 1, "k", "a", Expected::Version(1))),
            KvResult::NoKey
        );
        assert_eq!(
            s.apply(3, &put(c, 2, "k", "a", Expected::Version(0))),
            KvResult::Written { version: 1 }
        );
        assert_eq!(
            s.apply(4, &put(c, 3, "k", "b", Expected::Version(0))),
            KvResult::VersionMismatch
        );
        assert_eq!(
            s.apply(5, &put(c, 4, "k", "b", Expected::Any)),
            KvResult::Written { version: 2 }
        );
        assert_eq!(s.get(b"k"), Some((&b"b"[..], 2)));
        let del = KvRequest {
            client: c,
            request: 5,
            op: KvOp::Delete {
                key: "k".into(),
                expected: Expected::Version(2),
            },
            serializable: false,
        };
        assert_eq!(s.apply(6, &del), KvResult::Deleted);
        assert_eq!(s.get(b"k"), None);
        assert_eq!(s.data_bytes(), 0);
    }

    #[test]
    fn dedup_returns_remembered_answer() {
        let mut s = KvStore::new(Limits::default());
        let c = register(&mut s, 1);
        let p = put(c, 1, "k", "a", Expected::Any);
        assert_eq!(s.apply(2, &p), KvResult::Written { version: 1 });
        assert_eq!(s.apply(3, &p), KvResult::Written { version: 1 });
        assert_eq!(s.get(b"k"), Some((&b"a"[..], 1)));
        assert_eq!(
            s.apply(4, &put(c, 0, "k", "x", Expected::Any)),
            KvResult::Stale
        );
        assert_eq!(s.get(b"k"), Some((&b"a"[..], 1)));
    }

    #[test]
    fn registration_allocates_log_index_sessions() {
        let mut s = KvStore::new(Limits::default());
        assert_eq!(register(&mut s, 3), 3);
        assert_eq!(register(&mut s, 7), 7);
        assert!(s.has_session(3) && s.has_session(7) && !s.has_session(5));
        assert_eq!(s.session_count(), 2);
        // A write from a session never registered is refused and not applied.
        assert_eq!(
            s.apply(8, &put(5, 1, "k", "v", Expected::Any)),
            KvResult::SessionExpired
        );
        assert!(s.is_empty());
        // Sessions are independent: the same sequence number in two sessions applies twice.
        assert_eq!(
            s.apply(9, &put(3, 1, "k", "v", Expected::Any)),
            KvResult::Written { version: 1 }
        );
        assert_eq!(
            s.apply(10, &put(7, 1, "k", "v", Expected::Any)),
            KvResult::Written { version: 2 }
        );
        // Without sessions (max_sessions = 0) registration succeeds and writes apply.
        let mut plain = KvStore::new(Limits {
            max_sessions: 0,
            ..Limits::default()
        });
        assert_eq!(register(&mut plain, 1), 1);
        assert_eq!(plain.session_count(), 0);
        let p = put(42, 1, "k", "v", Expected::Any);
        assert_eq!(plain.apply(2, &p), KvResult::Written { version: 1 });
        assert_eq!(plain.apply(3, &p), KvResult::Written { version: 2 });
    }

    #[test]
    fn expired_session_write_never_applies() {
        let mut s = KvStore::new(Limits {
            max_sessions: 2,
            ..Limits::default()
        });
        let a = register(&mut s, 1);
        assert_eq!(
            s.apply(2, &put(a, 1, "k", "v", Expected::Any)),
            KvResult::Written { version: 1 }
        );
        let b = register(&mut s, 3);
        // `a` was used at 2, `b` at 3: the next registration expires `a`.
        let c = register(&mut s, 4);
        assert!(!s.has_session(a) && s.has_session(b) && s.has_session(c));
        // The late retry of a's unconditional put, and a's delete, are refused.
        assert_eq!(
            s.apply(5, &put(a, 1, "k", "v", Expected::Any)),
            KvResult::SessionExpired
        );
        assert_eq!(s.apply(6, &del(a, 2, "k")), KvResult::SessionExpired);
        assert_eq!(s.get(b"k"), Some((&b"v"[..], 1)));
        // A write refreshes its session: `b` written at 7 outlives `c`.
        assert_eq!(s.apply(7, &del(b, 1, "k")), KvResult::Deleted);
        let d = register(&mut s, 8);
        assert!(s.has_session(b) && !s.has_session(c) && s.has_session(d));
    }

    #[test]
    fn limits_refuse_and_store_nothing() {
        let limits = Limits {
            max_key_bytes: 4,
            max_value_bytes: 8,
            ..Limits::default()
        };
        let mut s = KvStore::new(limits);
        let c = register(&mut s, 1);
        assert!(matches!(
            s.apply(2, &put(c, 1, "kkkkk", "v", Expected::Any)),
            KvResult::TooLarge { .. }
        ));
        assert!(matches!(
            s.apply(3, &put(c, 2, "k", "123456789", Expected::Any)),
            KvResult::TooLarge { .. }
        ));
        assert!(s
            .size_error(&put(c, 3, "k", "123456789", Expected::Any).op)
            .is_some());
        assert!(s
            .size_error(&put(c, 3, "k", "1", Expected::Any).op)
            .is_none());
        assert!(s.is_empty());
    }

    /// The memory test: many clients, each registering and writing, never grow the table
    /// past its bound (entries and bytes), and the most recent sessions are the ones kept.
    #[test]
    fn session_table_is_bounded() {
        const MAX: usize = 10;
        let limits = Limits {
            max_sessions: MAX,
            ..Limits::default()
        };
        let mut s = KvStore::new(limits);
        let mut index = 0;
        let mut sessions = Vec::new();
        for _ in 0..1000u64 {
            index += 1;
            let c = register(&mut s, index);
            index += 1;
            s.apply(index, &put(c, 1, "k", "v", Expected::Any));
            sessions.push(c);
            assert!(s.session_count() <= MAX);
            assert!(s.session_bytes() <= MAX * SESSION_ENTRY_OVERHEAD_BYTES);
        }
        assert_eq!(s.get(b"k"), Some((&b"v"[..], 1000)));
        for (i, c) in sessions.iter().enumerate() {
            assert_eq!(s.has_session(*c), i >= 1000 - MAX, "session {c}");
        }
        // The newest client's retry is deduplicated; the oldest one's is refused.
        let last = *sessions.last().unwrap();
        assert_eq!(
            s.apply(index + 1, &put(last, 1, "k", "zzz", Expected::Any)),
            KvResult::Written { version: 1000 }
        );
        assert_eq!(
            s.apply(index + 2, &put(sessions[0], 1, "k", "zzz", Expected::Any)),
            KvResult::SessionExpired
        );
        assert_eq!(s.get(b"k"), Some((&b"v"[..], 1000)));
    }

    /// A fixed pseudo-random log (registrations, writes from live and dead sessions,
    /// retries) applied to two replicas — one of them restarted from a snapshot half way —
    /// gives byte-identical state, session table included.
    #[test]
    fn expiry_is_deterministic_across_replicas() {
        let limits = Limits {
            max_sessions: 5,
            ..Limits::default()
        };
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut log = Vec::new();
        let mut registered = vec![0u64];
        for index in 1..=2000u64 {
            let r = next();
            let req = if r % 4 == 0 {
                registered.push(index);
                KvRequest {
                    client: 0,
                    request: 1,
                    op: KvOp::Register,
                    serializable: false,
                }
            } else {
                let session = registered[(r >> 8) as usize % registered.len()];
                let key = format!("k{}", (r >> 20) % 7);
                if r % 3 == 0 {
                    del(session, (r >> 32) % 50, &key)
                } else {
                    put(session, (r >> 32) % 50, &key, "v", Expected::Any)
                }
            };
            log.push((index, req));
        }
        let mut a = KvStore::new(limits);
        let mut b = KvStore::new(limits);
        let mut answers_a = Vec::new();
        let mut answers_b = Vec::new();
        for (index, req) in &log {
            answers_a.push(a.apply(*index, req));
            if *index == 1000 {
                let mut restarted = KvStore::new(limits);
                restarted.restore(&b.snapshot()).unwrap();
                b = restarted;
            }
            answers_b.push(b.apply(*index, req));
            assert!(a.session_count() <= 5);
        }
        assert_eq!(answers_a, answers_b);
        assert_eq!(a.snapshot(), b.snapshot());
        assert!(answers_a.contains(&KvResult::SessionExpired));
    }

    #[test]
    fn snapshot_round_trip() {
        let mut s = KvStore::new(Limits::default());
        let sessions: Vec<u64> = (1..=5).map(|i| register(&mut s, i)).collect();
        for i in 0..50u64 {
            s.apply(
                i + 6,
                &put(
                    sessions[(i % 5) as usize],
                    i,
                    &format!("k{i}"),
                    "value",
                    Expected::Any,
                ),
            );
        }
        // Written from the maps (byte fields as bytes), it is exactly the plain encoding of
        // the body with every byte string a `Vec<u8>`, the format `restore` has always read.
        #[derive(Serialize)]
        struct PlainItem {
            value: Vec<u8>,
            version: u64,
            lease: u64,
        }
        #[derive(Serialize)]
        struct PlainBody {
            applied: u64,
            items: Vec<(Vec<u8>, PlainItem)>,
            sessions: Vec<(u64, Session)>,
            leases: Vec<(u64, Lease)>,
            members: Vec<(u64, String)>,
        }
        let members = KvRequest {
            client: 0,
            request: 0,
            op: KvOp::MemberAddresses {
                members: vec![(1, "127.0.0.1:7001".into()), (4, "127.0.0.1:7004".into())],
            },
            serializable: false,
        };
        let at = s.applied() + 1;
        s.apply(at, &members);
        let bytes = s.snapshot();
        let owned = PlainBody {
            applied: s.applied,
            items: s
                .items
                .iter()
                .map(|(k, v)| {
                    let item = PlainItem {
                        value: v.value.to_vec(),
                        version: v.version,
                        lease: v.lease,
                    };
                    (k.to_vec(), item)
                })
                .collect(),
            sessions: s.sessions.iter().map(|(c, x)| (*c, x.clone())).collect(),
            leases: s.leases.iter().map(|(c, x)| (*c, x.clone())).collect(),
            members: vec![(1, "127.0.0.1:7001".into()), (4, "127.0.0.1:7004".into())],
        };
        let mut expected = vec![SNAPSHOT_FORMAT_VERSION];
        expected.extend(postcard::to_allocvec(&owned).unwrap());
        assert_eq!(bytes, expected);
        let mut r = KvStore::new(Limits::default());
        r.restore(&bytes).unwrap();
        assert_eq!(r.snapshot(), bytes);
        assert_eq!(r.member_addresses().len(), 2);
        // A format-3 snapshot (before the addresses) restores with none.
        let mut v3 = vec![SNAPSHOT_FORMAT_VERSION_V3];
        v3.extend(
            postcard::to_allocvec(&(&owned.applied, &owned.items, &owned.sessions, &owned.leases))
                .unwrap(),
        );
        let mut old = KvStore::new(Limits::default());
        old.restore(&v3).unwrap();
        assert!(old.member_addresses().is_empty());
        assert_eq!(old.len(), r.len());
        assert_eq!(r.applied(), at);
        assert_eq!(r.data_bytes(), s.data_bytes());
        assert_eq!(r.session_count(), 5);
        assert_eq!(r.session_bytes(), s.session_bytes());
        // The restored session table deduplicates like the original: the latest write of a
        // session is answered from it, an older one is stale.
        assert_eq!(
            r.apply(at + 1, &put(sessions[4], 49, "k49", "other", Expected::Any)),
            KvResult::Written { version: 1 }
        );
        assert_eq!(
            r.apply(at + 2, &put(sessions[4], 44, "k49", "other", Expected::Any)),
            KvResult::Stale
        );
        assert_eq!(r.get(b"k49"), Some((&b"value"[..], 1)));
        assert!(r.restore(&[9, 1, 2]).is_err());
        // A format-1 snapshot (before sessions) restores its data and no session.
        let v1 = SnapshotBodyV1Out {
            applied: 7,
            items: vec![(
                b"old".to_vec(),
                OldItem {
                    value: b"x".to_vec(),
                    version: 3,
                },
            )],
            sessions: vec![(5, (2, 7, KvResult::Written { version: 3 }))],
        };
        let mut bytes = vec![SNAPSHOT_FORMAT_VERSION_V1];
        bytes.extend(postcard::to_allocvec(&v1).unwrap());
        let mut old = KvStore::new(Limits::default());
        old.restore(&bytes).unwrap();
        assert_eq!((old.applied(), old.session_count()), (7, 0));
        assert_eq!(old.get(b"old"), Some((&b"x"[..], 3)));
        assert_eq!(
            old.apply(8, &put(5, 2, "old", "y", Expected::Any)),
            KvResult::SessionExpired
        );
        let scan = r
            .read(&KvOp::Scan {
                start: b"k1".to_vec(),
                end: Some(b"k2".to_vec()),
                limit: 3,
            })
            .unwrap();
        let KvResult::Scanned { items } = scan else {
            panic!("scan")
        };
        let keys: Vec<_> = items.iter().map(|i| i.key.clone()).collect();
        assert_eq!(keys, vec![b"k1".to_vec(), b"k10".to_vec(), b"k11".to_vec()]);
    }

    fn req(client: u64, request: u64, op: KvOp) -> KvRequest {
        KvRequest {
            client,
            request,
            op,
            serializable: false,
        }
    }

    /// The leases as `(id, ttl_ms, remaining_ms, renewals, keys)`.
    fn tuples(s: &KvStore) -> Vec<(u64, u64, u64, u64, usize)> {
        s.leases()
            .iter()
            .map(|l| (l.id, l.ttl_ms, l.remaining_ms, l.renewals, l.keys))
            .collect()
    }

    fn put_lease(c: u64, r: u64, key: &str, value: &str, lease: u64) -> KvRequest {
        let op = KvOp::PutLease {
            key: key.into(),
            value: value.into(),
            expected: Expected::Any,
            lease,
        };
        req(c, r, op)
    }

    fn grant(s: &mut KvStore, index: u64, c: u64, ttl_ms: u64) -> u64 {
        match s.apply(index, &req(c, index, KvOp::LeaseGrant { ttl_ms })) {
            KvResult::LeaseGranted { id, ttl_ms: t } => {
                assert_eq!((id, t), (index, ttl_ms));
                id
            }
            other => panic!("grant: {other:?}"),
        }
    }

    /// Keys put with a lease go with it (revoke or a fenced expiry); a plain re-put detaches
    /// a key; a put with an unknown lease is refused; a key created under a lease starts at
    /// the position of its put and its versions keep growing across deletions.
    #[test]
    fn lease_attach_detach_revoke_expire() {
        let mut s = KvStore::new(Limits::default());
        let c = register(&mut s, 1);
        let l = grant(&mut s, 2, c, 5_000);
        assert_eq!(
            s.apply(3, &put_lease(c, 3, "a", "1", l)),
            KvResult::Written { version: 3 }
        );
        assert_eq!(
            s.apply(4, &put_lease(c, 4, "b", "1", l)),
            KvResult::Written { version: 4 }
        );
        assert_eq!(
            s.apply(5, &put_lease(c, 5, "a", "2", l)),
            KvResult::Written { version: 4 }
        );
        assert_eq!(s.key_lease(b"a"), Some(l));
        // A plain put detaches "b": it survives the lease.
        assert_eq!(
            s.apply(6, &put(c, 6, "b", "plain", Expected::Any)),
            KvResult::Written { version: 5 }
        );
        assert_eq!(s.key_lease(b"b"), None);
        assert_eq!(tuples(&s), vec![(l, 5_000, 5_000, 0, 1)]);
        // Unknown lease: refused, nothing stored.
        assert_eq!(
            s.apply(7, &put_lease(c, 7, "z", "1", 999)),
            KvResult::LeaseNotFound { id: 999 }
        );
        assert_eq!(s.get(b"z"), None);
        // Revoke deletes "a" only.
        assert_eq!(
            s.apply(8, &req(c, 8, KvOp::LeaseRevoke { id: l })),
            KvResult::LeaseRevoked { id: l, keys: 1 }
        );
        assert_eq!(s.get(b"a"), None);
        assert_eq!(s.get(b"b"), Some((&b"plain"[..], 5)));
        assert_eq!(s.lease_count(), 0);
        assert_eq!(
            s.apply(9, &req(c, 9, KvOp::LeaseKeepAlive { id: l })),
            KvResult::LeaseNotFound { id: l }
        );
        // A new lease: "a" comes back at a higher version than it ever had (fencing).
        let m = grant(&mut s, 10, c, 5_000);
        assert_eq!(
            s.apply(11, &put_lease(c, 11, "a", "3", m)),
            KvResult::Written { version: 11 }
        );
        // Expiry fenced by the renewal counter: a keep-alive applied since wins.
        assert_eq!(
            s.apply(12, &req(c, 12, KvOp::LeaseKeepAlive { id: m })),
            KvResult::LeaseKept {
                id: m,
                ttl_ms: 5_000
            }
        );
        let stale = req(0, 0, KvOp::LeaseExpire { id: m, renewals: 0 });
        assert_eq!(s.apply(13, &stale), KvResult::LeaseNotFound { id: m });
        assert!(s.get(b"a").is_some());
        let fresh = req(0, 0, KvOp::LeaseExpire { id: m, renewals: 1 });
        assert_eq!(
            s.apply(14, &fresh),
            KvResult::LeaseRevoked { id: m, keys: 1 }
        );
        assert_eq!(s.get(b"a"), None);
        // Deleting a leased key detaches it: the lease's count drops.
        let n = grant(&mut s, 15, c, 5_000);
        s.apply(16, &put_lease(c, 16, "d", "1", n));
        assert_eq!(s.apply(17, &del(c, 17, "d")), KvResult::Deleted);
        assert_eq!(tuples(&s), vec![(n, 5_000, 5_000, 0, 0)]);
        assert_eq!(s.data_bytes(), "b".len() + "plain".len());
    }

    /// Checkpoints record the remaining time unless the lease was renewed since.
    #[test]
    fn lease_checkpoint_is_fenced() {
        let mut s = KvStore::new(Limits::default());
        let c = register(&mut s, 1);
        let l = grant(&mut s, 2, c, 5_000);
        let cp = |renewals, remaining_ms| {
            req(
                0,
                0,
                KvOp::LeaseCheckpoint {
                    leases: vec![LeaseCheckpoint {
                        id: l,
                        renewals,
                        remaining_ms,
                    }],
                },
            )
        };
        s.apply(3, &cp(0, 1_200));
        assert_eq!(tuples(&s), vec![(l, 5_000, 1_200, 0, 0)]);
        s.apply(4, &req(c, 4, KvOp::LeaseKeepAlive { id: l }));
        assert_eq!(tuples(&s), vec![(l, 5_000, 5_000, 1, 0)]);
        s.apply(5, &cp(0, 100));
        assert_eq!(tuples(&s), vec![(l, 5_000, 5_000, 1, 0)]);
        // Never above the TTL.
        s.apply(6, &cp(1, 99_000));
        assert_eq!(tuples(&s), vec![(l, 5_000, 5_000, 1, 0)]);
    }

    /// Every lease limit refuses with a reason and changes nothing.
    #[test]
    fn lease_limits_refuse() {
        let mut s = KvStore::new(Limits {
            max_leases: 1,
            max_keys_per_lease: 1,
            min_lease_ttl_ms: 100,
            max_lease_ttl_ms: 1_000,
            ..Limits::default()
        });
        let c = register(&mut s, 1);
        for (i, ttl) in [(2, 99), (3, 1_001)] {
            let r = s.apply(i, &req(c, i, KvOp::LeaseGrant { ttl_ms: ttl }));
            assert!(
                matches!(&r, KvResult::Refused { reason } if reason.contains("TTL")),
                "{r:?}"
            );
        }
        let l = grant(&mut s, 4, c, 100);
        let r = s.apply(5, &req(c, 5, KvOp::LeaseGrant { ttl_ms: 500 }));
        assert!(
            matches!(&r, KvResult::Refused { reason } if reason.contains("too many leases")),
            "{r:?}"
        );
        assert_eq!(
            s.apply(6, &put_lease(c, 6, "a", "1", l)),
            KvResult::Written { version: 6 }
        );
        // Re-putting an attached key is fine; a second key is over the limit.
        assert_eq!(
            s.apply(7, &put_lease(c, 7, "a", "2", l)),
            KvResult::Written { version: 7 }
        );
        let r = s.apply(8, &put_lease(c, 8, "b", "1", l));
        assert!(matches!(r, KvResult::Refused { .. }), "{r:?}");
        assert_eq!(s.get(b"b"), None);
        assert_eq!(s.lease_count(), 1);
    }

    /// Leases are in the snapshot (keys stay attached after a restore), and a format-2
    /// snapshot (before leases) restores its data and sessions with no lease.
    #[test]
    fn lease_snapshot_and_old_format() {
        let mut s = KvStore::new(Limits::default());
        let c = register(&mut s, 1);
        let l = grant(&mut s, 2, c, 3_000);
        s.apply(3, &put_lease(c, 3, "a", "1", l));
        s.apply(4, &put(c, 4, "b", "1", Expected::Any));
        s.apply(5, &req(c, 5, KvOp::LeaseKeepAlive { id: l }));
        let bytes = s.snapshot();
        assert_eq!(bytes[0], SNAPSHOT_FORMAT_VERSION);
        let mut r = KvStore::new(Limits::default());
        r.restore(&bytes).unwrap();
        assert_eq!(r.snapshot(), bytes);
        assert_eq!(tuples(&r), vec![(l, 3_000, 3_000, 1, 1)]);
        assert_eq!(
            r.apply(6, &req(c, 6, KvOp::LeaseRevoke { id: l })),
            KvResult::LeaseRevoked { id: l, keys: 1 }
        );
        assert_eq!(r.get(b"a"), None);
        assert!(r.get(b"b").is_some());

        let v2 = SnapshotBodyV2Out {
            applied: 9,
            items: vec![(
                b"old".to_vec(),
                OldItem {
                    value: b"x".to_vec(),
                    version: 4,
                },
            )],
            sessions: vec![(
                7,
                Session {
                    request: 2,
                    last_used: 8,
                    result: Some(KvResult::Written { version: 4 }),
                },
            )],
        };
        let mut bytes = vec![SNAPSHOT_FORMAT_VERSION_V2];
        bytes.extend(postcard::to_allocvec(&v2).unwrap());
        let mut old = KvStore::new(Limits::default());
        old.restore(&bytes).unwrap();
        assert_eq!((old.applied(), old.session_count()), (9, 1));
        assert_eq!(old.get(b"old"), Some((&b"x"[..], 4)));
        assert_eq!(old.key_lease(b"old"), None);
        assert_eq!(old.lease_count(), 0);
        // Its session still deduplicates.
        assert_eq!(
            old.apply(10, &put(7, 2, "old", "y", Expected::Any)),
            KvResult::Written { version: 4 }
        );
        // A key attached to a lease the snapshot lacks is refused, not restored half-way.
        assert!(old.restore(&[SNAPSHOT_FORMAT_VERSION, 0xff]).is_err());
    }
}
