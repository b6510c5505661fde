//! The shard-controller scenarios of the lab (SCENARIOS.md: Lab 5A, shardcfg/TestBasic, and the
//! older shardctrler's TestBasic, TestMulti and TestMinimalAgain) that are about the model,
//! run against [`History`] and the pure operations. The lab's replication of the controller
//! (servers shut down between queries) is not here: it belongs to the controller's store.

use std::collections::BTreeMap;

use shoal_shard::{diff, Config, Error, Gid, History, Op, DEFAULT_SHARDS, NO_GROUP};

/// The old shardctrler's `NShards`.
const NSHARDS: u32 = 10;
/// shardkv1's (Lab 5) and its shardcfg's `NShards`.
const LAB5_SHARDS: u32 = 12;

fn group(gid: Gid, servers: &[&str]) -> BTreeMap<Gid, Vec<String>> {
    BTreeMap::from([(gid, servers.iter().map(|s| s.to_string()).collect())])
}

fn groups(gids: &[Gid]) -> BTreeMap<Gid, Vec<String>> {
    gids.iter()
        .map(|&g| (g, vec![format!("{g}a"), format!("{g}b"), format!("{g}c")]))
        .collect()
}

/// The lab's `check`: exactly the expected groups, every shard owned by one of them (when
/// there are any), and no group more than one shard above another.
fn check(c: &Config, expected: &[Gid]) {
    let members: Vec<Gid> = c.groups.keys().copied().collect();
    let mut want = expected.to_vec();
    want.sort_unstable();
    assert_eq!(members, want, "groups of configuration {}", c.num);
    for (s, g) in c.shards.iter().enumerate() {
        if expected.is_empty() {
            assert_eq!(*g, NO_GROUP, "shard {s} owned without groups");
        } else {
            assert!(c.groups.contains_key(g), "shard {s} -> invalid group {g}");
        }
    }
    let counts = c.counts();
    if let (Some(min), Some(max)) = (counts.values().min(), counts.values().max()) {
        assert!(
            max <= &(min + 1),
            "max {max} too much larger than min {min}: {:?}",
            c.shards
        );
    }
    c.check().unwrap();
}

fn join(h: &mut History, g: BTreeMap<Gid, Vec<String>>) -> Config {
    let before = h.latest().num;
    let c = h.apply(&Op::Join(g)).unwrap().clone();
    assert_eq!(c.num, before + 1);
    c
}

fn leave(h: &mut History, gids: &[Gid]) -> Config {
    let before = h.latest().num;
    let c = h.apply(&Op::Leave(gids.to_vec())).unwrap().clone();
    assert_eq!(c.num, before + 1);
    c
}

/// TestInitQuery5A: the first configuration is number 1, gives every shard (shard 0
/// included) to group 1 and is balanced.
#[test]
fn init_query() {
    let mut h = History::new(NSHARDS).unwrap();
    check(h.latest(), &[]);
    let c1 = join(&mut h, group(1, &["s1"]));
    assert_eq!(c1.num, 1);
    assert_eq!(c1.shards[0], 1);
    check(&c1, &[1]);
    assert_eq!(h.query(1).unwrap(), &c1);
    assert_eq!(h.latest(), &c1);
}

/// TestJoinBasic5A: joining group 2 raises the number by one and makes 2 a member.
#[test]
fn join_basic() {
    let mut h = History::new(NSHARDS).unwrap();
    join(&mut h, group(1, &["s1"]));
    let c2 = join(&mut h, group(2, &["s2"]));
    assert_eq!(c2.num, 2);
    check(&c2, &[1, 2]);
    assert_eq!(c2.shards_of(2).len(), 5);
}

