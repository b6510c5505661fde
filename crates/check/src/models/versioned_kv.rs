//! A key/value store with versions: conditional put and delete, as Shoal's KV database offers.

use super::KeyMap;
use crate::model::Model;

/// A versioned key/value store. A key is missing until created; each value carries a version.
///
/// - `get` answers the value and version, or no-key.
/// - `put(key, value, expected)`: on a missing key, expected `0` (or any) creates it at version 1,
///   expected `> 0` answers no-key; on a present key at version `v`, expected `v` (or any) stores
///   the value at version `v + 1`, anything else answers version-mismatch.
/// - `delete(key, expected)`: on a missing key answers no-key; on a present key at version `v`,
///   expected `v` (or any) removes it (a later create starts again at version 1), anything else
///   answers version-mismatch.
/// - the answer **maybe** (a put or delete returned but may or may not have applied) leads to two
///   possible states: applied, and not applied.
///
/// Partitioned by key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VersionedKv;

/// The version a conditional put or delete expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expected {
    /// Unconditional.
    Any,
    /// Apply only at this version; `0` means "the key must be missing".
    Version(u64),
}

/// An operation on a [`VersionedKv`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvInput {
    /// Read a key.
    Get {
        /// The key.
        key: String,
    },
    /// Store a value if the version matches.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The version expected.
        expected: Expected,
    },
    /// Remove a key if the version matches.
    Delete {
        /// The key.
        key: String,
        /// The version expected.
        expected: Expected,
    },
}

impl KvInput {
    /// The key the operation is on.
    pub fn key(&self) -> &str {
        match self {
            KvInput::Get { key } | KvInput::Put { key, .. } | KvInput::Delete { key, .. } => key,
        }
    }
}

/// An answer of a [`VersionedKv`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvOutput {
    /// A get found the key.
    Found {
        /// Its value.
        value: String,
        /// Its version.
        version: u64,
    },
    /// The key is missing (get), or a put expecting a version `> 0` / a delete found it missing.
    NoKey,
    /// A put applied; the key is now at `version`.
    Written {
        /// The new version.
        version: u64,
    },
    /// A delete applied.
    Deleted,
    /// A put or delete found another version and did nothing.
    VersionMismatch,
    /// A put or delete returned but may or may not have applied.
    Maybe,
}

/// A value and its version.
type Entry = (String, u64);

/// What a put or delete does in a state.
enum Effect {
    Applied(Option<Entry>, KvOutput),
    Refused(KvOutput),
}

fn matches(expected: Expected, version: u64) -> bool {
    match expected {
        Expected::Any => true,
        Expected::Version(v) => v == version,
    }
}

fn put_effect(current: Option<&Entry>, value: &str, expected: Expected) -> Effect {
    match current {
        None if matches!(expected, Expected::Any | Expected::Version(0)) => Effect::Applied(
            Some((value.to_string(), 1)),
            KvOutput::Written { version: 1 },
        ),
        None => Effect::Refused(KvOutput::NoKey),
        Some((_, version)) if matches(expected, *version) => Effect::Applied(
            Some((value.to_string(), version + 1)),
            KvOutput::Written {
                version: version + 1,
            },
        ),
        Some(_) => Effect::Refused(KvOutput::VersionMismatch),
    }
}

fn delete_effect(current: Option<&Entry>, expected: Expected) -> Effect {
    match current {
        None => Effect::Refused(KvOutput::NoKey),
        Some((_, version)) if matches(expected, *version) => {
            Effect::Applied(None, KvOutput::Deleted)
        }
        Some(_) => Effect::Refused(KvOutput::VersionMismatch),
    }
}

impl Model for VersionedKv {
    type Input = KvInput;
    type Output = KvOutput;
    type State = KeyMap<Entry>;

