//! The group host (`GroupHost`) on single-node replicas over in-memory disks, the pipeline
//! driven by hand: client requests in, replies out; WrongGroup without a log entry; a freeze,
//! export and install moving a shard to another group with its session table; WrongLeader.

use std::collections::BTreeMap;

use shoal_kv::Limits;
use shoal_raft::{Config as RaftConfig, NodeId};
use shoal_replica::SnapshotPolicy;
use shoal_shard::{
    join, shard_of, Config, ControlOutcome, ControlResult, Gid, GroupEntry, GroupHost,
};
use shoal_storage::{DurableStorage, MemDisk, StorageConfig};
use shoal_wire::kv::{Expected, KvOp, KvResult};
use shoal_wire::shard::{ShardReply, ShardRequest};

const SHARDS: u32 = 4;

fn servers(gid: Gid) -> BTreeMap<Gid, Vec<String>> {
    BTreeMap::from([(gid, vec![format!("{gid}a")])])
}

/// Configuration 1: group 1 owns every shard. Configuration 2: group 2 joins and gets shards
/// 2 and 3.
fn configs() -> (Config, Config) {
    let c1 = join(&Config::empty(SHARDS).unwrap(), &servers(1)).unwrap();
    let c2 = join(&c1, &servers(2)).unwrap();
    assert_eq!(c1.shards, vec![1, 1, 1, 1]);
    assert_eq!(c2.shards, vec![1, 1, 2, 2]);
    (c1, c2)
}

/// A key of `shard`.
fn key_in(shard: u32) -> Vec<u8> {
    (0..)
        .map(|i| format!("k{i}").into_bytes())
        .find(|k| shard_of(k, SHARDS) == shard)
        .unwrap()
}

/// A single-node server of group `gid` on its own in-memory disk.
struct Server {
    host: GroupHost,
    disk: MemDisk,
    next_tag: u64,
}

impl Server {
    fn new(gid: Gid) -> Server {
        let mut disk = MemDisk::new();
        let storage = DurableStorage::open(&mut disk, gid, 1, StorageConfig::default()).unwrap();
        let raft = RaftConfig::new(NodeId(1), vec![NodeId(1)]);
        let host = GroupHost::new(
            raft,
            storage,
            gid,
            SHARDS,
            Limits::default(),
            SnapshotPolicy::default(),
        )
        .unwrap();
        Server {
            host,
            disk,
            next_tag: 1,
        }
    }

    /// Carries out the Readies (a single node: no messages to send); snapshot jobs run and
    /// install at once.
    fn drive(&mut self) {
        let replica = self.host.replica_mut();
        while let Some(u) = replica.write_ready(&mut self.disk).expect("write") {
            replica.sync(&mut self.disk).expect("sync");
            let synced = replica.on_synced(&mut self.disk, u).expect("on_synced");
            if let Some(job) = synced.snapshot {
                let prepared = job.prepare(&mut self.disk);
                replica
                    .install_snapshot(&mut self.disk, prepared)
                    .expect("install snapshot");
            }
        }
    }

    fn elect(mut self) -> Server {
        self.host.raw_mut().campaign();
        self.drive();
        self
    }

    fn last_index(&self) -> u64 {
        self.host.raw().status().last_index.0
    }

    /// One request through `handle_request`, driven to its single reply.
    fn call(&mut self, client: u64, request: u64, shard: u32, op: KvOp) -> ShardReply {
        let config = self.host.machine().config().num;
        self.host.handle_request(
            7,
            ShardRequest {
                client,
                request,
                shard,
                config,
                op,
                serializable: false,
            },
        );
        self.drive();
        let mut replies = self.host.take_replies();
        assert_eq!(replies.len(), 1, "{replies:?}");
        let (to, reply) = replies.pop().unwrap();
        assert_eq!(to, 7);
        assert_eq!(reply.ids(), (client, request));
        reply
    }

    fn done(&mut self, client: u64, request: u64, shard: u32, op: KvOp) -> KvResult {
        match self.call(client, request, shard, op) {
            ShardReply::Done { result, .. } => result,
            other => panic!("{other:?}"),
        }
    }

    fn take_one_result(&mut self, tag: u64) -> ControlResult {
        let mut results = self.host.take_control_results();
        assert_eq!(results.len(), 1, "{results:?}");
        let (t, result) = results.pop().unwrap();
        assert_eq!(t, tag);
        result
    }

    fn control(&mut self, entry: GroupEntry) -> ControlOutcome {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.host.propose_control(tag, entry);
        self.drive();
        match self.take_one_result(tag) {
            ControlResult::Applied(outcome) => outcome,
            other => panic!("{other:?}"),
        }
    }

