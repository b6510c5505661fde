//! `shoal mr …` and `shoal bench mr` (being built: see the issue tracker).

use std::process::ExitCode;

/// `shoal mr` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum MrCommand {
    /// Run a job on this machine.
    Run {},
}

/// Arguments of `shoal bench mr`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn run(_cmd: MrCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`shoal mr` is not built yet")
}

pub fn bench(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`shoal bench mr` is not built yet")
}
