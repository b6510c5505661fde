//! The shard controller's operations: pure functions from the latest configuration to the
//! next one (numbered one higher).
//!
//! # The rebalancing rule (Join and Leave)
//!
//! With `n` shards and `k` member groups, a balanced configuration gives `r = n mod k` groups
//! `⌈n/k⌉` shards and the others `⌊n/k⌋` (so no group owns more than one shard more than
//! another; with more groups than shards some own none). Among the balanced configurations
//! the rebalancing picks one that moves the fewest shards:
//!
//! 1. Every shard of a group that is no longer a member (Leave), or of no group (the first
//!    Join), must move.
//! 2. Targets: the `r` members that own the most shards get `⌈n/k⌉`, the others `⌊n/k⌋`.
//!    Giving the larger targets to the groups that already have the most shards keeps the
//!    most shards in place: a group keeps `min(owned, target)`.
//! 3. A group above its target gives up its highest-numbered shards down to the target; the
//!    freed shards (with those of step 1), in increasing order, fill the groups below their
//!    target, in increasing gid order.
//!
//! The number of moves is then `orphaned + Σ max(0, owned − target)`, the minimum: any
//! balanced configuration keeps at most `Σ min(owned, target)` shards in place, and step 2
//! maximises that sum. Ties (equal counts) are broken by the smaller gid, so every replica
//! computes the same configuration.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{Config, Error, Gid, ShardId, NO_GROUP};

/// A controller operation that produces a new configuration (Query does not, see
/// [`crate::History`]). Serializable, to be proposed through the controller's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// New groups with their servers: [`join`].
    Join(BTreeMap<Gid, Vec<String>>),
    /// Groups leaving: [`leave`].
    Leave(Vec<Gid>),
    /// One shard given to one group: [`move_shard`].
    Move {
        /// The shard.
        shard: ShardId,
        /// Its new owner.
        gid: Gid,
    },
}

/// Applies `op` to `config`: the next configuration, or an error and none.
pub fn apply(config: &Config, op: &Op) -> Result<Config, Error> {
    match op {
        Op::Join(groups) => join(config, groups),
        Op::Leave(gids) => leave(config, gids),
        Op::Move { shard, gid } => move_shard(config, *shard, *gid),
    }
}

/// Adds `groups` (gid → servers) and rebalances with the fewest moves.
///
/// Errors: no groups given, gid 0, a gid already a member, a group without servers, or an
/// input configuration breaking the invariants.
pub fn join(config: &Config, groups: &BTreeMap<Gid, Vec<String>>) -> Result<Config, Error> {
    config.check()?;
    if groups.is_empty() {
        return Err(Error::NoGroups);
    }
    for (&gid, servers) in groups {
        if gid == NO_GROUP {
            return Err(Error::ReservedGid);
        }
        if config.groups.contains_key(&gid) {
            return Err(Error::AlreadyMember(gid));
        }
        if servers.is_empty() {
            return Err(Error::NoServers(gid));
        }
    }
    let mut next = successor(config)?;
    next.groups
        .extend(groups.iter().map(|(&g, s)| (g, s.clone())));
    rebalance(&mut next);
    Ok(next)
}

/// Removes the groups `gids` and gives their shards to the remaining ones, rebalancing with
/// the fewest moves.
///
/// Errors: no gids given, a gid named twice, gid 0, a gid not a member, every member leaving
/// (every shard needs an owner), or an input configuration breaking the invariants.
pub fn leave(config: &Config, gids: &[Gid]) -> Result<Config, Error> {
    config.check()?;
    if gids.is_empty() {
        return Err(Error::NoGroups);
    }
    let mut leaving = BTreeSet::new();
    for &gid in gids {
        if gid == NO_GROUP {
            return Err(Error::ReservedGid);
        }
        if !config.groups.contains_key(&gid) {
            return Err(Error::NotMember(gid));
        }
        if !leaving.insert(gid) {
            return Err(Error::DuplicateGid(gid));
        }
    }
    if leaving.len() == config.groups.len() {
        return Err(Error::LastGroup);
    }
    let mut next = successor(config)?;
    next.groups.retain(|g, _| !leaving.contains(g));
    rebalance(&mut next);
    Ok(next)
}

/// Gives `shard` to the member `gid`, without rebalancing (the operator's override: the next
/// Join or Leave rebalances again). Moving a shard to its current owner still makes a new
/// configuration, with no move.
///
/// Errors: a shard not below the shard count, gid 0, a gid not a member, or an input
/// configuration breaking the invariants.
pub fn move_shard(config: &Config, shard: ShardId, gid: Gid) -> Result<Config, Error> {
    config.check()?;
    if shard >= config.num_shards() {
        return Err(Error::UnknownShard {
            shard,
            shards: config.num_shards(),
        });
    }
    if gid == NO_GROUP {
        return Err(Error::ReservedGid);
    }
    if !config.groups.contains_key(&gid) {
        return Err(Error::NotMember(gid));
    }
    let mut next = successor(config)?;
    next.shards[shard as usize] = gid;
    Ok(next)
}

/// A copy of `config` numbered one higher.
fn successor(config: &Config) -> Result<Config, Error> {
    let num = config.num.checked_add(1).ok_or(Error::NumOverflow)?;
    Ok(Config {
        num,
        ..config.clone()
    })
}

