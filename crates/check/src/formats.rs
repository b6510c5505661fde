//! Parsers of the history formats `shoal check` reads. Each takes the file's text and gives a
//! [`History`](crate::History) for one of the built-in models, or a [`ParseError`] naming the line and what was
//! expected there. Times are line numbers unless the format carries its own.
//!
//! - [`jepsen_etcd`]: Jepsen's etcd logs, for the [`Register`](crate::models::Register) model;
//! - [`jepsen_kv`]: Jepsen's EDN-like key/value histories, for [`AppendKv`](crate::models::AppendKv);
//! - [`json`]: Shoal's own JSON-lines format, for all three built-in models.

use std::collections::BTreeMap;

use crate::history::{ClientId, HistoryBuilder, HistoryError, OpId, Time};

pub mod jepsen_etcd;
pub mod jepsen_kv;
pub mod json;

/// A line of a history file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: expected {expected}, found {found}")]
pub struct ParseError {
    /// The line number, from 1.
    pub line: usize,
    /// What the parser expected there.
    pub expected: String,
    /// What it found (shortened).
    pub found: String,
}

/// How much of an offending text an error message quotes.
const QUOTED_CHARS: usize = 80;

impl ParseError {
    /// An error at `line`.
    pub fn new(line: usize, expected: impl Into<String>, found: impl AsRef<str>) -> Self {
        let found = found.as_ref();
        let found = if found.chars().count() > QUOTED_CHARS {
            let cut: String = found.chars().take(QUOTED_CHARS).collect();
            format!("{cut:?}...")
        } else {
            format!("{found:?}")
        };
        ParseError {
            line,
            expected: expected.into(),
            found,
        }
    }
}

/// One client's open operation while parsing.
struct OpenOp {
    id: OpId,
    f: String,
    line: usize,
}

/// Pairs invocations and completions by client, as the line formats need.
struct Recorder<I, O> {
    builder: HistoryBuilder<I, O>,
    open: BTreeMap<ClientId, OpenOp>,
}

impl<I, O> Recorder<I, O> {
    fn new() -> Self {
        Recorder {
            builder: HistoryBuilder::new(),
            open: BTreeMap::new(),
        }
    }

    fn invoke(
        &mut self,
        line: usize,
        client: ClientId,
        f: &str,
        input: I,
        time: Time,
    ) -> Result<(), ParseError> {
        if let Some(open) = self.open.get(&client) {
            return Err(ParseError::new(
                line,
                format!(
                    "a completion of client {client}'s {} invoked on line {} before it invokes again",
                    open.f, open.line
                ),
                "an invocation",
            ));
        }
        let id = self.builder.invoke(client, input, time);
        self.open.insert(
            client,
            OpenOp {
                id,
                f: f.to_string(),
                line,
            },
        );
        Ok(())
    }

    /// Closes `client`'s open operation, checking the function matches when the line names one.
    fn close(
        &mut self,
        line: usize,
        client: ClientId,
        f: Option<&str>,
    ) -> Result<(OpId, String), ParseError> {
        let Some(open) = self.open.remove(&client) else {
            return Err(ParseError::new(
                line,
                format!("an invocation by client {client} before its completion"),
                "a completion with no open operation",
            ));
        };
        if let Some(f) = f {
            if f != open.f {
                return Err(ParseError::new(
                    line,
                    format!(
                        "a completion of {} (invoked on line {}) for client {client}",
                        open.f, open.line
                    ),
                    f,
                ));
            }
        }
        Ok((open.id, open.f))
    }

    fn complete(&mut self, line: usize, id: OpId, output: O, time: Time) -> Result<(), ParseError> {
        self.builder
            .complete(id, output, time)
            .map_err(|e| history_error(line, e))
    }

    fn discard(&mut self, line: usize, id: OpId) -> Result<(), ParseError> {
        self.builder.discard(id).map_err(|e| history_error(line, e))
    }

    fn unknown(&mut self, line: usize, id: OpId) -> Result<(), ParseError> {
        self.builder.unknown(id).map_err(|e| history_error(line, e))
    }

    fn finish(self) -> crate::History<I, O> {
        self.builder.build()
    }
}

fn history_error(line: usize, error: HistoryError) -> ParseError {
    ParseError::new(line, "a consistent history", error.to_string())
}
