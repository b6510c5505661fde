//! The seed harness: run a simulated test over many seeds, and on failure print the seed, the
//! exact command that replays only that seed, and the tail of the event trace.
//!
//! ```no_run
//! # fn build_and_run(seed: u64) -> Result<(), shoal_sim::Failure> { Ok(()) }
//! #[test]
//! fn initial_election() {
//!     // 20 seeds by default; SHOAL_SEEDS=N runs N, SHOAL_SEED=S replays S only.
//!     shoal_sim::check_seeds!(20, |seed| build_and_run(seed));
//! }
//! ```

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::sim::{SimError, PANIC_TRACE};

/// Environment variable naming the one seed to replay.
pub const SEED_ENV: &str = "SHOAL_SEED";
/// Environment variable giving how many seeds to run.
pub const SEEDS_ENV: &str = "SHOAL_SEEDS";
/// Trace entries shown in a failure report.
pub const REPORT_TRACE_TAIL: usize = 30;

/// Why one seed's run failed. Build it with [`crate::Sim::failure`] to include the trace tail,
/// or from a `String`/`&str` for a bare message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub message: String,
    /// Where: virtual time, trace hash and the last events, when known.
    pub context: Option<String>,
}

impl Failure {
    /// A failure with only a message.
    pub fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            context: None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(c) = &self.context {
            write!(f, "\n{c}")?;
        }
        Ok(())
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::new(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::new(message)
    }
}

impl From<SimError> for Failure {
    fn from(e: SimError) -> Self {
        Failure::new(e.to_string())
    }
}

/// Which test is running: enough to print a command that reruns exactly it.
/// [`test_id!`](crate::test_id) fills it in from where it is expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestId {
    /// Cargo package (`-p`), e.g. `shoal-raft`.
    pub package: String,
    /// Test target: `None` for the library's unit tests (`--lib`), else the integration
    /// test's name (`--test NAME`).
    pub target: Option<String>,
    /// Test path inside the target, as `--exact` wants it (e.g. `initial_election` or
    /// `tests::crash_loses_unsynced`).
    pub test: String,
}

impl TestId {
    /// Builds the id from `CARGO_PKG_NAME`, `CARGO_CRATE_NAME` and the type name of a function
    /// item declared inside the test (what [`test_id!`](crate::test_id) passes).
    pub fn from_parts(package: &str, crate_name: &str, fn_type_name: &str) -> Self {
        let mut segments: Vec<&str> = fn_type_name
            .split("::")
            .filter(|s| *s != "{{closure}}")
            .collect();
        // First segment is the crate, last the marker function.
        segments.pop();
        if !segments.is_empty() {
            segments.remove(0);
        }
        let lib_crate = package.replace('-', "_");
        TestId {
            package: package.to_string(),
            target: (crate_name != lib_crate).then(|| crate_name.to_string()),
            test: segments.join("::"),
        }
    }

    /// The command that replays `seed` of this test only.
    pub fn replay_command(&self, seed: u64) -> String {
        let target = match &self.target {
            Some(t) => format!("--test {t}"),
            None => "--lib".to_string(),
        };
        format!(
            "{SEED_ENV}={seed} cargo test -p {} {target} -- {} --exact",
            self.package, self.test
        )
    }
}

/// Expands to the [`TestId`] of the test function it is written in.
#[macro_export]
macro_rules! test_id {
    () => {{
        fn __shoal_sim_marker() {}
        $crate::TestId::from_parts(
            env!("CARGO_PKG_NAME"),
            env!("CARGO_CRATE_NAME"),
            ::std::any::type_name_of_val(&__shoal_sim_marker),
        )
    }};
}

/// Runs a simulated test over seeds: `check_seeds!(default_count, |seed| -> Result<(), E>)`
/// where `E: Into<Failure>`. Panics with a full report (seed, replay command, trace tail) on
/// the first failing seed. `SHOAL_SEEDS=N` overrides the count, `SHOAL_SEED=S` runs S only.
#[macro_export]
macro_rules! check_seeds {
    ($default_seeds:expr, $test:expr) => {
        $crate::run_seeds($crate::test_id!(), $default_seeds, $test)
    };
}

