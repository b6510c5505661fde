//! Properties of the controller's operations over random sequences of Join, Leave and Move,
//! and of the configuration decoder over random bytes.
//!
//! The expected outcome of each operation (accepted or refused) and the fewest moves a
//! Join/Leave can make are computed here independently of `shoal_shard::ops`: the lower bound
//! by a counting argument, and, for tiny configurations, by brute force over every balanced
//! assignment.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use shoal_shard::{diff, Config, Error, Gid, History, Op, CONFIG_FORMAT, NO_GROUP};

/// A raw operation; gids are drawn from a small range so that many operations are accepted
/// and the refused ones (non-member, already member, last group) occur too.
fn op_strategy(shards: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop::collection::btree_set(1..=12u64, 1..=3).prop_map(|gids| {
            Op::Join(gids.into_iter().map(|g| (g, vec![format!("srv-{g}")])).collect())
        }),
        3 => prop::collection::vec(1..=12u64, 1..=3).prop_map(Op::Leave),
        1 => (0..shards + 1, 0..=12u64).prop_map(|(shard, gid)| Op::Move { shard, gid }),
    ]
}

/// Whether `op` must be accepted on `c`, from the operation's documented preconditions.
fn accepted(c: &Config, op: &Op) -> bool {
    match op {
        Op::Join(groups) => {
            !groups.is_empty()
                && groups
                    .iter()
                    .all(|(g, s)| *g != NO_GROUP && !c.groups.contains_key(g) && !s.is_empty())
        }
        Op::Leave(gids) => {
            let distinct: BTreeSet<Gid> = gids.iter().copied().collect();
            !gids.is_empty()
                && distinct.len() == gids.len()
                && gids.iter().all(|g| c.groups.contains_key(g))
                && distinct.len() < c.groups.len()
        }
        Op::Move { shard, gid } => (*shard as usize) < c.shards.len() && c.groups.contains_key(gid),
    }
}

/// The fewest shards any balanced assignment of `old`'s shards to `members` must move.
///
/// A balanced assignment gives each member ⌊n/k⌋ or ⌊n/k⌋ + 1 shards, exactly `n mod k` of
/// them the latter. A member that owned `c` shards keeps at most `min(c, its target)`; with
/// every target ⌊n/k⌋ that is `Σ min(c, ⌊n/k⌋)`, and each of the `n mod k` larger targets adds
/// one more only for a member with `c > ⌊n/k⌋`. Everything else moves.
fn min_moves(old: &Config, members: &BTreeSet<Gid>) -> usize {
    let n = old.shards.len();
    let k = members.len();
    let (q, r) = (n / k, n % k);
    let owned = |g: &Gid| old.shards.iter().filter(|&&o| o == *g).count();
    let kept: usize = members.iter().map(|g| owned(g).min(q)).sum();
    let above = members.iter().filter(|g| owned(g) > q).count();
    n - kept - r.min(above)
}

/// The same minimum by brute force: every assignment of the shards to the members, kept if
/// balanced, the smallest number of shards whose owner differs from `old`.
fn min_moves_brute(old: &Config, members: &BTreeSet<Gid>) -> usize {
    let members: Vec<Gid> = members.iter().copied().collect();
    let (n, k) = (old.shards.len(), members.len());
    let mut best = usize::MAX;
    let mut digits = vec![0usize; n];
    loop {
        let mut counts = vec![0usize; k];
        for &d in &digits {
            counts[d] += 1;
        }
        if counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1 {
            let moved = (0..n)
                .filter(|&s| old.shards[s] != members[digits[s]])
                .count();
            best = best.min(moved);
        }
        // Next assignment (an odometer in base k).
        let mut i = 0;
        while i < n && digits[i] + 1 == k {
            digits[i] = 0;
            i += 1;
        }
        if i == n {
            return best;
        }
        digits[i] += 1;
    }
}

/// Checks one accepted operation's result against its input.
fn check_step(before: &Config, op: &Op, after: &Config, brute: bool) {
    assert_eq!(after.num, before.num + 1);
    after.check().unwrap();
    assert_eq!(after.shards.len(), before.shards.len());
    // Every shard is owned by a member (there is always one after an accepted operation).
    assert!(!after.groups.is_empty());
    assert!(after.shards.iter().all(|g| after.groups.contains_key(g)));
    let moves = diff(before, after).unwrap();
    match op {
        Op::Join(_) | Op::Leave(_) => {
            let mut want = before.groups.clone();
            match op {
                Op::Join(g) => want.extend(g.clone()),
                Op::Leave(g) => want.retain(|gid, _| !g.contains(gid)),
                Op::Move { .. } => unreachable!(),
            }
            assert_eq!(after.groups, want);
            assert!(
                after.is_balanced(),
                "unbalanced after {op:?}: {:?}",
                after.shards
            );
            let members: BTreeSet<Gid> = after.groups.keys().copied().collect();
            let lower = min_moves(before, &members);
            assert_eq!(
                moves.len(),
                lower,
                "{op:?} on {:?} -> {:?}",
                before.shards,
                after.shards
            );
            if brute {
                assert_eq!(lower, min_moves_brute(before, &members));
            }
            // Every move lands on a member.
            for m in &moves {
                assert!(members.contains(&m.to));
            }
        }
        Op::Move { shard, gid } => {
            assert_eq!(after.groups, before.groups);
            assert_eq!(after.shards[*shard as usize], *gid);
            assert!(moves.len() <= 1);
            assert!(moves.iter().all(|m| m.shard == *shard));
        }
    }
    // Round trip of the encoding.
    assert_eq!(Config::decode(&after.encode()).as_ref(), Ok(after));
}

