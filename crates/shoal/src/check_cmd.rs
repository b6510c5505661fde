//! `shoal check` (check a recorded history for linearizability) and `shoal bench check` (time the
//! checker on the bundled Jepsen histories). The checking itself lives in `shoal-check`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use shoal_check::formats::{jepsen_etcd, jepsen_kv, json, ParseError};
use shoal_check::models::{AppendKv, Register, VersionedKv};
use shoal_check::{check_with_options, Budget, CheckOptions, History, Model, Verdict};

const CHECK_ABOUT: &str = "\
Reads FILE in the given --format, searches for an order of its operations that respects real time
and the model's rules (Wing & Gong's search with Lowe's just-in-time linearization, a cache of
explored states, and one search per key), and prints the verdict with what it covered, for example
`linearizable: 1,234 operations on 10 keys`, or `not linearizable: ...` followed by an
explanation: the key, the longest linearizable prefix found, and the operations that could not
come after it. --html FILE also writes a self-contained timeline of the failing key.

FORMATS (--format):
  jepsen-etcd  Jepsen etcd logs (one register, read/write/cas), one operation event per line:
                 INFO  jepsen.util - 3<TAB>:invoke<TAB>:cas<TAB>[3 0]
               Fields separated by tabs or spaces. :ok completes, :fail means the cas found
               another value (or the write/read did nothing), :info means unknown outcome.
               Ignored: blank lines, `jepsen.util - :nemesis ...` lines, and log lines of other
               loggers (`INFO  jepsen.core - ...`).
  jepsen-kv    Jepsen key/value histories (get/put/append, keys start as \"\"), one map per line:
                 {:process 0, :type :invoke, :f :append, :key \"0\", :value \"x 0 0 y\"}
               Ignored: blank lines and maps whose :process is a keyword (:nemesis).
  json         Shoal's JSON lines, one event per line, for --model versioned-kv (default),
               register or append-kv:
                 {\"client\":1,\"type\":\"invoke\",\"f\":\"put\",\"key\":\"a\",\"value\":\"x\",\"expected\":0}
                 {\"client\":1,\"type\":\"ok\",\"version\":1}
               Completion types: ok, fail (did not apply), info (unknown), and for
               versioned-kv no-key, mismatch, maybe. Ignored: blank lines and lines starting
               with #. See docs/checker.md for every field.
Any other line is an error, and so is a file with no operation at all: a file in the wrong
format never passes as an empty history.

An operation that never completes, or completes with :info / \"info\", has an unknown outcome: it
may take effect at any point after its invocation, or never.

EXIT CODES:
  0  linearizable
  1  not linearizable
  2  unknown: --budget or --max-memory ran out before the search finished
  2  error: unreadable file, a line the format does not know (the message names the file,
     the line and what was expected there), or no operations found (wrong --format?)";

/// Default of `--max-memory`, in MiB.
const DEFAULT_MAX_MEMORY_MIB: usize = 2048;
const MIB: usize = 1 << 20;

/// The history formats `shoal check` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Jepsen etcd logs: one register with read, write and cas.
    JepsenEtcd,
    /// Jepsen key/value histories: get, put and append on many keys.
    JepsenKv,
    /// Shoal's JSON lines (see --model).
    Json,
}

/// The models a JSON history can be checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JsonModel {
    /// Versioned key/value store: get, put and delete with an expected version.
    VersionedKv,
    /// One register: read, write, cas.
    Register,
    /// Key/value store with get, put and append.
    AppendKv,
}

/// Arguments of `shoal check`.
#[derive(Debug, clap::Args)]
#[command(after_help = CHECK_ABOUT)]
pub struct CheckArgs {
    /// The history file.
    pub file: PathBuf,
    /// The file's format.
    #[arg(long, value_enum)]
    pub format: Format,
    /// The model of a --format json history.
    #[arg(long, value_enum, default_value = "versioned-kv")]
    pub model: JsonModel,
    /// Write a self-contained HTML timeline of the failing key to this file (only when the
    /// history is not linearizable; otherwise it says that no timeline was written).
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Give up after this many seconds of search and answer "unknown" (exit 2).
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub budget: Duration,
    /// Give up when the search's bookkeeping reaches about this many MiB and answer "unknown"
    /// (exit 2): a hard history can fill gigabytes within seconds.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MAX_MEMORY_MIB)]
    pub max_memory: usize,
    /// Print nothing on success or violation; the exit code tells (errors still go to stderr).
    #[arg(long, short)]
    pub quiet: bool,
    /// Check the whole history as one partition instead of one search per key (slower; the
    /// verdict must be the same).
    #[arg(long)]
    pub no_partition: bool,
    /// `text` (default) or `json`: one JSON document `{verdict, operations, keys, …}` (see
    /// docs/operations.md). The exit status is the same.
    #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
    pub output: crate::output::Format,
}

/// `shoal check -o json`.
#[derive(Debug, serde::Serialize)]
struct VerdictJson {
    /// The history file.
    file: String,
    /// `linearizable`, `not-linearizable` or `unknown`.
    verdict: &'static str,
    /// Operations in the history.
    operations: usize,
    /// Keys (partitions) in it (1 for a register).
    keys: usize,
    /// Why the search did not finish (`unknown` only).
    reason: Option<String>,
    /// The explanation of a violation, as the text output prints it.
    explanation: Option<String>,
    /// Where the HTML timeline was written (a violation with --html only).
    timeline: Option<String>,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("expected a number of seconds, found {text:?}"))?;
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!(
            "expected a positive number of seconds, found {text:?}"
        ));
    }
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("expected a number of seconds that fits a duration, found {text:?}"))
}

