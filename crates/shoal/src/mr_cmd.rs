//! `shoal mr …` and `shoal bench mr` (being built: see the issue tracker).

use std::process::ExitCode;

/// `shoal mr` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum MrCommand {
    /// Run a job on this machine.
    Run {},
}

pub fn run(_cmd: MrCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`shoal mr` is not built yet")
}
