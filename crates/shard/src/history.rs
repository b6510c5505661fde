//! The history of configurations the controller keeps: every configuration 1..=N, so a
//! group or a client can ask for configuration `n` (a group walks the configurations one by
//! one, migrating between each pair) or for the latest.

use crate::{apply, Config, Error, Op};

/// Configurations `0..=N` of one sharded cluster, in memory. Configuration 0 is the empty one
/// (no groups, no owners) the first Join starts from; 1..=N are the changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// `configs[i].num == i`; never empty (holds configuration 0).
    configs: Vec<Config>,
}

impl History {
    /// A history holding only configuration 0 with `shards` shards. Fails for a shard count
    /// outside `1..=MAX_SHARDS`.
    pub fn new(shards: u32) -> Result<History, Error> {
        Ok(History {
            configs: vec![Config::empty(shards)?],
        })
    }

    /// The latest configuration (configuration 0 before the first change).
    pub fn latest(&self) -> &Config {
        self.configs
            .last()
            .expect("a history holds configuration 0")
    }

    /// Configuration `num`; an error for a number past the latest.
    pub fn query(&self, num: u64) -> Result<&Config, Error> {
        usize::try_from(num)
            .ok()
            .and_then(|i| self.configs.get(i))
            .ok_or(Error::UnknownConfig {
                asked: num,
                latest: self.latest().num,
            })
    }

    /// Applies `op` to the latest configuration and keeps the result as the new latest. On an
    /// error nothing is kept.
    pub fn apply(&mut self, op: &Op) -> Result<&Config, Error> {
        let next = apply(self.latest(), op)?;
        self.configs.push(next);
        Ok(self.latest())
    }

    /// Appends a configuration computed elsewhere (read back from the controller's store): it
    /// must be numbered latest + 1, have the same shard count and keep the invariants.
    pub fn push(&mut self, config: Config) -> Result<(), Error> {
        let latest = self.latest();
        if latest.num.checked_add(1) != Some(config.num) {
            return Err(Error::OutOfOrder {
                latest: latest.num,
                got: config.num,
            });
        }
        if config.shards.len() != latest.shards.len() {
            return Err(Error::ShardCountMismatch(
                latest.num_shards(),
                config.num_shards(),
            ));
        }
        config.check()?;
        self.configs.push(config);
        Ok(())
    }

    /// Every configuration, 0 first.
    pub fn iter(&self) -> impl Iterator<Item = &Config> {
        self.configs.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn queries_and_errors() {
        let mut h = History::new(4).unwrap();
        assert_eq!(h.latest().num, 0);
        assert_eq!(
            h.query(1),
            Err(Error::UnknownConfig {
                asked: 1,
                latest: 0
            })
        );
        let join = Op::Join(BTreeMap::from([(1, vec!["a".to_string()])]));
        assert_eq!(h.apply(&join).unwrap().shards, vec![1; 4]);
        assert_eq!(h.apply(&join), Err(Error::AlreadyMember(1)));
        assert_eq!(h.latest().num, 1);
        assert_eq!(h.query(0).unwrap(), &Config::empty(4).unwrap());
        assert_eq!(
            h.query(u64::MAX),
            Err(Error::UnknownConfig {
                asked: u64::MAX,
                latest: 1
            })
        );
        let next = Config {
            num: 3,
            ..h.latest().clone()
        };
        assert_eq!(h.push(next), Err(Error::OutOfOrder { latest: 1, got: 3 }));
        let bad = Config {
            num: 2,
            shards: vec![1; 5],
            ..h.latest().clone()
        };
        assert_eq!(h.push(bad), Err(Error::ShardCountMismatch(4, 5)));
        let broken = Config {
            num: 2,
            shards: vec![1, 1, 1, 9],
            ..h.latest().clone()
        };
        assert!(matches!(h.push(broken), Err(Error::InvalidConfig(_))));
        let good = Config {
            num: 2,
            ..h.latest().clone()
        };
        h.push(good.clone()).unwrap();
        assert_eq!(h.latest(), &good);
        assert_eq!(h.iter().map(|c| c.num).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(History::new(0), Err(Error::ShardCount(0)));
    }
}
