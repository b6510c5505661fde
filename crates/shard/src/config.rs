//! A numbered configuration: which group owns each shard and which servers each group has.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{validate_shards, Error, Gid, ShardId, NO_GROUP};

/// The version byte that starts an encoded [`Config`]. A later format gets a new number;
/// a decoder refuses numbers it does not know instead of misreading them.
pub const CONFIG_FORMAT: u8 = 1;

/// Configuration number `num` of a sharded cluster.
///
/// Invariants ([`Config::check`]; every operation keeps them, [`Config::decode`] enforces
/// them): between 1 and [`crate::MAX_SHARDS`] shards; no group is gid 0 and every group has at
/// least one server; when there are groups, every shard is owned by one of them; when there
/// are none (configuration 0, before the first Join), no shard has an owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Config {
    /// The configuration's number: 0 for the empty one, then 1, 2, 3, … one per change.
    pub num: u64,
    /// The owner of each shard, indexed by shard; [`NO_GROUP`] (0) for none.
    pub shards: Vec<Gid>,
    /// The member groups and their servers' addresses.
    pub groups: BTreeMap<Gid, Vec<String>>,
}

/// One shard changing owner between two configurations: what a migration carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardMove {
    /// The shard.
    pub shard: ShardId,
    /// Its owner before; [`NO_GROUP`] when it had none (nothing to copy: the first Join).
    pub from: Gid,
    /// Its owner after.
    pub to: Gid,
}

impl Config {
    /// Configuration 0: `shards` shards, no groups, no owners. Fails for a shard count
    /// outside `1..=MAX_SHARDS`.
    pub fn empty(shards: u32) -> Result<Config, Error> {
        let shards = validate_shards(u64::from(shards))?;
        Ok(Config {
            num: 0,
            shards: vec![NO_GROUP; shards as usize],
            groups: BTreeMap::new(),
        })
    }

    /// The number of shards.
    pub fn num_shards(&self) -> u32 {
        // `check` bounds the length by MAX_SHARDS; saturate for a hand-built oversized one.
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX)
    }

    /// The owner of `shard`: `None` for an unknown shard or one no group owns.
    pub fn owner(&self, shard: ShardId) -> Option<Gid> {
        match self.shards.get(shard as usize) {
            Some(&g) if g != NO_GROUP => Some(g),
            _ => None,
        }
    }

    /// The shards `gid` owns, in increasing order.
    pub fn shards_of(&self, gid: Gid) -> Vec<ShardId> {
        (0..self.num_shards())
            .filter(|&s| self.shards[s as usize] == gid)
            .collect()
    }

    /// How many shards each member owns (members owning none included, with 0).
    pub fn counts(&self) -> BTreeMap<Gid, u32> {
        let mut counts: BTreeMap<Gid, u32> = self.groups.keys().map(|&g| (g, 0)).collect();
        for g in &self.shards {
            if let Some(c) = counts.get_mut(g) {
                *c += 1;
            }
        }
        counts
    }

    /// True when no member owns more than one shard more than another (vacuously true
    /// without members).
    pub fn is_balanced(&self) -> bool {
        let counts = self.counts();
        match (counts.values().min(), counts.values().max()) {
            (Some(min), Some(max)) => max - min <= 1,
            _ => true,
        }
    }

    /// Checks the invariants listed on [`Config`].
    pub fn check(&self) -> Result<(), Error> {
        let invalid = |why: String| Err(Error::InvalidConfig(why));
        validate_shards(self.shards.len() as u64)
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        for (&gid, servers) in &self.groups {
            if gid == NO_GROUP {
                return invalid("gid 0 is a member".into());
            }
            if servers.is_empty() {
                return invalid(format!("group {gid} has no servers"));
            }
        }
        for (shard, &gid) in self.shards.iter().enumerate() {
            if self.groups.is_empty() {
                if gid != NO_GROUP {
                    return invalid(format!(
                        "shard {shard} is owned by {gid} but there are no groups"
                    ));
                }
            } else if !self.groups.contains_key(&gid) {
                return invalid(format!(
                    "shard {shard} is owned by {gid}, which is not a member"
                ));
            }
        }
        Ok(())
    }

    /// The encoding: [`CONFIG_FORMAT`], then the configuration in postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![CONFIG_FORMAT];
        // Serializing plain integers, vectors, strings and maps into a Vec cannot fail.
        out.extend(postcard::to_stdvec(self).expect("a Config always serializes"));
        out
    }

    /// Decodes [`Config::encode`]'s bytes. Never panics: bytes of another format version,
    /// truncated or trailing bytes, and configurations breaking the invariants are errors.
    pub fn decode(bytes: &[u8]) -> Result<Config, Error> {
        let (&version, rest) = bytes
            .split_first()
            .ok_or_else(|| Error::Decode("no bytes".into()))?;
        if version != CONFIG_FORMAT {
            return Err(Error::FormatVersion(version));
        }
        let (config, trailing): (Config, _) =
            postcard::take_from_bytes(rest).map_err(|e| Error::Decode(e.to_string()))?;
        if !trailing.is_empty() {
            return Err(Error::Decode(format!("{} trailing bytes", trailing.len())));
        }
        config.check()?;
        Ok(config)
    }
}