    fn init(&self) -> Self::State {
        KeyMap::new()
    }

    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
        next: &mut Vec<Self::State>,
    ) {
        let key = input.key();
        let current = state.get(key);
        let effect = match input {
            KvInput::Get { .. } => {
                let legal = match output {
                    None | Some(KvOutput::Maybe) => true,
                    Some(KvOutput::Found { value, version }) => {
                        current.is_some_and(|(v, ver)| v == value && ver == version)
                    }
                    Some(KvOutput::NoKey) => current.is_none(),
                    Some(_) => false,
                };
                if legal {
                    next.push(state.clone());
                }
                return;
            }
            KvInput::Put {
                value, expected, ..
            } => put_effect(current, value, *expected),
            KvInput::Delete { expected, .. } => delete_effect(current, *expected),
        };
        let with = |entry: Option<Entry>| {
            let mut state = state.clone();
            match entry {
                Some(entry) => state.insert(key, entry),
                None => {
                    state.remove(key);
                }
            }
            state
        };
        match (effect, output) {
            (Effect::Applied(entry, _), None | Some(KvOutput::Maybe)) => {
                next.push(state.clone());
                next.push(with(entry));
            }
            (Effect::Refused(_), None | Some(KvOutput::Maybe)) => next.push(state.clone()),
            (Effect::Applied(entry, answer), Some(output)) => {
                if &answer == output {
                    next.push(with(entry));
                }
            }
            (Effect::Refused(answer), Some(output)) => {
                if &answer == output {
                    next.push(state.clone());
                }
            }
        }
    }

    fn is_read_only(&self, input: &Self::Input, output: Option<&Self::Output>) -> bool {
        matches!(input, KvInput::Get { .. })
            || matches!(
                output,
                Some(KvOutput::VersionMismatch | KvOutput::NoKey | KvOutput::Found { .. })
            )
    }

    fn partition_key(&self, input: &Self::Input) -> Option<String> {
        Some(input.key().to_string())
    }

    fn state_bytes(&self, state: &Self::State) -> usize {
        std::mem::size_of::<Self::State>()
            + state
                .iter()
                .map(|(k, (v, _))| 56 + k.len() + v.len())
                .sum::<usize>()
    }

    fn describe_op(&self, input: &Self::Input, output: Option<&Self::Output>) -> String {
        let expected = |e: &Expected| match e {
            Expected::Any => "any".to_string(),
            Expected::Version(v) => format!("v{v}"),
        };
        let input = match input {
            KvInput::Get { key } => format!("get {key:?}"),
            KvInput::Put {
                key,
                value,
                expected: e,
            } => format!("put {key:?} {value:?} if {}", expected(e)),
            KvInput::Delete { key, expected: e } => format!("delete {key:?} if {}", expected(e)),
        };
        let output = match output {
            None => "?".to_string(),
            Some(KvOutput::Found { value, version }) => format!("{value:?} v{version}"),
            Some(KvOutput::NoKey) => "no-key".to_string(),
            Some(KvOutput::Written { version }) => format!("ok v{version}"),
            Some(KvOutput::Deleted) => "ok".to_string(),
            Some(KvOutput::VersionMismatch) => "mismatch".to_string(),
            Some(KvOutput::Maybe) => "maybe".to_string(),
        };
        format!("{input} -> {output}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type State = KeyMap<Entry>;

    fn at(value: &str, version: u64) -> State {
        [("k".to_string(), (value.to_string(), version))]
            .into_iter()
            .collect()
    }

    fn empty() -> State {
        State::new()
    }

    fn put(value: &str, expected: Expected) -> KvInput {
        KvInput::Put {
            key: "k".into(),
            value: value.into(),
            expected,
        }
    }

    fn delete(expected: Expected) -> KvInput {
        KvInput::Delete {
            key: "k".into(),
            expected,
        }
    }

    fn step(state: &State, input: KvInput, output: Option<KvOutput>) -> Vec<State> {
        let mut next = Vec::new();
        VersionedKv.step(state, &input, output.as_ref(), &mut next);
        next
    }

    #[test]
    fn get_answers_value_and_version_or_no_key() {
        let get = || KvInput::Get { key: "k".into() };
        assert_eq!(step(&empty(), get(), Some(KvOutput::NoKey)), vec![empty()]);
        let found = KvOutput::Found {
            value: "a".into(),
            version: 2,
        };
        assert_eq!(
            step(&at("a", 2), get(), Some(found.clone())),
            vec![at("a", 2)]
        );
        assert!(step(&at("a", 3), get(), Some(found.clone())).is_empty());
        assert!(step(&empty(), get(), Some(found)).is_empty());
        assert!(step(&at("a", 1), get(), Some(KvOutput::NoKey)).is_empty());
    }

    #[test]
    fn put_with_expected_zero_creates_at_version_one() {
        let written = |version| Some(KvOutput::Written { version });
        assert_eq!(
            step(&empty(), put("a", Expected::Version(0)), written(1)),
            vec![at("a", 1)]
        );
        assert_eq!(
            step(&empty(), put("a", Expected::Any), written(1)),
            vec![at("a", 1)]
        );
        assert!(step(&empty(), put("a", Expected::Version(0)), written(2)).is_empty());
        assert_eq!(
            step(
                &at("a", 1),
                put("b", Expected::Version(0)),
                Some(KvOutput::VersionMismatch)
            ),
            vec![at("a", 1)]
        );
    }

    #[test]
    fn put_on_a_matching_version_bumps_it() {
        let written = |version| Some(KvOutput::Written { version });
        assert_eq!(
            step(&at("a", 3), put("b", Expected::Version(3)), written(4)),
            vec![at("b", 4)]
        );
        assert_eq!(
            step(&at("a", 3), put("b", Expected::Any), written(4)),
            vec![at("b", 4)]
        );
        assert!(step(&at("a", 3), put("b", Expected::Version(2)), written(3)).is_empty());
        assert_eq!(
            step(
                &at("a", 3),
                put("b", Expected::Version(2)),
                Some(KvOutput::VersionMismatch)
            ),
            vec![at("a", 3)]
        );
        assert!(step(
            &at("a", 3),
            put("b", Expected::Version(3)),
            Some(KvOutput::VersionMismatch)
        )
        .is_empty());
    }

    #[test]
    fn put_expecting_a_version_on_a_missing_key_is_no_key() {
        assert_eq!(
            step(
                &empty(),
                put("a", Expected::Version(2)),
                Some(KvOutput::NoKey)
            ),
            vec![empty()]
        );
        assert!(step(
            &empty(),
            put("a", Expected::Version(2)),
            Some(KvOutput::VersionMismatch)
        )
        .is_empty());
    }

    #[test]
    fn maybe_and_unknown_lead_to_both_states() {
        for output in [Some(KvOutput::Maybe), None] {
            assert_eq!(
                step(&at("a", 1), put("b", Expected::Version(1)), output.clone()),
                vec![at("a", 1), at("b", 2)]
            );
            assert_eq!(
                step(&at("a", 1), put("b", Expected::Version(5)), output.clone()),
                vec![at("a", 1)]
            );
            assert_eq!(
                step(&at("a", 1), delete(Expected::Any), output),
                vec![at("a", 1), empty()]
            );
        }
    }

    #[test]
    fn delete_removes_on_a_match_and_recreation_restarts_at_one() {
        assert_eq!(
            step(
                &at("a", 2),
                delete(Expected::Version(2)),
                Some(KvOutput::Deleted)
            ),
            vec![empty()]
        );
        assert_eq!(
            step(
                &at("a", 2),
                delete(Expected::Version(1)),
                Some(KvOutput::VersionMismatch)
            ),
            vec![at("a", 2)]
        );
        assert_eq!(
            step(&empty(), delete(Expected::Any), Some(KvOutput::NoKey)),
            vec![empty()]
        );
        assert!(step(&empty(), delete(Expected::Any), Some(KvOutput::Deleted)).is_empty());
        assert_eq!(
            step(
                &empty(),
                put("c", Expected::Version(0)),
                Some(KvOutput::Written { version: 1 })
            ),
            vec![at("c", 1)]
        );
    }
}
