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