/// Runs `shoal check`.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let file = &args.file;
    match args.format {
        Format::JepsenEtcd => check_file(&args, Register, parsed(file, jepsen_etcd::parse(&text))?),
        Format::JepsenKv => check_file(&args, AppendKv, parsed(file, jepsen_kv::parse(&text))?),
        Format::Json => match args.model {
            JsonModel::VersionedKv => check_file(
                &args,
                VersionedKv,
                parsed(file, json::parse_versioned_kv(&text))?,
            ),
            JsonModel::Register => {
                check_file(&args, Register, parsed(file, json::parse_register(&text))?)
            }
            JsonModel::AppendKv => {
                check_file(&args, AppendKv, parsed(file, json::parse_append_kv(&text))?)
            }
        },
    }
}

/// Prints to stdout; a closed pipe (`shoal check ... | head`) is not an error, the exit code
/// still tells the verdict.
fn emit(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_fmt(text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

/// Names the file in a parse error (`FILE:LINE: expected ..., found ...`), and refuses a history
/// with no operation: it would be trivially linearizable, and it nearly always means the file is
/// in another format or empty, so a green verdict would be false.
fn parsed<I, O>(
    file: &Path,
    result: Result<History<I, O>, ParseError>,
) -> anyhow::Result<History<I, O>> {
    let history = result.map_err(|e| {
        anyhow::anyhow!(
            "{}:{}: malformed line: expected {}, found {}",
            file.display(),
            e.line,
            e.expected,
            e.found
        )
    })?;
    if history.is_empty() {
        anyhow::bail!(
            "no operations found in {}: wrong --format? (an empty history is not checked)",
            file.display()
        );
    }
    Ok(history)
}

/// `1234567` as `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Keys (partitions) of a history; a model without partitions (the register) has one.
fn key_count<M: Model>(model: &M, history: &History<M::Input, M::Output>) -> usize {
    let keys: BTreeSet<Option<String>> = history
        .ops()
        .iter()
        .map(|op| model.partition_key(&op.input))
        .collect();
    keys.len()
}

/// What was checked, for the verdict line: `1,234 operations on 10 keys`. A model without
/// partitions (the register) is one key.
fn scope<M: Model>(model: &M, history: &History<M::Input, M::Output>) -> String {
    let keys = key_count(model, history);
    let plural =
        |n: usize, word: &str| format!("{} {word}{}", thousands(n), if n == 1 { "" } else { "s" });
    format!(
        "{} on {}",
        plural(history.len(), "operation"),
        plural(keys, "key")
    )
}

fn check_file<M: Model>(
    args: &CheckArgs,
    model: M,
    history: History<M::Input, M::Output>,
) -> anyhow::Result<ExitCode> {
    let options = CheckOptions {
        budget: Budget::time(args.budget).with_memory_bytes(args.max_memory.saturating_mul(MIB)),
        partition_by_key: !args.no_partition,
    };
    let verdict = check_with_options(&model, &history, &options);
    if args.output == crate::output::Format::Json {
        return print_verdict_json(args, key_count(&model, &history), history.len(), verdict);
    }
    let scope = scope(&model, &history);
    let say = |text: std::fmt::Arguments<'_>| -> anyhow::Result<()> {
        if args.quiet {
            Ok(())
        } else {
            emit(text)
        }
    };
    // Only a violation has a timeline to draw; say so rather than leave the user looking for
    // a file that was never written.
    let no_timeline = |why: &str| -> anyhow::Result<()> {
        match &args.html {
            Some(path) => say(format_args!(
                "{why}: no timeline written to {}\n",
                path.display()
            )),
            None => Ok(()),
        }
    };
    match verdict {
        Verdict::Linearizable => {
            say(format_args!("linearizable: {scope}\n"))?;
            no_timeline("history is linearizable")?;
            Ok(ExitCode::SUCCESS)
        }
        Verdict::NotLinearizable(explanation) => {
            say(format_args!("not linearizable: {scope}\n{explanation}"))?;
            if let Some(path) = &args.html {
                let title = args.file.display().to_string();
                std::fs::write(path, shoal_check::html::render(&title, &explanation))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                say(format_args!("timeline written to {}\n", path.display()))?;
            }
            Ok(ExitCode::from(1))
        }
        Verdict::Unknown(reason) => {
            say(format_args!("unknown: {scope}: {reason}\n"))?;
            no_timeline("search did not finish")?;
            Ok(ExitCode::from(2))
        }
    }
}

/// `check_file`'s answer as one JSON document (`--quiet` prints nothing); same exit status.
fn print_verdict_json(
    args: &CheckArgs,
    keys: usize,
    operations: usize,
    verdict: Verdict,
) -> anyhow::Result<ExitCode> {
    let mut json = VerdictJson {
        file: args.file.display().to_string(),
        verdict: "linearizable",
        operations,
        keys,
        reason: None,
        explanation: None,
        timeline: None,
    };
    let code = match verdict {
        Verdict::Linearizable => ExitCode::SUCCESS,
        Verdict::NotLinearizable(explanation) => {
            json.verdict = "not-linearizable";
            json.explanation = Some(explanation.to_string());
            if let Some(path) = &args.html {
                let title = args.file.display().to_string();
                std::fs::write(path, shoal_check::html::render(&title, &explanation))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                json.timeline = Some(path.display().to_string());
            }
            ExitCode::from(1)
        }
        Verdict::Unknown(reason) => {
            json.verdict = "unknown";
            json.reason = Some(reason.to_string());
            ExitCode::from(2)
        }
    };
    if !args.quiet {
        crate::output::print_json(&json)?;
    }
    Ok(code)
}

/// The target of `shoal bench check`: every bundled history in under this much wall time.
const BENCH_TARGET: Duration = Duration::from_secs(5);

/// Arguments of `shoal bench check`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Times the checker on the bundled histories: the 102 Jepsen etcd logs with \
a published verdict and the c50 key/value histories (ok and bad). Prints the wall time per set and \
in total next to the target (under 5 s on a 2-core machine, release build) and checks every \
verdict. The Go checker Porcupine is the reference to beat; it is not run here. Build with \
`cargo build --release -p shoal` for meaningful figures."
)]
pub struct BenchArgs {
    /// The folder holding jepsen-etcd/ and kv/ (default: testdata/linearizability of the
    /// current directory, else of the source tree the binary was built from).
    #[arg(long, value_name = "DIR")]
    pub testdata: Option<PathBuf>,
    /// Budget per history, in seconds.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub budget: Duration,
}

