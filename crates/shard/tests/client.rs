//! The routing client (`ShardClerk`) against real components, pumped by hand (no threads, no
//! clocks): the controller's store is a `shoal_kv::SingleServer` holding a `Record` the test
//! writes, the groups are single-node `GroupHost`s over `MemDisk`, and migrations are driven
//! by hand (Adopt, Freeze, export, Install through `propose_control`). Timers fire only when
//! nothing else is left to do, oldest first: a timeout happens exactly where the test lets it.
//!
//! The tests where leader hints and resends matter use a configuration naming three servers
//! with no host behind them, answered by hand.
//!
//! Mutation tried: giving every resend a fresh request id (in `ShardClerk::send`) makes
//! `a_put_whose_reply_was_lost_applies_once_across_a_migration` fail (the new owner applies
//! the put again: version 2).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use shoal_kv::{Limits, Outcome, SingleServer};
use shoal_raft::{Config as RaftConfig, NodeId};
use shoal_replica::SnapshotPolicy;
use shoal_shard::client::OWN_TIMER_BIT;
use shoal_shard::layout::{config_key, Record, LATEST_KEY};
use shoal_shard::{
    diff, join, leave, move_shard, shard_of, ClientAction, ClientError, Config, ControlOutcome,
    ControlResult, Gid, GroupEntry, GroupHost, ShardClerk, ShardClerkConfig,
};
use shoal_storage::{DurableStorage, MemDisk, StorageConfig};
use shoal_wire::kv::{Expected, KvOp, KvReply, KvRequest, KvResult, ScanItem};
use shoal_wire::shard::{ShardReply, ShardRequest};

const SHARDS: u32 = 4;
const CLIENT: u64 = 42;
const STORE: u64 = 1;

