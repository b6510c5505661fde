//! `shoal mr …`: the local quick start (`run`), the coordinator, the worker and the sequential
//! reference (`seq`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use shoal_mr::app::{AppConfig, ShippedFile};
use shoal_mr::apps::sort::{SortConfig, SortFormat};
use shoal_mr::coordinator::{prepare_job, CoordinatorError, JobOptions, JobReport};
use shoal_runtime::mr::{
    bind_status, run_job, run_worker, serve_status, status_channel, StatusFeed, WorkerExit,
    WorkerOptions,
};
use shoal_runtime::tls::Security;

/// `println!` that ignores a closed stdout (`shoal mr run | head` must not panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `shoal mr` subcommands.
#[derive(Debug, Subcommand)]
pub enum MrCommand {
    /// Run a whole job on this machine: a coordinator and N worker processes, with a progress
    /// bar. With no INPUT, counts the words of eight bundled books.
    #[command(after_help = RUN_HELP)]
    Run(Box<RunArgs>),
    /// Serve a job to workers over TCP; exit 0 once every output file is in place.
    #[command(after_help = COORDINATOR_HELP)]
    Coordinator(Box<CoordinatorArgs>),
    /// Ask a coordinator for tasks and run them until the job is over.
    #[command(after_help = WORKER_HELP)]
    Worker(Box<WorkerArgs>),
    /// Run a job sequentially in this process: the reference output the distributed run must
    /// match.
    #[command(after_help = SEQ_HELP)]
    Seq(Box<SeqArgs>),
    /// Write sort benchmark records (like gensort): 100-byte TeraSort records or 100-byte
    /// lines, the same for the same --seed.
    #[command(after_help = GEN_HELP)]
    Gen(GenArgs),
    /// Check a sort job's output (like valsort): order within and across the mr-out-* files,
    /// record count, and a checksum equal to the input's.
    #[command(after_help = VALIDATE_HELP)]
    Validate(ValidateArgs),
}

const GEN_HELP: &str = "\
Examples:
  shoal mr gen --format terasort --records 1000000 in/part-0     # 100 MB of TeraSort records
  shoal mr gen --format lines --records 1000 --seed 7 words.txt
  shoal mr run --app sort --format terasort --out sorted in/ && \\
    shoal mr validate --format terasort --input in/ sorted

Layout of a record (100 bytes; record i is the same whatever --records):
  terasort: 10-byte random key (any byte values), 00 11, the record number in 32 hex digits,
            88 99 AA BB, 48 filler bytes, CC DD EE FF (gensort's binary layout; no newline)
  lines:    10 random printable characters, 2 spaces, the record number in 32 hex digits,
            2 spaces, 53 filler characters, \\n
Prints the record count and the checksum that `mr validate` compares.";

const VALIDATE_HELP: &str = "\
Examples:
  shoal mr validate --format terasort sorted                  # order and count only
  shoal mr validate --format terasort --input in/ sorted      # and the same records as in/

Checks that keys never go down within each DIR/mr-out-<r> (in partition order, numeric) and
from one file to the next; with --input, that the output has as many records as the inputs
and the same checksum (the sum of a CRC-32C of every record, as valsort: independent of the
order). Exit status: 0 valid; 1 invalid (the message names the first out-of-order record's
file and byte offset, or the count or checksum that differs); 2 bad arguments or unreadable
files.";

/// `shoal mr gen`.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// Record format: terasort (binary) or lines (text).
    #[arg(long, value_name = "terasort|lines")]
    pub format: String,
    /// Number of 100-byte records.
    #[arg(long)]
    pub records: u64,
    /// Seed of the keys.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output file (written to a temporary name, fsynced, renamed).
    #[arg(value_name = "OUT")]
    pub out: PathBuf,
}

/// `shoal mr validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Record format: terasort or lines.
    #[arg(long, value_name = "terasort|lines")]
    pub format: String,
    /// The job's inputs (files or directories): the output must hold the same records.
    #[arg(long = "input", value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// The sort job's output directory (its mr-out-* files).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

