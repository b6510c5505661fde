//! The versioned key/value state machine with its at-most-once session table.
//!
//! Deterministic: every replica that applies the same commands in the same order reaches the
//! same state, byte for byte (ordered maps only; eviction depends only on applied indexes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_wire::kv::{Expected, KvOp, KvRequest, KvResult, ScanItem};

use crate::Error;

/// Default largest key, in bytes.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;
/// Default largest value, in bytes (1 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Default number of clients the session (dedup) table remembers.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// Default largest number of pairs one scan returns.
pub const DEFAULT_MAX_SCAN_ITEMS: u32 = 1000;
/// Version byte at the start of every snapshot; bumped when the layout changes.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 1;
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
    /// Most clients remembered for deduplication; `0` disables deduplication (the classic
    /// lab's kvsrv, where the versions alone make retries safe and the clerk reports "maybe").
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

/// A key's value and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Item {
    value: Vec<u8>,
    version: u64,
}

/// The latest write of one client: its id, the order of last use, and the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    request: u64,
    /// Sequence number of the apply that last touched this session (the log index under Raft).
    last_used: u64,
    result: KvResult,
}

/// The serialized form of a store (after the format version byte).
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    applied: u64,
    items: Vec<(Vec<u8>, Item)>,
    sessions: Vec<(u64, Session)>,
}

/// The versioned key/value state machine.
///
/// Writes go through [`KvStore::apply`] with a position (the Raft log index, or a counter in
/// the single server) that orders them; reads through [`KvStore::read`].
#[derive(Debug, Clone)]
pub struct KvStore {
    limits: Limits,
    items: BTreeMap<Vec<u8>, Item>,
    sessions: BTreeMap<u64, Session>,
    /// Sessions ordered by last use, for eviction: (last_used, client).
    by_use: BTreeMap<(u64, u64), ()>,
    /// Position of the last applied write.
    applied: u64,
    data_bytes: usize,
}

impl KvStore {
    /// An empty store.
    pub fn new(limits: Limits) -> KvStore {
        KvStore {
            limits,
            items: BTreeMap::new(),
            sessions: BTreeMap::new(),
            by_use: BTreeMap::new(),
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

    /// Number of clients in the session table (at most `limits.max_sessions`).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Approximate bytes of the session table: a fixed cost per entry plus the bytes of the
    /// remembered answers.
    pub fn session_bytes(&self) -> usize {
        self.sessions
            .values()
            .map(|s| SESSION_ENTRY_OVERHEAD_BYTES + result_bytes(&s.result))
            .sum()
    }

    /// The value and version of `key`.
    pub fn get(&self, key: &[u8]) -> Option<(&[u8], u64)> {
        self.items.get(key).map(|i| (i.value.as_slice(), i.version))
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
            KvOp::Get { key } => Ok(match self.items.get(key) {
                Some(i) => KvResult::Found {
                    value: i.value.clone(),
                    version: i.version,
                },
                None => KvResult::NoKey,
            }),
            KvOp::Scan { start, end, limit } => {
                let limit = (*limit).min(self.limits.max_scan_items) as usize;
                let items = self
                    .items
                    .range(start.clone()..)
                    .take_while(|(k, _)| end.as_ref().is_none_or(|e| k.as_slice() < e.as_slice()))
                    .take(limit)
                    .map(|(k, i)| ScanItem {
                        key: k.clone(),
                        value: i.value.clone(),
                        version: i.version,
                    })
                    .collect();
                Ok(KvResult::Scanned { items })
            }
            KvOp::Put { .. } | KvOp::Delete { .. } => Err(Error::NotARead),
        }
    }

    /// Applies a request at position `index` (strictly increasing; the Raft log index).
    ///
    /// Reads are answered from the state. Writes are deduplicated per client: a retry of the
    /// client's latest write gets the remembered answer without applying again; an older
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
        if self.limits.max_sessions > 0 {
            if let Some(s) = self.sessions.get(&req.client) {
                if req.request < s.request {
                    return KvResult::Stale;
                }
                if req.request == s.request {
                    let result = s.result.clone();
                    self.touch(req.client, index);
                    return result;
                }
            }
        }
        let result = self.write(&req.op);
        if self.limits.max_sessions > 0 {
            self.remember(req.client, req.request, index, result.clone());
        }
        result
    }

    /// Marks a session used at `index`.
    fn touch(&mut self, client: u64, index: u64) {
        if let Some(s) = self.sessions.get_mut(&client) {
            self.by_use.remove(&(s.last_used, client));
            s.last_used = index;
            self.by_use.insert((index, client), ());
        }
    }

