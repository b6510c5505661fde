//! The group state machine (`ShardMachine`): serving, WrongGroup, the fenced and idempotent
//! migration entries, at-most-once across a migration, snapshots, determinism, bad bytes and
//! per-shard positions. Every test drives the machine through `StateMachine::apply` with
//! encoded entries, as the replica shell does.

use std::collections::BTreeMap;

use shoal_kv::Limits;
use shoal_raft::LogIndex;
use shoal_replica::{SnapshotData, StateMachine};
use shoal_shard::group::LEASES_REFUSED;
use shoal_shard::{
    join, shard_of, Config, ControlOutcome, Gid, GroupEntry, GroupOutput, ShardMachine, ShardState,
};
use shoal_wire::kv::{Expected, KvOp, KvRequest, KvResult};
use shoal_wire::shard::{CopiedItem, DeltaChunk, ShardChunk, FROZEN_ROUND};

const SHARDS: u32 = 4;

fn servers(gid: Gid) -> BTreeMap<Gid, Vec<String>> {
    BTreeMap::from([(gid, vec![format!("{gid}a")])])
}

/// Configuration 1: group 1 owns every shard. Configuration 2: group 2 joins and gets shards
/// 2 and 3 (the highest-numbered of group 1's).
fn configs() -> (Config, Config) {
    let c1 = join(&Config::empty(SHARDS).unwrap(), &servers(1)).unwrap();
    let c2 = join(&c1, &servers(2)).unwrap();
    assert_eq!(c1.shards, vec![1, 1, 1, 1]);
    assert_eq!(c2.shards, vec![1, 1, 2, 2]);
    (c1, c2)
}

/// A key of `shard`.
fn key_in(shard: u32, n: usize) -> Vec<u8> {
    (0..)
        .map(|i| format!("k{i}").into_bytes())
        .filter(|k| shard_of(k, SHARDS) == shard)
        .nth(n)
        .unwrap()
}

/// A machine and the log index it applies at next (the shell's, unrelated to the shards').
struct Node {
    m: ShardMachine,
    index: u64,
}

impl Node {
    fn new(gid: Gid) -> Node {
        Node::at(gid, 1)
    }

    fn at(gid: Gid, index: u64) -> Node {
        Node {
            m: ShardMachine::new(gid, SHARDS, Limits::default()).unwrap(),
            index,
        }
    }

    fn apply(&mut self, e: &GroupEntry) -> GroupOutput {
        let out = self
            .m
            .apply(LogIndex(self.index), &e.encode())
            .expect("a well-formed entry applies")
            .expect("a command of this machine");
        self.index += 1;
        out
    }

    fn control(&mut self, e: &GroupEntry) -> ControlOutcome {
        match self.apply(e) {
            GroupOutput::Control(c) => c,
            other => panic!("{e:?} gave {other:?}"),
        }
    }

    fn client(&mut self, shard: u32, request: KvRequest) -> GroupOutput {
        let config = self.m.config().num;
        self.apply(&GroupEntry::Client {
            shard,
            config,
            request,
        })
    }