/// A key of `shard` (the `nth` one, in the order `k0, k1, …`).
fn key_in(shard: u32, nth: usize) -> Vec<u8> {
    (0..)
        .map(|i| format!("k{i}").into_bytes())
        .filter(|k| shard_of(k, SHARDS) == shard)
        .nth(nth)
        .unwrap()
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

/// Configuration 1: groups 1 and 2 (one server each, `1a` and `2a`) join together: shards
/// 0 and 1 to group 1, 2 and 3 to group 2.
fn two_groups() -> Config {
    let c0 = Config::empty(SHARDS).unwrap();
    let c1 = join(
        &c0,
        &BTreeMap::from([(1, vec!["1a".to_string()]), (2, vec!["2a".to_string()])]),
    )
    .unwrap();
    assert_eq!(c1.shards, vec![1, 1, 2, 2]);
    c1
}

/// A single-node server of group `gid` on its own in-memory disk.
struct Server {
    host: GroupHost,
    disk: MemDisk,
    next_tag: u64,
}

impl Server {
    fn new(gid: Gid) -> Server {
        Server::with_limits(gid, Limits::default())
    }

    fn with_limits(gid: Gid, limits: Limits) -> Server {
        let mut disk = MemDisk::new();
        let storage = DurableStorage::open(&mut disk, gid, 1, StorageConfig::default()).unwrap();
        let raft = RaftConfig::new(NodeId(1), vec![NodeId(1)]);
        let mut host = GroupHost::new(
            raft,
            storage,
            gid,
            SHARDS,
            limits,
            SnapshotPolicy::default(),
        )
        .unwrap();
        host.raw_mut().campaign();
        let mut s = Server {
            host,
            disk,
            next_tag: 1,
        };
        s.drive();
        s
    }

    /// Carries out the Readies (a single node: no messages to send).
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

    fn handle(&mut self, req: ShardRequest) -> Vec<ShardReply> {
        self.host.handle_request(7, req);
        self.drive();
        self.host
            .take_replies()
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    fn take_one_result(&mut self, tag: u64) -> ControlResult {
        let mut results = self.host.take_control_results();
        assert_eq!(results.len(), 1, "{results:?}");
        let (t, result) = results.pop().unwrap();
        assert_eq!(t, tag);
        result
    }

    fn control(&mut self, entry: GroupEntry) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.host.propose_control(tag, entry);
        self.drive();
        assert_eq!(
            self.take_one_result(tag),
            ControlResult::Applied(ControlOutcome::Applied)
        );
    }

    fn export(&mut self, shard: u32, config: u64) -> Vec<u8> {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.host.export(tag, shard, config);
        self.drive();
        match self.take_one_result(tag) {
            ControlResult::Exported(Some(data)) => data,
            other => panic!("{other:?}"),
        }
    }

    /// What the group's store holds for `key` (read straight from the machine).
    fn value(&self, shard: u32, key: &[u8]) -> KvResult {
        let store = &self.host.machine().shard(shard).expect("shard held").store;
        store.read(&get(key)).unwrap()
    }
}

/// The controller's store, written the way the controller will: `LATEST_KEY` holds a
/// `Record`.
struct Store {
    server: SingleServer,
    session: u64,
    next_request: u64,
    latest: Option<Config>,
}

impl Store {
    fn new() -> Store {
        let mut server = SingleServer::new(Limits::default());
        let reply = server.handle(&KvRequest {
            client: 999,
            request: 1,
            op: KvOp::Register,
            serializable: false,
        });
        let KvReply::Done {
            result: KvResult::Registered { session },
            ..
        } = reply
        else {
            panic!("{reply:?}");
        };
        Store {
            server,
            session,
            next_request: 2,
            latest: None,
        }
    }

    fn publish(&mut self, config: &Config) {
        self.publish_record(config, true);
    }

    /// Publishes `config` with its record complete or not (a change being driven).
    fn publish_record(&mut self, config: &Config, complete: bool) {
        let moves = match &self.latest {
            Some(prev) => diff(prev, config).unwrap(),
            None => Vec::new(),
        };
        let record = Record {
            config: config.clone(),
            moves,
            complete,
        };
        let reply = self.server.handle(&KvRequest {
            client: self.session,
            request: self.next_request,
            op: put(LATEST_KEY, &record.encode()),
            serializable: false,
        });
        self.next_request += 1;
        assert!(
            matches!(
                reply,
                KvReply::Done {
                    result: KvResult::Written { .. },
                    ..
                }
            ),
            "{reply:?}"
        );
        // The history, as the controller writes it.
        let reply = self.server.handle(&KvRequest {
            client: self.session,
            request: self.next_request,
            op: put(&config_key(config.num), &config.encode()),
            serializable: false,
        });
        self.next_request += 1;
        assert!(
            matches!(
                reply,
                KvReply::Done {
                    result: KvResult::Written { .. },
                    ..
                }
            ),
            "{reply:?}"
        );
        self.latest = Some(config.clone());
    }
}

/// The client, the store and the groups, with everything the client sent.
struct World {
    clerk: ShardClerk,
    store: Store,
    servers: BTreeMap<String, Server>,
    /// Servers that drop every request (down or cut off).
    down: BTreeSet<String>,
    /// Drop the replies to the next this-many Put requests (the put applies; the answer is
    /// lost).
    lose_put_replies: u32,
    timers: VecDeque<u64>,
    tokens_seen: BTreeSet<u64>,
    /// Every group request: (server, request).
    sent: Vec<(String, ShardRequest)>,
    store_requests: usize,
}

impl World {
    fn new(config: &Config, gids: &[Gid]) -> World {
        World::with_limits(config, gids, Limits::default())
    }

    fn with_limits(config: &Config, gids: &[Gid], limits: Limits) -> World {
        let mut store = Store::new();
        store.publish(config);
        let mut servers = BTreeMap::new();
        for &gid in gids {
            let mut s = Server::with_limits(gid, limits);
            s.control(GroupEntry::Adopt {
                config: config.clone(),
            });
            servers.insert(format!("{gid}a"), s);
        }
        World {
            clerk: ShardClerk::new(ShardClerkConfig::new(CLIENT, vec![STORE])).unwrap(),
            store,
            servers,
            down: BTreeSet::new(),
            lose_put_replies: 0,
            timers: VecDeque::new(),
            tokens_seen: BTreeSet::new(),
            sent: Vec::new(),
            store_requests: 0,
        }
    }

    fn server(&mut self, gid: Gid) -> &mut Server {
        self.servers.get_mut(&format!("{gid}a")).unwrap()
    }

    /// Carries out `actions` and everything they lead to, without firing timers. Returns the
    /// outcome if the operation finished.
    fn settle(&mut self, actions: Vec<ClientAction>) -> Option<Outcome> {
        let mut queue: VecDeque<ClientAction> = actions.into();
        let mut finished = None;
        while let Some(a) = queue.pop_front() {
            match a {
                ClientAction::Store { server, request } => {
                    assert_eq!(server, STORE);
                    self.store_requests += 1;
                    let reply = self.store.server.handle(&request);
                    queue.extend(self.clerk.on_store_reply(reply));
                }
                ClientAction::Group {
                    gid,
                    server,
                    request,
                } => {
                    // A group that leaves is not in the cached configuration.
                    if let Some(servers) = self.clerk.config().unwrap().groups.get(&gid) {
                        assert_eq!(servers.first(), Some(&server));
                    }
                    self.sent.push((server.clone(), request.clone()));
                    if self.down.contains(&server) {
                        continue;
                    }
                    let is_put = matches!(request.op, KvOp::Put { .. });
                    let replies = self.servers.get_mut(&server).unwrap().handle(request);
                    if is_put && self.lose_put_replies > 0 {
                        self.lose_put_replies -= 1;
                        continue;
                    }
                    for r in replies {
                        queue.extend(self.clerk.on_group_reply(r));
                    }
                }
                ClientAction::SetTimer { token, .. } => {
                    assert!(self.tokens_seen.insert(token), "token {token} set twice");
                    self.timers.push_back(token);
                }
                ClientAction::Finished(o) => {
                    assert!(finished.is_none(), "finished twice");
                    finished = Some(o);
                }
            }
        }
        finished
    }

    /// Fires timers, oldest first, until the operation finishes or `fires` timers fired.
    fn run_timers(&mut self, fires: usize) -> Option<Outcome> {
        for _ in 0..fires {
            let token = self.timers.pop_front()?;
            let actions = self.clerk.on_timer(token);
            if let Some(o) = self.settle(actions) {
                return Some(o);
            }
        }
        None
    }

    /// Runs `op` to its end (timers fire as needed, up to 100).
    fn run(&mut self, op: KvOp) -> Outcome {
        let actions = self.clerk.start(op).unwrap();
        if let Some(o) = self.settle(actions) {
            assert!(!self.clerk.is_busy());
            return o;
        }
        let o = self.run_timers(100).expect("the operation finishes");
        assert!(!self.clerk.is_busy());
        o
    }

    fn done(&mut self, op: KvOp) -> KvResult {
        match self.run(op) {
            Outcome::Done(r) => r,
            Outcome::Maybe => panic!("maybe"),
        }
    }

    /// Moves `shard` from group `from` to group `to` by hand, as the controller will:
    /// publish the configuration, both adopt it, the old owner freezes and exports, the new
    /// owner installs. Returns the new configuration.
    fn migrate(&mut self, shard: u32, from: Gid, to: Gid) -> Config {
        let (next, data) = self.begin_migration(shard, from, to);
        self.server(to).control(GroupEntry::Install {
            shard,
            config: next.num,
            data,
        });
        next
    }

    /// The first half of [`World::migrate`]: everything up to the export; the new owner has
    /// adopted the configuration but not installed the shard. Returns the configuration and
    /// the exported bytes.
    fn begin_migration(&mut self, shard: u32, from: Gid, to: Gid) -> (Config, Vec<u8>) {
        let next = move_shard(self.store.latest.as_ref().unwrap(), shard, to).unwrap();
        self.store.publish(&next);
        let num = next.num;
        for gid in [from, to] {
            self.server(gid).control(GroupEntry::Adopt {
                config: next.clone(),
            });
        }
        self.server(from)
            .control(GroupEntry::Freeze { shard, config: num });
        let data = self.server(from).export(shard, num);
        (next, data)
    }

    /// The requests sent for `shard`: (server, request).
    fn sent_for(&self, shard: u32) -> Vec<(String, ShardRequest)> {
        self.sent
            .iter()
            .filter(|(_, r)| r.shard == shard)
            .cloned()
            .collect()
    }

    fn registrations(&self, shard: u32) -> usize {
        self.sent_for(shard)
            .iter()
            .filter(|(_, r)| r.op == KvOp::Register)
            .map(|(_, r)| r.request)
            .collect::<BTreeSet<_>>()
            .len()
    }
}

fn written(r: &KvResult) -> u64 {
    match r {
        KvResult::Written { version } => *version,
        other => panic!("{other:?}"),
    }
}

/// Puts and gets reach the group that owns each key's shard, and nothing else.
#[test]
fn routes_puts_and_gets_to_the_owner_of_each_shard() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    for shard in 0..SHARDS {
        let key = key_in(shard, 0);
        let value = format!("v{shard}").into_bytes();
        let version = written(&w.done(put(&key, &value)));
        assert_eq!(
            w.done(get(&key)),
            KvResult::Found {
                value: value.clone(),
                version
            }
        );
        // Every request for the shard went to its owner's server, and the owner holds the key.
        let owner = c1.shards[shard as usize];
        for (server, _) in w.sent_for(shard) {
            assert_eq!(server, format!("{owner}a"));
        }
        assert_eq!(
            w.server(owner).value(shard, &key),
            KvResult::Found { value, version }
        );
    }
    // The other group never saw shards it does not own.
    assert!(w.server(1).host.machine().shard(2).is_none());
    assert!(w.server(2).host.machine().shard(0).is_none());
    // One configuration fetch served every operation.
    assert_eq!(w.store_requests, 1);
    assert_eq!(w.clerk.config(), Some(&c1));
}

