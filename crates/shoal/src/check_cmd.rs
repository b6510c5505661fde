//! `shoal check` and `shoal bench check` (being built: see the issue tracker).

use std::process::ExitCode;

/// Arguments of `shoal check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {}

/// Arguments of `shoal bench check`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: CheckArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`shoal check` is not built yet")
}

pub fn bench(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`shoal bench check` is not built yet")
}
