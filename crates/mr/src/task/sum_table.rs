//! A hash table from byte keys to 64-bit sums, specialised for the map-side summing combiner
//! (word counting): the hot path is "look up a short key that is usually present, add 1".
//!
//! Keys of up to 16 bytes are compared as two 64-bit words plus the length (a lossless
//! encoding, see [`KeyWords`]), so a hit costs a hash, one or two cache lines, and three
//! integer compares — no `memcmp` call. Longer keys also compare their bytes in the arena.
//! Open addressing with linear probing, power-of-two capacity, at most half full.

/// Initial number of slots.
const INITIAL_SLOTS: usize = 1 << 8;
/// Marks an empty slot (no key has this length).
const EMPTY_LEN: u32 = u32::MAX;

/// The lossless word encoding of a key: together with its length, `lo`/`hi` determine every
/// byte of a key of up to 16 bytes (overlapping loads of its first and last bytes). For a
/// longer key they hold its first and last 8 bytes, and the arena holds the rest.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct KeyWords {
    lo: u64,
    hi: u64,
}

#[inline(always)]
fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn read_u32(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u64::from(u32::from_le_bytes(w))
}

#[inline(always)]
fn key_words(key: &[u8]) -> KeyWords {
    let len = key.len();
    if len >= 8 {
        KeyWords {
            lo: read_u64(key, 0),
            hi: read_u64(key, len - 8),
        }
    } else if len >= 4 {
        KeyWords {
            lo: read_u32(key, 0) | (read_u32(key, len - 4) << 32),
            hi: 0,
        }
    } else if len > 0 {
        KeyWords {
            lo: u64::from(key[0])
                | (u64::from(key[len / 2]) << 8)
                | (u64::from(key[len - 1]) << 16),
            hi: 0,
        }
    } else {
        KeyWords { lo: 0, hi: 0 }
    }
}

/// Folded 128-bit multiply: a fast, well-mixing hash step.
#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let m = u128::from(a) * u128::from(b);
    (m as u64) ^ ((m >> 64) as u64)
}

const K0: u64 = 0x243f_6a88_85a3_08d3;
const K1: u64 = 0x1319_8a2e_0370_7344;
const K2: u64 = 0xa409_3822_299f_31d0;

#[inline(always)]
fn hash(key: &[u8], w: KeyWords) -> u64 {
    let len = key.len() as u64;
    let mut h = fold_mul(w.lo ^ K0, w.hi ^ K1 ^ len.wrapping_mul(K2));
    if key.len() > 16 {
        for chunk in key[8..key.len() - 8].chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            h = fold_mul(h ^ u64::from_le_bytes(b), K1);
        }
    }
    h
}

#[derive(Clone, Copy)]
struct Slot {
    words: KeyWords,
    len: u32,
    /// Offset of the key in the arena.
    offset: u32,
    sum: u64,
}

const EMPTY: Slot = Slot {
    words: KeyWords { lo: 0, hi: 0 },
    len: EMPTY_LEN,
    offset: 0,
    sum: 0,
};

/// Key → sum.
pub(crate) struct SumTable {
    slots: Vec<Slot>,
    arena: Vec<u8>,
    used: usize,
}

impl Default for SumTable {
    fn default() -> Self {
        Self {
            slots: vec![EMPTY; INITIAL_SLOTS],
            arena: Vec::new(),
            used: 0,
        }
    }
}

impl SumTable {
    /// Bytes of memory held (slots and key arena).
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>() + self.arena.len()
    }

    /// Number of distinct keys.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Adds `n` to the sum of `key`; true if the key was new (the table grew). Keys longer
    /// than 4 GiB are not supported (the map buffer spills long before).
    #[inline]
    pub fn add(&mut self, key: &[u8], n: u64) -> bool {
        let w = key_words(key);
        let h = hash(key, w);
        self.add_hashed(key, w, h, n)
    }

    #[inline(always)]
    fn add_hashed(&mut self, key: &[u8], w: KeyWords, h: u64, n: u64) -> bool {
        let mask = self.slots.len() - 1;
        let mut i = (h as usize) & mask;
        let len = key.len() as u32;
        loop {
            let slot = &mut self.slots[i];
            if slot.len == len && slot.words == w {
                if key.len() <= 16 || self.arena_key(i) == key {
                    let slot = &mut self.slots[i];
                    slot.sum = slot.sum.saturating_add(n);
                    return false;
                }
            } else if slot.len == EMPTY_LEN {
                break;
            }
            i = (i + 1) & mask;
        }
        // Insert into slot i.
        let offset = self.arena.len() as u32;
        self.arena.extend_from_slice(key);
        self.slots[i] = Slot {
            words: w,
            len,
            offset,
            sum: n,
        };
        self.used += 1;
        if self.used * 2 > self.slots.len() {
            self.grow();
        }
        true
    }

    fn arena_key(&self, i: usize) -> &[u8] {
        let s = &self.slots[i];
        &self.arena[s.offset as usize..s.offset as usize + s.len as usize]
    }

    fn grow(&mut self) {
        let new_len = self.slots.len() * 2;
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; new_len]);
        let mask = new_len - 1;
        for s in old.into_iter().filter(|s| s.len != EMPTY_LEN) {
            let key = &self.arena[s.offset as usize..s.offset as usize + s.len as usize];
            let mut i = (hash(key, s.words) as usize) & mask;
            while self.slots[i].len != EMPTY_LEN {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Calls `f(key, sum)` for every entry (in no particular order) and empties the table.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8], u64)) {
        for s in &self.slots {
            if s.len != EMPTY_LEN {
                f(
                    &self.arena[s.offset as usize..s.offset as usize + s.len as usize],
                    s.sum,
                );
            }
        }
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_encoding_is_lossless_for_short_keys() {
        let mut seen = std::collections::BTreeMap::new();
        let alphabet = [0u8, 1, b'a', 255];
        // Every key of length 0..=5 over a small alphabet, plus some of 6..=16.
        let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
        for len in 1..=5 {
            let mut next = Vec::new();
            for k in keys.iter().filter(|k| k.len() == len - 1) {
                for &b in &alphabet {
                    let mut k2 = k.clone();
                    k2.push(b);
                    next.push(k2);
                }
            }
            keys.extend(next);
        }
        for len in 6..=16 {
            for b in alphabet {
                let mut k = vec![b'x'; len];
                k[len / 2] = b;
                keys.push(k);
            }
        }
        for k in &keys {
            let w = key_words(k);
            if let Some(other) = seen.insert((k.len(), w.lo, w.hi), k.clone()) {
                assert_eq!(&other, k, "collision");
            }
        }
    }

    #[test]
    fn sums_match_a_btreemap() {
        let mut t = SumTable::default();
        let mut reference = std::collections::BTreeMap::new();
        for i in 0..50_000u64 {
            let key = format!("{}{}", "k".repeat((i % 23) as usize), i % 5_000).into_bytes();
            t.add(&key, i);
            *reference.entry(key).or_insert(0u64) += i;
        }
        t.add(b"", 3);
        *reference.entry(Vec::new()).or_insert(0) += 3;
        assert_eq!(t.len(), reference.len());
        let mut got = std::collections::BTreeMap::new();
        t.drain(|k, s| {
            got.insert(k.to_vec(), s);
        });
        assert_eq!(got, reference);
        assert_eq!(t.len(), 0);
    }
}
