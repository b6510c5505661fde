//! Shoal's JSON-lines history format, for checking the histories of your own systems.
//!
//! One JSON object per line (blank lines and lines starting with `#` are skipped). Each is an
//! event of one client: an invocation, then later its completion.
//!
//! ```text
//! {"client": 1, "type": "invoke", "f": "put", "key": "a", "value": "x", "expected": 0}
//! {"client": 2, "type": "invoke", "f": "get", "key": "a"}
//! {"client": 1, "type": "ok", "version": 1}
//! {"client": 2, "type": "ok", "value": "x", "version": 1}
//! ```
//!
//! Fields: `client` (integer, required), `type` (required), `time` (optional integer in any unit;
//! either every line has one or none does, and then line numbers are the times), and per
//! operation:
//!
//! | model | invocation (`"type": "invoke"`) | completions |
//! |---|---|---|
//! | versioned-kv | `"f": "get", "key"` | `ok` with `value` and `version`; `no-key` |
//! | | `"f": "put", "key", "value", "expected"` (integer, or `"any"`; absent = any) | `ok` with `version` (the new one); `mismatch`; `no-key`; `maybe` |
//! | | `"f": "delete", "key", "expected"` | `ok`; `mismatch`; `no-key`; `maybe` |
//! | register | `"f": "read"` | `ok` with `value` (absent or `null`: no value) |
//! | | `"f": "write", "value"` | `ok` |
//! | | `"f": "cas", "from", "to"` | `ok` (applied); `fail` (found another value) |
//! | append-kv | `"f": "get" / "put" / "append", "key"`, and `"value"` for put and append | `ok` (with `value` for get) |
//!
//! For every model, `"type": "info"` (or no completion at all) means the outcome is unknown, and
//! `"type": "fail"` (except for cas) means the operation certainly did not take effect. Values
//! are strings; integers are accepted and read as their decimal text.

use serde::Deserialize;
use serde_json::Value;

use super::{ParseError, Recorder};
use crate::history::{History, Time};
use crate::models::{
    AppendKvInput, AppendKvOutput, Expected, KvInput, KvOutput, RegisterInput, RegisterOutput,
};

/// One line, before its meaning is checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Event {
    client: u64,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    time: Option<u64>,
    #[serde(default)]
    f: Option<String>,
    #[serde(default)]
    key: Option<Value>,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    expected: Option<Value>,
    #[serde(default)]
    from: Option<Value>,
    #[serde(default)]
    to: Option<Value>,
}

const EVENT_SHAPE: &str = "a JSON object like {\"client\": 1, \"type\": \"invoke\", \"f\": \"get\", \"key\": \"a\"} (fields: client, type, time, f, key, value, version, expected, from, to)";

/// What a model needs from the generic line reader.
trait JsonModel {
    type Input;
    type Output;
    /// The input of an invocation line.
    fn input(line: usize, event: &Event) -> Result<Self::Input, ParseError>;
    /// The effect of a completion line on operation `f`.
    fn completion(
        line: usize,
        f: &str,
        event: &Event,
    ) -> Result<Completion<Self::Output>, ParseError>;
}

enum Completion<O> {
    Returned(O),
    Unknown,
    Discarded,
}

fn parse_with<M: JsonModel>(text: &str) -> Result<History<M::Input, M::Output>, ParseError> {
    let mut recorder: Recorder<M::Input, M::Output> = Recorder::new();
    let mut timed: Option<bool> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let event: Event = serde_json::from_str(trimmed)
            .map_err(|e| ParseError::new(line, EVENT_SHAPE, format!("{trimmed} ({e})")))?;
        let has_time = event.time.is_some();
        if *timed.get_or_insert(has_time) != has_time {
            return Err(ParseError::new(
                line,
                "a \"time\" field on every line or on none",
                trimmed,
            ));
        }
        let time: Time = event.time.unwrap_or(line as u64);
        if event.kind == "invoke" {
            let f = event
                .f
                .as_deref()
                .ok_or_else(|| ParseError::new(line, "an \"f\" field in an invocation", trimmed))?;
            let input = M::input(line, &event)?;
            recorder.invoke(line, event.client, f, input, time)?;
        } else {
            let (id, f) = recorder.close(line, event.client, event.f.as_deref())?;
            match M::completion(line, &f, &event)? {
                Completion::Returned(output) => recorder.complete(line, id, output, time)?,
                Completion::Unknown => recorder.unknown(line, id)?,
                Completion::Discarded => recorder.discard(line, id)?,
            }
        }
    }
    Ok(recorder.finish())
}

fn text(line: usize, name: &str, value: Option<&Value>) -> Result<String, ParseError> {
    match value {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err(ParseError::new(
            line,
            format!("\"{name}\" as a string"),
            other.to_string(),
        )),
        None => Err(ParseError::new(line, format!("a \"{name}\" field"), "none")),
    }
}

