//! `shoal sim` and `shoal bench sim` (being built: see the issue tracker).

use std::process::ExitCode;

/// Arguments of `shoal sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {}

/// Arguments of `shoal bench sim`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: SimArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`shoal sim` is not built yet")
}

pub fn bench(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`shoal bench sim` is not built yet")
}