    fn export(&mut self, shard: u32, config: u64) -> Option<Vec<u8>> {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.host.export(tag, shard, config);
        self.drive();
        match self.take_one_result(tag) {
            ControlResult::Exported(data) => data,
            other => panic!("{other:?}"),
        }
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

/// Register, put and get through `handle_request`, answered from the applied entries and a
/// confirmed read.
#[test]
fn serves_register_put_and_get() {
    let (c1, _) = configs();
    let mut s = Server::new(1).elect();
    assert_eq!(
        s.control(GroupEntry::Adopt { config: c1 }),
        ControlOutcome::Applied
    );
    let key = key_in(1);
    let KvResult::Registered { session } = s.done(100, 1, 1, KvOp::Register) else {
        panic!("no session");
    };
    let KvResult::Written { version } = s.done(session, 1, 1, put(&key, b"v1")) else {
        panic!("not written");
    };
    let before = s.last_index();
    assert_eq!(
        s.done(5, 9, 1, get(&key)),
        KvResult::Found {
            value: b"v1".to_vec(),
            version
        }
    );
    assert_eq!(s.last_index(), before, "a read writes no log entry");
    // A key of another shard named with this shard is refused, not stored.
    assert!(matches!(
        s.done(session, 2, 1, put(&key_in(0), b"x")),
        KvResult::Refused { .. }
    ));
    // Leases are refused at once, before they take log space.
    let before = s.last_index();
    assert_eq!(
        s.done(session, 3, 1, KvOp::LeaseGrant { ttl_ms: 5_000 }),
        KvResult::Refused {
            reason: shoal_shard::group::LEASES_REFUSED.into()
        }
    );
    assert_eq!(s.last_index(), before, "a refused lease takes no log entry");
}

/// A request for a shard another group serves is answered WrongGroup at once, with the
/// group's configuration number, and takes no log entry.
#[test]
fn a_shard_of_another_group_is_wrong_group_without_a_log_entry() {
    let (c1, c2) = configs();
    let mut s = Server::new(2).elect();
    assert_eq!(
        s.control(GroupEntry::Adopt { config: c1 }),
        ControlOutcome::Applied
    );
    let before = s.last_index();
    for (request, op) in [(1, put(&key_in(0), b"v")), (2, get(&key_in(0)))] {
        assert_eq!(
            s.call(3, request, 0, op),
            ShardReply::WrongGroup {
                client: 3,
                request,
                config: 1
            }
        );
    }
    assert_eq!(
        s.last_index(),
        before,
        "no log entry for a misrouted request"
    );
    // Configuration 2 moves shard 2 here, but it serves it only once installed.
    assert_eq!(
        s.control(GroupEntry::Adopt { config: c2 }),
        ControlOutcome::Applied
    );
    let before = s.last_index();
    assert_eq!(
        s.call(3, 3, 2, get(&key_in(2))),
        ShardReply::WrongGroup {
            client: 3,
            request: 3,
            config: 2
        }
    );
    assert_eq!(s.last_index(), before);
}

/// Freeze stops the old owner's writes; its export, installed at the new owner, serves the
/// key; a retry of the pre-migration put there is answered from the migrated session table.
#[test]
fn a_shard_moves_with_its_data_and_sessions() {
    let (c1, c2) = configs();
    let shard = 2;
    let key = key_in(shard);

    let mut old = Server::new(1).elect();
    assert_eq!(
        old.control(GroupEntry::Adopt { config: c1.clone() }),
        ControlOutcome::Applied
    );
    let KvResult::Registered { session } = old.done(100, 1, shard, KvOp::Register) else {
        panic!("no session");
    };
    let first = old.done(session, 1, shard, put(&key, b"v1"));
    let KvResult::Written { version } = first else {
        panic!("{first:?}");
    };

    // Exporting a shard that is still serving gives nothing.
    assert_eq!(old.export(shard, 2), None);
    assert_eq!(
        old.control(GroupEntry::Adopt { config: c2.clone() }),
        ControlOutcome::Applied
    );
    assert_eq!(
        old.control(GroupEntry::Freeze { shard, config: 2 }),
        ControlOutcome::Applied
    );
    assert_eq!(
        old.call(session, 2, shard, put(&key, b"v2")),
        ShardReply::WrongGroup {
            client: session,
            request: 2,
            config: 2
        }
    );
    let data = old.export(shard, 2).expect("the frozen shard exports");

    let mut new = Server::new(2).elect();
    for c in [c1, c2] {
        assert_eq!(
            new.control(GroupEntry::Adopt { config: c }),
            ControlOutcome::Applied
        );
    }
    assert_eq!(
        new.control(GroupEntry::Install {
            shard,
            config: 2,
            data: data.clone()
        }),
        ControlOutcome::Applied
    );
    // A replayed install changes nothing.
    assert_eq!(
        new.control(GroupEntry::Install {
            shard,
            config: 2,
            data
        }),
        ControlOutcome::AlreadyDone
    );
    let found = KvResult::Found {
        value: b"v1".to_vec(),
        version,
    };
    assert_eq!(new.done(5, 1, shard, get(&key)), found);
    // The client never saw the answer to its put and retries it at the new owner: the session
    // table came along, so the answer is the recorded one and the put does not apply twice.
    assert_eq!(new.done(session, 1, shard, put(&key, b"v1")), first);
    assert_eq!(new.done(5, 2, shard, get(&key)), found);
    // The next write of the session applies.
    assert_eq!(
        new.done(session, 2, shard, put(&key, b"v2")),
        KvResult::Written {
            version: version + 1
        }
    );

    // The old owner forgets the shard; a later export finds nothing.
    assert_eq!(
        old.control(GroupEntry::Delete { shard, config: 2 }),
        ControlOutcome::Applied
    );
    assert_eq!(old.export(shard, 2), None);
}

/// A server that is not the leader answers WrongLeader, and refuses control entries and
/// exports with NotLeader.
#[test]
fn a_follower_answers_wrong_leader() {
    let (c1, _) = configs();
    let mut s = Server::new(1);
    assert_eq!(
        s.call(4, 1, 0, get(&key_in(0))),
        ShardReply::WrongLeader {
            client: 4,
            request: 1,
            leader: None
        }
    );
    assert_eq!(
        s.call(4, 2, 0, put(&key_in(0), b"v")),
        ShardReply::WrongLeader {
            client: 4,
            request: 2,
            leader: None
        }
    );
    s.host.propose_control(1, GroupEntry::Adopt { config: c1 });
    s.host.export(2, 0, 1);
    s.drive();
    assert_eq!(
        s.host.take_control_results(),
        vec![
            (1, ControlResult::NotLeader { leader: None }),
            (2, ControlResult::NotLeader { leader: None })
        ]
    );
    assert_eq!(s.last_index(), 0, "a follower proposes nothing");
}

/// A read confirmed after its shard was frozen is answered WrongGroup: the host serves it from
/// the machine's state when the confirmation comes, not from the state it arrived in.
#[test]
fn a_read_whose_shard_left_meanwhile_is_wrong_group() {
    let (c1, _) = configs();
    let shard = 2;
    let mut s = Server::new(1).elect();
    assert_eq!(
        s.control(GroupEntry::Adopt { config: c1 }),
        ControlOutcome::Applied
    );
    // Frozen for configuration 2 (which gives shard 2 away) before the group adopts it: the
    // freeze alone stops the shard.
    assert!(matches!(
        s.done(5, 1, shard, get(&key_in(shard))),
        KvResult::NoKey
    ));
    let config = s.host.machine().config().num;
    s.host.handle_request(
        7,
        ShardRequest {
            client: 5,
            request: 2,
            shard,
            config,
            op: get(&key_in(shard)),
            serializable: false,
        },
    );
    s.host
        .propose_control(1, GroupEntry::Freeze { shard, config: 2 });
    s.drive();
    assert_eq!(
        s.host.take_control_results(),
        vec![(1, ControlResult::Applied(ControlOutcome::Applied))]
    );
    assert_eq!(
        s.host.take_replies(),
        vec![(
            7,
            ShardReply::WrongGroup {
                client: 5,
                request: 2,
                config: 1
            }
        )]
    );
}

/// The controller's wire requests (`handle_control`): a whole migration through them, with the
/// group's adopted number in every answer; another gid, bad configuration bytes and a
/// follower are answered without touching anything.
#[test]
fn control_requests_over_the_wire_carry_a_whole_migration() {
    use shoal_wire::shard::{ControlOp, ControlReply, ControlRequest, ControlStatus};
    fn ask(s: &mut Server, gid: Gid, op: ControlOp) -> ControlReply {
        let tag = s.next_tag;
        s.next_tag += 1;
        s.host.handle_control(3, ControlRequest { tag, gid, op });
        s.drive();
        let mut replies = s.host.take_control_replies();
        assert_eq!(replies.len(), 1, "{replies:?}");
        let (to, reply) = replies.pop().unwrap();
        assert_eq!((to, reply.tag()), (3, tag));
        assert!(
            s.host.take_control_results().is_empty(),
            "routed to the wire"
        );
        reply
    }
    let (c1, c2) = configs();
    let mut a = Server::new(1).elect();
    let mut b = Server::new(2).elect();
    let adopted = |r: ControlReply| match r {
        ControlReply::Done {
            status: ControlStatus::Applied,
            adopted,
            ..
        } => adopted,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        ask(&mut a, 1, ControlOp::Adopted),
        ControlReply::Adopted { tag: 1, adopted: 0 }
    );
    assert_eq!(
        adopted(ask(
            &mut a,
            1,
            ControlOp::Adopt {
                config: c1.encode()
            }
        )),
        1
    );
    let key = key_in(2);
    let KvResult::Registered { session } = a.done(100, 1, 2, KvOp::Register) else {
        panic!("no session");
    };
    assert!(matches!(
        a.done(session, 1, 2, put(&key, b"moved")),
        KvResult::Written { .. }
    ));
    // Another group's request, and bytes that are no configuration: refused, nothing logged.
    let before = a.last_index();
    let wrong = ask(
        &mut a,
        2,
        ControlOp::Freeze {
            shard: 2,
            config: 2,
        },
    );
    assert!(
        matches!(wrong, ControlReply::WrongGid { gid: 1, .. }),
        "{wrong:?}"
    );
    assert!(matches!(
        ask(
            &mut a,
            1,
            ControlOp::Adopt {
                config: vec![1, 2, 3]
            }
        ),
        ControlReply::Invalid { .. }
    ));
    assert_eq!(a.last_index(), before);

    for s in [&mut a, &mut b] {
        let gid = s.host.machine().gid();
        if gid == 2 {
            assert_eq!(
                adopted(ask(
                    s,
                    2,
                    ControlOp::Adopt {
                        config: c1.encode()
                    }
                )),
                1
            );
        }
        assert_eq!(
            adopted(ask(
                s,
                gid,
                ControlOp::Adopt {
                    config: c2.encode()
                }
            )),
            2
        );
    }
    // The same step again is a no-op.
    assert!(matches!(
        ask(
            &mut a,
            1,
            ControlOp::Adopt {
                config: c2.encode()
            }
        ),
        ControlReply::Done {
            status: ControlStatus::AlreadyDone,
            adopted: 2,
            ..
        }
    ));
    assert!(
        matches!(
            ask(
                &mut a,
                1,
                ControlOp::Export {
                    shard: 2,
                    config: 2
                }
            ),
            ControlReply::Exported { data: None, .. }
        ),
        "nothing to export before the freeze"
    );
    assert_eq!(
        adopted(ask(
            &mut a,
            1,
            ControlOp::Freeze {
                shard: 2,
                config: 2
            }
        )),
        2
    );
    let ControlReply::Exported {
        data: Some(data), ..
    } = ask(
        &mut a,
        1,
        ControlOp::Export {
            shard: 2,
            config: 2,
        },
    )
    else {
        panic!("no export");
    };
    assert_eq!(
        adopted(ask(
            &mut b,
            2,
            ControlOp::Install {
                shard: 2,
                config: 2,
                data
            }
        )),
        2
    );
    assert_eq!(
        adopted(ask(
            &mut a,
            1,
            ControlOp::Delete {
                shard: 2,
                config: 2
            }
        )),
        2
    );
    assert!(matches!(
        b.done(5, 1, 2, get(&key)),
        KvResult::Found { value, .. } if value == b"moved"
    ));
    // An older step now is stale.
    assert!(matches!(
        ask(
            &mut a,
            1,
            ControlOp::Freeze {
                shard: 2,
                config: 1
            }
        ),
        ControlReply::Done {
            status: ControlStatus::Stale { .. },
            ..
        }
    ));
}

/// A follower answers the controller `NotLeader` with its hint and proposes nothing.
#[test]
fn a_follower_answers_control_requests_not_leader() {
    use shoal_wire::shard::{ControlOp, ControlReply, ControlRequest};
    let mut s = Server::new(1); // never campaigned: a follower
    s.host.handle_control(
        9,
        ControlRequest {
            tag: 5,
            gid: 1,
            op: ControlOp::Freeze {
                shard: 0,
                config: 1,
            },
        },
    );
    s.drive();
    assert_eq!(
        s.host.take_control_replies(),
        vec![(
            9,
            ControlReply::NotLeader {
                tag: 5,
                leader: None
            }
        )]
    );
    assert_eq!(s.last_index(), 0);
}