/// After a shard moved, the old owner answers WrongGroup; the client fetches the newer
/// configuration and the operation succeeds at the new owner, with the migrated session.
#[test]
fn wrong_group_after_a_migration_refetches_and_reaches_the_new_owner() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    let shard = 1;
    let key = key_in(shard, 0);
    let v1 = written(&w.done(put(&key, b"before")));
    let session = w.clerk.session(shard).expect("a session for the shard");

    let c2 = w.migrate(shard, 1, 2);
    assert_eq!(
        w.clerk.config().unwrap().num,
        1,
        "the client does not know yet"
    );
    let fetches = w.store_requests;
    let sent_before = w.sent.len();
    assert_eq!(
        w.done(get(&key)),
        KvResult::Found {
            value: b"before".to_vec(),
            version: v1
        }
    );
    assert_eq!(w.clerk.config(), Some(&c2));
    assert!(w.store_requests > fetches, "it fetched the configuration");
    let route: Vec<String> = w.sent[sent_before..]
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(route, vec!["1a".to_string(), "2a".to_string()]);

    // Writes continue in the session that migrated with the shard: no new registration.
    let v2 = written(&w.done(put(&key, b"after")));
    assert_eq!(v2, v1 + 1);
    assert_eq!(w.clerk.session(shard), Some(session));
    assert_eq!(w.registrations(shard), 1);
    assert_eq!(
        w.server(2).value(shard, &key),
        KvResult::Found {
            value: b"after".to_vec(),
            version: v2
        }
    );
}

