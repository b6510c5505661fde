//! [`KeyMap`]: the compact key/value map the KV models use as their state.

/// A map from string keys to values, kept as a vector sorted by key.
///
/// The search checks one key at a time, so a state usually holds a single key; a `BTreeMap`
/// would allocate a whole node (hundreds of bytes) for it, and the search keeps millions of
/// states.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyMap<V> {
    entries: Vec<(String, V)>,
}

impl<V> KeyMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        KeyMap {
            entries: Vec::new(),
        }
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.position(key).ok().map(|i| &self.entries[i].1)
    }

    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: &str, value: V) {
        match self.position(key) {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => self.entries.insert(i, (key.to_string(), value)),
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.position(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// The entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map has no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Shown like a map: `{"a": "x"}`.
impl<V: std::fmt::Debug> std::fmt::Debug for KeyMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V> FromIterator<(K, V)> for KeyMap<V> {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        let mut map = KeyMap::new();
        for (k, v) in iter {
            map.insert(&k.into(), v);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut map: KeyMap<u32> = [("b", 2), ("a", 1)].into_iter().collect();
        assert_eq!(map.iter().collect::<Vec<_>>(), vec![("a", &1), ("b", &2)]);
        map.insert("a", 3);
        assert_eq!(map.get("a"), Some(&3));
        assert_eq!(map.remove("b"), Some(2));
        assert_eq!(map.get("b"), None);
        assert_eq!(map.len(), 1);
        assert_eq!(map, [("a", 3)].into_iter().collect());
        assert_eq!(format!("{map:?}"), r#"{"a": 3}"#);
    }
}