/// TestJoinLeaveBasic5A: join 2, leave 1 (group 2 owns everything), rejoin 1.
#[test]
fn join_leave_basic() {
    let mut h = History::new(NSHARDS).unwrap();
    join(&mut h, group(1, &["s1"]));
    join(&mut h, group(2, &["s2"]));
    let c3 = leave(&mut h, &[1]);
    check(&c3, &[2]);
    assert_eq!(c3.shards, vec![2; NSHARDS as usize]);
    let c4 = join(&mut h, group(1, &["s1"]));
    check(&c4, &[1, 2]);
}

/// shardcfg/TestBasic and the old TestBasic "Basic leave/join": the servers given at Join are
/// kept, in order; Leave rebalances. Unlike the 2025 shardcfg, leaving the last group is
/// refused (every shard needs an owner) and leaves no new configuration.
#[test]
fn basic_leave_join_keeps_servers() {
    let mut h = History::new(NSHARDS).unwrap();
    join(&mut h, group(1, &["x", "y", "z"]));
    check(h.latest(), &[1]);
    join(&mut h, group(2, &["a", "b", "c"]));
    check(h.latest(), &[1, 2]);
    assert_eq!(h.latest().groups[&1], vec!["x", "y", "z"]);
    assert_eq!(h.latest().groups[&2], vec!["a", "b", "c"]);
    leave(&mut h, &[1]);
    check(h.latest(), &[2]);
    assert_eq!(h.apply(&Op::Leave(vec![2])), Err(Error::LastGroup));
    assert_eq!(h.latest().num, 3);
    check(h.latest(), &[2]);
}

/// shardcfg/TestBasic (2025) at its own 12 shards: join 1 (servers x, y, z), join 2 (a, b, c):
/// balanced 6/6 with the fewest moves (6, all to group 2), servers kept in order; leave 1:
/// every shard at 2 (only group 1's moved); leaving the last group is refused (the lab's
/// config would be left empty; ours keeps every shard owned) and writes nothing; every
/// configuration stays queryable.
#[test]
fn shardcfg_basic_at_the_labs_twelve_shards() {
    let mut h = History::new(LAB5_SHARDS).unwrap();
    check(h.latest(), &[]);
    let c1 = join(&mut h, group(1, &["x", "y", "z"]));
    check(&c1, &[1]);
    assert_eq!(c1.shards, vec![1; LAB5_SHARDS as usize]);
    let c2 = join(&mut h, group(2, &["a", "b", "c"]));
    check(&c2, &[1, 2]);
    let moves = diff(&c1, &c2).unwrap();
    assert_eq!(moves.len(), 6);
    assert!(moves.iter().all(|m| m.from == 1 && m.to == 2));
    assert_eq!(c2.groups[&1], vec!["x", "y", "z"]);
    assert_eq!(c2.groups[&2], vec!["a", "b", "c"]);
    let c3 = leave(&mut h, &[1]);
    check(&c3, &[2]);
    let moves = diff(&c2, &c3).unwrap();
    assert_eq!(moves.len(), 6);
    assert!(moves.iter().all(|m| m.from == 1 && m.to == 2));
    assert_eq!(h.apply(&Op::Leave(vec![2])), Err(Error::LastGroup));
    assert_eq!(h.latest(), &c3);
    for c in [&c1, &c2, &c3] {
        assert_eq!(h.query(c.num).unwrap(), c);
    }
}

/// The old TestBasic "Historical queries": every configuration stays queryable, unchanged, by
/// its number, after later changes.
#[test]
fn historical_queries() {
    let mut h = History::new(NSHARDS).unwrap();
    let mut seen = vec![h.latest().clone()];
    seen.push(join(&mut h, group(1, &["x", "y", "z"])));
    seen.push(join(&mut h, group(2, &["a", "b", "c"])));
    seen.push(h.apply(&Op::Move { shard: 3, gid: 2 }).unwrap().clone());
    seen.push(leave(&mut h, &[1]));
    seen.push(join(&mut h, groups(&[7, 8])));
    for c in &seen {
        assert_eq!(h.query(c.num).unwrap(), c);
    }
    let nums: Vec<u64> = h.iter().map(|c| c.num).collect();
    assert_eq!(nums, (0..=5).collect::<Vec<_>>());
    assert_eq!(
        h.query(6),
        Err(Error::UnknownConfig {
            asked: 6,
            latest: 5
        })
    );
}