/// Reassigns `config.shards` to `config.groups` (at least one) by the rule in the module
/// documentation.
fn rebalance(config: &mut Config) {
    let n = config.shards.len();
    let k = config.groups.len();
    debug_assert!(k > 0, "rebalance without groups");
    let (floor, extra) = (n / k, n % k);

    // Shards per member, and shards whose owner is not a member (they all move).
    let mut owned: BTreeMap<Gid, Vec<usize>> =
        config.groups.keys().map(|&g| (g, Vec::new())).collect();
    let mut freed = Vec::new();
    for (shard, gid) in config.shards.iter().enumerate() {
        match owned.get_mut(gid) {
            Some(list) => list.push(shard),
            None => freed.push(shard),
        }
    }

    // The `extra` members owning the most shards (smaller gid first on ties) get floor + 1.
    let mut by_load: Vec<(Gid, usize)> = owned.iter().map(|(&g, s)| (g, s.len())).collect();
    by_load.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let target: BTreeMap<Gid, usize> = by_load
        .iter()
        .enumerate()
        .map(|(rank, &(g, _))| (g, floor + usize::from(rank < extra)))
        .collect();

    // Groups above target give up their highest-numbered shards.
    for (gid, shards) in owned.iter_mut() {
        let t = target[gid];
        if shards.len() > t {
            freed.extend(shards.drain(t..));
        }
    }
    freed.sort_unstable();

    // Freed shards, in increasing order, fill the groups below target in gid order.
    let mut freed = freed.into_iter();
    for (gid, shards) in &owned {
        for _ in shards.len()..target[gid] {
            let shard = freed.next().expect("targets sum to the shard count");
            config.shards[shard] = *gid;
        }
    }
    debug_assert!(freed.next().is_none(), "every freed shard is placed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(gids: &[Gid]) -> BTreeMap<Gid, Vec<String>> {
        gids.iter().map(|&g| (g, vec![format!("s{g}")])).collect()
    }

    #[test]
    fn first_join_gives_contiguous_ranges_by_gid() {
        let c = join(&Config::empty(10).unwrap(), &servers(&[3, 1, 2])).unwrap();
        assert_eq!(c.num, 1);
        assert_eq!(c.shards, vec![1, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
    }

    #[test]
    fn join_takes_from_the_largest_groups_highest_shards() {
        let c1 = join(&Config::empty(10).unwrap(), &servers(&[1, 2])).unwrap();
        assert_eq!(c1.shards, vec![1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        let c2 = join(&c1, &servers(&[3])).unwrap();
        // Group 1 keeps 4 (gid tie-break for the extra shard), 2 keeps 3, 3 gets 3.
        assert_eq!(c2.shards, vec![1, 1, 1, 1, 3, 2, 2, 2, 3, 3]);
        assert_eq!(crate::diff(&c1, &c2).unwrap().len(), 3);
    }

    #[test]
    fn errors_produce_no_configuration() {
        let c = join(&Config::empty(4).unwrap(), &servers(&[1, 2])).unwrap();
        assert_eq!(join(&c, &BTreeMap::new()), Err(Error::NoGroups));
        assert_eq!(join(&c, &servers(&[0])), Err(Error::ReservedGid));
        assert_eq!(join(&c, &servers(&[3, 2])), Err(Error::AlreadyMember(2)));
        assert_eq!(
            join(&c, &BTreeMap::from([(5, vec![])])),
            Err(Error::NoServers(5))
        );
        assert_eq!(leave(&c, &[]), Err(Error::NoGroups));
        assert_eq!(leave(&c, &[9]), Err(Error::NotMember(9)));
        assert_eq!(leave(&c, &[0]), Err(Error::ReservedGid));
        assert_eq!(leave(&c, &[1, 1]), Err(Error::DuplicateGid(1)));
        assert_eq!(leave(&c, &[1, 2]), Err(Error::LastGroup));
        assert_eq!(
            move_shard(&c, 4, 1),
            Err(Error::UnknownShard {
                shard: 4,
                shards: 4
            })
        );
        assert_eq!(move_shard(&c, 0, 7), Err(Error::NotMember(7)));
        assert_eq!(move_shard(&c, 0, 0), Err(Error::ReservedGid));
        let empty = Config::empty(4).unwrap();
        assert_eq!(leave(&empty, &[1]), Err(Error::NotMember(1)));
        assert_eq!(move_shard(&empty, 0, 1), Err(Error::NotMember(1)));
        let broken = Config {
            shards: vec![1, 2, 3, 1],
            ..c.clone()
        };
        assert!(matches!(
            join(&broken, &servers(&[4])),
            Err(Error::InvalidConfig(_))
        ));
        let last = Config { num: u64::MAX, ..c };
        assert_eq!(move_shard(&last, 0, 1), Err(Error::NumOverflow));
    }

    #[test]
    fn apply_dispatches() {
        let c0 = Config::empty(4).unwrap();
        let c1 = apply(&c0, &Op::Join(servers(&[1, 2]))).unwrap();
        assert_eq!(c1, join(&c0, &servers(&[1, 2])).unwrap());
        let c2 = apply(&c1, &Op::Move { shard: 0, gid: 2 }).unwrap();
        assert_eq!(c2.shards, vec![2, 1, 2, 2]);
        let c3 = apply(&c2, &Op::Leave(vec![2])).unwrap();
        assert_eq!(c3.shards, vec![1; 4]);
        assert_eq!(c3.num, 3);
    }
}
