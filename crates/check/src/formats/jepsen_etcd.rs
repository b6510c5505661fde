//! Jepsen etcd logs: one register, read / write / cas.
//!
//! ```text
//! INFO  jepsen.util - 3<TAB>:invoke<TAB>:write<TAB>4
//! INFO  jepsen.util - 3<TAB>:ok<TAB>:write<TAB>4
//! INFO  jepsen.util - 2<TAB>:invoke<TAB>:cas<TAB>[3 0]
//! INFO  jepsen.util - 2<TAB>:fail<TAB>:cas<TAB>[3 0]
//! INFO  jepsen.util - 0<TAB>:invoke<TAB>:read<TAB>nil
//! INFO  jepsen.util - 0<TAB>:ok<TAB>:read<TAB>3
//! ```
//!
//! (`<TAB>` is a tab character.) Fields after `jepsen.util - ` are tab-separated: process, type, function, value. Lines whose
//! process is not a number (nemesis, setup) and lines without `jepsen.util - ` are ignored.
//! `:ok` completes an operation; `:fail` means a cas found another value, a write did not
//! apply (dropped), or a read failed (no effect, dropped); `:info` and a missing completion mean
//! the outcome is unknown. Times are line numbers.

use super::{ParseError, Recorder};
use crate::history::History;
use crate::models::{RegisterInput, RegisterOutput};

const MARKER: &str = "jepsen.util - ";
const FIELDS: &str = "4 tab-separated fields after \"jepsen.util - \": process, :invoke|:ok|:fail|:info, :read|:write|:cas, value";

/// Parses a Jepsen etcd log into a [`Register`](crate::models::Register) history.
pub fn parse(text: &str) -> Result<History<RegisterInput, RegisterOutput>, ParseError> {
    let mut recorder = Recorder::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let Some(start) = raw.find(MARKER) else {
            continue;
        };
        let rest = &raw[start + MARKER.len()..];
        let fields: Vec<&str> = rest.split('\t').map(str::trim).collect();
        let Ok(process) = fields[0].parse::<u64>() else {
            continue; // nemesis and other non-client lines
        };
        let [_, kind, f, value] = fields[..] else {
            return Err(ParseError::new(line, FIELDS, rest));
        };
        let time = line as u64;
        match kind {
            ":invoke" => {
                let input = match f {
                    ":read" => RegisterInput::Read,
                    ":write" => RegisterInput::Write(scalar(line, value)?),
                    ":cas" => {
                        let (from, to) = pair(line, value)?;
                        RegisterInput::Cas { from, to }
                    }
                    other => return Err(ParseError::new(line, ":read, :write or :cas", other)),
                };
                recorder.invoke(line, process, f, input, time)?;
            }
            ":ok" => {
                let (id, f) = recorder.close(line, process, Some(f))?;
                let output = match f.as_str() {
                    ":read" if value == "nil" => RegisterOutput::Value(None),
                    ":read" => RegisterOutput::Value(Some(scalar(line, value)?)),
                    _ => RegisterOutput::Ok,
                };
                recorder.complete(line, id, output, time)?;
            }
            ":fail" => {
                let (id, f) = recorder.close(line, process, Some(f))?;
                match f.as_str() {
                    ":cas" => recorder.complete(line, id, RegisterOutput::Failed, time)?,
                    _ => recorder.discard(line, id)?,
                }
            }
            ":info" => {
                let (id, _) = recorder.close(line, process, Some(f))?;
                recorder.unknown(line, id)?;
            }
            other => return Err(ParseError::new(line, ":invoke, :ok, :fail or :info", other)),
        }
    }
    Ok(recorder.finish())
}

fn scalar(line: usize, value: &str) -> Result<String, ParseError> {
    if value.is_empty() || value.contains(char::is_whitespace) || value.starts_with('[') {
        return Err(ParseError::new(line, "a value (for example 3)", value));
    }
    Ok(value.to_string())
}

fn pair(line: usize, value: &str) -> Result<(String, String), ParseError> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(|| ParseError::new(line, "a cas argument [from to]", value))?;
    let mut parts = inner.split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(from), Some(to), None) => Ok((from.to_string(), to.to_string())),
        _ => Err(ParseError::new(line, "a cas argument [from to]", value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    #[test]
    fn parses_operations_and_outcomes() {
        let text = "INFO  jepsen.util - 3\t:invoke\t:write\t4\n\
                    INFO  jepsen.util - :nemesis\t:info\t:start\tnil\n\
                    INFO  jepsen.util - 2\t:invoke\t:cas\t[3 0]\n\
                    INFO  jepsen.util - 3\t:ok\t:write\t4\n\
                    INFO  jepsen.util - 2\t:fail\t:cas\t[3 0]\n\
                    INFO  jepsen.util - 0\t:invoke\t:read\tnil\n\
                    INFO  jepsen.util - 0\t:ok\t:read\tnil\n\
                    INFO  jepsen.util - 1\t:invoke\t:write\t1\n\
                    INFO  jepsen.util - 1\t:info\t:write\t1\n\
                    INFO  jepsen.util - 4\t:invoke\t:write\t5\n\
                    INFO  jepsen.util - 4\t:fail\t:write\t5\n";
        let history = parse(text).unwrap();
        let ops = history.ops();
        assert_eq!(ops.len(), 5);
        assert_eq!(ops[0].input, RegisterInput::Write("4".into()));
        assert_eq!(
            ops[0].outcome,
            Outcome::Returned {
                output: RegisterOutput::Ok,
                at: 4
            }
        );
        assert_eq!(
            ops[1].input,
            RegisterInput::Cas {
                from: "3".into(),
                to: "0".into()
            }
        );
        assert_eq!(ops[1].output(), Some(&RegisterOutput::Failed));
        assert_eq!(ops[2].output(), Some(&RegisterOutput::Value(None)));
        assert_eq!(ops[3].outcome, Outcome::Unknown);
        assert_eq!(ops[4].outcome, Outcome::Discarded);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let err = parse(
            "INFO  jepsen.util - 1\t:invoke\t:write\t1\nINFO  jepsen.util - 1\t:ok\t:write\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 2);
        let err = parse("INFO  jepsen.util - 1\t:invoke\t:frob\t1\n").unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.expected.contains(":cas"), "{err}");
        let err = parse("x\nINFO  jepsen.util - 1\t:ok\t:write\t1\n").unwrap_err();
        assert_eq!(err.line, 2);
        let err = parse("INFO  jepsen.util - 1\t:invoke\t:cas\t[1]\n").unwrap_err();
        assert!(err.expected.contains("[from to]"), "{err}");
    }
}