/// The old TestBasic "Move": shards 0..5 moved to 503 and 5..10 to 504, one Move each, each
/// Move raising the number; then both leave.
#[test]
fn move_shards() {
    let mut h = History::new(NSHARDS).unwrap();
    join(&mut h, groups(&[1, 2]));
    join(&mut h, group(503, &["3a", "3b", "3c"]));
    join(&mut h, group(504, &["4a", "4b", "4c"]));
    for i in 0..NSHARDS {
        let before = h.latest().clone();
        let gid = if i < NSHARDS / 2 { 503 } else { 504 };
        let after = h.apply(&Op::Move { shard: i, gid }).unwrap().clone();
        assert_eq!(after.num, before.num + 1, "Move should increase Config.Num");
        let moves = diff(&before, &after).unwrap();
        if before.shards[i as usize] == gid {
            assert!(moves.is_empty());
        } else {
            assert_eq!(
                moves,
                vec![shoal_shard::ShardMove {
                    shard: i,
                    from: before.shards[i as usize],
                    to: gid
                }]
            );
        }
        assert_eq!(after.groups, before.groups);
    }
    for i in 0..NSHARDS {
        let want = if i < NSHARDS / 2 { 503 } else { 504 };
        assert_eq!(h.latest().shards[i as usize], want, "shard {i}");
    }
    // Groups 1 and 2 now own nothing: the configuration is not balanced until the next
    // Join or Leave, which rebalances.
    assert!(!h.latest().is_balanced());
    leave(&mut h, &[503]);
    check(h.latest(), &[1, 2, 504]);
    leave(&mut h, &[504]);
    check(h.latest(), &[1, 2]);
    // Errors: unknown shard, non-member, and no new configuration.
    let num = h.latest().num;
    let err = h.apply(&Op::Move {
        shard: NSHARDS,
        gid: 1,
    });
    assert_eq!(
        err,
        Err(Error::UnknownShard {
            shard: NSHARDS,
            shards: NSHARDS
        })
    );
    assert_eq!(
        h.apply(&Op::Move { shard: 0, gid: 503 }),
        Err(Error::NotMember(503))
    );
    assert_eq!(h.latest().num, num);
}

/// The old TestBasic "Concurrent leave/join", serialised as the controller's log would: 10
/// clients each join gid+1000, join gid, leave gid+1000, interleaved round-robin; balance is
/// checked after every step and the final members are the 10 gids.
#[test]
fn concurrent_leave_join() {
    let mut h = History::new(NSHARDS).unwrap();
    let gids: Vec<Gid> = (0..10).map(|i| i * 10 + 100).collect();
    let mut members: Vec<Gid> = Vec::new();
    for step in 0..3 {
        for &gid in &gids {
            match step {
                0 => {
                    join(&mut h, group(gid + 1000, &[&format!("s{gid}a")]));
                    members.push(gid + 1000);
                }
                1 => {
                    join(&mut h, group(gid, &[&format!("s{gid}b")]));
                    members.push(gid);
                }
                _ => {
                    leave(&mut h, &[gid + 1000]);
                    members.retain(|&g| g != gid + 1000);
                }
            }
            check(h.latest(), &members);
        }
    }
    check(h.latest(), &gids);
    assert_eq!(h.latest().num, 30);
}

/// The old TestMulti "Concurrent multi leave/join": 10 clients each join three groups in one
/// Join, then leave two of them in one Leave.
#[test]
fn concurrent_multi_leave_join() {
    let mut h = History::new(NSHARDS).unwrap();
    let gids: Vec<Gid> = (0..10).map(|i| i + 1).collect();
    let mut members: Vec<Gid> = Vec::new();
    for &gid in &gids {
        join(&mut h, groups(&[gid, gid + 1000, gid + 2000]));
        members.extend([gid, gid + 1000, gid + 2000]);
        check(h.latest(), &members);
    }
    for &gid in &gids {
        leave(&mut h, &[gid + 1000, gid + 2000]);
        members.retain(|&g| g != gid + 1000 && g != gid + 2000);
        check(h.latest(), &members);
    }
    check(h.latest(), &gids);
}