/// The at-most-once test: a put applied at the old owner whose reply was lost, retried after
/// its shard migrated, is answered by the new owner from the migrated session table — the
/// same request id and session, the same version, the value not written twice.
#[test]
fn a_put_whose_reply_was_lost_applies_once_across_a_migration() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    let shard = 0;
    let key = key_in(shard, 0);
    w.lose_put_replies = 1;
    let actions = w.clerk.start(put(&key, b"once")).unwrap();
    assert_eq!(w.settle(actions), None, "the answer was lost");
    let KvResult::Found { version, .. } = w.server(1).value(shard, &key) else {
        panic!("the put applied at the old owner");
    };
    assert_eq!(version, 1);
    let (_, first) = w.sent_for(shard).last().unwrap().clone();

    w.migrate(shard, 1, 2);
    let outcome = w.run_timers(100).expect("the retry finishes");
    assert_eq!(outcome, Outcome::Done(KvResult::Written { version }));

    // The resend that reached the new owner is the same request in the same session.
    let (server, last) = w.sent_for(shard).last().unwrap().clone();
    assert_eq!(server, "2a");
    assert_eq!((last.client, last.request), (first.client, first.request));
    assert_eq!(last.op, first.op);
    // The new owner holds the value at the version of the single apply.
    assert_eq!(
        w.server(2).value(shard, &key),
        KvResult::Found {
            value: b"once".to_vec(),
            version
        }
    );
}

/// A shard's first write registers a session with the shard's owner; later writes to that
/// shard reuse it. Every shard gets exactly one registration, and reads need none.
#[test]
fn registers_once_per_shard() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    w.done(get(&key_in(3, 0)));
    assert_eq!(w.registrations(3), 0, "reads need no session");
    for round in 0..3 {
        for shard in 0..SHARDS {
            let key = key_in(shard, round);
            written(&w.done(put(&key, b"x")));
        }
    }
    for shard in 0..SHARDS {
        assert_eq!(w.registrations(shard), 1, "shard {shard}");
        let session = w.clerk.session(shard).unwrap();
        // Every write to the shard carried the shard's session; every read the client id.
        for (_, r) in w.sent_for(shard) {
            match r.op {
                KvOp::Register | KvOp::Get { .. } => assert_eq!(r.client, CLIENT),
                _ => assert_eq!(r.client, session),
            }
        }
    }
}

/// A scan visits every shard (both groups), merges in key order and honours the limit and
/// the range.
#[test]
fn scans_merge_across_shards_in_key_order() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    let mut expected = BTreeMap::new();
    for i in 0..12 {
        let key = format!("s{i:02}").into_bytes();
        let value = format!("value {i}").into_bytes();
        let version = written(&w.done(put(&key, &value)));
        expected.insert(key, (value, version));
    }
    let shards: BTreeSet<u32> = expected.keys().map(|k| shard_of(k, SHARDS)).collect();
    assert!(shards.len() > 2, "the keys span both groups: {shards:?}");
    let items = |from: usize, n: usize| -> Vec<ScanItem> {
        expected
            .iter()
            .skip(from)
            .take(n)
            .map(|(k, (v, ver))| ScanItem {
                key: k.clone(),
                value: v.clone(),
                version: *ver,
            })
            .collect()
    };
    let scan = |start: &str, end: Option<&str>, limit| KvOp::Scan {
        start: start.as_bytes().to_vec(),
        end: end.map(|e| e.as_bytes().to_vec()),
        limit,
    };
    let sent_before = w.sent.len();
    assert_eq!(
        w.done(scan("s", None, 100)),
        KvResult::Scanned {
            items: items(0, 12)
        }
    );
    let parts: BTreeSet<u32> = w.sent[sent_before..].iter().map(|(_, r)| r.shard).collect();
    assert_eq!(parts, (0..SHARDS).collect(), "one part per shard");
    // The limit cuts the merged result (each shard alone could fill it).
    assert_eq!(
        w.done(scan("s", None, 5)),
        KvResult::Scanned { items: items(0, 5) }
    );
    // A range: [s03, s09).
    assert_eq!(
        w.done(scan("s03", Some("s09"), 100)),
        KvResult::Scanned { items: items(3, 6) }
    );
}