fn expected(line: usize, value: Option<&Value>) -> Result<Expected, ParseError> {
    match value {
        None => Ok(Expected::Any),
        Some(Value::String(s)) if s == "any" => Ok(Expected::Any),
        Some(Value::Number(n)) => n.as_u64().map(Expected::Version).ok_or_else(|| {
            ParseError::new(
                line,
                "\"expected\" as a version >= 0 or \"any\"",
                n.to_string(),
            )
        }),
        Some(other) => Err(ParseError::new(
            line,
            "\"expected\" as a version >= 0 or \"any\"",
            other.to_string(),
        )),
    }
}

fn unexpected_type<O>(line: usize, f: &str, allowed: &str, kind: &str) -> Result<O, ParseError> {
    Err(ParseError::new(
        line,
        format!("a completion of {f} with \"type\" {allowed}"),
        kind,
    ))
}

/// The [`VersionedKv`](crate::models::VersionedKv) model in JSON.
struct VersionedKvJson;

impl JsonModel for VersionedKvJson {
    type Input = KvInput;
    type Output = KvOutput;

    fn input(line: usize, event: &Event) -> Result<KvInput, ParseError> {
        let key = text(line, "key", event.key.as_ref())?;
        match event.f.as_deref().unwrap_or_default() {
            "get" => Ok(KvInput::Get { key }),
            "put" => Ok(KvInput::Put {
                key,
                value: text(line, "value", event.value.as_ref())?,
                expected: expected(line, event.expected.as_ref())?,
            }),
            "delete" => Ok(KvInput::Delete {
                key,
                expected: expected(line, event.expected.as_ref())?,
            }),
            other => Err(ParseError::new(line, "\"f\" get, put or delete", other)),
        }
    }

    fn completion(line: usize, f: &str, event: &Event) -> Result<Completion<KvOutput>, ParseError> {
        let version = || {
            event.version.ok_or_else(|| {
                ParseError::new(line, format!("a \"version\" in the ok of a {f}"), "none")
            })
        };
        let output = match (event.kind.as_str(), f) {
            ("info", _) => return Ok(Completion::Unknown),
            ("fail", _) => return Ok(Completion::Discarded),
            ("ok", "get") => match (&event.value, event.version) {
                (Some(value), Some(version)) => KvOutput::Found {
                    value: text(line, "value", Some(value))?,
                    version,
                },
                _ => {
                    return Err(ParseError::new(
                        line,
                        "a \"value\" and a \"version\" in the ok of a get (a missing key is \"type\": \"no-key\")",
                        "a field missing",
                    ))
                }
            },
            ("ok", "put") => KvOutput::Written {
                version: version()?,
            },
            ("ok", _) => KvOutput::Deleted,
            ("no-key", _) => KvOutput::NoKey,
            ("mismatch", "put" | "delete") => KvOutput::VersionMismatch,
            ("maybe", "put" | "delete") => KvOutput::Maybe,
            (kind, "get") => return unexpected_type(line, f, "ok, no-key, info or fail", kind),
            (kind, _) => {
                return unexpected_type(line, f, "ok, no-key, mismatch, maybe, info or fail", kind)
            }
        };
        Ok(Completion::Returned(output))
    }
}

/// The [`Register`](crate::models::Register) model in JSON.
struct RegisterJson;

impl JsonModel for RegisterJson {
    type Input = RegisterInput;
    type Output = RegisterOutput;

    fn input(line: usize, event: &Event) -> Result<RegisterInput, ParseError> {
        match event.f.as_deref().unwrap_or_default() {
            "read" => Ok(RegisterInput::Read),
            "write" => Ok(RegisterInput::Write(text(
                line,
                "value",
                event.value.as_ref(),
            )?)),
            "cas" => Ok(RegisterInput::Cas {
                from: text(line, "from", event.from.as_ref())?,
                to: text(line, "to", event.to.as_ref())?,
            }),
            other => Err(ParseError::new(line, "\"f\" read, write or cas", other)),
        }
    }

    fn completion(
        line: usize,
        f: &str,
        event: &Event,
    ) -> Result<Completion<RegisterOutput>, ParseError> {
        let output = match (event.kind.as_str(), f) {
            ("info", _) => return Ok(Completion::Unknown),
            ("fail", "cas") => RegisterOutput::Failed,
            ("fail", _) => return Ok(Completion::Discarded),
            ("ok", "read") => match &event.value {
                None | Some(Value::Null) => RegisterOutput::Value(None),
                value => RegisterOutput::Value(Some(text(line, "value", value.as_ref())?)),
            },
            ("ok", _) => RegisterOutput::Ok,
            (kind, _) => return unexpected_type(line, f, "ok, fail or info", kind),
        };
        Ok(Completion::Returned(output))
    }
}

/// The [`AppendKv`](crate::models::AppendKv) model in JSON.
struct AppendKvJson;

impl JsonModel for AppendKvJson {
    type Input = AppendKvInput;
    type Output = AppendKvOutput;