fn testdata_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    let local = PathBuf::from("testdata/linearizability");
    if local.is_dir() {
        return local;
    }
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/linearizability"
    ))
}

/// The benchmark's wall clock.
#[allow(clippy::disallowed_methods)] // A benchmark measures wall time by definition.
fn now() -> Instant {
    Instant::now()
}

struct SetResult {
    histories: usize,
    operations: usize,
    agree: usize,
    parse: Duration,
    check: Duration,
}

fn bench_one<M: Model>(
    model: &M,
    history: &History<M::Input, M::Output>,
    expected: bool,
    budget: Duration,
    result: &mut SetResult,
) {
    let started = now();
    let verdict = check_with_options(
        model,
        history,
        &CheckOptions {
            budget: Budget::time(budget).with_memory_bytes(DEFAULT_MAX_MEMORY_MIB * MIB),
            partition_by_key: true,
        },
    );
    result.check += started.elapsed();
    result.histories += 1;
    result.operations += history.len();
    if verdict.is_linearizable() == expected && !matches!(verdict, Verdict::Unknown(_)) {
        result.agree += 1;
    }
}

/// `println!` through [`emit`]: a closed pipe is not a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        emit(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// Runs `shoal bench check`.
pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let bench_started = now();
    let dir = testdata_dir(args.testdata.as_deref());
    let etcd_dir = dir.join("jepsen-etcd");
    let verdicts_path = etcd_dir.join("verdicts.tsv");
    let verdicts = std::fs::read_to_string(&verdicts_path).with_context(|| {
        format!(
            "cannot read {} (use --testdata DIR)",
            verdicts_path.display()
        )
    })?;

    let mut etcd = SetResult {
        histories: 0,
        operations: 0,
        agree: 0,
        parse: Duration::ZERO,
        check: Duration::ZERO,
    };
    for (index, row) in verdicts.lines().enumerate().skip(1) {
        let (file, expected) = row.split_once('\t').with_context(|| {
            format!(
                "{}:{}: expected FILE<TAB>true|false",
                verdicts_path.display(),
                index + 1
            )
        })?;
        let path = etcd_dir.join(file);
        let started = now();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let history = parsed(&path, jepsen_etcd::parse(&text))?;
        etcd.parse += started.elapsed();
        bench_one(
            &Register,
            &history,
            expected.trim() == "true",
            args.budget,
            &mut etcd,
        );
    }

    let mut kv_sets = Vec::new();
    for (file, expected) in [("c50-ok.txt", true), ("c50-bad.txt", false)] {
        let mut set = SetResult {
            histories: 0,
            operations: 0,
            agree: 0,
            parse: Duration::ZERO,
            check: Duration::ZERO,
        };
        let path = dir.join("kv").join(file);
        let started = now();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let history = parsed(&path, jepsen_kv::parse(&text))?;
        set.parse += started.elapsed();
        bench_one(&AppendKv, &history, expected, args.budget, &mut set);
        kv_sets.push((format!("kv {file} (append-kv)"), set));
    }

    let profile = if cfg!(debug_assertions) {
        "debug (use --release for real figures)"
    } else {
        "release"
    };
    outln!("shoal bench check: linearizability checker on the bundled histories ({profile} build)");
    outln!(
        "{:<30} {:>9} {:>10} {:>8} {:>10} {:>10}",
        "set",
        "histories",
        "operations",
        "agree",
        "check (s)",
        "parse (s)"
    );
    let mut sets = vec![("jepsen-etcd (register)".to_string(), etcd)];
    sets.extend(kv_sets);
    for (name, set) in &sets {
        outln!(
            "{:<30} {:>9} {:>10} {:>8} {:>10.3} {:>10.3}",
            name,
            set.histories,
            set.operations,
            format!("{}/{}", set.agree, set.histories),
            set.check.as_secs_f64(),
            set.parse.as_secs_f64()
        );
    }
    let total = bench_started.elapsed();
    let check_sum: Duration = sets.iter().map(|(_, set)| set.check).sum();
    let parse_sum: Duration = sets.iter().map(|(_, set)| set.parse).sum();
    outln!(
        "total wall time {:.3} s (check {:.3} s, read + parse {:.3} s); target: all of them in under {} s; reference to beat: Porcupine (Go), not run here",
        total.as_secs_f64(),
        check_sum.as_secs_f64(),
        parse_sum.as_secs_f64(),
        BENCH_TARGET.as_secs()
    );
    let all_agree = sets.iter().all(|(_, set)| set.agree == set.histories);
    if !all_agree {
        outln!("WARNING: some verdicts disagree with the published ones (or ran out of budget)");
        return Ok(ExitCode::from(1));
    }
    outln!(
        "every verdict agrees with the published one; {}",
        if total < BENCH_TARGET {
            "target met"
        } else {
            "TARGET MISSED"
        }
    );
    Ok(ExitCode::SUCCESS)
}