/// Servers that cap a scan part below the limit (their `max_scan_items`): the merge must not
/// skip the capped shard's keys past its last answered one, so it stops there; paging on
/// from after the last key returned reads every key once, in order. (Before the cut, a scan
/// of limit 100 against a cap of 2 returned other shards' later keys and lost the capped
/// shards' middle ones.)
#[test]
fn a_capped_shard_part_cuts_the_merge_and_paging_reads_every_key() {
    let c1 = two_groups();
    let limits = Limits {
        max_scan_items: 2,
        ..Limits::default()
    };
    let mut w = World::with_limits(&c1, &[1, 2], limits);
    w.clerk = ShardClerk::new(ShardClerkConfig {
        max_scan_items: 2,
        ..ShardClerkConfig::new(CLIENT, vec![STORE])
    })
    .unwrap();
    let mut expected = Vec::new();
    for i in 0..40 {
        let key = format!("user{}", i * 7919).into_bytes();
        written(&w.done(put(&key, b"v")));
        expected.push(key);
    }
    expected.sort();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut from = b"u".to_vec();
    for round in 0.. {
        assert!(round < 100, "paging does not end: {got:?}");
        let KvResult::Scanned { items } = w.done(KvOp::Scan {
            start: from.clone(),
            end: None,
            limit: 100,
        }) else {
            panic!("not a scan answer");
        };
        let Some(last) = items.last() else { break };
        from = last.key.clone();
        from.push(0);
        got.extend(items.into_iter().map(|i| i.key));
    }
    assert_eq!(got, expected, "every key once, in key order");
}

/// Unsupported operations are refused with a reason; a second operation while one runs is
/// refused.
#[test]
fn refuses_status_register_leases_and_a_second_operation() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    for op in [
        KvOp::Status,
        KvOp::Register,
        KvOp::LeaseGrant { ttl_ms: 5000 },
        KvOp::PutLease {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expected: Expected::Any,
            lease: 1,
        },
    ] {
        let e = w.clerk.start(op.clone()).unwrap_err();
        assert!(matches!(e, ClientError::Unsupported(_)), "{op:?}");
        assert!(!e.to_string().is_empty());
    }
    assert!(!w.clerk.is_busy());
    let _ = w.clerk.start(get(b"a")).unwrap();
    assert_eq!(w.clerk.start(get(b"b")), Err(ClientError::Busy));
    assert!(ShardClerk::new(ShardClerkConfig::new(1, vec![])).is_err());
}

/// A group whose servers do not answer: the client keeps retrying it (and refetching the
/// configuration) and never finishes; once the group is back the operation completes.
#[test]
fn a_silent_group_is_retried_until_it_comes_back() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    let key = key_in(0, 0);
    written(&w.done(put(&key, b"v")));
    w.down.insert("1a".into());
    let fetches = w.store_requests;
    let actions = w.clerk.start(get(&key)).unwrap();
    assert_eq!(w.settle(actions), None);
    assert_eq!(w.run_timers(40), None, "no answer, no outcome");
    assert!(w.clerk.is_busy());
    let tries = w
        .sent_for(0)
        .iter()
        .filter(|(s, r)| s == "1a" && r.op == get(&key))
        .count();
    assert!(tries >= 3, "resent {tries} times");
    assert!(
        w.store_requests >= fetches + 2,
        "refetched the configuration"
    );
    w.down.clear();
    let o = w.run_timers(100).expect("finishes once the group answers");
    assert!(matches!(o, Outcome::Done(KvResult::Found { .. })), "{o:?}");
}

/// Configuration 0 (no group has joined): the client waits and refetches, sending nothing to
/// any group, until a configuration with owners appears.
#[test]
fn waits_while_no_group_has_joined() {
    let c0 = Config::empty(SHARDS).unwrap();
    let mut w = World::new(&c0, &[]);
    let key = key_in(2, 0);
    let actions = w.clerk.start(put(&key, b"v")).unwrap();
    assert_eq!(w.settle(actions), None);
    assert_eq!(w.run_timers(30), None);
    assert!(w.sent.is_empty(), "nothing sent without an owner");
    assert!(w.store_requests >= 3, "it keeps refetching");
    assert_eq!(w.clerk.config().map(|c| c.num), Some(0));

    let c1 = two_groups();
    w.store.publish(&c1);
    for gid in [1, 2] {
        let mut s = Server::new(gid);
        s.control(GroupEntry::Adopt { config: c1.clone() });
        w.servers.insert(format!("{gid}a"), s);
    }
    let o = w.run_timers(100).expect("finishes once groups joined");
    assert_eq!(o, Outcome::Done(KvResult::Written { version: 1 }));
    assert_eq!(
        w.server(2).value(2, &key),
        KvResult::Found {
            value: b"v".to_vec(),
            version: 1
        }
    );
}

// ---- Answered by hand: one group of three servers with no host behind them. ----

