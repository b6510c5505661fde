//! How `shoal kv scan` and `shoal kv shell` write keys and values as text, and how the shell
//! reads them back.
//!
//! A key or value is written as it is (a *bare word*) when that is unambiguous, and otherwise
//! as a C-style quoted string: `"..."` with `\n`, `\r`, `\t`, `\0`, `\\`, `\"` and `\xHH` for
//! any other byte (a control character or a byte that is not part of valid UTF-8). Bare words
//! are taken literally (a backslash in a bare word is a backslash). So every answer of the
//! shell stays one line and every key and value, binary ones included, round-trips.

use std::borrow::Cow;

/// A key as text: bare when it is non-empty UTF-8 without whitespace or control characters
/// and does not start with `"`; quoted otherwise.
pub fn key(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s)
            if !s.is_empty()
                && !s.starts_with('"')
                && !s.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Cow::Borrowed(s)
        }
        _ => Cow::Owned(quote(bytes)),
    }
}

/// A value as text (the rest of a line): bare when it is UTF-8 without control characters,
/// without whitespace at either end, and does not start with `"` (the empty value is bare
/// too); quoted otherwise. Plain text values with inner spaces stay as they are.
pub fn value(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s)
            if !s.starts_with('"')
                && !s.starts_with(char::is_whitespace)
                && !s.ends_with(char::is_whitespace)
                && !s.chars().any(char::is_control) =>
        {
            Cow::Borrowed(s)
        }
        _ => Cow::Owned(quote(bytes)),
    }
}

/// `bytes` as a quoted string (always quoted).
pub fn quote(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\0' => out.push_str("\\0"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.push('"');
    out
}

/// One word of a shell line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// The bytes it stands for (escapes resolved).
    pub bytes: Vec<u8>,
    /// Whether it was written quoted (a quoted `"10"` is a key, a bare `10` may be a number).
    pub quoted: bool,
}

impl Word {
    /// The word as UTF-8 text, if it is.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.bytes).ok()
    }
}

/// Splits off the next word of `s` (leading whitespace skipped): a quoted string or a bare
/// run of non-whitespace. Returns `None` at the end of the line, and the rest after the word.
pub fn next_word(s: &str) -> Result<Option<(Word, &str)>, String> {
    let s = s.trim_start();
    if s.is_empty() {
        return Ok(None);
    }
    if s.starts_with('"') {
        let (bytes, rest) = unquote(s)?;
        if rest.starts_with(|c: char| !c.is_whitespace()) {
            return Err(
                "a quoted string must be followed by a space or the end of the line".into(),
            );
        }
        return Ok(Some((
            Word {
                bytes,
                quoted: true,
            },
            rest,
        )));
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Ok(Some((
        Word {
            bytes: s.as_bytes()[..end].to_vec(),
            quoted: false,
        },
        &s[end..],
    )))
}

/// The rest of a line as one value: a single quoted string, or the bare text with the
/// whitespace before it skipped (inner spaces kept, as the shell always did).
pub fn rest_value(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim_start();
    if s.starts_with('"') {
        let (bytes, rest) = unquote(s)?;
        if !rest.trim().is_empty() {
            return Err("text after the quoted value".into());
        }
        return Ok(bytes);
    }
    Ok(s.as_bytes().to_vec())
}

/// Reads the quoted string at the start of `s` (which starts with `"`); returns its bytes and
/// what follows the closing quote.
fn unquote(s: &str) -> Result<(Vec<u8>, &str), String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => {
                let (_, e) = chars
                    .next()
                    .ok_or("a backslash at the end of the line (unterminated string)")?;
                match e {
                    'n' => out.push(b'\n'),
                    'r' => out.push(b'\r'),
                    't' => out.push(b'\t'),
                    '0' => out.push(0),
                    '\\' => out.push(b'\\'),
                    '"' => out.push(b'"'),
                    'x' => {
                        let hex: String = (0..2)
                            .filter_map(|_| chars.next().map(|(_, c)| c))
                            .collect();
                        let byte = (hex.len() == 2)
                            .then(|| u8::from_str_radix(&hex, 16).ok())
                            .flatten()
                            .ok_or_else(|| format!("\\x needs two hex digits, not {hex:?}"))?;
                        out.push(byte);
                    }
                    other => {
                        return Err(format!(
                            "unknown escape \\{other} (use \\n \\r \\t \\0 \\\\ \\\" \\xHH)"
                        ))
                    }
                }
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    Err("unterminated quoted string (no closing \")".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keys_and_values_stay_bare() {
        assert_eq!(key(b"user/42"), "user/42");
        assert_eq!(key("clé".as_bytes()), "clé");
        assert_eq!(value(b"hello world"), "hello world");
        assert_eq!(value(b""), "");
        assert_eq!(value(b"a\\b"), "a\\b");
    }

    #[test]
    fn ambiguous_ones_are_quoted() {
        assert_eq!(key(b"a b"), "\"a b\"");
        assert_eq!(key(b""), "\"\"");
        assert_eq!(key(b"\"x"), "\"\\\"x\"");
        assert_eq!(value(b"line1\nline2"), "\"line1\\nline2\"");
        assert_eq!(value(b" lead"), "\" lead\"");
        assert_eq!(value(&[0xff, b'a', 0x01]), "\"\\xffa\\x01\"");
        assert_eq!(value(b"tab\there"), "\"tab\\there\"");
    }

    #[test]
    fn every_byte_string_round_trips() {
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"a b".to_vec(),
            b"\"\\\n\r\t\0".to_vec(),
            (0u8..=255).collect(),
            "é\u{7f}ü".as_bytes().to_vec(),
        ];
        for bytes in cases {
            let q = quote(&bytes);
            let (word, rest) = next_word(&q).expect("parses").expect("a word");
            assert_eq!(word.bytes, bytes, "{q}");
            assert!(word.quoted);
            assert_eq!(rest, "");
            assert_eq!(rest_value(&q).expect("parses"), bytes);
        }
    }

    #[test]
    fn words_and_values() {
        let (w, rest) = next_word("  put  k any v").expect("ok").expect("word");
        assert_eq!(w.bytes, b"put");
        let (w, rest) = next_word(rest).expect("ok").expect("word");
        assert_eq!(w.bytes, b"k");
        let (_, rest) = next_word(rest).expect("ok").expect("word");
        assert_eq!(rest_value(rest).expect("ok"), b"v");
        assert_eq!(next_word("   ").expect("ok"), None);
        assert!(next_word("\"abc").is_err());
        assert!(next_word("\"a\"b").is_err());
        assert!(next_word("\"\\q\"").is_err());
        assert!(next_word("\"\\x4\"").is_err());
        assert!(rest_value("\"a\" b").is_err());
        assert_eq!(rest_value("hello world").expect("ok"), b"hello world");
    }
}