/// Shards that `gid` owns in `new` but did not own in `old` (shards it gained).
fn gained(old: &Config, new: &Config, gid: Gid) -> usize {
    (0..old.shards.len())
        .filter(|&s| new.shards[s] == gid && old.shards[s] != gid)
        .count()
}

/// The old TestBasic "Minimal transfers after joins" / "after leaves" (one group per call), as
/// the lab meant it: after joins, a group present before gained no shard (shards only flow to
/// the new groups); after the new groups leave, a group that stayed lost no shard (shards only
/// flow from the leaving ones). Also the exact move counts.
#[test]
fn minimal_transfers_after_joins_and_leaves() {
    let mut h = History::new(NSHARDS).unwrap();
    let old: Vec<Gid> = (0..10).map(|i| i * 10 + 100).collect();
    for &g in &old {
        join(&mut h, groups(&[g]));
    }
    let c1 = h.latest().clone();
    for i in 0..5 {
        join(&mut h, groups(&[11 + i]));
    }
    let c2 = h.latest().clone();
    check(&c2, &[old.clone(), (11..16).collect()].concat());
    for &g in &old {
        assert_eq!(
            gained(&c1, &c2, g),
            0,
            "non-minimal transfer after Join()s to {g}"
        );
    }
    // 10 groups of 1 shard → 15 groups: 5 own none; no shard needs to move.
    assert!(diff(&c1, &c2).unwrap().is_empty());
    for i in 0..5 {
        leave(&mut h, &[11 + i]);
    }
    let c3 = h.latest().clone();
    check(&c3, &old);
    for &g in &old {
        for s in c2.shards_of(g) {
            assert_eq!(
                c3.shards[s as usize], g,
                "non-minimal transfer after Leave()s of {g}"
            );
        }
    }
    assert_eq!(diff(&c2, &c3).unwrap().len(), 0);

    // The same with groups that do own shards before: 3 groups on 10 shards, join 2 more.
    let mut h = History::new(NSHARDS).unwrap();
    join(&mut h, groups(&[1, 2, 3]));
    let c1 = h.latest().clone();
    for g in [4, 5] {
        join(&mut h, groups(&[g]));
    }
    let c2 = h.latest().clone();
    check(&c2, &[1, 2, 3, 4, 5]);
    for g in [1, 2, 3] {
        assert_eq!(gained(&c1, &c2, g), 0, "group {g} gained a shard on join");
    }
    // 4/3/3 → 2 each: 2 + 1 + 1 shards go.
    assert_eq!(diff(&c1, &c2).unwrap().len(), 4);
    for g in [4, 5] {
        leave(&mut h, &[g]);
    }
    let c3 = h.latest().clone();
    check(&c3, &[1, 2, 3]);
    for g in [1, 2, 3] {
        for s in c2.shards_of(g) {
            assert_eq!(
                c3.shards[s as usize], g,
                "group {g} lost shard {s} on leave"
            );
        }
    }
    assert_eq!(diff(&c2, &c3).unwrap().len(), 4);
}