const RUN_HELP: &str = "\
Examples:
  shoal mr run                                  # wordcount over the bundled books into ./mr-out
  shoal mr run --workers 4 --http 127.0.0.1:8080 --app indexer books/*.txt
  shoal mr run --app grep --pattern 'whale|ocean' --out hits big.txt
  shoal mr run --app sort --format terasort --workers 2 --out sorted in/   # TeraSort (mr gen)
  shoal mr run --app stream --mapper 'sh map.sh' --ship map.sh in.txt   # scripts run in the ship dir
  shoal mr run --workers 4 --slow-workers 1     # one worker 10x slower: watch backup tasks win

Inputs: files; a directory stands for the files in it (names starting with _ or . and
subdirectories are skipped); *.gz files are decompressed (one map task each).
Output: one file per reduce task, OUT/mr-out-<r>, each line `key value`, sorted by key;
and the final status page, OUT/_status.html (summary, timeline of attempts per worker, tasks)
with its snapshot as OUT/_status.json.
Sort: `--app sort --format lines|terasort` writes the records themselves, in total order
across mr-out-0, mr-out-1, … (a range partitioner placed from a sample of the input); make
data with `shoal mr gen` and check the result with `shoal mr validate`.
Exit status: 0 done; 1 the job failed (a task failed --max-attempts times, or the output
directory is full, read-only or not writable); 2 bad options or inputs, or every worker
exited; 130 on Ctrl-C and 143 on SIGTERM (workers stopped and the scratch directory under
$TMPDIR removed either way). A job that does not finish still leaves OUT/_status.html and
OUT/_status.json, with phase `failed` or `abandoned` and why, and no mr-out-* files.";

const COORDINATOR_HELP: &str = "\
Examples:
  # on host A (10.0.0.1), with TLS: certificates from `shoal cert init` / `shoal cert node`
  shoal mr coordinator --listen 10.0.0.1:7070 --http 0.0.0.0:8080 --app wordcount --out out \\
      --cert certs/coord.pem --key certs/coord-key.pem --ca certs/ca.pem /data/*.txt
  # on hosts B, C, … (inputs must be readable at the same paths there)
  shoal mr worker --coordinator 10.0.0.1:7070 --cert certs/b.pem --key certs/b-key.pem --ca certs/ca.pem
  # one machine, plain TCP
  shoal mr coordinator --listen 127.0.0.1:7070 --app wordcount --out out /data/*.txt

With --cert/--key/--ca, workers connect with mutual TLS and the shuffle between workers goes
through TLS too: every worker needs a certificate signed by the same CA (naming the IP other
workers reach it at). Without them, the coordinator refuses to listen on an address other than
loopback unless given --insecure (anyone who can reach the port could join the job).

The first line on stdout is `listening on ADDR` (useful with --listen 127.0.0.1:0).
Exit status: 0 when the job is done and out/mr-out-* are in place; 1 when a task failed
--max-attempts times (the message names the task, its input and the error) or the output
directory is full, read-only or not writable; 2 on bad options or inputs, or a busy --listen
or --http port (reported before `listening on`); 130 on Ctrl-C, 143 on SIGTERM (the job is
abandoned: workers are told, partial outputs removed, and out/_status.html and _status.json
written with phase `abandoned`).";

const WORKER_HELP: &str = "\
Examples:
  shoal mr worker --coordinator 10.0.0.1:7070 --cert certs/b.pem --key certs/b-key.pem --ca certs/ca.pem
  shoal mr worker --coordinator hostA:7070 --work-dir /scratch --advertise hostB --insecure
  shoal mr worker --coordinator 127.0.0.1:7070             # one machine, plain TCP

The shuffle server listens on --shuffle-listen; by default on 127.0.0.1 when the coordinator
is on loopback, else on every interface (0.0.0.0). Off loopback it needs --cert/--key/--ca
(TLS, the coordinator's CA) or --insecure.

The worker keeps its map output in a fresh directory under --work-dir (removed on exit) and
serves it to reduce workers from its shuffle server. It exits 0 when the coordinator says the
job is done, 1 if the job failed, if the coordinator stayed unreachable for
--coordinator-timeout (a worker that cannot connect says so at once, then keeps trying), or at
once if the address answers but is not a MapReduce coordinator.";

const SEQ_HELP: &str = "\
Examples:
  shoal mr seq --app wordcount --out seq.txt testdata/gutenberg/*.txt
  sort mr-out/mr-out-* | diff - <(sort seq.txt)   # the distributed run must match";

/// Which app and its options (shared by run, coordinator and seq).
#[derive(Debug, Clone, Args)]
pub struct AppArgs {
    /// The app: wordcount, indexer, grep, sort (with --format), stream, or a fault-testing
    /// app (mtiming, rtiming, jobcount, early_exit, crash, nocrash).
    #[arg(long)]
    pub app: Option<String>,
    /// Regular expression of the grep app.
    #[arg(long)]
    pub pattern: Option<String>,
    /// Map command of the stream app (`sh -c`; reads its split on stdin, writes
    /// `key<TAB>value` lines).
    #[arg(long)]
    pub mapper: Option<String>,
    /// Reduce command of the stream app (`sh -c`; reads sorted `key<TAB>value` lines).
    #[arg(long)]
    pub reducer: Option<String>,
    /// A file shipped to every worker (e.g. the stream app's scripts); repeatable.
    #[arg(long = "ship", value_name = "FILE")]
    pub ship: Vec<PathBuf>,
    /// Record format of the sort app: `lines` (each line a record, ordered by its bytes) or
    /// `terasort` (100-byte records ordered by their first 10 bytes). Default: lines.
    #[arg(long, value_name = "lines|terasort")]
    pub format: Option<String>,
}

impl AppArgs {
    fn config(&self, default_app: &str) -> anyhow::Result<AppConfig> {
        let mut shipped = Vec::new();
        for path in &self.ship {
            let contents = std::fs::read(path)
                .with_context(|| format!("cannot read --ship {}", path.display()))?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("--ship {}: not a file name", path.display()))?
                .to_string();
            let executable = is_executable(path);
            shipped.push(ShippedFile {
                name,
                contents,
                executable,
            });
        }
        let name = self.app.clone().unwrap_or_else(|| default_app.to_string());
        let sort = match (name.as_str(), &self.format) {
            ("sort", format) => Some(SortConfig {
                format: SortFormat::parse(format.as_deref().unwrap_or("lines"))?,
                cut_points: Vec::new(),
            }),
            (_, Some(_)) => bail!("--format is an option of the sort app (--app sort)"),
            (_, None) => None,
        };
        Ok(AppConfig {
            name,
            pattern: self.pattern.clone(),
            mapper: self.mapper.clone(),
            reducer: self.reducer.clone(),
            shipped,
            sort,
        })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Options of the job (shared by run and coordinator).
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Number of reduce tasks (= output files).
    #[arg(long, default_value_t = 10)]
    pub reduces: u32,
    /// Target input size of one map task (e.g. 64MiB, 512KiB, 1000000).
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub split_size: u64,
    /// Memory budget of one task's sort buffer; more is spilled to disk.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub memory: u64,
    /// A worker silent this long is lost (its tasks are redone); an attempt running this long
    /// is duplicated on another worker (e.g. 10s, 2500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub task_timeout: Duration,
    /// A task failing this many times fails the job.
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,
    /// Re-run straggling tasks on idle workers near the end of each phase (paper §3.6).
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set, value_name = "on|off")]
    pub backup_tasks: bool,
    /// Serve an HTML status page (and /status.json) on this address (HOST:PORT; a host name
    /// or an IP address); the final page is kept as OUT/_status.html either way.
    #[arg(long, value_name = "ADDR", value_parser = addr_arg)]
    pub http: Option<SocketAddr>,
}

/// `shoal mr run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub app: AppArgs,
    #[command(flatten)]
    pub job: JobArgs,
    /// Number of worker processes.
    #[arg(long, default_value_t = 3)]
    pub workers: u32,
    /// Output directory.
    #[arg(long, default_value = "mr-out")]
    pub out: PathBuf,
    /// Make this many of the workers artificially slow (testing knob for backup tasks).
    #[arg(long, default_value_t = 0)]
    pub slow_workers: u32,
    /// How much slower the --slow-workers are.
    #[arg(long, default_value_t = 10.0)]
    pub slow_factor: f64,
    /// Input files (default: the eight bundled books).
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// `text` (default) or `json`: the summary as one JSON document `{elapsed_seconds,
    /// map_tasks, reduce_tasks, input_bytes, attempts, outputs, counters, top_words}` and
    /// nothing else on stdout (see docs/operations.md).
    #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
    pub output: crate::output::Format,
}

/// `shoal mr run -o json`.
#[derive(Debug, serde::Serialize)]
struct SummaryJson {
    app: String,
    elapsed_seconds: f64,
    map_tasks: usize,
    reduce_tasks: usize,
    input_bytes: u64,
    /// Attempts started (more than the tasks when some ran again).
    attempts: u64,
    /// The `mr-out-N` files, in partition order.
    outputs: Vec<String>,
    /// Counters merged from winning attempts.
    counters: std::collections::BTreeMap<String, u64>,
    /// wordcount only: the ten most frequent words and their counts.
    top_words: Option<Vec<(String, u64)>>,
}

/// `shoal mr coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to accept workers on (HOST:PORT; a host name or an IP address).
    #[arg(long, default_value = "0.0.0.0:7070", value_parser = addr_arg)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub app: AppArgs,
    #[command(flatten)]
    pub job: JobArgs,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Input files (must be readable at the same paths on every worker's host).
    #[arg(value_name = "INPUT", required = true)]
    pub inputs: Vec<PathBuf>,
    #[command(flatten)]
    pub obs: crate::obs::ServerObsArgs,
    #[command(flatten)]
    pub tls: crate::tls_cmd::ServerTlsArgs,
}

/// `shoal mr worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The coordinator's address (HOST:PORT; a host name or an IP address).
    #[arg(long, value_parser = addr_arg)]
    pub coordinator: SocketAddr,
    /// Where to keep map output (a fresh subdirectory, removed on exit). Default: $TMPDIR.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Address of this worker's shuffle server (default: 127.0.0.1:0 when the coordinator is
    /// on loopback, else 0.0.0.0:0: any free port).
    #[arg(long, value_parser = addr_arg)]
    pub shuffle_listen: Option<SocketAddr>,
    /// Host name other workers use to reach this one (default: the address this worker uses
    /// to reach the coordinator).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Give up after the coordinator is unreachable this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub coordinator_timeout: Duration,
    /// Testing knob: behave as a machine this many times slower (sleeps after each task).
    #[arg(long, default_value_t = 1.0, hide_short_help = true)]
    pub slow_factor: f64,
    /// Started by `mr run`, which reports a failed job itself: do not print it again.
    #[arg(long, hide = true)]
    pub supervised: bool,
    #[command(flatten)]
    pub obs: crate::obs::ServerObsArgs,
    #[command(flatten)]
    pub tls: crate::tls_cmd::ServerTlsArgs,
}

/// `shoal mr seq`.
#[derive(Debug, Args)]
pub struct SeqArgs {
    #[command(flatten)]
    pub app: AppArgs,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// Input files.
    #[arg(value_name = "INPUT", required = true)]
    pub inputs: Vec<PathBuf>,
}

/// `--http`, `--listen`, `--coordinator`: a host name or an IP address, with a port.
fn addr_arg(s: &str) -> anyhow::Result<SocketAddr> {
    crate::cli::parse_addr(s)
}

/// Parses `64MiB`, `512KiB`, `1G`, `100k`, `1000`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 64MiB or 1000000)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses `10s`, `2500ms`, `1m`, `3` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let digits = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 10s or 500ms)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        other => return Err(format!("unknown duration unit `{other}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("`{s}`: expected on or off")),
    }
}

/// Runs a `shoal mr` subcommand.
pub fn run(cmd: MrCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    match cmd {
        MrCommand::Run(args) => runtime.block_on(run_local(*args)),
        MrCommand::Coordinator(args) => runtime.block_on(coordinator(*args)),
        MrCommand::Worker(args) => runtime.block_on(worker(*args)),
        MrCommand::Seq(args) => seq(*args),
        MrCommand::Gen(args) => gen(args),
        MrCommand::Validate(args) => validate(args),
    }
}

fn gen(args: GenArgs) -> anyhow::Result<ExitCode> {
    let format = SortFormat::parse(&args.format)?;
    let summary = shoal_mr::sortdata::generate(format, args.records, args.seed, &args.out)?;
    say!(
        "wrote {} {} records ({:.1} MB) to {}; checksum {:032x}",
        summary.records,
        format.name(),
        summary.bytes as f64 / 1e6,
        args.out.display(),
        summary.checksum
    );
    Ok(ExitCode::SUCCESS)
}

fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let format = SortFormat::parse(&args.format)?;
    if !args.dir.is_dir() {
        bail!(
            "{} is not a directory: give the --out directory of a sort job",
            args.dir.display()
        );
    }
    for input in &args.inputs {
        std::fs::metadata(input)
            .with_context(|| format!("cannot read --input {}", input.display()))?;
    }
    let files = shoal_mr::sortdata::output_files(&args.dir)?;
    match shoal_mr::sortdata::validate(&args.dir, format, &args.inputs) {
        Ok((out, input)) => {
            say!(
                "valid: {} records ({:.1} MB) in {} files, in order; {} duplicate keys; checksum {:032x}",
                out.records,
                out.bytes as f64 / 1e6,
                files.len(),
                out.duplicate_keys,
                out.checksum
            );
            if input.is_some() {
                say!("the same records as the input (count and checksum match)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.downcast_ref::<std::io::Error>().is_some() => Err(e),
        Err(e) => {
            eprintln!("invalid: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

fn job_options(app: AppConfig, job: &JobArgs, inputs: Vec<PathBuf>, out: PathBuf) -> JobOptions {
    JobOptions {
        app,
        inputs,
        split_size_bytes: job.split_size,
        reduces: job.reduces,
        memory_bytes: job.memory,
        task_timeout: job.task_timeout,
        max_attempts: job.max_attempts,
        backup_tasks: job.backup_tasks,
        out_dir: out,
    }
}

/// Serves the status page of `feed` on `listener`, if any, and says where.
fn serve_status_page(
    listener: Option<tokio::net::TcpListener>,
    feed: &StatusFeed,
) -> anyhow::Result<()> {
    if let Some(listener) = listener {
        let real = listener.local_addr()?;
        say!("status page on http://{real}/ (JSON at /status.json)");
        tokio::spawn(serve_status(listener, feed.clone()));
    }
    Ok(())
}

/// Why a job was stopped by a signal, and the exit code that says so (130 for SIGINT, 143 for
/// SIGTERM, as shells do).
struct Stopped {
    reason: &'static str,
    code: u8,
}

/// How `mr run`'s wait for its job ended.
enum RunEnd {
    /// The job ended by itself.
    Job(Result<JobReport, CoordinatorError>),
    /// It must be abandoned: a signal (`code` its exit code) or no worker left.
    Stop {
        reason: &'static str,
        code: Option<u8>,
    },
}

/// Why `mr run` abandons a job whose workers all exited.
const NO_WORKERS_LEFT: &str = "every worker process exited before the job finished";

/// How long `mr run` waits for an abandoned job's driver to say farewell and write its final
/// status (its own farewell wait is 2 s).
const ABANDON_GRACE: Duration = Duration::from_secs(5);

/// Waits for Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal(
    interrupt: &mut tokio::signal::unix::Signal,
    terminate: &mut tokio::signal::unix::Signal,
) -> Stopped {
    tokio::select! {
        _ = interrupt.recv() => Stopped { reason: "interrupted (SIGINT, Ctrl-C)", code: 130 },
        _ = terminate.recv() => Stopped { reason: "terminated (SIGTERM)", code: 143 },
    }
}

/// Maps a job's failure to an exit code: 1 for a failed task, a job aborted on an
/// unrecoverable disk error or abandoned, an error (exit 2) otherwise.
fn job_failure(e: CoordinatorError) -> anyhow::Result<ExitCode> {
    match e {
        CoordinatorError::TaskFailed { .. }
        | CoordinatorError::Aborted(_)
        | CoordinatorError::Abandoned(_) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
        other => Err(other.into()),
    }
}

async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    // Installed before `listening on`: from then on a SIGINT or SIGTERM abandons the job
    // through its driver (none is lost meanwhile).
    let mut terminate = sigterm()?;
    let mut interrupt = sigint()?;
    let security = args.tls.security(args.listen)?;
    let app = args.app.config("wordcount")?;
    let sort_format = app.sort.as_ref().map(|s| s.format.name().to_owned());
    let job = prepare_job(job_options(app, &args.job, args.inputs, args.out.clone()))?;
    // Both ports are bound before either is announced: a busy --http port fails the command
    // before any worker can connect (and before `listening on` tells anyone to try).
    let status_listener = match args.job.http {
        Some(addr) => Some(bind_http(addr).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // The metrics port too is bound before `listening on`; that line stays the first.
    let (publisher, feed) = status_channel();
    crate::obs::start_mr_metrics(args.obs.metrics, feed.subscribe()).await?;
    say!("listening on {addr}");
    serve_status_page(status_listener, &feed)?;
    let _ = std::io::stdout().flush();
    let maps = job.splits.len();
    // A signal abandons the job through the driver, which tells the workers, removes partial
    // outputs and writes the final status page (phase "abandoned") before returning.
    let stopped = std::cell::Cell::new(None);
    let stop = async {
        let s = stop_signal(&mut interrupt, &mut terminate).await;
        stopped.set(Some(s.code));
        s.reason.to_string()
    };
    match run_job(job, security, listener, publisher, stop).await {
        Ok(report) => {
            print_summary(&report, maps, None, sort_format.as_deref(), &args.out);
            Ok(ExitCode::SUCCESS)
        }
        Err(CoordinatorError::Abandoned(reason)) => {
            let code = stopped.get().unwrap_or(1);
            let word = if code == 143 {
                "terminated"
            } else {
                "interrupted"
            };
            tracing::debug!(%reason, "job abandoned");
            eprintln!(
                "{word}: the job is abandoned (final status in {})",
                args.out.join(shoal_mr::status::page::FINAL_HTML).display()
            );
            Ok(ExitCode::from(code))
        }
        Err(e) => job_failure(e),
    }
}

/// A stream of SIGINTs (Ctrl-C).
fn sigint() -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot install a SIGINT handler")
}

/// Binds the status page's port (`--http`).
async fn bind_http(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    bind_status(addr)
        .await
        .with_context(|| format!("cannot serve the status page on --http {addr}"))
}

/// A stream of SIGTERMs (what `kill`, systemd, CI runners and `timeout` send).
fn sigterm() -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install a SIGTERM handler")
}

async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    if !(args.slow_factor >= 1.0 && args.slow_factor.is_finite()) {
        bail!("--slow-factor must be at least 1");
    }
    let supervised = args.supervised;
    let shuffle_listen = args
        .shuffle_listen
        .unwrap_or_else(|| default_shuffle_listen(args.coordinator));
    let security = args
        .tls
        .security(shuffle_listen)
        .context("the worker's shuffle server (--shuffle-listen)")?;
    crate::obs::start_worker_metrics(args.obs.metrics).await?;
    let options = WorkerOptions {
        coordinator: args.coordinator.to_string(),
        work_dir: args.work_dir,
        shuffle_listen,
        security,
        advertise_host: args.advertise,
        slow_factor: args.slow_factor,
        coordinator_timeout: args.coordinator_timeout,
    };
    match run_worker(options).await {
        Ok(WorkerExit::JobDone) => {
            tracing::info!("job done: exiting");
            Ok(ExitCode::SUCCESS)
        }
        Ok(WorkerExit::JobFailed(reason)) => {
            if supervised {
                // `mr run` prints the reason once, for the whole job.
                tracing::debug!(%reason, "the coordinator reports the job failed");
            } else {
                eprintln!("worker: the coordinator reports the job failed: {reason}");
            }
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("worker: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Where a worker's shuffle server listens when `--shuffle-listen` is not given: on loopback
/// when the coordinator is (a one-machine job; no TLS or --insecure needed), else on every
/// interface, so that workers on other hosts can fetch from it.
fn default_shuffle_listen(coordinator: SocketAddr) -> SocketAddr {
    match coordinator.ip() {
        ip if ip.is_loopback() => SocketAddr::new(ip, 0),
        std::net::IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        std::net::IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    }
}

fn seq(args: SeqArgs) -> anyhow::Result<ExitCode> {
    let config = args.app.config("wordcount")?;
    let scratch = std::env::temp_dir().join(format!("shoal-mr-seq-{}", std::process::id()));
    let app = shoal_mr::app::build_app(&config, &scratch);
    let app = app.with_context(|| format!("bad app configuration for {}", config.name))?;
    let inputs = shoal_mr::split::expand_inputs(&args.inputs)?;
    let result = shoal_mr::seq::run_sequential(&*app, &inputs, &args.out);
    let _ = std::fs::remove_dir_all(&scratch);
    let counters = result.with_context(|| format!("sequential {} failed", config.name))?;
    eprintln!("wrote {}", args.out.display());
    for (k, v) in &counters.0 {
        eprintln!("  {k:<28} {v:>12}");
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `mr run` waits for its workers to exit after the job ends.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Name prefix of `mr run`'s scratch directory under $TMPDIR; the pid follows.
const SCRATCH_PREFIX: &str = "shoal-mr-run-";

async fn run_local(args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let tmp = std::env::temp_dir();
    // Scratch directories of `mr run`s that were SIGKILLed (their workers died with them).
    shoal_runtime::mr::remove_dirs_of_dead_processes(&tmp, SCRATCH_PREFIX);
    let scratch = tmp.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
    // Declared before the workers, so dropped after them: the directory goes once no worker
    // writes to it, on every way out of this function (errors, Ctrl-C, SIGTERM).
    let _cleanup = RemoveOnDrop(scratch.clone());
    // Installed before anything slow, so that a SIGINT or SIGTERM from now on takes the
    // cleanup path (they are acted on in the job loop below; none is lost meanwhile).
    let mut terminate = sigterm()?;
    let mut interrupt = sigint()?;
    let (inputs, bundled) = if args.inputs.is_empty() {
        let books = shoal_mr::local::write_bundled_books(&scratch.join("books"))
            .context("cannot write the bundled books to a temporary directory")?;
        (books, true)
    } else {
        (args.inputs.clone(), false)
    };
    let app = args.app.config("wordcount")?;
    let app_name = app.name.clone();
    let sort_format = app.sort.as_ref().map(|s| s.format.name().to_owned());
    let status_listener = match args.job.http {
        Some(addr) => Some(bind_http(addr).await?),
        None => None,
    };
    let job = prepare_job(job_options(app, &args.job, inputs, args.out.clone()))?;
    let maps = job.splits.len();
    let input_bytes = job.input_bytes;
    let files = job.options.inputs.len();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1")?;
    let addr = listener.local_addr()?;
    let (publisher, feed) = status_channel();
    serve_status_page(status_listener, &feed)?;
    let mut rx = feed.subscribe();

    let json = args.output == crate::output::Format::Json;
    if json {
        // stdout is the summary's JSON document only.
    } else if bundled {
        say!(
            "Counting words in {files} bundled books ({:.1} MB) with {} worker processes…",
            input_bytes as f64 / 1e6,
            args.workers
        );
    } else {
        say!(
            "Running {app_name} over {files} file(s) ({:.1} MB) with {} worker processes…",
            input_bytes as f64 / 1e6,
            args.workers
        );
    }

    let exe = std::env::current_exe().context("cannot find the shoal executable")?;
    // The workers, killed (SIGKILL) and reaped when dropped.
    let mut children = shoal_cluster::Procs::new();
    for i in 0..args.workers {
        // No log file: stdout is discarded and the workers' (rare) errors reach the terminal.
        let mut spec = shoal_cluster::Spec::unlogged(format!("worker {i}"), &exe)
            .args([
                "mr",
                "worker",
                "--supervised",
                "--coordinator",
                &addr.to_string(),
            ])
            .arg("--work-dir")
            .arg(scratch.join(format!("worker-{i}")));
        if i < args.slow_workers {
            spec = spec.arg("--slow-factor").arg(args.slow_factor.to_string());
        }
        if std::env::var_os("SHOAL_LOG").is_none() {
            spec = spec.env("SHOAL_LOG", "error");
        }
        // The supervisor gives the workers the parent-death signal: they die with this
        // process even when it is SIGKILLed. The signal follows the spawning thread: this is
        // the thread of `block_on` (the main thread), which lives as long as the process.
        std::fs::create_dir_all(scratch.join(format!("worker-{i}")))
            .with_context(|| format!("cannot create {}", scratch.display()))?;
        children.spawn(spec)?;
    }

    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>7} [{bar:40.cyan/blue}] {pos}/{len} tasks, {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    let map_bar = bars.add(indicatif::ProgressBar::new(maps as u64));
    map_bar.set_style(style.clone());
    map_bar.set_prefix("map");
    let reduce_bar = bars.add(indicatif::ProgressBar::new(u64::from(args.job.reduces)));
    reduce_bar.set_style(style);
    reduce_bar.set_prefix("reduce");

    // The job is abandoned through its driver (so that it tells the workers, removes partial
    // outputs and writes the final status page) when a signal comes or every worker is gone.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<String>();
    let stop = async move {
        match stop_rx.await {
            Ok(reason) => reason,
            Err(_) => std::future::pending().await,
        }
    };
    let job_future = run_job(job, Security::plain(), listener, publisher, stop);
    tokio::pin!(job_future);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    // When the map phase was seen over (to the poll's 100 ms).
    let mut map_phase_ms: Option<u64> = None;
    let end = loop {
        tokio::select! {
            r = &mut job_future => break RunEnd::Job(r),
            _ = poll.tick() => {
                let s = rx.borrow_and_update().clone();
                if map_phase_ms.is_none() && s.maps_total > 0 && s.maps_done == s.maps_total {
                    map_phase_ms = Some(s.elapsed_ms);
                }
                map_bar.set_position(u64::from(s.maps_done));
                reduce_bar.set_position(u64::from(s.reduces_done));
                let busy = s.workers.iter().filter(|w| !w.running.is_empty()).count();
                let mb = |name: &str| s.counters.get(name).copied().unwrap_or(0) as f64 / 1e6;
                map_bar.set_message(format!(
                    "{:.1}/{:.1} MB read, {:.1} MB written; {busy} workers busy",
                    mb("map.input.bytes"),
                    input_bytes as f64 / 1e6,
                    mb("map.output.file.bytes")
                ));
                reduce_bar.set_message(format!(
                    "{:.1} MB merged, {:.1} MB written",
                    mb("reduce.input.bytes"),
                    mb("reduce.output.bytes")
                ));
                if children.running() == 0 {
                    break RunEnd::Stop { reason: NO_WORKERS_LEFT, code: None };
                }
            }
            // Ctrl-C and SIGTERM take the same way out: the job is abandoned, then `children`
            // (killed and reaped) and `_cleanup` (the scratch directory) are dropped on return.
            stopped = stop_signal(&mut interrupt, &mut terminate) => {
                break RunEnd::Stop { reason: stopped.reason, code: Some(stopped.code) };
            }
        }
    };
    let result = match end {
        RunEnd::Job(result) => result,
        RunEnd::Stop { reason, code } => {
            bars.clear().ok();
            let _ = stop_tx.send(reason.to_string());
            // The driver tells the workers, cleans the output directory and writes the final
            // status page (phase "abandoned"); bounded, as the caller waits.
            if tokio::time::timeout(ABANDON_GRACE, &mut job_future)
                .await
                .is_err()
            {
                tracing::warn!("the coordinator did not finish abandoning the job in time");
            }
            return match code {
                Some(130) => {
                    eprintln!("interrupted: stopping the workers");
                    Ok(ExitCode::from(130))
                }
                Some(code) => {
                    eprintln!("terminated: stopping the workers");
                    Ok(ExitCode::from(code))
                }
                None => bail!("{reason} (run with SHOAL_LOG=info to see why)"),
            };
        }
    };
    map_bar.finish();
    reduce_bar.finish();
    bars.clear().ok();
    // Workers exit on their own when told the job is over; give them a moment.
    let deadline = tokio::time::Instant::now() + WORKER_EXIT_GRACE;
    while tokio::time::Instant::now() < deadline && children.running() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(children);
    match result {
        Ok(report) if json => {
            let top_words = (app_name == "wordcount")
                .then(|| shoal_mr::local::top_counts(&report.outputs, 10))
                .transpose()
                .context("reading the output for the most frequent words")?;
            crate::output::print_json(&SummaryJson {
                app: app_name.to_string(),
                elapsed_seconds: report.elapsed.as_secs_f64(),
                map_tasks: maps,
                reduce_tasks: report.outputs.len(),
                input_bytes: report.input_bytes,
                attempts: report.attempts,
                outputs: report
                    .outputs
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                counters: report.counters.clone(),
                top_words,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Ok(report) => {
            let top = (app_name == "wordcount").then_some(10);
            print_summary(&report, maps, top, sort_format.as_deref(), &args.out);
            if let Some(ms) = map_phase_ms {
                let total = report.elapsed.as_secs_f64();
                say!(
                    "Phases: map {:.1} s, then reduce and commit {:.1} s (seen every 100 ms).",
                    ms as f64 / 1e3,
                    (total - ms as f64 / 1e3).max(0.0)
                );
            }
            if bundled {
                say!(
                    "\nNext: `shoal mr run --http 127.0.0.1:8080 --workers 4` to watch the status page, \
                     or `shoal mr --help` to run a coordinator and workers on several hosts."
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => job_failure(e),
    }
}

/// Sizes of the output files: how evenly the partitioner spread the data.
struct Balance {
    largest: u64,
    mean: f64,
    ratio: f64,
    empty: usize,
}

fn partition_balance(outputs: &[PathBuf]) -> Option<Balance> {
    let sizes: Vec<u64> = outputs
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .collect::<Result<_, _>>()
        .ok()?;
    let largest = *sizes.iter().max()?;
    let mean = sizes.iter().sum::<u64>() as f64 / sizes.len() as f64;
    Some(Balance {
        largest,
        mean,
        ratio: if mean > 0.0 {
            largest as f64 / mean
        } else {
            1.0
        },
        empty: sizes.iter().filter(|&&s| s == 0).count(),
    })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn print_summary(
    report: &JobReport,
    maps: usize,
    top_words: Option<usize>,
    sort_format: Option<&str>,
    out: &Path,
) {
    let secs = report.elapsed.as_secs_f64().max(1e-6);
    say!(
        "Done in {secs:.2} s: {maps} map tasks, {} reduce tasks, {:.1} MB in ({:.1} MB/s).",
        report.outputs.len(),
        report.input_bytes as f64 / 1e6,
        report.input_bytes as f64 / 1e6 / secs
    );
    let tasks = (maps + report.outputs.len()) as u64;
    if report.attempts > tasks {
        say!(
            "{} attempts for {tasks} tasks: {} ran again (backup tasks, timeouts or lost workers).",
            report.attempts,
            report.attempts - tasks
        );
    }
    if let Some(n) = top_words {
        match shoal_mr::local::top_counts(&report.outputs, n) {
            Ok(top) if !top.is_empty() => {
                say!("\nMost frequent words:");
                let width = top.iter().map(|(w, _)| w.len()).max().unwrap_or(0);
                for (i, (word, count)) in top.iter().enumerate() {
                    say!("  {:>2}. {word:<width$} {count:>8}", i + 1);
                }
            }
            _ => {}
        }
    }
    let mb = |name: &str| report.counters.get(name).copied().unwrap_or(0) as f64 / 1e6;
    if report.counters.contains_key("map.input.bytes") {
        say!(
            "Bytes through each phase: map in {:.1} MB, spilled {:.1} MB, map output {:.1} MB, \
             shuffled {:.1} MB (over the network), reduce in {:.1} MB, out {:.1} MB.",
            mb("map.input.bytes"),
            mb("map.spill.bytes"),
            mb("map.output.file.bytes"),
            mb("shuffle.fetched.bytes"),
            mb("reduce.input.bytes"),
            mb("reduce.output.bytes")
        );
    }
    if let Some(&remote) = report.counters.get("map.input.remote.bytes") {
        say!(
            "Input read from the coordinator by workers that could not open it: {:.1} MB.",
            remote as f64 / 1e6
        );
    }
    let secs_of = |name: &str| report.counters.get(name).copied().unwrap_or(0) as f64 / 1e3;
    if report.counters.contains_key("map.read.ms") {
        say!(
            "Time in tasks (summed over tasks): map read {:.1} s, map {:.1} s, spill {:.1} s, \
             map merge+write {:.1} s; shuffle fetch {:.1} s; reduce merge+write {:.1} s, fsync {:.1} s.",
            secs_of("map.read.ms"),
            secs_of("map.run.ms"),
            secs_of("map.spill.ms"),
            secs_of("map.finish.ms"),
            secs_of("shuffle.fetch.ms"),
            secs_of("reduce.merge.ms"),
            secs_of("reduce.fsync.ms")
        );
    }
    if let Some(b) = sort_format.and(partition_balance(&report.outputs)) {
        say!(
            "Partitions: largest {:.1} MB, mean {:.1} MB: largest/mean = {:.2} ({} of {} empty).",
            b.largest as f64 / 1e6,
            b.mean / 1e6,
            b.ratio,
            b.empty,
            report.outputs.len()
        );
    }
    if !report.counters.is_empty() {
        say!("\nCounters (winning attempts only):");
        let width = report.counters.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in &report.counters {
            say!("  {k:<width$} {v:>12}");
        }
    }
    let last = report.outputs.len().saturating_sub(1);
    match sort_format {
        Some(format) => say!(
            "\nOutput: {}/mr-out-0 … mr-out-{last}, in total order (check: shoal mr validate \
             --format {format} --input INPUT {})",
            out.display(),
            out.display()
        ),
        None => say!(
            "\nOutput: {}/mr-out-0 … mr-out-{last} (try: sort {}/mr-out-* | head)",
            out.display(),
            out.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2k"), Ok(2048));
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2500ms"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
    }
}
