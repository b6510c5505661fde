//! Jepsen's EDN-like key/value histories: get / put / append on many keys.
//!
//! ```text
//! {:process 0, :type :invoke, :f :append, :key "0", :value "x 0 0 y"}
//! {:process 0, :type :ok, :f :append, :key "0", :value "x 0 0 y"}
//! {:process 0, :type :invoke, :f :get, :key "7", :value nil}
//! {:process 0, :type :ok, :f :get, :key "7", :value ""}
//! ```
//!
//! One map per line; blank lines are skipped. `:ok` completes, `:fail` drops the operation (it
//! did not apply), `:info` or no completion leaves the outcome unknown. Exactly these lines are
//! ignored: blank lines and maps whose `:process` is a keyword (`:nemesis`); anything else that
//! is not such a map is an error. Times are line numbers.

use std::collections::BTreeMap;

use super::{ParseError, Recorder};
use crate::history::History;
use crate::models::{AppendKvInput, AppendKvOutput};

/// A value of the EDN subset these files use.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Edn {
    Keyword(String),
    Str(String),
    Int(u64),
    Nil,
}

/// Parses a Jepsen key/value history into an [`AppendKv`](crate::models::AppendKv) history.
pub fn parse(text: &str) -> Result<History<AppendKvInput, AppendKvOutput>, ParseError> {
    let mut recorder = Recorder::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let map = parse_map(line, raw)?;
        let field = |name: &str| {
            map.get(name)
                .ok_or_else(|| ParseError::new(line, format!("a map with a :{name} entry"), raw))
        };
        let process = match field("process")? {
            Edn::Int(p) => *p,
            Edn::Keyword(_) => continue, // :nemesis
            other => {
                return Err(ParseError::new(
                    line,
                    ":process as a number",
                    format!("{other:?}"),
                ))
            }
        };
        let kind = keyword(line, "type", field("type")?)?;
        let f = keyword(line, "f", field("f")?)?;
        let key = string(line, "key", field("key")?)?;
        let value = map.get("value").cloned().unwrap_or(Edn::Nil);
        let time = line as u64;
        match kind.as_str() {
            "invoke" => {
                let input = match f.as_str() {
                    "get" => AppendKvInput::Get { key },
                    "put" => AppendKvInput::Put {
                        key,
                        value: string(line, "value", &value)?,
                    },
                    "append" => AppendKvInput::Append {
                        key,
                        value: string(line, "value", &value)?,
                    },
                    other => return Err(ParseError::new(line, ":f :get, :put or :append", other)),
                };
                recorder.invoke(line, process, &f, input, time)?;
            }
            "ok" => {
                let (id, f) = recorder.close(line, process, Some(&f))?;
                let output = match f.as_str() {
                    "get" => AppendKvOutput::Value(string(line, "value", &value)?),
                    _ => AppendKvOutput::Ok,
                };
                recorder.complete(line, id, output, time)?;
            }
            "fail" => {
                let (id, _) = recorder.close(line, process, Some(&f))?;
                recorder.discard(line, id)?;
            }
            "info" => {
                let (id, _) = recorder.close(line, process, Some(&f))?;
                recorder.unknown(line, id)?;
            }
            other => {
                return Err(ParseError::new(
                    line,
                    ":type :invoke, :ok, :fail or :info",
                    other,
                ))
            }
        }
    }
    Ok(recorder.finish())
}

fn keyword(line: usize, name: &str, value: &Edn) -> Result<String, ParseError> {
    match value {
        Edn::Keyword(k) => Ok(k.clone()),
        other => Err(ParseError::new(
            line,
            format!(":{name} as a keyword"),
            format!("{other:?}"),
        )),
    }
}

fn string(line: usize, name: &str, value: &Edn) -> Result<String, ParseError> {
    match value {
        Edn::Str(s) => Ok(s.clone()),
        Edn::Int(i) => Ok(i.to_string()),
        other => Err(ParseError::new(
            line,
            format!(":{name} as a string"),
            format!("{other:?}"),
        )),
    }
}

/// Parses `{:k v, :k v}` into a map from keyword name to value.
fn parse_map(line: usize, raw: &str) -> Result<BTreeMap<String, Edn>, ParseError> {
    const EXPECTED_MAP: &str =
        "a map like {:process 0, :type :invoke, :f :get, :key \"k\", :value nil}";
    let text = raw.trim();
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| ParseError::new(line, EXPECTED_MAP, raw))?;
    let mut chars = inner.char_indices().peekable();
    let mut map = BTreeMap::new();
    loop {
        // Separators: whitespace and commas.
        while chars
            .next_if(|(_, c)| c.is_whitespace() || *c == ',')
            .is_some()
        {}
        if chars.peek().is_none() {
            return Ok(map);
        }
        let key = match read_value(&mut chars, inner) {
            Some(Edn::Keyword(k)) => k,
            _ => return Err(ParseError::new(line, "a :keyword key", raw)),
        };
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let value = read_value(&mut chars, inner)
            .ok_or_else(|| ParseError::new(line, format!("a value after :{key}"), raw))?;
        map.insert(key, value);
    }
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

fn read_value(chars: &mut Chars<'_>, text: &str) -> Option<Edn> {
    let &(start, first) = chars.peek()?;
    if first == '"' {
        chars.next();
        let mut s = String::new();
        loop {
            let (_, c) = chars.next()?;
            match c {
                '"' => return Some(Edn::Str(s)),
                '\\' => {
                    let (_, escaped) = chars.next()?;
                    s.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                }
                c => s.push(c),
            }
        }
    }
    let mut end = start;
    while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != ',') {
        end = i + c.len_utf8();
    }
    let token = &text[start..end];
    if let Some(k) = token.strip_prefix(':') {
        (!k.is_empty()).then(|| Edn::Keyword(k.to_string()))
    } else if token == "nil" {
        Some(Edn::Nil)
    } else {
        token.parse().ok().map(Edn::Int)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    #[test]
    fn parses_maps() {
        let text = "{:process 0, :type :invoke, :f :append, :key \"0\", :value \"x 0 0 y\"}\n\
                    {:process 1, :type :invoke, :f :get, :key \"7\", :value nil}\n\
                    {:process 0, :type :ok, :f :append, :key \"0\", :value \"x 0 0 y\"}\n\
                    \n\
                    {:process 1, :type :ok, :f :get, :key \"7\", :value \"\"}\n\
                    {:process 2, :type :invoke, :f :put, :key \"7\", :value \"a\"}\n";
        let history = parse(text).unwrap();
        let ops = history.ops();
        assert_eq!(ops.len(), 3);
        assert_eq!(
            ops[0].input,
            AppendKvInput::Append {
                key: "0".into(),
                value: "x 0 0 y".into()
            }
        );
        assert_eq!(
            ops[0].outcome,
            Outcome::Returned {
                output: AppendKvOutput::Ok,
                at: 3
            }
        );
        assert_eq!(ops[1].output(), Some(&AppendKvOutput::Value(String::new())));
        assert_eq!(ops[2].outcome, Outcome::Unknown);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let err = parse(
            "{:process 0, :type :invoke, :f :get, :key \"1\", :value nil}\n{:process 0 :type}\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 2);
        let err = parse("{:process 0, :type :invoke, :f :get, :value nil}").unwrap_err();
        assert!(err.expected.contains(":key"), "{err}");
        let err = parse("not a map").unwrap_err();
        assert_eq!(err.line, 1);
    }
}