/// The old TestMulti "Minimal transfers after multijoins" / "after multileaves": the same with
/// all 5 groups in one Join and one Leave.
#[test]
fn minimal_transfers_after_multijoins_and_multileaves() {
    let mut h = History::new(NSHARDS).unwrap();
    join(&mut h, groups(&[1, 2, 3]));
    let c1 = h.latest().clone();
    let c2 = join(&mut h, groups(&[4, 5, 6, 7, 8]));
    check(&c2, &[1, 2, 3, 4, 5, 6, 7, 8]);
    for g in [1, 2, 3] {
        assert_eq!(
            gained(&c1, &c2, g),
            0,
            "non-minimal transfer after multijoin to {g}"
        );
    }
    // 4/3/3 → 8 groups (2,2,1,1,1,1,1,1): group 1 keeps 2, 2 and 3 keep 2 or 1.
    let lower_bound = 10 - (2 + 2 + 1);
    assert_eq!(diff(&c1, &c2).unwrap().len(), lower_bound);
    let c3 = leave(&mut h, &[4, 5, 6, 7, 8]);
    check(&c3, &[1, 2, 3]);
    for g in [1, 2, 3] {
        for s in c2.shards_of(g) {
            assert_eq!(
                c3.shards[s as usize], g,
                "non-minimal transfer after multileave of {g}"
            );
        }
    }
    assert_eq!(diff(&c2, &c3).unwrap().len(), 5);
}

/// TestMinimalAgain (2024): from two groups, a third joins; at most NShards/3 + 1 = 4 shards
/// move (here exactly 3: 5/5 → 4/3/3).
#[test]
fn minimal_again() {
    let mut h = History::new(NSHARDS).unwrap();
    join(&mut h, groups(&[1]));
    let before = join(&mut h, groups(&[2]));
    let after = join(&mut h, groups(&[3]));
    let moves = diff(&before, &after).unwrap();
    assert!(moves.len() as u32 <= NSHARDS / 3 + 1);
    assert_eq!(moves.len(), 3);
    assert!(moves.iter().all(|m| m.to == 3));
}

/// TestManyJoinLeave5A: 8 groups join one by one after group 1, then leave one by one; the
/// configuration is balanced after every change, and every change moves the fewest shards
/// (a join of the k-th group takes exactly ⌊n/k⌋ shards, a leave moves only the leaver's); at
/// the old lab's 10 shards, Lab 5's 12 and our default 128.
#[test]
fn many_join_leave() {
    for shards in [NSHARDS, LAB5_SHARDS, DEFAULT_SHARDS] {
        let mut h = History::new(shards).unwrap();
        join(&mut h, groups(&[1]));
        let mut members = vec![1];
        for g in 2..=9 {
            let before = h.latest().clone();
            let after = join(&mut h, groups(&[g]));
            members.push(g);
            check(&after, &members);
            let k = members.len() as u32;
            let moves = diff(&before, &after).unwrap();
            assert_eq!(
                moves.len() as u32,
                shards / k,
                "join of group {g} ({shards} shards)"
            );
            assert!(moves.iter().all(|m| m.to == g));
        }
        for g in 2..=9 {
            let before = h.latest().clone();
            let after = leave(&mut h, &[g]);
            members.retain(|&m| m != g);
            check(&after, &members);
            let moves = diff(&before, &after).unwrap();
            assert_eq!(moves.len(), before.shards_of(g).len(), "leave of group {g}");
            assert!(moves.iter().all(|m| m.from == g));
        }
        assert_eq!(h.latest().shards, vec![1; shards as usize]);
    }
}

/// TestProgressJoin5A, the model's part: while 4 groups join, another gid joins and leaves
/// between each of them; every change is balanced and moves the fewest shards, so shards
/// not involved keep their owner (the groups keep serving them).
#[test]
fn progress_join_with_background_join_leave() {
    let mut h = History::new(DEFAULT_SHARDS).unwrap();
    join(&mut h, groups(&[1]));
    let mut members = vec![1];
    for g in 2..=5 {
        join(&mut h, groups(&[100]));
        leave(&mut h, &[100]);
        let before = h.latest().clone();
        let after = join(&mut h, groups(&[g]));
        members.push(g);
        check(&after, &members);
        for m in diff(&before, &after).unwrap() {
            assert_eq!(m.to, g, "a shard moved between old groups: {m:?}");
        }
    }
}