    fn register(&mut self, shard: u32) -> u64 {
        match self.client(shard, req(0, 0, KvOp::Register)) {
            GroupOutput::Kv(KvResult::Registered { session }) => session,
            other => panic!("register gave {other:?}"),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.m.snapshot().into_bytes()
    }
}

fn req(client: u64, request: u64, op: KvOp) -> KvRequest {
    KvRequest {
        client,
        request,
        op,
        serializable: false,
    }
}

fn put(key: &[u8], value: &[u8]) -> KvOp {
    KvOp::Put {
        key: key.to_vec(),
        value: value.to_vec(),
        expected: Expected::Any,
    }
}

fn get(key: &[u8]) -> KvOp {
    KvOp::Get { key: key.to_vec() }
}

fn adopt(c: &Config) -> GroupEntry {
    GroupEntry::Adopt { config: c.clone() }
}

fn freeze(shard: u32, config: u64) -> GroupEntry {
    GroupEntry::Freeze { shard, config }
}

fn delete(shard: u32, config: u64) -> GroupEntry {
    GroupEntry::Delete { shard, config }
}

fn install(shard: u32, config: u64, data: Vec<u8>) -> GroupEntry {
    GroupEntry::Install {
        shard,
        config,
        data,
    }
}

fn written(version: u64) -> GroupOutput {
    GroupOutput::Kv(KvResult::Written { version })
}

#[test]
fn a_serving_shard_applies_requests() {
    let (c1, _) = configs();
    let mut g1 = Node::new(1);
    assert_eq!(g1.control(&adopt(&c1)), ControlOutcome::Applied);
    // The first join: every shard starts serving, empty, at configuration 1.
    for s in 0..SHARDS {
        let shard = g1.m.shard(s).unwrap();
        assert_eq!((shard.state, shard.config), (ShardState::Serving, 1));
        assert!(g1.m.serves(s));
    }
    let k = key_in(1, 0);
    let session = g1.register(1);
    assert_eq!(g1.client(1, req(session, 1, put(&k, b"v1"))), written(1));
    assert_eq!(g1.client(1, req(session, 2, put(&k, b"v2"))), written(2));
    assert_eq!(
        g1.m.read(1, &get(&k)),
        GroupOutput::Kv(KvResult::Found {
            value: b"v2".to_vec(),
            version: 2
        })
    );
    // Other shards are untouched.
    assert_eq!(g1.m.shard(0).unwrap().store.len(), 0);
}

#[test]
fn an_absent_or_frozen_shard_answers_wrong_group_and_applies_nothing() {
    let (c1, c2) = configs();
    // Group 2 at configuration 1 holds nothing.
    let mut g2 = Node::new(2);
    g2.control(&adopt(&c1));
    let before = g2.bytes();
    let k = key_in(2, 0);
    assert_eq!(
        g2.client(2, req(1, 1, put(&k, b"v"))),
        GroupOutput::WrongGroup { config: 1 }
    );
    assert_eq!(
        g2.client(2, req(0, 0, KvOp::Register)),
        GroupOutput::WrongGroup { config: 1 }
    );
    assert_eq!(
        g2.m.read(2, &get(&k)),
        GroupOutput::WrongGroup { config: 1 }
    );
    assert_eq!(g2.bytes(), before);
    // Adopting configuration 2 (shard 2 moves in) does not serve it before its Install.
    g2.control(&adopt(&c2));
    assert!(g2.m.shard(2).is_none());
    assert_eq!(
        g2.client(2, req(1, 1, put(&k, b"v"))),
        GroupOutput::WrongGroup { config: 2 }
    );

    // Group 1: shard 2 frozen.
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let session = g1.register(2);
    assert_eq!(g1.client(2, req(session, 1, put(&k, b"v1"))), written(1));
    g1.control(&adopt(&c2));
    assert_eq!(g1.control(&freeze(2, 2)), ControlOutcome::Applied);
    let before = g1.bytes();
    let applied = g1.m.shard(2).unwrap().store.applied();
    assert_eq!(
        g1.client(2, req(session, 2, put(&k, b"v2"))),
        GroupOutput::WrongGroup { config: 2 }
    );
    assert_eq!(
        g1.m.read(2, &get(&k)),
        GroupOutput::WrongGroup { config: 2 }
    );
    assert_eq!(g1.m.shard(2).unwrap().store.applied(), applied);
    assert_eq!(g1.m.shard(2).unwrap().store.get(&k), Some((&b"v1"[..], 1)));
    assert_eq!(g1.bytes(), before);
    // A shard still held but given away by the adopted configuration is not served either.
    let session3 = {
        let mut g = Node::new(1);
        g.control(&adopt(&c1));
        let s = g.register(3);
        g.control(&adopt(&c2));
        let k3 = key_in(3, 0);
        assert_eq!(g.m.shard(3).unwrap().state, ShardState::Serving);
        assert_eq!(
            g.client(3, req(s, 1, put(&k3, b"x"))),
            GroupOutput::WrongGroup { config: 2 }
        );
        assert_eq!(g.m.shard(3).unwrap().store.len(), 0);
        s
    };
    assert!(session3 > 0);
}

#[test]
fn a_stale_freeze_is_ignored() {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    g1.control(&adopt(&c2));
    let before = g1.bytes();
    // Shard 2 is Serving(1): a Freeze numbered 1 (or 0) is from an older configuration.
    assert_eq!(g1.control(&freeze(2, 1)), ControlOutcome::Stale { seen: 1 });
    assert_eq!(g1.control(&freeze(2, 0)), ControlOutcome::Stale { seen: 1 });
    assert_eq!(g1.bytes(), before);
    assert_eq!(g1.m.shard(2).unwrap().state, ShardState::Serving);
    assert_eq!(g1.control(&freeze(2, 2)), ControlOutcome::Applied);
    let frozen = g1.bytes();
    assert_eq!(g1.control(&freeze(2, 1)), ControlOutcome::Stale { seen: 2 });
    assert_eq!(g1.bytes(), frozen);
}

#[test]
fn every_control_entry_replayed_is_a_no_op() {
    let (c1, c2) = configs();
    let k = key_in(2, 0);
    let mut g1 = Node::new(1);
    let mut g2 = Node::new(2);
    let mut s = 0;
    for g in [&mut g1, &mut g2] {
        assert_eq!(g.control(&adopt(&c1)), ControlOutcome::Applied);
        let once = g.bytes();
        assert_eq!(g.control(&adopt(&c1)), ControlOutcome::AlreadyDone);
        assert_eq!(g.bytes(), once);
        if g.m.gid() == 1 {
            // A session of shard 2 opened at the old owner migrates with the shard.
            s = g.register(2);
        }
        assert_eq!(g.control(&adopt(&c2)), ControlOutcome::Applied);
        let once = g.bytes();
        assert_eq!(g.control(&adopt(&c2)), ControlOutcome::AlreadyDone);
        assert_eq!(g.control(&adopt(&c1)), ControlOutcome::Stale { seen: 2 });
        assert_eq!(g.bytes(), once);
    }
    assert_eq!(g1.control(&freeze(2, 2)), ControlOutcome::Applied);
    let once = g1.bytes();
    assert_eq!(g1.control(&freeze(2, 2)), ControlOutcome::AlreadyDone);
    assert_eq!(g1.bytes(), once);
    let data = g1.m.export(2, 2).unwrap();
    assert_eq!(
        g2.control(&install(2, 2, data.clone())),
        ControlOutcome::Applied
    );
    assert_eq!(g2.client(2, req(s, 1, put(&k, b"v"))), written(1));
    let once = g2.bytes();
    // A replayed Install must not overwrite the writes made since.
    assert_eq!(
        g2.control(&install(2, 2, data.clone())),
        ControlOutcome::AlreadyDone
    );
    assert_eq!(g2.bytes(), once);
    assert_eq!(g1.control(&delete(2, 2)), ControlOutcome::Applied);
    let once = g1.bytes();
    assert_eq!(g1.control(&delete(2, 2)), ControlOutcome::AlreadyDone);
    assert_eq!(g1.control(&freeze(2, 2)), ControlOutcome::AlreadyDone);
    // A delayed Install of the deleted configuration does not bring the old data back.
    assert_eq!(
        g1.control(&install(2, 2, data)),
        ControlOutcome::Stale { seen: 2 }
    );
    assert_eq!(g1.bytes(), once);
    assert!(g1.m.shard(2).is_none());
}

#[test]
fn a_retry_after_a_migration_is_answered_from_the_migrated_table_not_applied_twice() {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let k = key_in(3, 0);
    let s = g1.register(3);
    // The write applies at the old owner; its answer is lost, the client will retry.
    assert_eq!(g1.client(3, req(s, 1, put(&k, b"once"))), written(1));
    g1.control(&adopt(&c2));
    g1.control(&freeze(3, 2));
    assert_eq!(
        g1.m.export(3, 1),
        None,
        "only at the number it was frozen at"
    );
    assert_eq!(g1.m.export(2, 2), None, "only a frozen shard");
    let data = g1.m.export(3, 2).unwrap();

    let mut g2 = Node::new(2);
    g2.control(&adopt(&c1));
    g2.control(&adopt(&c2));
    assert_eq!(g2.control(&install(3, 2, data)), ControlOutcome::Applied);
    let shard = g2.m.shard(3).unwrap();
    assert_eq!((shard.state, shard.config), (ShardState::Serving, 2));
    assert!(shard.store.has_session(s));
    // The retry, same (session, request): the remembered answer, the version unchanged.
    assert_eq!(g2.client(3, req(s, 1, put(&k, b"once"))), written(1));
    assert_eq!(
        g2.m.read(3, &get(&k)),
        GroupOutput::Kv(KvResult::Found {
            value: b"once".to_vec(),
            version: 1
        })
    );
    // The session's next write applies.
    assert_eq!(g2.client(3, req(s, 2, put(&k, b"twice"))), written(2));
    // A session the shard never knew is refused, as in the unsharded KV.
    assert_eq!(
        g2.client(3, req(s + 1000, 1, put(&k, b"x"))),
        GroupOutput::Kv(KvResult::SessionExpired)
    );
}

#[test]
fn delete_frees_the_shard() {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let s = g1.register(2);
    for i in 0..20u64 {
        let k = key_in(2, i as usize);
        assert_eq!(g1.client(2, req(s, i + 1, put(&k, &[7; 100]))), written(1));
    }
    g1.control(&adopt(&c2));
    // Deleting a serving shard would lose writes: refused.
    assert!(matches!(
        g1.control(&delete(2, 2)),
        ControlOutcome::Refused { .. }
    ));
    g1.control(&freeze(2, 2));
    let frozen = g1.bytes();
    assert_eq!(g1.control(&delete(2, 2)), ControlOutcome::Applied);
    assert!(g1.m.shard(2).is_none());
    assert_eq!(g1.m.export(2, 2), None);
    let deleted = g1.bytes();
    assert!(
        deleted.len() + 2000 < frozen.len(),
        "{} vs {}",
        deleted.len(),
        frozen.len()
    );
    // The other shards are still served.
    let k0 = key_in(0, 0);
    let s0 = g1.register(0);
    assert_eq!(g1.client(0, req(s0, 1, put(&k0, b"v"))), written(1));
}

/// A machine with serving, frozen and deleted shards, data and sessions.
fn busy_machine() -> Node {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    for shard in 0..SHARDS {
        let s = g1.register(shard);
        for i in 0..5u64 {
            let k = key_in(shard, i as usize);
            assert_eq!(
                g1.client(shard, req(s, i + 1, put(&k, b"value"))),
                written(1)
            );
        }
    }
    g1.control(&adopt(&c2));
    g1.control(&freeze(2, 2));
    g1.control(&freeze(3, 2));
    g1.control(&delete(3, 2));
    g1
}

#[test]
fn snapshot_restore_snapshot_is_byte_identical() {
    let g1 = busy_machine();
    let bytes = g1.bytes();
    let mut fresh = ShardMachine::new(1, SHARDS, Limits::default()).unwrap();
    fresh.restore(LogIndex(99), &mut (&bytes as &[u8])).unwrap();
    assert_eq!(fresh.snapshot().into_bytes(), bytes);
    assert_eq!(fresh.config(), g1.m.config());
    assert_eq!(fresh.shard(2).unwrap().state, ShardState::Frozen);
    assert!(fresh.shard(3).is_none());
    assert_eq!(fresh.export(2, 2), g1.m.export(2, 2));

    // Garbage, another version, truncations, trailing bytes and another group's snapshot are
    // errors that leave the machine as it was.
    let mut other = ShardMachine::new(2, SHARDS, Limits::default()).unwrap();
    let other_before = other.snapshot().into_bytes();
    assert!(other
        .restore(LogIndex(1), &mut (&bytes as &[u8]))
        .unwrap_err()
        .contains("group 1"));
    assert!(fresh.restore(LogIndex(1), &mut (&[] as &[u8])).is_err());
    assert!(fresh
        .restore(LogIndex(1), &mut (b"garbage" as &[u8]))
        .is_err());
    let mut v5 = bytes.clone();
    v5[0] = 5;
    assert!(fresh
        .restore(LogIndex(1), &mut (&v5 as &[u8]))
        .unwrap_err()
        .contains("version 5"));
    for cut in 1..bytes.len() {
        assert!(
            fresh
                .restore(LogIndex(1), &mut (&bytes[..cut] as &[u8]))
                .is_err(),
            "cut {cut}"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(fresh.restore(LogIndex(1), &mut (&long as &[u8])).is_err());
    assert_eq!(fresh.snapshot().into_bytes(), bytes);
    assert_eq!(other.snapshot().into_bytes(), other_before);
}

#[test]
fn two_machines_applying_the_same_entries_end_byte_identical() {
    let a = busy_machine();
    let b = busy_machine();
    assert_eq!(a.bytes(), b.bytes());
    // And a replica restored from the snapshot then applying the same entries as another.
    let (_, c2) = configs();
    let c3 = shoal_shard::move_shard(&c2, 1, 2).unwrap();
    let mut x = busy_machine();
    let mut y = Node::at(1, 500);
    y.m.restore(LogIndex(499), &mut (&x.bytes() as &[u8]))
        .unwrap();
    let k = key_in(0, 7);
    for n in [&mut x, &mut y] {
        n.control(&adopt(&c3));
        let s = n.register(0);
        assert_eq!(n.client(0, req(s, 1, put(&k, b"z"))), written(1));
    }
    assert_eq!(x.bytes(), y.bytes());
}

#[test]
fn garbage_entries_are_errors_never_panics() {
    let mut g = Node::new(1);
    let (c1, _) = configs();
    g.control(&adopt(&c1));
    let before = g.bytes();
    let entries = [
        adopt(&c1),
        freeze(1, 2),
        install(1, 2, vec![1, 2, 3]),
        delete(1, 2),
        GroupEntry::Client {
            shard: 1,
            config: 1,
            request: req(3, 4, put(&key_in(1, 0), b"v")),
        },
    ];
    for e in &entries {
        let bytes = e.encode();
        assert_eq!(bytes[0], shoal_shard::group::ENTRY_FORMAT);
        assert_eq!(GroupEntry::decode(&bytes).as_ref(), Ok(e));
        for cut in 0..bytes.len() {
            assert!(
                g.m.apply(LogIndex(9), &bytes[..cut.max(1)]).is_err(),
                "{e:?} cut {cut}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(g.m.apply(LogIndex(9), &long).is_err());
        let mut version = bytes.clone();
        version[0] = 9;
        assert!(g
            .m
            .apply(LogIndex(9), &version)
            .unwrap_err()
            .contains("version 9"));
        // Flipped bytes either decode to some entry or are an error; never a panic.
        for i in 1..bytes.len() {
            let mut m = bytes.clone();
            m[i] ^= 0xff;
            let _ = GroupEntry::decode(&m);
        }
    }
    assert!(g
        .m
        .apply(LogIndex(9), b"\x01\xff\xff\xff\xff\xff\xff")
        .is_err());
    // An Adopt of a configuration breaking the invariants does not decode.
    let mut broken = c1.clone();
    broken.shards[0] = 7;
    assert!(g.m.apply(LogIndex(9), &adopt(&broken).encode()).is_err());
    // An empty command is no command of this machine.
    assert_eq!(g.m.apply(LogIndex(9), &[]), Ok(None));
    assert_eq!(g.bytes(), before);
}

#[test]
fn moving_a_shard_from_a_long_log_to_a_short_log_does_not_panic() {
    let (c1, c2) = configs();
    // The old owner's log is far ahead of the new owner's.
    let mut g1 = Node::at(1, 1_000_000);
    g1.control(&adopt(&c1));
    let s = g1.register(2);
    let k = key_in(2, 0);
    for i in 1..=30u64 {
        assert_eq!(g1.client(2, req(s, i, put(&k, b"v"))), written(i));
    }
    // The shard counts its own applies (one registration, 30 writes), not the log index.
    assert_eq!(g1.m.shard(2).unwrap().store.applied(), 31);
    assert_eq!(
        s, 1,
        "a session id is the shard's position of its registration"
    );
    g1.control(&adopt(&c2));
    g1.control(&freeze(2, 2));
    let data = g1.m.export(2, 2).unwrap();

    let mut g2 = Node::at(2, 1);
    g2.control(&adopt(&c1));
    g2.control(&adopt(&c2));
    assert_eq!(g2.control(&install(2, 2, data)), ControlOutcome::Applied);
    assert!(g2.index < 10);
    assert_eq!(g2.client(2, req(s, 31, put(&k, b"w"))), written(31));
    assert_eq!(g2.m.shard(2).unwrap().store.applied(), 32);
    let s2 = g2.register(2);
    assert_eq!(s2, 33);
}

#[test]
fn leases_are_refused_and_misrouted_keys_too() {
    let (c1, _) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let before = g1.bytes();
    let refused = GroupOutput::Kv(KvResult::Refused {
        reason: LEASES_REFUSED.into(),
    });
    assert_eq!(
        g1.client(0, req(1, 1, KvOp::LeaseGrant { ttl_ms: 5000 })),
        refused
    );
    assert_eq!(
        g1.client(
            0,
            req(
                1,
                1,
                KvOp::PutLease {
                    key: key_in(0, 0),
                    value: b"v".to_vec(),
                    expected: Expected::Any,
                    lease: 1
                }
            )
        ),
        refused
    );
    assert_eq!(g1.m.read(0, &KvOp::LeaseList), refused);
    // A key of shard 1 sent as shard 0: refused, stored nowhere.
    let s = g1.register(0);
    let after_register = g1.bytes();
    assert_ne!(after_register, before);
    match g1.client(0, req(s, 1, put(&key_in(1, 0), b"v"))) {
        GroupOutput::Kv(KvResult::Refused { reason }) => {
            assert!(reason.contains("shard 1"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        g1.client(SHARDS, req(s, 1, KvOp::Register)),
        GroupOutput::Kv(KvResult::Refused { .. })
    ));
    assert_eq!(g1.bytes(), after_register);
}

#[test]
fn adoption_is_in_order_and_installs_are_fenced() {
    let (c1, c2) = configs();
    let mut g2 = Node::new(2);
    let before = g2.bytes();
    // Skipping configuration 1 would take every shard's owner for "none".
    assert!(matches!(
        g2.control(&adopt(&c2)),
        ControlOutcome::Refused { .. }
    ));
    assert_eq!(g2.bytes(), before);
    g2.control(&adopt(&c1));
    g2.control(&adopt(&c2));

    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    g1.control(&adopt(&c2));
    g1.control(&freeze(2, 2));
    let data = g1.m.export(2, 2).unwrap();
    // Data frozen at 2 installed as another number or another shard: refused.
    let before = g2.bytes();
    assert!(matches!(
        g2.control(&install(2, 3, data.clone())),
        ControlOutcome::Refused { .. }
    ));
    assert!(matches!(
        g2.control(&install(3, 2, data.clone())),
        ControlOutcome::Refused { .. }
    ));
    assert!(matches!(
        g2.control(&install(2, 2, b"junk".to_vec())),
        ControlOutcome::Refused { .. }
    ));
    assert!(matches!(
        g2.control(&freeze(2, 2)),
        ControlOutcome::Refused { .. }
    ));
    assert_eq!(g2.bytes(), before);
    assert_eq!(g2.control(&install(2, 2, data)), ControlOutcome::Applied);
    assert!(g2.m.serves(2));
    assert!(!g2.m.serves(3));
}

/// The state alone fences writes: a Freeze that reaches the group before it adopts the
/// configuration that moves the shard (the adopted one still gives it here) stops the writes.
#[test]
fn a_frozen_shard_refuses_writes_even_before_the_group_adopts_the_move() {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let k = key_in(2, 0);
    let s = g1.register(2);
    assert_eq!(g1.client(2, req(s, 1, put(&k, b"v1"))), written(1));
    assert_eq!(g1.control(&freeze(2, 2)), ControlOutcome::Applied);
    assert_eq!(g1.m.config().owner(2), Some(1));
    let before = g1.bytes();
    assert_eq!(
        g1.client(2, req(s, 2, put(&k, b"v2"))),
        GroupOutput::WrongGroup { config: 1 }
    );
    assert_eq!(
        g1.m.read(2, &get(&k)),
        GroupOutput::WrongGroup { config: 1 }
    );
    assert_eq!(g1.bytes(), before);
    // Adopting configuration 2 afterwards keeps it frozen, and its export is what was frozen.
    assert_eq!(g1.control(&adopt(&c2)), ControlOutcome::Applied);
    assert_eq!(g1.m.shard(2).unwrap().state, ShardState::Frozen);
    let mut g2 = Node::new(2);
    g2.control(&adopt(&c1));
    g2.control(&adopt(&c2));
    g2.control(&install(2, 2, g1.m.export(2, 2).unwrap()));
    assert_eq!(
        g2.m.read(2, &get(&k)),
        GroupOutput::Kv(KvResult::Found {
            value: b"v1".to_vec(),
            version: 1
        })
    );
}

proptest::proptest! {
    /// Random bytes, raw or behind a valid version byte, as an entry, a snapshot or an
    /// Install's data: errors or refusals, never a panic, and the machine unchanged.
    #[test]
    fn random_bytes_never_panic(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
        let mut g = busy_machine();
        let before = g.bytes();
        let mut versioned = vec![1u8];
        versioned.extend(&raw);
        for bytes in [&raw, &versioned] {
            if let Ok(e) = GroupEntry::decode(bytes) {
                // Bytes that happen to decode are a well-formed entry: they re-encode the same.
                proptest::prop_assert_eq!(&e.encode(), bytes);
            } else {
                proptest::prop_assert!(bytes.is_empty() || g.m.apply(LogIndex(7), bytes).is_err());
            }
            proptest::prop_assert!(g.m.restore(LogIndex(7), &mut (bytes as &[u8])).is_err());
            let outcome = g.control(&install(2, 3, bytes.clone()));
            proptest::prop_assert!(
                matches!(outcome, ControlOutcome::Refused { .. }),
                "{:?}",
                outcome
            );
        }
        proptest::prop_assert_eq!(g.bytes(), before);
    }
}

// ---- the chunked copy: ExportChunk, Stage, Install of the tail ----

fn stage(shard: u32, config: u64, items: Vec<CopiedItem>) -> GroupEntry {
    GroupEntry::Stage {
        shard,
        config,
        items,
    }
}

/// Every chunk of `shard` frozen at `config` in `from`, `max` bytes each: (chunks, tail).
fn chunks(from: &Node, shard: u32, config: u64, max: u64) -> (Vec<Vec<CopiedItem>>, Vec<u8>) {
    let mut after: Option<Vec<u8>> = None;
    let mut out = Vec::new();
    loop {
        let ShardChunk { items, tail } = from
            .m
            .export_chunk(shard, config, after.as_deref(), max)
            .expect("frozen here");
        assert!(!items.is_empty() || tail.is_some(), "a chunk moves on");
        if let Some(last) = items.last() {
            after = Some(last.key.clone());
        }
        out.push(items);
        if let Some(tail) = tail {
            return (out, tail);
        }
    }
}

/// Group 1 at configuration 2 with shard 3 frozen for group 2: ten keys (one overwritten, one
/// deleted), a session whose write's answer was lost. Returns it, the key and the session.
fn frozen_with_data() -> (Node, Vec<u8>, u64) {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let s = g1.register(3);
    for n in 0..10u64 {
        let k = key_in(3, n as usize);
        assert_eq!(
            g1.client(3, req(s, n + 1, put(&k, b"v0123456789"))),
            written(1)
        );
    }
    let gone = key_in(3, 5);
    let del = KvOp::Delete {
        key: gone,
        expected: Expected::Any,
    };
    assert!(matches!(g1.client(3, req(s, 11, del)), GroupOutput::Kv(_)));
    let k = key_in(3, 0);
    assert_eq!(g1.client(3, req(s, 12, put(&k, b"again"))), written(2));
    g1.control(&adopt(&c2));
    assert_eq!(g1.control(&freeze(3, 2)), ControlOutcome::Applied);
    (g1, k, s)
}

fn new_owner() -> Node {
    let (c1, c2) = configs();
    let mut g2 = Node::new(2);
    g2.control(&adopt(&c1));
    g2.control(&adopt(&c2));
    g2
}

#[test]
fn a_shard_copied_in_chunks_is_served_whole_with_its_sessions_after_the_tail() {
    let (g1, k, s) = frozen_with_data();
    assert!(
        g1.m.export_chunk(3, 1, None, 100).is_none(),
        "only at the number it was frozen at"
    );
    assert!(
        g1.m.export_chunk(2, 2, None, 100).is_none(),
        "only a frozen shard"
    );
    let (parts, tail) = chunks(&g1, 3, 2, 20);
    assert!(parts.len() >= 4, "small chunks: {} of them", parts.len());
    let mut g2 = new_owner();
    // Staged, not served: the shard is not installed yet.
    for (n, items) in parts.iter().enumerate() {
        assert_eq!(
            g2.control(&stage(3, 2, items.clone())),
            ControlOutcome::Applied
        );
        if n == 0 {
            // A chunk staged twice (a resend) changes nothing.
            let once = g2.bytes();
            assert_eq!(
                g2.control(&stage(3, 2, items.clone())),
                ControlOutcome::Applied
            );
            assert_eq!(g2.m.staging(3).unwrap().store.len(), items.len());
            assert_eq!(g2.bytes(), once);
        }
    }
    assert!(g2.m.shard(3).is_none());
    assert_eq!(
        g2.m.read(3, &get(&k)),
        GroupOutput::WrongGroup { config: 2 }
    );
    assert_eq!(
        g2.control(&install(3, 2, tail.clone())),
        ControlOutcome::Applied
    );
    assert!(
        g2.m.staging(3).is_none(),
        "the staged copy became the shard"
    );
    let (old, new) = (&g1.m.shard(3).unwrap().store, &g2.m.shard(3).unwrap().store);
    assert_eq!(new.snapshot(), old.snapshot(), "data, sessions and counter");
    // The lost answer's retry is answered from the migrated table.
    assert_eq!(g2.client(3, req(s, 12, put(&k, b"again"))), written(2));
    assert_eq!(g2.client(3, req(s, 13, put(&k, b"more"))), written(3));
    // Replays after the install change nothing.
    let once = g2.bytes();
    assert_eq!(
        g2.control(&stage(3, 2, parts[0].clone())),
        ControlOutcome::AlreadyDone
    );
    assert_eq!(
        g2.control(&install(3, 2, tail)),
        ControlOutcome::AlreadyDone
    );
    assert_eq!(g2.bytes(), once);
}

#[test]
fn an_incomplete_or_foreign_staged_copy_is_never_served() {
    let (g1, _, _) = frozen_with_data();
    let (parts, tail) = chunks(&g1, 3, 2, 20);
    let mut g2 = new_owner();
    // Nothing staged: refused, nothing changes.
    let before = g2.bytes();
    assert!(matches!(
        g2.control(&install(3, 2, tail.clone())),
        ControlOutcome::Refused { reason } if reason.contains("copy it first")
    ));
    // A chunk missing: refused.
    for items in &parts[1..] {
        g2.control(&stage(3, 2, items.clone()));
    }
    let missing = g2.bytes();
    assert_ne!(missing, before);
    assert!(matches!(
        g2.control(&install(3, 2, tail.clone())),
        ControlOutcome::Refused { reason } if reason.contains("copy it again")
    ));
    assert_eq!(g2.bytes(), missing);
    assert!(g2.m.shard(3).is_none());
    // A tail of another shard or configuration: refused.
    let mut other = tail.clone();
    assert!(matches!(
        g2.control(&install(2, 2, other.clone())),
        ControlOutcome::Refused { .. }
    ));
    // Truncated or lengthened tails are refused, never a panic.
    for cut in 1..tail.len() {
        assert!(matches!(
            g2.control(&install(3, 2, tail[..cut].to_vec())),
            ControlOutcome::Refused { .. }
        ));
    }
    other.push(0);
    assert!(matches!(
        g2.control(&install(3, 2, other)),
        ControlOutcome::Refused { .. }
    ));
    // The missing chunk, then it installs.
    g2.control(&stage(3, 2, parts[0].clone()));
    assert_eq!(g2.control(&install(3, 2, tail)), ControlOutcome::Applied);
}

#[test]
fn stages_are_fenced_by_the_configuration_and_the_shard() {
    let (g1, _, _) = frozen_with_data();
    let (parts, tail) = chunks(&g1, 3, 2, 20);
    let (c1, c2) = configs();
    // Neither configuration 2 nor the one before adopted yet: refused (configuration 1
    // adopted, a stage of 2 is a copy while the shard serves: see `copy_while_serving`).
    let mut g2 = Node::new(2);
    assert!(matches!(
        g2.control(&stage(3, 2, parts[0].clone())),
        ControlOutcome::Refused { reason } if reason.contains("not adopted")
    ));
    g2.control(&adopt(&c1));
    g2.control(&adopt(&c2));
    // A shard configuration 2 does not give to group 2, a key of another shard: refused.
    assert!(matches!(
        g2.control(&stage(1, 2, Vec::new())),
        ControlOutcome::Refused { .. }
    ));
    let mut wrong = parts[0].clone();
    wrong[0].key = key_in(2, 0);
    assert!(matches!(
        g2.control(&stage(3, 2, wrong)),
        ControlOutcome::Refused { reason } if reason.contains("shard 2")
    ));
    assert!(g2.m.staging(3).is_none());
    // Installed at 2, moved on to group 1 at 3 and deleted here: a stage of 2 delivered late
    // is stale and stages nothing.
    for items in &parts {
        g2.control(&stage(3, 2, items.clone()));
    }
    assert_eq!(g2.control(&install(3, 2, tail)), ControlOutcome::Applied);
    let c3 = shoal_shard::move_shard(&c2, 3, 1).unwrap();
    g2.control(&adopt(&c3));
    g2.control(&freeze(3, 3));
    g2.control(&delete(3, 3));
    assert_eq!(
        g2.control(&stage(3, 2, parts[0].clone())),
        ControlOutcome::Stale { seen: 3 }
    );
    assert!(g2.m.staging(3).is_none());
}

#[test]
fn a_staged_copy_of_an_older_configuration_is_dropped_by_a_newer_one_and_refused_by_its_tail() {
    // Group 3 stages shard 3 for configuration 2 (a copy never finished), then for 3.
    let (c1, c2) = configs();
    let (g1, _, _) = frozen_with_data();
    let (parts, tail2) = chunks(&g1, 3, 2, 20);
    let mut g = Node::new(2);
    g.control(&adopt(&c1));
    g.control(&adopt(&c2));
    g.control(&stage(3, 2, parts[0].clone()));
    assert_eq!(g.m.staging(3).unwrap().config, 2);
    // (Configuration 3 moves shard 0 and still gives shard 3 to group 2.)
    let c3 = shoal_shard::move_shard(&c2, 0, 2).unwrap();
    assert_eq!((c3.num, c3.shards[3]), (3, 2));
    g.control(&adopt(&c3));
    let later = vec![parts[1][0].clone()];
    assert_eq!(g.control(&stage(3, 3, later)), ControlOutcome::Applied);
    let st = g.m.staging(3).unwrap();
    assert_eq!(
        (st.config, st.store.len()),
        (3, 1),
        "the older copy was dropped"
    );
    // The older configuration's stage and tail are now stale or refused.
    assert_eq!(
        g.control(&stage(3, 2, parts[0].clone())),
        ControlOutcome::Stale { seen: 3 }
    );
    assert!(matches!(
        g.control(&install(3, 2, tail2)),
        ControlOutcome::Refused { .. }
    ));
    assert!(g.m.shard(3).is_none());
}

#[test]
fn staged_copies_survive_a_snapshot_and_a_restore_and_old_snapshots_still_restore() {
    let (g1, _, _) = frozen_with_data();
    let (parts, tail) = chunks(&g1, 3, 2, 20);
    let mut g2 = new_owner();
    for items in &parts {
        g2.control(&stage(3, 2, items.clone()));
    }
    let bytes = g2.bytes();
    let mut fresh = ShardMachine::new(2, SHARDS, Limits::default()).unwrap();
    fresh.restore(LogIndex(9), &mut (&bytes as &[u8])).unwrap();
    assert_eq!(fresh.snapshot().into_bytes(), bytes);
    let mut restored = Node {
        m: fresh,
        index: 10,
    };
    assert_eq!(
        restored.control(&install(3, 2, tail)),
        ControlOutcome::Applied
    );
    assert_eq!(
        restored.m.shard(3).unwrap().store.snapshot(),
        g1.m.shard(3).unwrap().store.snapshot()
    );
    // A format-1 snapshot (before staged copies: the same image without the last field, an
    // empty list here) still restores, as a machine staging nothing.
    // Format 2 (before copy tracking: without the last list) too, and format 3 (before
    // delta rounds: the same bytes when nothing is staged or copied).
    let plain = busy_machine().bytes();
    assert_eq!(plain[0], 4);
    assert_eq!(
        plain[plain.len() - 2..],
        [0, 0],
        "empty lists of staged copies and copies in progress"
    );
    let mut v1 = plain[..plain.len() - 2].to_vec();
    v1[0] = 1;
    let mut old = ShardMachine::new(1, SHARDS, Limits::default()).unwrap();
    old.restore(LogIndex(5), &mut (&v1 as &[u8])).unwrap();
    assert_eq!(old.snapshot().into_bytes(), plain);
    let mut v2 = plain[..plain.len() - 1].to_vec();
    v2[0] = 2;
    let mut old = ShardMachine::new(1, SHARDS, Limits::default()).unwrap();
    old.restore(LogIndex(5), &mut (&v2 as &[u8])).unwrap();
    assert_eq!(old.snapshot().into_bytes(), plain);
    let mut v3 = plain.clone();
    v3[0] = 3;
    let mut old = ShardMachine::new(1, SHARDS, Limits::default()).unwrap();
    old.restore(LogIndex(5), &mut (&v3 as &[u8])).unwrap();
    assert_eq!(old.snapshot().into_bytes(), plain);
    // Cut anywhere, the snapshot with staging is an error, never a panic.
    for cut in 1..bytes.len() {
        let mut m = ShardMachine::new(2, SHARDS, Limits::default()).unwrap();
        assert!(
            m.restore(LogIndex(1), &mut (&bytes[..cut] as &[u8]))
                .is_err(),
            "cut {cut}"
        );
    }
}

#[test]
fn stage_entries_that_do_not_decode_are_errors_never_panics() {
    let (g1, _, _) = frozen_with_data();
    let (parts, _) = chunks(&g1, 3, 2, 20);
    let bytes = stage(3, 2, parts[0].clone()).encode();
    assert_eq!(
        GroupEntry::decode(&bytes).unwrap(),
        stage(3, 2, parts[0].clone())
    );
    for cut in 0..bytes.len() {
        assert!(GroupEntry::decode(&bytes[..cut]).is_err(), "cut {cut}");
    }
    let mut long = bytes.clone();
    long.push(1);
    assert!(GroupEntry::decode(&long).is_err());
    // A huge claimed item count with no bytes behind it: an error, no allocation of it.
    let mut huge = bytes[..bytes.len().min(4)].to_vec();
    huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(GroupEntry::decode(&huge).is_err());
}

fn copy_start(shard: u32, config: u64) -> GroupEntry {
    GroupEntry::CopyStart { shard, config }
}

/// Chunks of the live shard `shard` (its copy to `config` started), from `after` to an empty
/// chunk, `max` bytes each; `between` runs after each chunk (writes while the copy goes on).
fn live_chunks(
    from: &mut Node,
    shard: u32,
    config: u64,
    mut after: Option<Vec<u8>>,
    max: u64,
    mut between: impl FnMut(&mut Node, usize),
) -> (Vec<Vec<CopiedItem>>, Option<Vec<u8>>) {
    let mut out = Vec::new();
    loop {
        let ShardChunk { items, tail } = from
            .m
            .export_chunk(shard, config, after.as_deref(), max)
            .expect("copied live here");
        assert!(tail.is_none(), "a live copy has no tail");
        if items.is_empty() {
            return (out, after);
        }
        after = Some(items.last().unwrap().key.clone());
        out.push(items);
        between(from, out.len());
    }
}

#[test]
fn a_shard_copied_while_it_serves_is_installed_with_the_writes_made_meanwhile() {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let s = g1.register(3);
    for n in 0..10u64 {
        let k = key_in(3, n as usize);
        assert_eq!(
            g1.client(3, req(s, n + 1, put(&k, b"v0123456789"))),
            written(1)
        );
    }
    // The new owner has adopted configuration 1 only: it stages for 2 all the same.
    let mut g2 = Node::new(2);
    g2.control(&adopt(&c1));
    assert_eq!(g1.control(&copy_start(3, 2)), ControlOutcome::Applied);
    assert_eq!(g1.control(&copy_start(3, 2)), ControlOutcome::AlreadyDone);
    let p0 = g1.m.shard(3).unwrap().store.applied();
    assert_eq!(g1.m.copy_track(3).unwrap().p0, p0);
    assert!(g1.m.serves(3), "the shard still serves while it is copied");
    // Writes between the chunks: a key copied already overwritten, one deleted, a new key,
    // a key not copied yet overwritten; the deleted key is written again and deleted again.
    let mut request = 20;
    let (parts, after) = live_chunks(&mut g1, 3, 2, None, 30, |g, n| {
        let mut w = |g: &mut Node, op: KvOp| {
            request += 1;
            assert!(matches!(
                g.client(3, req(s, request, op)),
                GroupOutput::Kv(_)
            ));
        };
        let del = |k: Vec<u8>| KvOp::Delete {
            key: k,
            expected: Expected::Any,
        };
        match n {
            1 => {
                w(g, put(&key_in(3, 0), b"changed while copied"));
                w(g, del(key_in(3, 1)));
            }
            2 => {
                w(g, put(&key_in(3, 10), b"new"));
                w(g, put(&key_in(3, 9), b"before its chunk"));
                w(g, put(&key_in(3, 1), b"back"));
            }
            3 => w(g, del(key_in(3, 1))),
            _ => {}
        }
    });
    assert!(parts.len() >= 4, "small chunks: {} of them", parts.len());
    let touched = &g1.m.copy_track(3).unwrap().touched;
    assert_eq!(touched.len(), 4, "the keys written since the copy started");
    for items in &parts {
        assert_eq!(
            g2.control(&stage(3, 2, items.clone())),
            ControlOutcome::Applied
        );
    }
    // Cut-over: adopt, freeze, the rest after the last key copied live, and the tail.
    g1.control(&adopt(&c2));
    g2.control(&adopt(&c2));
    assert!(matches!(
        g1.client(3, req(s, 99, put(&key_in(3, 2), b"late"))),
        GroupOutput::WrongGroup { config: 2 }
    ));
    assert_eq!(g1.control(&freeze(3, 2)), ControlOutcome::Applied);
    assert!(g1.m.copy_track(3).is_some(), "kept through its own freeze");
    let ShardChunk { items, tail } = g1.m.export_chunk(3, 2, after.as_deref(), 30).unwrap();
    assert!(items.is_empty(), "every key was copied live");
    let tail = tail.expect("the frozen shard's last chunk has the tail");
    assert_eq!(tail[0], shoal_shard::group::TAIL_TOUCHED_FORMAT);
    // A tail cut anywhere or with a byte more is refused, never a panic.
    for cut in 1..tail.len() {
        assert!(matches!(
            g2.control(&install(3, 2, tail[..cut].to_vec())),
            ControlOutcome::Refused { .. }
        ));
    }
    let mut longer = tail.clone();
    longer.push(0);
    assert!(matches!(
        g2.control(&install(3, 2, longer)),
        ControlOutcome::Refused { .. }
    ));
    assert_eq!(g2.control(&install(3, 2, tail)), ControlOutcome::Applied);
    // The shard whole: data, versions, sessions and position counter, byte for byte.
    assert_eq!(
        g2.m.shard(3).unwrap().store.snapshot(),
        g1.m.shard(3).unwrap().store.snapshot()
    );
    assert_eq!(
        g2.client(3, req(0, 0, get(&key_in(3, 0)))),
        GroupOutput::Kv(KvResult::Found {
            value: b"changed while copied".to_vec(),
            version: 2
        })
    );
    assert_eq!(
        g2.client(3, req(0, 0, get(&key_in(3, 1)))),
        GroupOutput::Kv(KvResult::NoKey)
    );
    // The old owner forgets the copy with the shard.
    assert_eq!(g1.control(&delete(3, 2)), ControlOutcome::Applied);
    assert!(g1.m.copy_track(3).is_none());
}

#[test]
fn copy_start_is_fenced_by_the_configuration_and_the_shard() {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    // Nothing held yet.
    g1.control(&adopt(&c1));
    assert!(matches!(
        g1.control(&copy_start(9, 2)),
        ControlOutcome::Refused { reason } if reason.contains("unknown shard")
    ));
    // Not the next configuration: refused, nothing tracked, no live chunk.
    assert!(matches!(
        g1.control(&copy_start(3, 3)),
        ControlOutcome::Refused { .. }
    ));
    assert!(g1.m.copy_track(3).is_none());
    assert!(g1.m.export_chunk(3, 3, None, 100).is_none());
    // An older configuration than the shard's: stale.
    assert_eq!(
        g1.control(&copy_start(3, 1)),
        ControlOutcome::Stale { seen: 1 }
    );
    // A serving shard not being copied gives no chunk.
    assert!(g1.m.export_chunk(3, 2, None, 100).is_none());
    // The group adopted configuration 2 already: copied frozen, never live.
    g1.control(&adopt(&c2));
    assert!(matches!(
        g1.control(&copy_start(3, 2)),
        ControlOutcome::Refused { reason } if reason.contains("adopted configuration 2 already")
    ));
    assert!(g1.m.copy_track(3).is_none());
    assert!(g1.m.export_chunk(3, 2, None, 100).is_none());
    g1.control(&freeze(3, 2));
    let (_, tail) = chunks(&g1, 3, 2, 20);
    assert_eq!(tail[0], shoal_shard::group::TAIL_FORMAT, "no keys to add");
    assert_eq!(
        g1.control(&copy_start(3, 2)),
        ControlOutcome::Stale { seen: 2 }
    );
    // Deleted at 2: a late CopyStart of 2 is stale; a shard another group holds is refused.
    g1.control(&delete(3, 2));
    assert_eq!(
        g1.control(&copy_start(3, 2)),
        ControlOutcome::Stale { seen: 2 }
    );
    let mut g2 = new_owner();
    assert!(matches!(
        g2.control(&copy_start(0, 3)),
        ControlOutcome::Refused { .. }
    ));
    // A stage two configurations ahead of the new owner's is refused.
    let mut g3 = Node::new(3);
    g3.control(&adopt(&c1));
    assert!(matches!(
        g3.control(&stage(3, 3, Vec::new())),
        ControlOutcome::Refused { reason } if reason.contains("not adopted")
    ));
}

#[test]
fn copy_tracking_survives_a_snapshot_and_a_newer_configuration_drops_it() {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let s = g1.register(3);
    g1.control(&copy_start(3, 2));
    g1.control(&copy_start(2, 2));
    g1.client(3, req(s, 1, put(&key_in(3, 0), b"x")));
    g1.client(3, req(s, 2, put(&key_in(3, 1), b"y")));
    let bytes = g1.bytes();
    let mut fresh = ShardMachine::new(1, SHARDS, Limits::default()).unwrap();
    fresh.restore(LogIndex(7), &mut (&bytes as &[u8])).unwrap();
    assert_eq!(fresh.snapshot().into_bytes(), bytes);
    assert_eq!(fresh.copy_track(3), g1.m.copy_track(3));
    assert_eq!(fresh.copy_track(3).unwrap().touched.len(), 2);
    assert_eq!(fresh.copy_track(2).unwrap().touched.len(), 0);
    // Cut anywhere: an error, never a panic.
    for cut in 1..bytes.len() {
        let mut m = ShardMachine::new(1, SHARDS, Limits::default()).unwrap();
        assert!(
            m.restore(LogIndex(1), &mut (&bytes[..cut] as &[u8]))
                .is_err(),
            "cut {cut}"
        );
    }
    // The restored replica's tail is the same as the original's.
    let mut restored = Node {
        m: fresh,
        index: 100,
    };
    for g in [&mut g1, &mut restored] {
        g.control(&adopt(&c2));
        g.control(&freeze(3, 2));
    }
    assert_eq!(chunks(&g1, 3, 2, 20), chunks(&restored, 3, 2, 20));
    // Configuration 3 adopted: the copies towards 2 are over.
    let c3 = shoal_shard::move_shard(&c2, 0, 2).unwrap();
    g1.control(&adopt(&c3));
    assert!(g1.m.copy_track(2).is_none() && g1.m.copy_track(3).is_none());
}

// ---- delta rounds: CopyRound, ExportDelta, StageRound ----

fn copy_round(shard: u32, config: u64, round: u32) -> GroupEntry {
    GroupEntry::CopyRound {
        shard,
        config,
        round,
    }
}

fn stage_round(shard: u32, config: u64, round: u32, c: &DeltaChunk) -> GroupEntry {
    GroupEntry::StageRound {
        shard,
        config,
        round,
        items: c.items.clone(),
        absent: c.absent.clone(),
    }
}

fn live_round(shard: u32, config: u64, items: &[CopiedItem]) -> GroupEntry {
    GroupEntry::StageRound {
        shard,
        config,
        round: 0,
        items: items.to_vec(),
        absent: Vec::new(),
    }
}

/// Every chunk of `shard`'s current delta round towards `config`, `max` bytes each;
/// `between` runs after each chunk (writes while the round is read).
fn delta_chunks(
    from: &mut Node,
    shard: u32,
    config: u64,
    max: u64,
    mut between: impl FnMut(&mut Node, usize),
) -> Vec<DeltaChunk> {
    let mut after: Option<Vec<u8>> = None;
    let mut out = Vec::new();
    loop {
        let c = from
            .m
            .export_delta(shard, config, after.as_deref(), max)
            .expect("copied live here");
        let last = c.last;
        if let Some(k) = c.last_key() {
            after = Some(k.to_vec());
        }
        assert!(last || after.is_some(), "a chunk moves on");
        out.push(c);
        between(from, out.len());
        if last {
            return out;
        }
    }
}

/// Group 1 serving shard 3 (ten keys) at configuration 1 with its copy to 2 started and
/// read live to the end; group 2 at configuration 1 with the live chunks staged (round 0).
/// Returns both, the live chunks, the session and the last key copied live.
fn copied_live() -> (Node, Node, Vec<Vec<CopiedItem>>, u64, Option<Vec<u8>>) {
    let (c1, _) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    let s = g1.register(3);
    for n in 0..10u64 {
        let k = key_in(3, n as usize);
        assert_eq!(
            g1.client(3, req(s, n + 1, put(&k, b"v0123456789"))),
            written(1)
        );
    }
    let mut g2 = Node::new(2);
    g2.control(&adopt(&c1));
    assert_eq!(g1.control(&copy_start(3, 2)), ControlOutcome::Applied);
    let (parts, after) = live_chunks(&mut g1, 3, 2, None, 30, |_, _| {});
    for items in &parts {
        assert_eq!(
            g2.control(&live_round(3, 2, items)),
            ControlOutcome::Applied
        );
    }
    (g1, g2, parts, s, after)
}

fn del(key: Vec<u8>) -> KvOp {
    KvOp::Delete {
        key,
        expected: Expected::Any,
    }
}

#[test]
fn delta_rounds_install_the_frozen_shard_and_an_older_round_never_overwrites_a_newer_one() {
    let (_, c2) = configs();
    let (mut g1, mut g2, live, s, after) = copied_live();
    let mut request = 100;
    let mut w = |g: &mut Node, op: KvOp| {
        request += 1;
        assert!(matches!(
            g.client(3, req(s, request, op)),
            GroupOutput::Kv(_)
        ));
    };
    // Written during the live copy: an overwrite, a delete, a new key.
    w(&mut g1, put(&key_in(3, 0), b"round one"));
    w(&mut g1, del(key_in(3, 1)));
    w(&mut g1, put(&key_in(3, 10), b"new"));
    // Round 1 takes those three keys; recording starts afresh.
    assert_eq!(g1.control(&copy_round(3, 2, 1)), ControlOutcome::Applied);
    assert_eq!(
        g1.control(&copy_round(3, 2, 1)),
        ControlOutcome::AlreadyDone
    );
    let t = g1.m.copy_track(3).unwrap();
    assert_eq!((t.round, t.pending.len(), t.touched.len()), (1, 3, 0));
    // Read in chunks of one key, with writes in between (to a key of the round, and to
    // one outside it): they go to the next round.
    let round1 = delta_chunks(&mut g1, 3, 2, 1, |g, n| {
        if n == 1 {
            w(g, put(&key_in(3, 0), b"during round one"));
            w(g, put(&key_in(3, 2), b"during round one"));
        }
    });
    assert_eq!(round1.len(), 3, "one key a chunk");
    assert!(round1.iter().all(|c| c.round == 1));
    assert_eq!(round1.iter().map(|c| c.absent.len()).sum::<usize>(), 1);
    for c in &round1 {
        assert_eq!(
            g2.control(&stage_round(3, 2, 1, c)),
            ControlOutcome::Applied
        );
    }
    assert_eq!(g2.m.staging(3).unwrap().round, 1);
    // Round 2 acknowledges round 1: its keys leave the tail.
    assert_eq!(g1.control(&copy_round(3, 2, 2)), ControlOutcome::Applied);
    let t = g1.m.copy_track(3).unwrap();
    assert_eq!((t.round, t.pending.len(), t.touched.len()), (2, 2, 0));
    let round2 = delta_chunks(&mut g1, 3, 2, 1 << 20, |_, _| {});
    assert_eq!(round2.len(), 1);
    assert_eq!(
        g2.control(&stage_round(3, 2, 2, &round2[0])),
        ControlOutcome::Applied
    );
    // Chunks of older rounds delivered again now (the live one holds key 0's first value,
    // round 1's maybe its second): ignored, the staged copy unchanged.
    let staged = g2.m.staging(3).unwrap().store.snapshot();
    let old_live = live
        .iter()
        .find(|items| items.iter().any(|i| i.key == key_in(3, 0)))
        .unwrap();
    assert_eq!(
        g2.control(&live_round(3, 2, old_live)),
        ControlOutcome::Stale { seen: 2 }
    );
    assert_eq!(
        g2.control(&stage(3, 2, old_live.clone())),
        ControlOutcome::Stale { seen: 2 },
        "a plain Stage is round 0"
    );
    for c in &round1 {
        assert_eq!(
            g2.control(&stage_round(3, 2, 1, c)),
            ControlOutcome::Stale { seen: 2 }
        );
    }
    assert_eq!(g2.m.staging(3).unwrap().store.snapshot(), staged);
    // A key written during round 2, then the last round (only acknowledging round 2), a key
    // written after it: the tail carries those two keys, not the seven written in all.
    w(&mut g1, put(&key_in(3, 3), b"during round two"));
    assert_eq!(g1.control(&copy_round(3, 2, 3)), ControlOutcome::Applied);
    w(&mut g1, put(&key_in(3, 4), b"after the last round"));
    // Cut-over.
    g1.control(&adopt(&c2));
    g2.control(&adopt(&c2));
    assert!(
        matches!(
            g1.control(&copy_round(3, 2, 4)),
            ControlOutcome::Refused { .. }
        ),
        "no round once the group adopted the move"
    );
    assert!(g1.m.export_delta(3, 2, None, 100).is_none());
    assert_eq!(g1.control(&freeze(3, 2)), ControlOutcome::Applied);
    let ShardChunk { items, tail } = g1.m.export_chunk(3, 2, after.as_deref(), 30).unwrap();
    assert!(items.is_empty(), "every key was copied live");
    let tail = tail.unwrap();
    assert_eq!(ShardMachine::tail_touched_keys(&tail), Some(2));
    // A replayed delta stage after the install changes nothing either.
    assert_eq!(g2.control(&install(3, 2, tail)), ControlOutcome::Applied);
    assert_eq!(
        g2.control(&stage_round(3, 2, 2, &round2[0])),
        ControlOutcome::AlreadyDone
    );
    assert_eq!(
        g2.m.shard(3).unwrap().store.snapshot(),
        g1.m.shard(3).unwrap().store.snapshot(),
        "data, versions, sessions and counter"
    );
}

#[test]
fn a_frozen_chunk_is_staged_over_any_round_and_no_round_after_it() {
    let (_, c2) = configs();
    let (mut g1, mut g2, live, s, _) = copied_live();
    g1.client(3, req(s, 50, put(&key_in(3, 0), b"x")));
    g1.control(&copy_round(3, 2, 1));
    let round1 = delta_chunks(&mut g1, 3, 2, 1 << 20, |_, _| {});
    g2.control(&stage_round(3, 2, 1, &round1[0]));
    g1.client(3, req(s, 51, put(&key_in(3, 0), b"y")));
    // The group adopts the move before round 1 is acknowledged (a controller that took
    // over): the whole shard is copied frozen, as the last round, and the tail carries
    // round 1's keys and the later ones.
    g1.control(&adopt(&c2));
    g2.control(&adopt(&c2));
    g1.control(&freeze(3, 2));
    let (frozen, tail) = chunks(&g1, 3, 2, 30);
    assert_eq!(ShardMachine::tail_touched_keys(&tail), Some(1));
    for items in &frozen {
        let e = GroupEntry::StageRound {
            shard: 3,
            config: 2,
            round: FROZEN_ROUND,
            items: items.clone(),
            absent: Vec::new(),
        };
        assert_eq!(g2.control(&e), ControlOutcome::Applied);
    }
    for items in &live {
        assert_eq!(
            g2.control(&live_round(3, 2, items)),
            ControlOutcome::Stale { seen: 2 }
        );
    }
    assert_eq!(
        g2.control(&stage_round(3, 2, 1, &round1[0])),
        ControlOutcome::Stale { seen: 2 }
    );
    assert_eq!(g2.control(&install(3, 2, tail)), ControlOutcome::Applied);
    assert_eq!(
        g2.m.shard(3).unwrap().store.snapshot(),
        g1.m.shard(3).unwrap().store.snapshot()
    );
}

#[test]
fn copy_rounds_are_fenced_by_round_configuration_and_state() {
    let (c1, c2) = configs();
    let mut g1 = Node::new(1);
    g1.control(&adopt(&c1));
    assert!(matches!(
        g1.control(&copy_round(9, 2, 1)),
        ControlOutcome::Refused { reason } if reason.contains("unknown shard")
    ));
    // No copy started: refused, and no delta to read.
    assert!(matches!(
        g1.control(&copy_round(3, 2, 1)),
        ControlOutcome::Refused { reason } if reason.contains("CopyStart")
    ));
    assert!(g1.m.export_delta(3, 2, None, 100).is_none());
    g1.control(&copy_start(3, 2));
    // Round 0 is the copy itself; a round that skips one is refused.
    assert_eq!(
        g1.control(&copy_round(3, 2, 0)),
        ControlOutcome::AlreadyDone
    );
    assert!(matches!(
        g1.control(&copy_round(3, 2, 2)),
        ControlOutcome::Refused { reason } if reason.contains("skips")
    ));
    assert_eq!(g1.m.copy_track(3).unwrap().round, 0);
    // Another configuration than the copy's: older is stale, newer refused.
    assert_eq!(
        g1.control(&copy_round(3, 1, 1)),
        ControlOutcome::Stale { seen: 2 }
    );
    assert!(matches!(
        g1.control(&copy_round(3, 3, 1)),
        ControlOutcome::Refused { .. }
    ));
    assert!(g1.m.export_delta(3, 3, None, 100).is_none());
    assert_eq!(g1.control(&copy_round(3, 2, 1)), ControlOutcome::Applied);
    let empty = g1.m.export_delta(3, 2, None, 100).unwrap();
    assert!(empty.last && empty.items.is_empty() && empty.absent.is_empty());
    assert_eq!(empty.round, 1);
    // Adopted, frozen, deleted: no more rounds; afterwards a round is stale.
    g1.control(&adopt(&c2));
    assert!(matches!(
        g1.control(&copy_round(3, 2, 2)),
        ControlOutcome::Refused { .. }
    ));
    g1.control(&freeze(3, 2));
    assert!(g1.m.export_delta(3, 2, None, 100).is_none());
    g1.control(&delete(3, 2));
    assert_eq!(
        g1.control(&copy_round(3, 2, 2)),
        ControlOutcome::Stale { seen: 2 }
    );
    // A stage of a round staged into a shard of another group's configuration is refused
    // as any stage is; keys of another shard in `absent` too.
    let mut g2 = new_owner();
    let foreign = GroupEntry::StageRound {
        shard: 3,
        config: 2,
        round: 1,
        items: Vec::new(),
        absent: vec![key_in(2, 0)],
    };
    assert!(matches!(
        g2.control(&foreign),
        ControlOutcome::Refused { reason } if reason.contains("not in shard 3")
    ));
    assert!(g2.m.staging(3).is_none());
}

#[test]
fn delta_rounds_survive_a_snapshot_and_the_entries_never_panic_on_bad_bytes() {
    let (mut g1, mut g2, _, s, _) = copied_live();
    g1.client(3, req(s, 50, put(&key_in(3, 0), b"x")));
    g1.client(3, req(s, 51, del(key_in(3, 1))));
    g1.control(&copy_round(3, 2, 1));
    g1.client(3, req(s, 52, put(&key_in(3, 2), b"y")));
    let round1 = delta_chunks(&mut g1, 3, 2, 1 << 20, |_, _| {});
    let entry = stage_round(3, 2, 1, &round1[0]);
    g2.control(&entry);
    for g in [&g1, &g2] {
        let bytes = g.bytes();
        assert_eq!(bytes[0], 4);
        let mut fresh = ShardMachine::new(g.m.gid(), SHARDS, Limits::default()).unwrap();
        fresh.restore(LogIndex(9), &mut (&bytes as &[u8])).unwrap();
        assert_eq!(fresh.snapshot().into_bytes(), bytes);
        assert_eq!(fresh.copy_track(3), g.m.copy_track(3));
        assert_eq!(
            fresh.staging(3).map(|st| st.round),
            g.m.staging(3).map(|st| st.round)
        );
        assert_eq!(
            fresh.export_delta(3, 2, None, 100),
            g.m.export_delta(3, 2, None, 100)
        );
        for cut in 1..bytes.len() {
            let mut m = ShardMachine::new(g.m.gid(), SHARDS, Limits::default()).unwrap();
            assert!(
                m.restore(LogIndex(1), &mut (&bytes[..cut] as &[u8]))
                    .is_err(),
                "cut {cut}"
            );
        }
    }
    let t = g1.m.copy_track(3).unwrap();
    assert_eq!((t.round, t.pending.len(), t.touched.len()), (1, 2, 1));
    assert_eq!(g2.m.staging(3).unwrap().round, 1);
    for e in [entry, copy_round(3, 2, 2)] {
        let bytes = e.encode();
        assert_eq!(GroupEntry::decode(&bytes).unwrap(), e);
        for cut in 0..bytes.len() {
            assert!(GroupEntry::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }
}
