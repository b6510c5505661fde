//! `shoal bench mr` (being built: see the issue tracker).

use std::process::ExitCode;

/// Arguments of `shoal bench mr`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn bench(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`shoal bench mr` is not built yet")
}
