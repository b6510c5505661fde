//! The shard function and the shard count.
//!
//! A key's shard is `fnv1a32(key) % shards`: the lab's `key2shard` (Go's `hash/fnv` `New32a`),
//! stable across versions, platforms and processes, so a client, a group and the controller
//! always agree on where a key lives. The shard count is fixed when a sharded cluster is
//! created; changing it would move almost every key.

use crate::{Error, ShardId};

/// The shard count of a sharded cluster created without `--shards`.
///
/// 128 shards. With `k` groups a balanced configuration gives every group `⌊128/k⌋` or
/// `⌈128/k⌉` shards, so the busiest group carries at most `⌈128/k⌉ / (128/k)` of its fair
/// share. For 1..=16 groups (also in `docs/sharding.md`; the unit test
/// `default_shard_count_balances_8_to_16_groups` checks it):
///
/// | groups | shards per group (min–max) | busiest / fair share |
/// |-------:|:---------------------------|---------------------:|
/// | 1, 2, 4, 8, 16 | exact (128, 64, 32, 16, 8) | 1.000 |
/// | 3  | 42–43 | 1.008 |
/// | 5  | 25–26 | 1.016 |
/// | 6  | 21–22 | 1.031 |
/// | 7  | 18–19 | 1.039 |
/// | 9  | 14–15 | 1.055 |
/// | 10 | 12–13 | 1.016 |
/// | 11 | 11–12 | 1.031 |
/// | 12 | 10–11 | 1.031 |
/// | 13 | 9–10  | 1.016 |
/// | 14 | 9–10  | 1.094 |
/// | 15 | 8–9   | 1.055 |
///
/// So from 8 to 16 groups no group carries more than 9.4% above its share and no group
/// owns more than 12.5% more than another (9 against 8 at 15 groups). With 64 shards the
/// worst cases are 17.2% above the share and 25% more than another (5 against 4 at 13 to
/// 15 groups); 256 would gain little more while doubling configuration size and the number
/// of migrations a join or leave runs. The lab's 10 shards cannot balance beyond 10 groups
/// at all.
pub const DEFAULT_SHARDS: u32 = 128;

/// The largest shard count [`validate_shards`] accepts.
///
/// Every configuration lists the owner of every shard, and the history keeps every
/// configuration: 4096 shards is already a 4 KiB-or-more configuration per change, and more
/// shards than that only makes each migration smaller than it is worth.
pub const MAX_SHARDS: u32 = 4096;

/// Checks a shard count: `1..=MAX_SHARDS`. Takes a `u64` so that a count parsed from a
/// command line or a file is checked before any narrowing.
pub fn validate_shards(shards: u64) -> Result<u32, Error> {
    if shards == 0 || shards > u64::from(MAX_SHARDS) {
        return Err(Error::ShardCount(shards));
    }
    Ok(shards as u32)
}

/// FNV-1a, 32 bits (offset basis `0x811c9dc5`, prime `0x01000193`): XOR each byte in, then
/// multiply.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    bytes
        .iter()
        .fold(OFFSET_BASIS, |h, &b| (h ^ u32::from(b)).wrapping_mul(PRIME))
}

/// The shard of a key: `fnv1a32(key) % shards`.
///
/// # Panics
/// If `shards` is 0 (a division by zero). Shard counts come from a [`crate::Config`] or
/// through [`validate_shards`], which never give 0.
pub fn shard_of(key: &[u8], shards: u32) -> ShardId {
    assert!(shards > 0, "shard_of with a shard count of 0");
    fnv1a32(key) % shards
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors of the FNV reference test suite (draft-eastlake-fnv, Go's `hash/fnv`).
    #[test]
    fn fnv1a32_known_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"b"), 0xe70c_2de5);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn shard_of_is_the_hash_modulo_the_count() {
        assert_eq!(shard_of(b"", 10), 0x811c_9dc5 % 10);
        assert_eq!(shard_of(b"a", 10), 0xe40c_292c % 10);
        assert_eq!(shard_of(b"foobar", DEFAULT_SHARDS), 0xbf9c_f968 % 128);
        assert_eq!(shard_of(b"anything", 1), 0);
        for n in [1, 7, 10, 128, MAX_SHARDS] {
            for key in [&b"x"[..], b"key-17", b"\x00\xff"] {
                assert!(shard_of(key, n) < n);
            }
        }
    }

    /// Keys spread over the shards: 12,800 keys `k0..` into 128 shards, every shard within a
    /// factor of 2 of the mean 100 (a broken hash, e.g. one ignoring the low bytes, fails).
    #[test]
    fn shard_of_spreads_keys() {
        let mut counts = vec![0u32; DEFAULT_SHARDS as usize];
        for i in 0..12_800 {
            counts[shard_of(format!("k{i}").as_bytes(), DEFAULT_SHARDS) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min >= 50 && *max <= 200, "min {min} max {max}");
    }

    #[test]
    fn shard_counts_are_validated() {
        assert_eq!(validate_shards(0), Err(Error::ShardCount(0)));
        assert_eq!(validate_shards(1), Ok(1));
        assert_eq!(validate_shards(128), Ok(128));
        assert_eq!(validate_shards(u64::from(MAX_SHARDS)), Ok(MAX_SHARDS));
        assert_eq!(
            validate_shards(u64::from(MAX_SHARDS) + 1),
            Err(Error::ShardCount(u64::from(MAX_SHARDS) + 1))
        );
        assert_eq!(validate_shards(u64::MAX), Err(Error::ShardCount(u64::MAX)));
        assert!(validate_shards(0)
            .unwrap_err()
            .to_string()
            .contains("between 1 and 4096"));
    }

    /// The justification of [`DEFAULT_SHARDS`], checked: for 8..=16 groups the busiest
    /// group is at most 9.4% above its fair share and owns at most 12.5% more shards than
    /// the least loaded; 64 shards would not meet these bounds.
    #[test]
    fn default_shard_count_balances_8_to_16_groups() {
        let worst = |n: u32| {
            (8..=16u32).fold((0f64, 0f64), |(share, spread), k| {
                let (lo, hi) = (n / k, n.div_ceil(k));
                let busiest = f64::from(hi) / (f64::from(n) / f64::from(k));
                (
                    share.max(busiest),
                    spread.max(f64::from(hi) / f64::from(lo)),
                )
            })
        };
        let (share, spread) = worst(DEFAULT_SHARDS);
        assert!(share <= 1.094 && spread <= 1.125, "{share} {spread}");
        let (share64, spread64) = worst(64);
        assert!(share64 > 1.17 && spread64 >= 1.25, "{share64} {spread64}");
        // The table of the doc comment, row by row.
        let rows: [(u32, u32, u32); 16] = [
            (1, 128, 128),
            (2, 64, 64),
            (3, 42, 43),
            (4, 32, 32),
            (5, 25, 26),
            (6, 21, 22),
            (7, 18, 19),
            (8, 16, 16),
            (9, 14, 15),
            (10, 12, 13),
            (11, 11, 12),
            (12, 10, 11),
            (13, 9, 10),
            (14, 9, 10),
            (15, 8, 9),
            (16, 8, 8),
        ];
        for (k, lo, hi) in rows {
            assert_eq!(
                (DEFAULT_SHARDS / k, DEFAULT_SHARDS.div_ceil(k)),
                (lo, hi),
                "{k} groups"
            );
        }
    }
}
