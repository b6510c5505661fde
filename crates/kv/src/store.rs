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

use std::ops::Bound;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use serde_bytes::{ByteBuf, Bytes};
use smallvec::SmallVec;

use serde::{Deserialize, Serialize};
use shoal_wire::kv::{Expected, KvOp, KvRequest, KvResult, ScanItem};

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
pub const SNAPSHOT_FORMAT_VERSION: u8 = 2;
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_scan_items: DEFAULT_MAX_SCAN_ITEMS,
        }
    }
}

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
    items: Vec<(Vec<u8>, Item)>,
    #[allow(dead_code)] // decoded to validate the layout; dedup entries do not carry over
    sessions: Vec<(u64, (u64, u64, KvResult))>,
}

/// The serialized form of a store (after the format version byte).
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    applied: u64,
    items: Vec<(ByteBuf, Item)>,
    sessions: Vec<(u64, Session)>,
}

/// [`SnapshotBody`]'s encoding, borrowing the store's maps.
#[derive(Serialize)]
struct SnapshotBodyRef<'a> {
    applied: u64,
    items: Items<'a>,
    sessions: Seq<'a, u64, Session>,
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
    /// Position of the last applied write.
    applied: u64,
    data_bytes: usize,
}

impl KvStore {
    /// An empty store.
    pub fn new(limits: Limits) -> KvStore {
        KvStore {
            limits,
            items: OrdMap::new(),
            sessions: OrdMap::new(),
            by_use: OrdSet::new(),
            applied: 0,
            data_bytes: 0,
        }
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
            KvOp::Get { .. } | KvOp::Scan { .. } | KvOp::Register | KvOp::Status => None,
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
            KvOp::Put { .. } | KvOp::Delete { .. } | KvOp::Register | KvOp::Status => {
                Err(Error::NotARead)
            }
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
        assert!(
            index > self.applied,
            "apply at {index} after {}: out of order",
            self.applied
        );
        self.applied = index;
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
            return self.write(&req.op);
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
        let result = self.write(&req.op);
        self.touch(req.client, index, Some((req.request, result.clone())));
        result
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

    /// Applies a write without deduplication.
    fn write(&mut self, op: &KvOp) -> KvResult {
        match op {
            KvOp::Put {
                key,
                value,
                expected,
            } => {
                if let Some(e) = self.check_sizes(key, Some(value)) {
                    return e;
                }
                // One walk down the tree for a key that exists (the common case), two for a
                // new one.
                if let Some(item) = self.items.get_mut(key.as_slice()) {
                    let version = match expected {
                        Expected::Version(e) if *e != item.version => {
                            return KvResult::VersionMismatch
                        }
                        _ => item.version + 1,
                    };
                    self.data_bytes = self.data_bytes + value.len() - item.value.len();
                    item.value = Arc::from(value.as_slice());
                    item.version = version;
                    return KvResult::Written { version };
                }
                if let Expected::Version(v) = expected {
                    if *v != 0 {
                        return KvResult::NoKey;
                    }
                }
                let item = Item {
                    value: Arc::from(value.as_slice()),
                    version: 1,
                };
                self.data_bytes += key.len() + value.len();
                self.items.insert(Key::from_slice(key), item);
                KvResult::Written { version: 1 }
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
                        }
                        KvResult::Deleted
                    }
                }
            }
            KvOp::Get { .. } | KvOp::Scan { .. } | KvOp::Register | KvOp::Status => {
                self.read(op).unwrap_or(KvResult::Stale)
            }
        }
    }

    /// Serializes the whole state (data, sessions, applied position): one format version
    /// byte, then postcard.
    pub fn snapshot(&self) -> Vec<u8> {
        // The same encoding as `SnapshotBody`, written straight from the maps: no copy of any
        // key or value before the one into `out` (it used to clone the store twice over).
        let body = SnapshotBodyRef {
            applied: self.applied,
            items: Items(&self.items),
            sessions: Seq(&self.sessions),
        };
        let out = vec![SNAPSHOT_FORMAT_VERSION];
        // Encoding plain vectors and integers into a Vec cannot fail.
        postcard::to_extend(&body, out).expect("snapshot encodes")
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
                fresh.items.insert(Key::from_vec(k), item);
            }
            *self = fresh;
            return Ok(());
        }
        if bytes[0] != SNAPSHOT_FORMAT_VERSION {
            return Err(Error::SnapshotVersion(bytes[0]));
        }
        let body: SnapshotBody =
            postcard::from_bytes(&bytes[1..]).map_err(|e| Error::SnapshotDecode(e.to_string()))?;
        fresh.applied = body.applied;
        for (k, item) in body.items {
            fresh.data_bytes += k.len() + item.value.len();
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

    /// The format-1 layout, for writing one in a test.
    #[derive(Serialize)]
    struct SnapshotBodyV1Out {
        applied: u64,
        items: Vec<(Vec<u8>, Item)>,
        sessions: Vec<(u64, (u64, u64, KvResult))>,
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
        let bytes = s.snapshot();
        // Written from the maps (byte fields as bytes), it is exactly the plain encoding of
        // the body with every byte string a `Vec<u8>`, the format `restore` has always read.
        #[derive(Serialize)]
        struct PlainItem {
            value: Vec<u8>,
            version: u64,
        }
        #[derive(Serialize)]
        struct PlainBody {
            applied: u64,
            items: Vec<(Vec<u8>, PlainItem)>,
            sessions: Vec<(u64, Session)>,
        }
        let owned = PlainBody {
            applied: s.applied,
            items: s
                .items
                .iter()
                .map(|(k, v)| {
                    let item = PlainItem {
                        value: v.value.to_vec(),
                        version: v.version,
                    };
                    (k.to_vec(), item)
                })
                .collect(),
            sessions: s.sessions.iter().map(|(c, x)| (*c, x.clone())).collect(),
        };
        let mut expected = vec![SNAPSHOT_FORMAT_VERSION];
        expected.extend(postcard::to_allocvec(&owned).unwrap());
        assert_eq!(bytes, expected);
        let mut r = KvStore::new(Limits::default());
        r.restore(&bytes).unwrap();
        assert_eq!(r.snapshot(), bytes);
        assert_eq!(r.applied(), 55);
        assert_eq!(r.data_bytes(), s.data_bytes());
        assert_eq!(r.session_count(), 5);
        assert_eq!(r.session_bytes(), s.session_bytes());
        // The restored session table deduplicates like the original: the latest write of a
        // session is answered from it, an older one is stale.
        assert_eq!(
            r.apply(56, &put(sessions[4], 49, "k49", "other", Expected::Any)),
            KvResult::Written { version: 1 }
        );
        assert_eq!(
            r.apply(57, &put(sessions[4], 44, "k49", "other", Expected::Any)),
            KvResult::Stale
        );
        assert_eq!(r.get(b"k49"), Some((&b"value"[..], 1)));
        assert!(r.restore(&[9, 1, 2]).is_err());
        // A format-1 snapshot (before sessions) restores its data and no session.
        let v1 = SnapshotBodyV1Out {
            applied: 7,
            items: vec![(
                b"old".to_vec(),
                Item {
                    value: Arc::from(&b"x"[..]),
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
}