/// The shards whose owner differs between `old` and `new`, in shard order: the moves a
/// migration from `old` to `new` has to carry out. Configurations with different shard counts
/// are an error.
pub fn diff(old: &Config, new: &Config) -> Result<Vec<ShardMove>, Error> {
    if old.shards.len() != new.shards.len() {
        return Err(Error::ShardCountMismatch(
            old.num_shards(),
            new.num_shards(),
        ));
    }
    Ok(old
        .shards
        .iter()
        .zip(&new.shards)
        .enumerate()
        .filter(|(_, (from, to))| from != to)
        .map(|(shard, (&from, &to))| ShardMove {
            shard: shard as ShardId,
            from,
            to,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Config {
        Config {
            num: 7,
            shards: vec![1, 2, 1, 2],
            groups: BTreeMap::from([
                (1, vec!["a:1".to_string(), "b:1".to_string()]),
                (2, vec!["c:2".to_string()]),
            ]),
        }
    }

    #[test]
    fn encoding_round_trips_and_starts_with_the_version() {
        let c = sample();
        let bytes = c.encode();
        assert_eq!(bytes[0], CONFIG_FORMAT);
        assert_eq!(Config::decode(&bytes), Ok(c));
        let empty = Config::empty(10).unwrap();
        assert_eq!(Config::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn decoding_refuses_bad_bytes_with_clear_errors() {
        let bytes = sample().encode();
        assert_eq!(Config::decode(&[]), Err(Error::Decode("no bytes".into())));
        let mut other = bytes.clone();
        other[0] = 2;
        assert_eq!(Config::decode(&other), Err(Error::FormatVersion(2)));
        assert!(matches!(
            Config::decode(&bytes[..bytes.len() - 1]),
            Err(Error::Decode(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            Config::decode(&long),
            Err(Error::Decode("1 trailing bytes".into()))
        );
    }

    #[test]
    fn decoding_refuses_configurations_that_break_the_invariants() {
        let broken = [
            Config {
                shards: vec![],
                ..sample()
            },
            Config {
                shards: vec![1, 3, 1, 2],
                ..sample()
            },
            Config {
                shards: vec![1, 0, 1, 2],
                ..sample()
            },
            Config {
                groups: BTreeMap::from([(0, vec!["x".into()])]),
                shards: vec![0; 4],
                ..sample()
            },
            Config {
                groups: BTreeMap::from([(1, vec![]), (2, vec!["x".into()])]),
                ..sample()
            },
            Config {
                groups: BTreeMap::new(),
                ..sample()
            },
        ];
        for c in broken {
            assert!(matches!(c.check(), Err(Error::InvalidConfig(_))), "{c:?}");
            assert!(
                matches!(Config::decode(&c.encode()), Err(Error::InvalidConfig(_))),
                "{c:?}"
            );
        }
    }

    #[test]
    fn accessors() {
        let c = sample();
        assert_eq!(c.num_shards(), 4);
        assert_eq!(c.owner(1), Some(2));
        assert_eq!(c.owner(4), None);
        assert_eq!(Config::empty(3).unwrap().owner(0), None);
        assert_eq!(c.shards_of(1), vec![0, 2]);
        assert_eq!(c.counts(), BTreeMap::from([(1, 2), (2, 2)]));
        assert!(c.is_balanced());
        let skewed = Config {
            shards: vec![1, 1, 1, 2],
            ..sample()
        };
        assert!(!skewed.is_balanced());
        assert_eq!(Config::empty(0), Err(Error::ShardCount(0)));
    }

    #[test]
    fn diff_lists_the_shards_that_change_owner() {
        let old = sample();
        let new = Config {
            num: 8,
            shards: vec![1, 1, 2, 2],
            ..sample()
        };
        assert_eq!(
            diff(&old, &new),
            Ok(vec![
                ShardMove {
                    shard: 1,
                    from: 2,
                    to: 1
                },
                ShardMove {
                    shard: 2,
                    from: 1,
                    to: 2
                }
            ])
        );
        assert_eq!(diff(&old, &old), Ok(vec![]));
        let other = Config::empty(5).unwrap();
        assert_eq!(diff(&old, &other), Err(Error::ShardCountMismatch(4, 5)));
    }
}