    /// Records a client's latest answer, evicting the least recently used client when full.
    fn remember(&mut self, client: u64, request: u64, index: u64, result: KvResult) {
        if let Some(old) = self.sessions.remove(&client) {
            self.by_use.remove(&(old.last_used, client));
        }
        // Eviction rule: the table holds at most `max_sessions` clients; a new client evicts
        // the one whose last write applied earliest. Depends only on the log, so every
        // replica evicts the same client.
        while self.sessions.len() >= self.limits.max_sessions {
            let Some((&(used, victim), _)) = self.by_use.iter().next() else {
                break;
            };
            self.by_use.remove(&(used, victim));
            self.sessions.remove(&victim);
            tracing::debug!(client = victim, "session evicted");
        }
        self.sessions.insert(
            client,
            Session {
                request,
                last_used: index,
                result,
            },
        );
        self.by_use.insert((index, client), ());
        debug_assert_eq!(self.sessions.len(), self.by_use.len());
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
                let current = self.items.get(key).map(|i| i.version);
                let version = match (current, expected) {
                    (None, Expected::Any | Expected::Version(0)) => 1,
                    (None, Expected::Version(_)) => return KvResult::NoKey,
                    (Some(v), Expected::Any) => v + 1,
                    (Some(v), Expected::Version(e)) if *e == v => v + 1,
                    (Some(_), Expected::Version(_)) => return KvResult::VersionMismatch,
                };
                let item = Item {
                    value: value.clone(),
                    version,
                };
                self.data_bytes += key.len() + value.len();
                if let Some(old) = self.items.insert(key.clone(), item) {
                    self.data_bytes -= key.len() + old.value.len();
                }
                KvResult::Written { version }
            }
            KvOp::Delete { key, expected } => {
                if let Some(e) = self.check_sizes(key, None) {
                    return e;
                }
                let Some(current) = self.items.get(key).map(|i| i.version) else {
                    return KvResult::NoKey;
                };
                match expected {
                    Expected::Version(e) if *e != current => KvResult::VersionMismatch,
                    _ => {
                        if let Some(old) = self.items.remove(key) {
                            self.data_bytes -= key.len() + old.value.len();
                        }
                        KvResult::Deleted
                    }
                }
            }
            KvOp::Get { .. } | KvOp::Scan { .. } => self.read(op).unwrap_or(KvResult::Stale),
        }
    }

    /// Serializes the whole state (data, sessions, applied position): one format version
    /// byte, then postcard.
    pub fn snapshot(&self) -> Vec<u8> {
        let body = SnapshotBody {
            applied: self.applied,
            items: self
                .items
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            sessions: self.sessions.iter().map(|(c, s)| (*c, s.clone())).collect(),
        };
        let mut out = vec![SNAPSHOT_FORMAT_VERSION];
        // Encoding plain vectors and integers into a Vec cannot fail.
        out.extend(postcard::to_allocvec(&body).expect("snapshot encodes"));
        out
    }

    /// Replaces the state with a snapshot made by [`KvStore::snapshot`]. An empty snapshot is
    /// the empty store.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let mut fresh = KvStore::new(self.limits);
        if bytes.is_empty() {
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
            fresh.items.insert(k, item);
        }
        for (c, s) in body.sessions {
            fresh.by_use.insert((s.last_used, c), ());
            fresh.sessions.insert(c, s);
        }
        *self = fresh;
        Ok(())
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

    #[test]
    fn put_semantics() {
        let mut s = KvStore::new(Limits::default());
        assert_eq!(
            s.apply(1, &put(1, 1, "k", "a", Expected::Version(1))),
            KvResult::NoKey
        );
        assert_eq!(
            s.apply(2, &put(1, 2, "k", "a", Expected::Version(0))),
            KvResult::Written { version: 1 }
        );
        assert_eq!(
            s.apply(3, &put(1, 3, "k", "b", Expected::Version(0))),
            KvResult::VersionMismatch
        );
        assert_eq!(
            s.apply(4, &put(1, 4, "k", "b", Expected::Any)),
            KvResult::Written { version: 2 }
        );
        assert_eq!(s.get(b"k"), Some((&b"b"[..], 2)));
        let del = KvRequest {
            client: 1,
            request: 5,
            op: KvOp::Delete {
                key: "k".into(),
                expected: Expected::Version(2),
            },
            serializable: false,
        };
        assert_eq!(s.apply(5, &del), KvResult::Deleted);
        assert_eq!(s.get(b"k"), None);
        assert_eq!(s.data_bytes(), 0);
    }

    #[test]
    fn dedup_returns_remembered_answer() {
        let mut s = KvStore::new(Limits::default());
        let p = put(7, 1, "k", "a", Expected::Version(0));
        assert_eq!(s.apply(1, &p), KvResult::Written { version: 1 });
        assert_eq!(s.apply(2, &p), KvResult::Written { version: 1 });
        assert_eq!(s.get(b"k"), Some((&b"a"[..], 1)));
        assert_eq!(
            s.apply(3, &put(7, 0, "k", "x", Expected::Any)),
            KvResult::Stale
        );
    }

    #[test]
    fn limits_refuse_and_store_nothing() {
        let limits = Limits {
            max_key_bytes: 4,
            max_value_bytes: 8,
            ..Limits::default()
        };
        let mut s = KvStore::new(limits);
        assert!(matches!(
            s.apply(1, &put(1, 1, "kkkkk", "v", Expected::Any)),
            KvResult::TooLarge { .. }
        ));
        assert!(matches!(
            s.apply(2, &put(1, 2, "k", "123456789", Expected::Any)),
            KvResult::TooLarge { .. }
        ));
        assert!(s.is_empty());
    }

    #[test]
    fn session_table_is_bounded() {
        let limits = Limits {
            max_sessions: 10,
            ..Limits::default()
        };
        let mut s = KvStore::new(limits);
        for c in 0..1000u64 {
            s.apply(c + 1, &put(c, 1, "k", "v", Expected::Any));
            assert!(s.session_count() <= 10);
        }
        // The most recent clients are the ones remembered.
        assert_eq!(
            s.apply(2000, &put(999, 1, "k", "zzz", Expected::Any)),
            KvResult::Written { version: 1000 }
        );
    }

    #[test]
    fn snapshot_round_trip() {
        let mut s = KvStore::new(Limits::default());
        for i in 0..50u64 {
            s.apply(
                i + 1,
                &put(i % 5, i, &format!("k{i}"), "value", Expected::Any),
            );
        }
        let bytes = s.snapshot();
        let mut r = KvStore::new(Limits::default());
        r.restore(&bytes).unwrap();
        assert_eq!(r.snapshot(), bytes);
        assert_eq!(r.applied(), 50);
        assert_eq!(r.data_bytes(), s.data_bytes());
        assert!(r.restore(&[9, 1, 2]).is_err());
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