/// More groups than shards: with 10 shards and 25 groups, 10 groups own one shard and 15 own
/// none (balanced: max 1, min 0); leaving groups that own a shard moves exactly their
/// shards, to groups that owned none; joining more groups moves nothing.
#[test]
fn many_groups() {
    let mut h = History::new(NSHARDS).unwrap();
    let all: Vec<Gid> = (1..=25).collect();
    let c1 = join(&mut h, groups(&all));
    check(&c1, &all);
    let counts = c1.counts();
    assert_eq!(counts.values().filter(|&&c| c == 1).count(), 10);
    assert_eq!(counts.values().filter(|&&c| c == 0).count(), 15);
    let owners: Vec<Gid> = c1.shards.clone();
    let c2 = leave(&mut h, &owners[..4]);
    let rest: Vec<Gid> = all
        .iter()
        .copied()
        .filter(|g| !owners[..4].contains(g))
        .collect();
    check(&c2, &rest);
    let moves = diff(&c1, &c2).unwrap();
    assert_eq!(moves.len(), 4);
    for m in &moves {
        assert_eq!(
            c1.counts()[&m.to],
            0,
            "{m:?} went to a group that already owned one"
        );
    }
    let c3 = join(&mut h, groups(&[100, 101]));
    check(&c3, &[rest, vec![100, 101]].concat());
    assert!(diff(&c2, &c3).unwrap().is_empty());

    // The default shard count with 200 groups: 128 own one each.
    let mut h = History::new(DEFAULT_SHARDS).unwrap();
    let all: Vec<Gid> = (1..=200).collect();
    let c = join(&mut h, groups(&all));
    check(&c, &all);
    assert_eq!(c.counts().values().filter(|&&c| c == 1).count(), 128);
}

/// Clear errors, and no new configuration for any of them.
#[test]
fn errors_leave_the_history_unchanged() {
    let mut h = History::new(NSHARDS).unwrap();
    assert_eq!(h.apply(&Op::Leave(vec![1])), Err(Error::NotMember(1)));
    assert_eq!(
        h.apply(&Op::Move { shard: 0, gid: 1 }),
        Err(Error::NotMember(1))
    );
    join(&mut h, groups(&[1, 2]));
    let before = h.clone();
    let cases = [
        (Op::Join(groups(&[2])), Error::AlreadyMember(2)),
        (Op::Join(groups(&[0])), Error::ReservedGid),
        (Op::Join(BTreeMap::new()), Error::NoGroups),
        (Op::Join(BTreeMap::from([(3, vec![])])), Error::NoServers(3)),
        (Op::Leave(vec![3]), Error::NotMember(3)),
        (Op::Leave(vec![1, 1]), Error::DuplicateGid(1)),
        (Op::Leave(vec![1, 2]), Error::LastGroup),
        (
            Op::Move { shard: 10, gid: 1 },
            Error::UnknownShard {
                shard: 10,
                shards: 10,
            },
        ),
        (Op::Move { shard: 0, gid: 3 }, Error::NotMember(3)),
    ];
    for (op, err) in cases {
        assert_eq!(h.apply(&op), Err(err.clone()), "{op:?}");
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(h, before);
    assert_eq!(
        Error::LastGroup.to_string(),
        "refused: leaving would remove the last group(s); every shard needs an owner"
    );
    assert_eq!(Error::NotMember(3).to_string(), "group 3 is not a member");
}

/// Same input, same output: two controllers applying the same operations get byte-identical
/// configurations (no hash-map order anywhere).
#[test]
fn deterministic() {
    let ops = vec![
        Op::Join(groups(&[5, 3, 9])),
        Op::Join(groups(&[1])),
        Op::Move { shard: 7, gid: 5 },
        Op::Leave(vec![3, 9]),
        Op::Join(groups(&[2, 4, 6, 8])),
        Op::Leave(vec![5]),
    ];
    let run = || {
        let mut h = History::new(DEFAULT_SHARDS).unwrap();
        for op in &ops {
            h.apply(op).unwrap();
        }
        h.iter().map(Config::encode).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}
