//! `--output text|json` (`-o json`) of the commands that report something: one JSON document
//! per run, from serde structs whose field names are part of the CLI's interface (see
//! `docs/operations.md`, "Scripting Shoal").

use anyhow::{Context, Result};

/// How a command prints its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// For people (the default).
    #[default]
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// Prints `value` as one JSON document and a newline on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).context("writing JSON")?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Bytes (a key or a value) for JSON: the UTF-8 text, or `None` and the bytes in lower-case
/// hex when they are not UTF-8 (so no byte is lost or mangled).
pub fn text_or_hex(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (
            None,
            Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_are_text_or_hex() {
        assert_eq!(super::text_or_hex(b"a b"), (Some("a b".into()), None));
        assert_eq!(super::text_or_hex(b"\xff\x00"), (None, Some("ff00".into())));
    }
}
