//! `shoal`: one binary for every part of Shoal.
//!
//! Each area owns one module here holding its clap arguments and the code that runs them:
//! `demo_cmd` (the tour), `check_cmd` (linearizability checker), `sim_cmd` (simulator), `mr_cmd` (MapReduce).
//! `bench kv|raft|mr` run the `shoal-bench` library; local clusters are supervised by `shoal-cluster`.
//! `main` only parses, sets up logging and dispatches.

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the KV server's hot path allocates per request (frames,
/// commands, entries, replies), and under load glibc's allocator was 11–15% of the leader's
/// CPU in the profile (`docs/benchmarks.md`); mimalloc's thread-local free lists cost a
/// fraction of that. Memory use is comparable.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod check_cmd;
mod cli;
mod demo_cmd;
mod help;
mod kv_backup;
mod kv_cmd;
mod kv_lease_cmd;
mod kv_member_cmd;
mod kv_up;
mod mr_cmd;
mod obs;
mod output;
mod raft_cmd;
mod shard_cmd;
mod shard_up;
mod sim_cmd;
mod supervise;
mod tls_cmd;

/// Shoal: a distributed-systems suite — MapReduce, Raft, and fault-tolerant key/value
/// databases — in one binary.
///
/// Every subcommand has its own --help. Logs go to stderr; set SHOAL_LOG (for example
/// SHOAL_LOG=debug or SHOAL_LOG=shoal_mr=trace) to see more.
#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    propagate_version = true,
    term_width = help::WIDTH
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The tour: a KV cluster, a MapReduce job and a leader crash on this machine, in seconds.
    Demo(demo_cmd::DemoArgs),
    /// Check a recorded history for linearizability.
    Check(check_cmd::CheckArgs),
    /// Run MapReduce jobs: a local quick start, a coordinator, workers, or the sequential
    /// reference.
    #[command(subcommand)]
    Mr(mr_cmd::MrCommand),
    /// Run a node of a Raft group (a demo replicated log on the Raft library).
    #[command(subcommand)]
    Raft(raft_cmd::RaftCommand),
    /// The key/value database: servers, a local cluster, get/put/del/scan, a shell, a lock.
    Kv(kv_cmd::KvCommand),
    /// The sharded key/value database: a local cluster, the servers of a replica group, the
    /// controller's join, leave, move, query and status.
    Shard(shard_cmd::ShardCommand),
    /// Run a deterministic simulation: the heartbeat scenario's trace, or the Raft or KV
    /// protocol under a nemesis, checked after every event (--workload raft|kv).
    Sim(sim_cmd::SimArgs),
    /// Benchmarks that print Shoal's figures next to the baselines they must beat.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Make a CA and certificates for TLS: `shoal cert init`, `cert node`, `cert client`.
    Cert(tls_cmd::CertArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time the checker on the bundled Jepsen etcd and kv histories.
    Check(check_cmd::BenchArgs),
    /// Simulator speed: events and simulated seconds per wall second.
    Sim(sim_cmd::BenchArgs),
    /// MapReduce throughput against a coreutils pipeline and the sequential implementation.
    Mr(shoal_bench::mr_bench::BenchArgs),
    /// Raft on three real processes: commits/s and latency by proposer count, election time
    /// after a leader SIGKILL.
    Raft(shoal_bench::raft_bench::BenchArgs),
    /// The key/value database against etcd: ops/s and latency by client count for puts and
    /// linearizable gets, write availability after a leader SIGKILL.
    Kv(shoal_bench::kv_bench::BenchArgs),
    /// The sharded key/value database: puts and linearizable gets against 1, 2, 4, 8 groups
    /// under per-server CPU quotas (and without), speed-up and efficiency; a shard migration.
    Shard(shoal_bench::shard_bench::BenchArgs),
    /// A learner added to a KV cluster of three `kv server` processes holding `--mb` MiB,
    /// brought up to date over the snapshot stream: time and MB/s next to the disk's and
    /// loopback's raw speed, clients' p99 with and without the transfer, the leader's and the
    /// learner's resident memory.
    Snapshot(shoal_bench::snapshot_bench::BenchArgs),
}

fn main() -> ExitCode {
    init_logging();
    // `--config FILE`: its keys become flags before the user's (obs.rs).
    let expanded = match obs::expand(std::env::args_os().collect(), Cli::command()) {
        Ok(expanded) => expanded,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::command()
        .try_get_matches_from(&expanded.args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => match expanded.blame(&e) {
            Some(origin) => {
                let text = e.render().to_string();
                let text = text.strip_prefix("error: ").unwrap_or(&text);
                eprint!("error: {origin}: {text}");
                return ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    let result = match cli.command {
        Command::Demo(args) => demo_cmd::run(args),
        Command::Check(args) => check_cmd::run(args),
        Command::Mr(cmd) => mr_cmd::run(cmd),
        Command::Raft(cmd) => raft_cmd::run(cmd),
        Command::Kv(cmd) => kv_cmd::run(cmd),
        Command::Shard(cmd) => shard_cmd::run(cmd),
        Command::Sim(args) => sim_cmd::run(args),
        Command::Cert(args) => tls_cmd::run(args),
        Command::Bench(BenchCommand::Check(args)) => check_cmd::bench(args),
        Command::Bench(BenchCommand::Sim(args)) => sim_cmd::bench(args),
        Command::Bench(BenchCommand::Mr(args)) => shoal_bench::mr_bench::bench(args),
        Command::Bench(BenchCommand::Raft(args)) => shoal_bench::raft_bench::bench(args),
        Command::Bench(BenchCommand::Kv(args)) => shoal_bench::kv_bench::bench(args),
        Command::Bench(BenchCommand::Shard(args)) => shoal_bench::shard_bench::bench(args),
        Command::Bench(BenchCommand::Snapshot(args)) => shoal_bench::snapshot_bench::bench(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause once (`shoal_runtime::error_chain`, which
/// the servers' fatal-error logs use too).
fn error_chain(err: &anyhow::Error) -> String {
    shoal_runtime::error_chain(err.as_ref())
}

/// Logs go to stderr, filtered by `SHOAL_LOG` (default: warnings, and info for shoal's crates),
/// coloured only when stderr is a terminal (and `NO_COLOR` is unset): a log file or a pipe
/// gets plain text.
fn init_logging() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,shoal=info,shoal_mr=info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    /// An error type that, like many, prints its cause in its message and returns it as its
    /// source too.
    #[derive(Debug)]
    struct Repeats(std::io::Error);

    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "append seg-1.log: {}", self.0)
        }
    }

    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_is_printed_once() {
        let err = anyhow::Error::new(Repeats(std::io::Error::from_raw_os_error(28)))
            .context("kv server 1");
        let text = error_chain(&err);
        assert_eq!(text.matches("No space left on device").count(), 1, "{text}");
        assert!(text.starts_with("kv server 1: append seg-1.log: No space left on device"));
        // Distinct causes are all kept, in order.
        let err = anyhow::anyhow!("root").context("middle").context("outer");
        assert_eq!(error_chain(&err), "outer: middle: root");
    }
}
