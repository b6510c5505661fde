//! A key/value store with get, put and append, every key starting as the empty string.

use super::KeyMap;
use crate::model::Model;

/// A map from string keys to string values; every key starts as `""`. `put` replaces a value,
/// `append` concatenates to it, `get` returns it. Partitioned by key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendKv;

/// An operation on an [`AppendKv`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AppendKvInput {
    /// Read a key.
    Get {
        /// The key.
        key: String,
    },
    /// Replace a key's value.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Append to a key's value.
    Append {
        /// The key.
        key: String,
        /// What to append.
        value: String,
    },
}

impl AppendKvInput {
    /// The key the operation is on.
    pub fn key(&self) -> &str {
        match self {
            AppendKvInput::Get { key }
            | AppendKvInput::Put { key, .. }
            | AppendKvInput::Append { key, .. } => key,
        }
    }
}

/// An answer of an [`AppendKv`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AppendKvOutput {
    /// A get's answer.
    Value(String),
    /// A put or append applied.
    Ok,
}

impl Model for AppendKv {
    type Input = AppendKvInput;
    type Output = AppendKvOutput;
    /// Keys whose value is not `""` (so equal maps are equal states).
    type State = KeyMap<String>;

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
        match (input, output) {
            (AppendKvInput::Get { .. }, None) => next.push(state.clone()),
            (AppendKvInput::Get { key }, Some(AppendKvOutput::Value(value))) => {
                if state.get(key).map_or("", String::as_str) == value {
                    next.push(state.clone());
                }
            }
            (AppendKvInput::Put { key, value }, None | Some(AppendKvOutput::Ok)) => {
                let mut state = state.clone();
                if value.is_empty() {
                    state.remove(key);
                } else {
                    state.insert(key, value.clone());
                }
                next.push(state);
            }
            (AppendKvInput::Append { key, value }, None | Some(AppendKvOutput::Ok)) => {
                let mut state = state.clone();
                if !value.is_empty() {
                    let mut new_value = state.get(key).cloned().unwrap_or_default();
                    new_value.push_str(value);
                    state.insert(key, new_value);
                }
                next.push(state);
            }
            (AppendKvInput::Get { .. }, Some(AppendKvOutput::Ok))
            | (
                AppendKvInput::Put { .. } | AppendKvInput::Append { .. },
                Some(AppendKvOutput::Value(_)),
            ) => {}
        }
    }

    fn is_read_only(&self, input: &Self::Input, _output: Option<&Self::Output>) -> bool {
        matches!(input, AppendKvInput::Get { .. })
    }

    fn partition_key(&self, input: &Self::Input) -> Option<String> {
        Some(input.key().to_string())
    }

    fn state_bytes(&self, state: &Self::State) -> usize {
        std::mem::size_of::<Self::State>()
            + state
                .iter()
                .map(|(k, v)| 48 + k.len() + v.len())
                .sum::<usize>()
    }

    fn describe_op(&self, input: &Self::Input, output: Option<&Self::Output>) -> String {
        let input = match input {
            AppendKvInput::Get { key } => format!("get {key:?}"),
            AppendKvInput::Put { key, value } => format!("put {key:?} {value:?}"),
            AppendKvInput::Append { key, value } => format!("append {key:?} {value:?}"),
        };
        let output = match output {
            None => "?".to_string(),
            Some(AppendKvOutput::Value(value)) => format!("{value:?}"),
            Some(AppendKvOutput::Ok) => "ok".to_string(),
        };
        format!("{input} -> {output}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> KeyMap<String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn step(
        state: &KeyMap<String>,
        input: AppendKvInput,
        output: Option<AppendKvOutput>,
    ) -> Vec<KeyMap<String>> {
        let mut next = Vec::new();
        AppendKv.step(state, &input, output.as_ref(), &mut next);
        next
    }

    #[test]
    fn keys_start_empty() {
        let get = AppendKvInput::Get { key: "a".into() };
        assert_eq!(
            step(
                &map(&[]),
                get.clone(),
                Some(AppendKvOutput::Value(String::new()))
            ),
            vec![map(&[])]
        );
        assert!(step(&map(&[]), get, Some(AppendKvOutput::Value("x".into()))).is_empty());
    }

    #[test]
    fn put_replaces_and_append_concatenates() {
        let put = AppendKvInput::Put {
            key: "a".into(),
            value: "x".into(),
        };
        let append = AppendKvInput::Append {
            key: "a".into(),
            value: "y".into(),
        };
        assert_eq!(
            step(&map(&[("a", "old")]), put, Some(AppendKvOutput::Ok)),
            vec![map(&[("a", "x")])]
        );
        assert_eq!(
            step(&map(&[("a", "x")]), append.clone(), None),
            vec![map(&[("a", "xy")])]
        );
        assert_eq!(
            step(&map(&[]), append, Some(AppendKvOutput::Ok)),
            vec![map(&[("a", "y")])]
        );
        let clear = AppendKvInput::Put {
            key: "a".into(),
            value: String::new(),
        };
        assert_eq!(
            step(&map(&[("a", "x")]), clear, Some(AppendKvOutput::Ok)),
            vec![map(&[])]
        );
    }

    #[test]
    fn keys_are_partitions() {
        assert_eq!(
            AppendKv.partition_key(&AppendKvInput::Get { key: "k".into() }),
            Some("k".to_string())
        );
    }
}