/// A store holding a configuration where group 1 (`1a`, `1b`, `1c`: Raft ids 1, 2, 3) owns
/// every shard, and a client that has fetched it.
fn hand_world() -> (ShardClerk, SingleServer) {
    let c1 = join(
        &Config::empty(SHARDS).unwrap(),
        &BTreeMap::from([(1, vec!["1a".into(), "1b".into(), "1c".into()])]),
    )
    .unwrap();
    let mut store = Store::new();
    store.publish(&c1);
    let clerk = ShardClerk::new(ShardClerkConfig::new(CLIENT, vec![STORE])).unwrap();
    (clerk, store.server)
}

/// Answers the store's requests in `actions` until none is left; returns the other actions.
fn through_store(
    clerk: &mut ShardClerk,
    store: &mut SingleServer,
    actions: Vec<ClientAction>,
) -> Vec<ClientAction> {
    let mut queue: VecDeque<_> = actions.into();
    let mut rest = Vec::new();
    while let Some(a) = queue.pop_front() {
        match a {
            ClientAction::Store { request, .. } => {
                let reply = store.handle(&request);
                queue.extend(clerk.on_store_reply(reply));
            }
            ClientAction::SetTimer { token, .. } if token & OWN_TIMER_BIT == 0 => {}
            other => rest.push(other),
        }
    }
    rest
}

fn group_send(actions: &[ClientAction]) -> (String, ShardRequest) {
    actions
        .iter()
        .find_map(|a| match a {
            ClientAction::Group {
                server, request, ..
            } => Some((server.clone(), request.clone())),
            _ => None,
        })
        .expect("a group request")
}

fn own_timer(actions: &[ClientAction]) -> u64 {
    actions
        .iter()
        .find_map(|a| match a {
            ClientAction::SetTimer { token, .. } => Some(*token),
            _ => None,
        })
        .expect("a timer")
}

fn done(request: &ShardRequest, result: KvResult) -> ShardReply {
    ShardReply::Done {
        client: request.client,
        request: request.request,
        result,
    }
}

/// Opens the shard's session: answers the registration in `actions`, returns the write's
/// actions.
fn register(clerk: &mut ShardClerk, actions: &[ClientAction], session: u64) -> Vec<ClientAction> {
    let (_, reg) = group_send(actions);
    assert_eq!((reg.client, &reg.op), (CLIENT, &KvOp::Register));
    clerk.on_group_reply(done(&reg, KvResult::Registered { session }))
}

/// WrongLeader hints (Raft ids) are followed, a reply without a hint rotates, and the leader
/// found is tried first by the next operation.
#[test]
fn follows_leader_hints() {
    let (mut c, mut store) = hand_world();
    let a = c.start(get(b"k")).unwrap();
    let a = through_store(&mut c, &mut store, a);
    let (server, req) = group_send(&a);
    assert_eq!(server, "1a");
    let wrong = |leader| ShardReply::WrongLeader {
        client: req.client,
        request: req.request,
        leader,
    };
    let a = c.on_group_reply(wrong(Some(3)));
    let (server, again) = group_send(&a);
    assert_eq!(server, "1c");
    assert_eq!(again.request, req.request, "the same request");
    // No hint: the next server in the list (after 1c: 1a).
    let a = c.on_group_reply(wrong(None));
    assert_eq!(group_send(&a).0, "1a");
    let a = c.on_group_reply(wrong(Some(2)));
    assert_eq!(group_send(&a).0, "1b");
    let a = c.on_group_reply(done(&req, KvResult::NoKey));
    assert_eq!(
        a,
        vec![ClientAction::Finished(Outcome::Done(KvResult::NoKey))]
    );
    // The next operation starts at the leader found.
    let a = c.start(get(b"other")).unwrap();
    assert_eq!(group_send(&a).0, "1b");
}

/// The clerk's maybe rule: a conditional put resent after a timeout and answered
/// VersionMismatch may have applied on the first send: Maybe. Answered on its first send, the
/// mismatch is the answer.
#[test]
fn a_resent_conditional_put_answered_mismatch_is_maybe() {
    let (mut c, mut store) = hand_world();
    let cas = KvOp::Put {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        expected: Expected::Version(0),
    };
    let a = c.start(cas.clone()).unwrap();
    let a = through_store(&mut c, &mut store, a);
    let a = register(&mut c, &a, 5);
    let (server, first) = group_send(&a);
    assert_eq!((server.as_str(), first.client), ("1a", 5));
    // Timeout: resent to the next server, same session and request id.
    let a = c.on_timer(own_timer(&a));
    let (server, again) = group_send(&a);
    assert_eq!(server, "1b");
    assert_eq!((again.client, again.request), (first.client, first.request));
    let a = c.on_group_reply(done(&again, KvResult::VersionMismatch));
    assert_eq!(a, vec![ClientAction::Finished(Outcome::Maybe)]);

    // First send answered mismatch: a real mismatch (the session is reused, no registration).
    let a = c.start(cas).unwrap();
    let (_, req) = group_send(&a);
    assert_eq!(req.client, 5);
    let a = c.on_group_reply(done(&req, KvResult::VersionMismatch));
    assert_eq!(
        a,
        vec![ClientAction::Finished(Outcome::Done(
            KvResult::VersionMismatch
        ))]
    );
}