fn run(shards: u32, ops: &[Op], brute: bool) {
    let mut h = History::new(shards).unwrap();
    for op in ops {
        let before = h.latest().clone();
        let expect = accepted(&before, op);
        match h.apply(op) {
            Ok(after) => {
                assert!(expect, "accepted {op:?} on {before:?}");
                let after = after.clone();
                check_step(&before, op, &after, brute);
            }
            Err(e) => {
                assert!(!expect, "refused {op:?} on {before:?}: {e}");
                assert_eq!(
                    h.latest(),
                    &before,
                    "a refused operation changed the latest"
                );
            }
        }
    }
    // Historical queries return what was produced, in order.
    for (i, c) in h.iter().enumerate() {
        assert_eq!(c.num, i as u64);
        assert_eq!(h.query(c.num).unwrap(), c);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random sequences on up to 40 shards: members own every shard, Join/Leave leave the
    /// configuration balanced and move exactly the fewest shards possible, refusals change
    /// nothing.
    #[test]
    fn random_sequences_keep_the_invariants(
        (shards, ops) in (1..=40u32).prop_flat_map(|n| (Just(n), prop::collection::vec(op_strategy(n), 1..40)))
    ) {
        run(shards, &ops, false);
    }

    /// Tiny configurations (up to 6 shards), where the lower bound is also checked against
    /// brute force over every balanced assignment.
    #[test]
    fn tiny_sequences_match_brute_force(
        (shards, ops) in (1..=6u32).prop_flat_map(|n| (Just(n), prop::collection::vec(op_strategy(n), 1..25)))
    ) {
        run(shards, &ops, true);
    }

    /// The same operations on two histories give identical configurations (determinism).
    #[test]
    fn same_ops_same_configs(
        (shards, ops) in (1..=40u32).prop_flat_map(|n| (Just(n), prop::collection::vec(op_strategy(n), 1..30)))
    ) {
        let mut a = History::new(shards).unwrap();
        let mut b = History::new(shards).unwrap();
        for op in &ops {
            let (ra, rb) = (a.apply(op).cloned(), b.apply(op).cloned());
            prop_assert_eq!(ra, rb);
        }
    }

    /// Random bytes never make the decoder panic; whatever it accepts keeps the invariants.
    #[test]
    fn decode_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(c) = Config::decode(&bytes) {
            prop_assert!(c.check().is_ok());
        }
        let mut versioned = vec![CONFIG_FORMAT];
        versioned.extend(&bytes);
        if let Ok(c) = Config::decode(&versioned) {
            prop_assert!(c.check().is_ok());
        }
    }

    /// Valid encodings with one byte changed, truncated or extended: never a panic, and a
    /// decoded configuration keeps the invariants.
    #[test]
    fn decode_mutated_encodings(
        (shards, ops) in (1..=20u32).prop_flat_map(|n| (Just(n), prop::collection::vec(op_strategy(n), 1..10))),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut h = History::new(shards).unwrap();
        for op in &ops {
            let _ = h.apply(op);
        }
        let good = h.latest().encode();
        let mut flipped = good.clone();
        flipped[pos.index(good.len())] = byte;
        for bytes in [&flipped[..], &good[..cut.index(good.len())]] {
            match Config::decode(bytes) {
                Ok(c) => prop_assert!(c.check().is_ok()),
                Err(e) => prop_assert!(matches!(
                    e,
                    Error::Decode(_) | Error::FormatVersion(_) | Error::InvalidConfig(_)
                )),
            }
        }
        let truncated = Config::decode(&good[..cut.index(good.len())]);
        prop_assert!(truncated.is_err());
    }
}

/// The independent lower bound on hand-made cases (so that it is itself checked).
#[test]
fn min_moves_examples() {
    let cfg = |shards: Vec<Gid>| {
        let groups: BTreeMap<Gid, Vec<String>> = shards
            .iter()
            .filter(|&&g| g != NO_GROUP)
            .map(|&g| (g, vec!["s".to_string()]))
            .collect();
        Config {
            num: 1,
            shards,
            groups,
        }
    };
    let set = |g: &[Gid]| g.iter().copied().collect::<BTreeSet<Gid>>();
    // 5/5 → 3 groups (4/3/3): 3 shards go to the new one.
    let c = cfg(vec![1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    assert_eq!(min_moves(&c, &set(&[1, 2, 3])), 3);
    assert_eq!(min_moves_brute(&c, &set(&[1, 2, 3])), 3);
    // Group 2 leaves: its 5 shards move.
    assert_eq!(min_moves(&c, &set(&[1])), 5);
    // Unbalanced after Moves (8/2), then a Join: with targets 4/3/3 group 1 keeps 4 and
    // group 2 keeps its 2, so 4 shards move (4 from group 1: 3 to the newcomer, 1 to group 2).
    let c = cfg(vec![1, 1, 1, 1, 1, 1, 1, 1, 2, 2]);
    assert_eq!(min_moves(&c, &set(&[1, 2, 3])), 4);
    assert_eq!(min_moves_brute(&c, &set(&[1, 2, 3])), 4);
    // Everything unowned (first join): every shard moves.
    let empty = Config::empty(4).unwrap();
    assert_eq!(min_moves(&empty, &set(&[1, 2])), 4);
    assert_eq!(min_moves_brute(&empty, &set(&[1, 2])), 4);
}
