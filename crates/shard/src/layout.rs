//! Where the shard controller keeps its state in the controller's store (a Shoal KV cluster),
//! shared by the controller (which writes it) and the routing clients (which read it).
//!
//! | key | value |
//! | --- | --- |
//! | [`LATEST_KEY`] `shard/latest` | the latest configuration and the state of its change ([`Record`]) |
//! | [`config_key`]`(n)` `shard/config/00000000000000000042` | configuration `n` ([`Config::encode`]), the history |
//! | [`LOCK_KEY`] `shard/lock` | the controllers' lock (`shoal_kv::Lock`, with a lease) |
//!
//! A new configuration is installed by a conditional put of [`LATEST_KEY`] at the version the
//! controller read (so two controllers can never both install N+1), then written to the history
//! under [`config_key`]; a controller that finds the latest configuration missing from the
//! history writes it there first. [`Record::complete`] is false while the change's migrations
//! run and set (by another conditional put) once every moved shard is installed at its new
//! owner and deleted at its old one.

use serde::{Deserialize, Serialize};

use crate::{Config, ShardMove};

/// Key of the latest configuration's [`Record`].
pub const LATEST_KEY: &[u8] = b"shard/latest";
/// Key of the controllers' lock.
pub const LOCK_KEY: &[u8] = b"shard/lock";
/// Prefix of the history's keys.
pub const CONFIG_PREFIX: &[u8] = b"shard/config/";
/// Format version of an encoded [`Record`].
pub const RECORD_FORMAT: u8 = 1;

/// Key of configuration `n` in the history (zero-padded: keys sort by number).
pub fn config_key(n: u64) -> Vec<u8> {
    let mut key = CONFIG_PREFIX.to_vec();
    key.extend_from_slice(format!("{n:020}").as_bytes());
    key
}

/// The latest configuration and the state of the change that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The configuration.
    pub config: Config,
    /// The migrations from the previous configuration to this one (`diff`), in shard order.
    pub moves: Vec<ShardMove>,
    /// Every move is installed at its new owner and deleted at its old one.
    pub complete: bool,
}

#[derive(Serialize, Deserialize)]
struct RecordWire {
    config: Vec<u8>,
    moves: Vec<ShardMove>,
    complete: bool,
}

impl Record {
    /// The encoding: [`RECORD_FORMAT`], then the record in postcard (the configuration in its
    /// own versioned encoding).
    pub fn encode(&self) -> Vec<u8> {
        let wire = RecordWire {
            config: self.config.encode(),
            moves: self.moves.clone(),
            complete: self.complete,
        };
        let mut out = vec![RECORD_FORMAT];
        out.extend(postcard::to_stdvec(&wire).expect("a record encodes"));
        out
    }

    /// Decodes [`Record::encode`]'s bytes; refuses another format version, trailing bytes,
    /// an invalid configuration and moves that name shards past its count. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Record, crate::Error> {
        let (&version, rest) = bytes
            .split_first()
            .ok_or_else(|| crate::Error::Decode("empty record".into()))?;
        if version != RECORD_FORMAT {
            return Err(crate::Error::FormatVersion(version));
        }
        let (wire, trailing): (RecordWire, _) =
            postcard::take_from_bytes(rest).map_err(|e| crate::Error::Decode(e.to_string()))?;
        if !trailing.is_empty() {
            return Err(crate::Error::Decode(format!(
                "{} trailing bytes after the record",
                trailing.len()
            )));
        }
        let config = Config::decode(&wire.config)?;
        let shards = config.shards.len() as u32;
        if let Some(m) = wire.moves.iter().find(|m| m.shard >= shards) {
            return Err(crate::Error::UnknownShard {
                shard: m.shard,
                shards,
            });
        }
        Ok(Record {
            config,
            moves: wire.moves,
            complete: wire.complete,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        let c0 = Config::empty(10).unwrap();
        let c1 = crate::join(&c0, &BTreeMap::from([(1, vec!["a".to_string()])])).unwrap();
        let r = Record {
            moves: crate::diff(&c0, &c1).unwrap(),
            config: c1,
            complete: false,
        };
        let bytes = r.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        for cut in 0..bytes.len() {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Record::decode(&long).is_err());
        let mut v2 = bytes;
        v2[0] = 2;
        assert!(matches!(
            Record::decode(&v2),
            Err(crate::Error::FormatVersion(2))
        ));
    }

    #[test]
    fn history_keys_sort_by_number() {
        assert!(config_key(9) < config_key(10));
        assert!(config_key(10) < config_key(u64::MAX));
        assert!(config_key(3).starts_with(CONFIG_PREFIX));
    }
}