/// SessionExpired: Maybe, the shard's session is forgotten, and the next write to the shard
/// registers again.
#[test]
fn session_expired_is_maybe_and_registers_again() {
    let (mut c, mut store) = hand_world();
    let shard = shard_of(b"k", SHARDS);
    let a = c.start(put(b"k", b"v")).unwrap();
    let a = through_store(&mut c, &mut store, a);
    let a = register(&mut c, &a, 8);
    assert_eq!(c.session(shard), Some(8));
    let (_, req) = group_send(&a);
    let a = c.on_group_reply(done(&req, KvResult::SessionExpired));
    assert_eq!(a, vec![ClientAction::Finished(Outcome::Maybe)]);
    assert_eq!(c.session(shard), None);
    let a = c.start(put(b"k", b"v")).unwrap();
    let (_, reg) = group_send(&a);
    assert_eq!(reg.op, KvOp::Register);
    assert!(reg.request > req.request, "request ids only grow");
}

/// Answers to an older request, or to someone else, are ignored; the client's own timers are
/// told apart from the store clerk's.
#[test]
fn stale_answers_and_foreign_timers_are_ignored() {
    let (mut c, mut store) = hand_world();
    let a = c.start(get(b"k")).unwrap();
    let a = through_store(&mut c, &mut store, a);
    let (_, req) = group_send(&a);
    let token = own_timer(&a);
    assert_ne!(token & OWN_TIMER_BIT, 0);
    let stale = ShardReply::Done {
        client: req.client,
        request: req.request + 100,
        result: KvResult::NoKey,
    };
    assert!(c.on_group_reply(stale).is_empty());
    assert!(c.on_timer(token + 1000).is_empty());
    let a = c.on_group_reply(done(&req, KvResult::NoKey));
    assert_eq!(a.len(), 1);
    // The finished operation's retry timer is void.
    assert!(c.on_timer(token).is_empty());
    assert!(!c.is_busy());
}

/// A scan routed by a stale configuration: the part of the shard that moved is answered
/// WrongGroup by its old owner, rerouted after a refetch, and the merged result is complete.
#[test]
fn a_scan_reroutes_the_part_of_a_shard_that_moved() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    let mut expected = Vec::new();
    for shard in 0..SHARDS {
        for nth in 0..2 {
            let key = key_in(shard, nth);
            let version = written(&w.done(put(&key, b"x")));
            expected.push(ScanItem {
                key,
                value: b"x".to_vec(),
                version,
            });
        }
    }
    expected.sort_by(|a, b| a.key.cmp(&b.key));
    w.migrate(3, 2, 1);
    let sent_before = w.sent.len();
    assert_eq!(
        w.done(KvOp::Scan {
            start: Vec::new(),
            end: None,
            limit: 100
        }),
        KvResult::Scanned { items: expected }
    );
    let shard3: Vec<String> = w.sent[sent_before..]
        .iter()
        .filter(|(_, r)| r.shard == 3)
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(shard3, vec!["2a".to_string(), "1a".to_string()]);
    assert_eq!(w.clerk.config().unwrap().shards, vec![1, 1, 2, 1]);
}

/// Mid-migration: the new owner adopted the configuration but waits for the Install, so both
/// groups answer WrongGroup and the store has nothing newer. The client pauses and retries
/// (no outcome) and succeeds once the shard is installed.
#[test]
fn waits_while_its_shard_is_mid_migration() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    let shard = 1;
    let key = key_in(shard, 0);
    let version = written(&w.done(put(&key, b"v")));
    let (c2, data) = w.begin_migration(shard, 1, 2);
    let actions = w.clerk.start(get(&key)).unwrap();
    assert_eq!(w.settle(actions), None);
    assert_eq!(w.run_timers(30), None, "nobody serves the shard yet");
    assert_eq!(w.clerk.config(), Some(&c2));
    let at_new_owner = w
        .sent_for(shard)
        .iter()
        .filter(|(s, r)| s == "2a" && r.op == get(&key))
        .count();
    assert!(
        at_new_owner >= 2,
        "retried the new owner {at_new_owner} times"
    );
    w.server(2).control(GroupEntry::Install {
        shard,
        config: c2.num,
        data,
    });
    assert_eq!(
        w.run_timers(100),
        Some(Outcome::Done(KvResult::Found {
            value: b"v".to_vec(),
            version
        }))
    );
}

