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
//! (`<TAB>` is a tab character.) After `jepsen.util - ` come four fields: process, type,
//! function, value, separated by tabs or runs of spaces (some published logs use spaces); the
//! value is the rest of the line, so a cas's `[3 0]` keeps its space. `:ok` completes an
//! operation; `:fail` means a cas found another value, a write did not apply (dropped), or a read
//! failed (no effect, dropped); `:info` and a missing completion mean the outcome is unknown.
//! Times are line numbers.
//!
//! Exactly these lines are ignored: blank lines; `jepsen.util` lines whose process is a keyword
//! (`:nemesis`); and log lines of another logger, `LEVEL  LOGGER - MESSAGE` with a log level
//! (`TRACE`, `DEBUG`, `INFO`, `WARN`, `ERROR`, `FATAL`) and a logger other than `jepsen.util`.
//! Any other line is an error naming it, so a file in another format is never read as an empty
//! (and trivially linearizable) history.

use super::{ParseError, Recorder};
use crate::history::History;
use crate::models::{RegisterInput, RegisterOutput};

const MARKER: &str = "jepsen.util - ";
const FIELDS: &str = "4 fields after \"jepsen.util - \", separated by tabs or spaces: process, :invoke|:ok|:fail|:info, :read|:write|:cas, value";
const LINE: &str = "a Jepsen log line like \"INFO  jepsen.util - 3<TAB>:invoke<TAB>:write<TAB>4\"";

/// Log levels that open a log line of another logger (ignored).
const LEVELS: [&str; 6] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"];

/// Parses a Jepsen etcd log into a [`Register`](crate::models::Register) history.
pub fn parse(text: &str) -> Result<History<RegisterInput, RegisterOutput>, ParseError> {
    let mut recorder = Recorder::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let Some(start) = raw.find(MARKER) else {
            if is_other_logger(raw) {
                continue;
            }
            return Err(ParseError::new(line, LINE, raw));
        };
        let rest = &raw[start + MARKER.len()..];
        let Some([process, kind, f, value]) = fields(rest) else {
            if rest.trim_start().starts_with(':') {
                continue; // a nemesis line with fewer fields
            }
            return Err(ParseError::new(line, FIELDS, rest));
        };
        if process.starts_with(':') {
            continue; // :nemesis and other non-client processes
        }
        let Ok(process) = process.parse::<u64>() else {
            return Err(ParseError::new(
                line,
                "a process number (or a keyword such as :nemesis)",
                process,
            ));
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

/// The four fields after the marker: three words, then the rest of the line as the value.
fn fields(rest: &str) -> Option<[&str; 4]> {
    let (process, rest) = rest.trim().split_once(char::is_whitespace)?;
    let (kind, rest) = rest.trim_start().split_once(char::is_whitespace)?;
    let (f, value) = rest.trim_start().split_once(char::is_whitespace)?;
    let value = value.trim();
    (!value.is_empty()).then_some([process, kind, f, value])
}

/// Whether `raw` is `LEVEL  LOGGER - MESSAGE` of a logger other than `jepsen.util` (Jepsen's
/// own progress lines: `INFO  jepsen.core - Run complete`).
fn is_other_logger(raw: &str) -> bool {
    let mut words = raw.split_whitespace();
    let (Some(level), Some(logger), Some(dash)) = (words.next(), words.next(), words.next()) else {
        return false;
    };
    LEVELS.contains(&level)
        && dash == "-"
        && logger != "jepsen.util"
        && logger
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '$'))
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
        let err = parse("INFO  jepsen.core - starting\nINFO  jepsen.util - 1\t:ok\t:write\t1\n")
            .unwrap_err();
        assert_eq!(err.line, 2);
        let err = parse("INFO  jepsen.util - one\t:invoke\t:read\tnil\n").unwrap_err();
        assert!(err.expected.contains("process number"), "{err}");
        let err = parse("INFO  jepsen.util - 1\t:invoke\t:cas\t[1]\n").unwrap_err();
        assert!(err.expected.contains("[from to]"), "{err}");
    }

    #[test]
    fn lines_of_another_format_are_errors_not_skipped() {
        // A jepsen-kv line, a JSON line and free text: none of them is ignorable.
        for text in [
            "{:process 0, :type :invoke, :f :get, :key \"1\", :value nil}\n",
            "{\"client\": 1, \"type\": \"invoke\", \"f\": \"read\"}\n",
            "\nhello\n",
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.expected.contains("Jepsen log line"), "{err}");
        }
        assert_eq!(parse("\nhello\n").unwrap_err().line, 2);
    }

    #[test]
    fn documented_ignorable_lines_are_ignored() {
        let text = "INFO  jepsen.core - Worker 0 starting\n\
                    \n\
                    INFO  jepsen.util - :nemesis\t:info\t:start\tnil\n\
                    INFO  jepsen.util - :nemesis\t:info\n\
                    WARN  jepsen.control - ssh retry\n\
                    INFO  jepsen.util - 0\t:invoke\t:read\tnil\n";
        assert_eq!(parse(text).unwrap().len(), 1);
    }

    #[test]
    fn space_separated_fields_parse_like_tabs() {
        // etcd_100.log to etcd_102.log of the bundled histories use spaces, not tabs.
        let text = "INFO  jepsen.util - 17  :invoke :cas    [3 4]\n\
                    INFO  jepsen.util - 17  :ok     :cas    [3 4]\n";
        let history = parse(text).unwrap();
        assert_eq!(
            history.ops()[0].input,
            RegisterInput::Cas {
                from: "3".into(),
                to: "4".into()
            }
        );
        assert_eq!(history.ops()[0].output(), Some(&RegisterOutput::Ok));
    }
}