/// The seeds to run: `SHOAL_SEED` alone if set, else `0..SHOAL_SEEDS` (default
/// `default_count`). Fails on a malformed variable.
pub fn seeds_from_env(default_count: u64) -> Result<Vec<u64>, String> {
    seeds_from(
        std::env::var(SEED_ENV).ok().as_deref(),
        std::env::var(SEEDS_ENV).ok().as_deref(),
        default_count,
    )
}

/// [`seeds_from_env`] on explicit values (testable).
pub fn seeds_from(
    seed: Option<&str>,
    seeds: Option<&str>,
    default_count: u64,
) -> Result<Vec<u64>, String> {
    if let Some(s) = seed {
        let seed = s
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{SEED_ENV}={s:?} is not a u64: {e}"))?;
        return Ok(vec![seed]);
    }
    let count = match seeds {
        Some(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{SEEDS_ENV}={s:?} is not a u64: {e}"))?,
        None => default_count,
    };
    Ok((0..count).collect())
}

/// The trace tail left behind by the last `Sim` dropped while this thread panicked (taken:
/// a second call returns `None`). For runners that catch a simulation's panic themselves,
/// like `shoal sim`'s workloads.
pub fn take_panic_trace() -> Option<String> {
    PANIC_TRACE.with(|p| p.borrow_mut().take())
}

/// The report printed for a failing seed.
pub fn format_failure_report(test: &TestId, seed: u64, failure: &Failure) -> String {
    let mut out = format!(
        "simulation test `{}` failed with seed {seed}: {}\n\nreplay this seed only:\n    {}\n",
        test.test,
        failure.message,
        test.replay_command(seed)
    );
    if let Some(c) = &failure.context {
        out.push('\n');
        out.push_str(c);
        if !c.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// Runs `test` for each seed in `seeds`, stopping at the first failure (a returned error or a
/// panic, whose message and the trace tail of the `Sim` it unwound are captured). Returns the
/// number of seeds run, or the failure report.
pub fn try_run_seeds<E, F>(test_id: &TestId, seeds: &[u64], test: F) -> Result<usize, String>
where
    E: Into<Failure>,
    F: Fn(u64) -> Result<(), E>,
{
    for &seed in seeds {
        PANIC_TRACE.with(|p| p.borrow_mut().take());
        let outcome = catch_unwind(AssertUnwindSafe(|| test(seed)));
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.into(),
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(non-string panic payload)".to_string());
                Failure {
                    message: format!("panicked: {msg}"),
                    context: PANIC_TRACE.with(|p| p.borrow_mut().take()),
                }
            }
        };
        return Err(format_failure_report(test_id, seed, &failure));
    }
    Ok(seeds.len())
}

/// Runs `test` over the seeds chosen by the environment (see [`seeds_from_env`]) and panics
/// with the failure report if one fails. Use it through [`check_seeds!`](crate::check_seeds).
pub fn run_seeds<E, F>(test_id: TestId, default_seeds: u64, test: F)
where
    E: Into<Failure>,
    F: Fn(u64) -> Result<(), E>,
{
    let seeds = match seeds_from_env(default_seeds) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    if let Err(report) = try_run_seeds(&test_id, &seeds, test) {
        panic!("\n{report}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_id_of_unit_test() {
        let id = crate::test_id!();
        assert_eq!(id.package, "shoal-sim");
        assert_eq!(id.target, None);
        assert_eq!(id.test, "harness::tests::test_id_of_unit_test");
        assert_eq!(
            id.replay_command(7),
            "SHOAL_SEED=7 cargo test -p shoal-sim --lib -- harness::tests::test_id_of_unit_test --exact"
        );
    }

    #[test]
    fn seed_selection() {
        assert_eq!(seeds_from(Some("42"), Some("5"), 3), Ok(vec![42]));
        assert_eq!(seeds_from(None, Some("4"), 3), Ok(vec![0, 1, 2, 3]));
        assert_eq!(seeds_from(None, None, 2), Ok(vec![0, 1]));
        assert!(seeds_from(Some("x"), None, 2).is_err());
    }
}