    fn input(line: usize, event: &Event) -> Result<AppendKvInput, ParseError> {
        let key = text(line, "key", event.key.as_ref())?;
        match event.f.as_deref().unwrap_or_default() {
            "get" => Ok(AppendKvInput::Get { key }),
            "put" => Ok(AppendKvInput::Put {
                key,
                value: text(line, "value", event.value.as_ref())?,
            }),
            "append" => Ok(AppendKvInput::Append {
                key,
                value: text(line, "value", event.value.as_ref())?,
            }),
            other => Err(ParseError::new(line, "\"f\" get, put or append", other)),
        }
    }

    fn completion(
        line: usize,
        f: &str,
        event: &Event,
    ) -> Result<Completion<AppendKvOutput>, ParseError> {
        let output = match (event.kind.as_str(), f) {
            ("info", _) => return Ok(Completion::Unknown),
            ("fail", _) => return Ok(Completion::Discarded),
            ("ok", "get") => AppendKvOutput::Value(match &event.value {
                None | Some(Value::Null) => String::new(),
                value => text(line, "value", value.as_ref())?,
            }),
            ("ok", _) => AppendKvOutput::Ok,
            (kind, _) => return unexpected_type(line, f, "ok, fail or info", kind),
        };
        Ok(Completion::Returned(output))
    }
}

/// Parses a JSON-lines history for the [`VersionedKv`](crate::models::VersionedKv) model.
pub fn parse_versioned_kv(text: &str) -> Result<History<KvInput, KvOutput>, ParseError> {
    parse_with::<VersionedKvJson>(text)
}

/// Parses a JSON-lines history for the [`Register`](crate::models::Register) model.
pub fn parse_register(text: &str) -> Result<History<RegisterInput, RegisterOutput>, ParseError> {
    parse_with::<RegisterJson>(text)
}

/// Parses a JSON-lines history for the [`AppendKv`](crate::models::AppendKv) model.
pub fn parse_append_kv(text: &str) -> Result<History<AppendKvInput, AppendKvOutput>, ParseError> {
    parse_with::<AppendKvJson>(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    #[test]
    fn parses_versioned_kv_events() {
        let text = r#"
# a comment
{"client": 1, "type": "invoke", "f": "put", "key": "a", "value": "x", "expected": 0}
{"client": 2, "type": "invoke", "f": "get", "key": "a"}
{"client": 1, "type": "ok", "version": 1}
{"client": 2, "type": "ok", "value": "x", "version": 1}
{"client": 3, "type": "invoke", "f": "delete", "key": "a", "expected": "any"}
{"client": 3, "type": "maybe"}
{"client": 4, "type": "invoke", "f": "put", "key": 7, "value": 5}
"#;
        let history = parse_versioned_kv(text).unwrap();
        let ops = history.ops();
        assert_eq!(ops.len(), 4);
        assert_eq!(
            ops[0].input,
            KvInput::Put {
                key: "a".into(),
                value: "x".into(),
                expected: Expected::Version(0)
            }
        );
        assert_eq!(
            ops[0].outcome,
            Outcome::Returned {
                output: KvOutput::Written { version: 1 },
                at: 5
            }
        );
        assert_eq!(
            ops[1].output(),
            Some(&KvOutput::Found {
                value: "x".into(),
                version: 1
            })
        );
        assert_eq!(ops[2].output(), Some(&KvOutput::Maybe));
        assert_eq!(
            ops[3].input,
            KvInput::Put {
                key: "7".into(),
                value: "5".into(),
                expected: Expected::Any
            }
        );
        assert_eq!(ops[3].outcome, Outcome::Unknown);
    }

    #[test]
    fn parses_register_events_with_times() {
        let text = r#"{"client": 1, "type": "invoke", "f": "cas", "from": 1, "to": 2, "time": 10}
{"client": 1, "type": "fail", "time": 20}
{"client": 1, "type": "invoke", "f": "read", "time": 30}
{"client": 1, "type": "ok", "value": null, "time": 40}"#;
        let history = parse_register(text).unwrap();
        assert_eq!(
            history.ops()[0].outcome,
            Outcome::Returned {
                output: RegisterOutput::Failed,
                at: 20
            }
        );
        assert_eq!(
            history.ops()[1].output(),
            Some(&RegisterOutput::Value(None))
        );
    }

    #[test]
    fn errors_name_the_line_and_what_was_expected() {
        let err = parse_versioned_kv("{\"client\": 1, \"type\": \"invoke\", \"f\": \"get\", \"key\": \"a\"}\n{\"client\": 1, \"type\": \"ok\"}\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.expected.contains("version"), "{err}");
        let err = parse_versioned_kv("{\"client\": 1, \"tipe\": \"invoke\"}").unwrap_err();
        assert_eq!(err.line, 1);
        let err = parse_register("{\"client\": 1, \"type\": \"invoke\", \"f\": \"read\", \"time\": 1}\n{\"client\": 1, \"type\": \"ok\"}").unwrap_err();
        assert!(err.expected.contains("time"), "{err}");
        let err = parse_register("{\"client\": 1, \"type\": \"invoke\", \"f\": \"read\", \"time\": 5}\n{\"client\": 1, \"type\": \"ok\", \"time\": 2}").unwrap_err();
        assert_eq!(err.line, 2);
    }
}