/// A failed connection to the server a request waits on resends it to the next server at
/// once (same request id); another server's failure changes nothing.
#[test]
fn a_lost_connection_moves_on_at_once() {
    let (mut c, mut store) = hand_world();
    let a = c.start(get(b"k")).unwrap();
    let a = through_store(&mut c, &mut store, a);
    let (server, req) = group_send(&a);
    assert_eq!(server, "1a");
    let old_timer = own_timer(&a);
    assert!(c.on_group_unreachable(1, "1c").is_empty());
    assert!(c.on_group_unreachable(2, "1a").is_empty());
    let a = c.on_group_unreachable(1, "1a");
    let (server, again) = group_send(&a);
    assert_eq!(server, "1b");
    assert_eq!((again.client, again.request), (req.client, req.request));
    assert!(
        c.on_timer(old_timer).is_empty(),
        "the failed send's timer is void"
    );
    let a = c.on_group_reply(done(&again, KvResult::NoKey));
    assert_eq!(
        a,
        vec![ClientAction::Finished(Outcome::Done(KvResult::NoKey))]
    );
    assert!(
        c.on_group_unreachable(1, "1b").is_empty(),
        "idle: nothing to do"
    );
}

/// A shard that the latest record (incomplete) moves is copied while it still serves at its
/// previous owner: the client sends it there until that owner answers WrongGroup at the new
/// configuration, then to the new owner. Without that rule the put below waits at the new
/// owner (which has not even adopted the move) for ever.
#[test]
fn a_shard_moving_is_sent_to_its_previous_owner_until_it_adopts_the_move() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    let shard = 1;
    let key = key_in(shard, 0);
    written(&w.done(put(&key, b"before")));
    // Configuration 2 moves the shard to group 2; recorded, not complete, adopted by nobody.
    let c2 = move_shard(&c1, shard, 2).unwrap();
    w.store.publish_record(&c2, false);
    // A client that did not know configuration 1 (its timer tokens start afresh).
    w.clerk = ShardClerk::new(ShardClerkConfig::new(CLIENT + 1, vec![STORE])).unwrap();
    w.tokens_seen.clear();
    w.timers.clear();
    let sent_before = w.sent.len();
    let v = written(&w.done(put(&key, b"while copied")));
    assert_eq!(w.clerk.config(), Some(&c2));
    assert!(
        w.sent[sent_before..].iter().all(|(s, _)| s == "1a"),
        "served by the previous owner: {:?}",
        &w.sent[sent_before..]
    );
    // The cut-over: both adopt 2, the old owner freezes, the new one installs.
    for gid in [1, 2] {
        w.server(gid)
            .control(GroupEntry::Adopt { config: c2.clone() });
    }
    w.server(1).control(GroupEntry::Freeze { shard, config: 2 });
    let data = w.server(1).export(shard, 2);
    w.server(2).control(GroupEntry::Install {
        shard,
        config: 2,
        data,
    });
    let sent_before = w.sent.len();
    assert_eq!(
        w.done(get(&key)),
        KvResult::Found {
            value: b"while copied".to_vec(),
            version: v
        }
    );
    let route: Vec<String> = w.sent[sent_before..]
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(route, vec!["1a".to_string(), "2a".to_string()]);
    // From then on, straight to the new owner.
    let sent_before = w.sent.len();
    w.done(get(&key));
    assert!(w.sent[sent_before..].iter().all(|(s, _)| s == "2a"));
}

/// The same when the move is a group leaving: a client that knew no configuration before the
/// incomplete one cannot find the leaving group's servers in it, so it reads the previous
/// configuration from the history and sends the shard to the leaving group while it still
/// serves it. Without that, the put below waits at the new owner for ever.
#[test]
fn a_shard_of_a_leaving_group_is_sent_there_until_it_adopts_the_move() {
    let c1 = two_groups();
    let mut w = World::new(&c1, &[1, 2]);
    let shard = 2;
    let key = key_in(shard, 0);
    written(&w.done(put(&key, b"before")));
    // Configuration 2: group 2 leaves; recorded, not complete, adopted by nobody.
    let c2 = leave(&c1, &[2]).unwrap();
    assert!(!c2.groups.contains_key(&2));
    w.store.publish_record(&c2, false);
    // A client that knew no configuration at all.
    w.clerk = ShardClerk::new(ShardClerkConfig::new(CLIENT + 1, vec![STORE])).unwrap();
    w.tokens_seen.clear();
    w.timers.clear();
    let sent_before = w.sent.len();
    let v = written(&w.done(put(&key, b"while copied")));
    assert_eq!(w.clerk.config(), Some(&c2));
    assert!(
        w.sent[sent_before..].iter().all(|(s, _)| s == "2a"),
        "served by the leaving group: {:?}",
        &w.sent[sent_before..]
    );
    // The cut-over: both adopt 2, the leaving group freezes, group 1 installs.
    for gid in [1, 2] {
        w.server(gid)
            .control(GroupEntry::Adopt { config: c2.clone() });
    }
    w.server(2).control(GroupEntry::Freeze { shard, config: 2 });
    let data = w.server(2).export(shard, 2);
    w.server(1).control(GroupEntry::Install {
        shard,
        config: 2,
        data,
    });
    let sent_before = w.sent.len();
    assert_eq!(
        w.done(get(&key)),
        KvResult::Found {
            value: b"while copied".to_vec(),
            version: v
        }
    );
    let route: Vec<String> = w.sent[sent_before..]
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(route, vec!["2a".to_string(), "1a".to_string()]);
}
