//! `shoal bench mr`: MapReduce throughput next to the baselines it must beat, in one run.
//!
//! Builds (or reuses) a corpus of repeated Gutenberg books, then times on the same files:
//! the map task engine alone (one core), the sequential reference (`run_sequential`, in
//! process), `shoal mr run` with N workers (child processes of this binary), and the
//! coreutils pipeline `tr | sort | uniq -c`; then indexer and grep; then the backup-task
//! experiment (one worker 30x slower, backups on vs off). Timings are wall-clock, warm page cache.
//! Not a test: nothing here passes or fails on a timing.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_mr::app::{build_app, AppConfig};
use shoal_mr::seq::run_sequential;
use shoal_mr::split::plan_splits;
use shoal_mr::task::{run_map_task, DEFAULT_TASK_MEMORY_BYTES};

/// Size of one corpus file.
const CORPUS_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Corpus size of `--quick`.
const QUICK_SIZE_MIB: u64 = 64;
/// Bytes per MB in the figures (decimal megabytes, as `dd` and the reference figures use).
const BYTES_PER_MB: f64 = 1e6;
/// The grep benchmark's pattern.
const GREP_PATTERN: &str = "[Ww]hale|Holmes";

/// Arguments of `shoal bench mr`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Corpus size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Smoke run: a 64 MiB corpus (overrides --size-mib).
    #[arg(long)]
    pub quick: bool,
    /// Where the corpus and outputs live (reused if present). Default: a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Directory of the books the corpus repeats.
    #[arg(long, default_value = "testdata/gutenberg")]
    pub books: PathBuf,
    /// Worker processes of `shoal mr run`.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Skip the coreutils pipeline (slow: about 2 minutes per GiB).
    #[arg(long)]
    pub skip_coreutils: bool,
    /// Skip indexer and grep.
    #[arg(long)]
    pub skip_apps: bool,
    /// Skip the backup-task experiment.
    #[arg(long)]
    pub skip_backup: bool,
    /// Run the sort benchmark instead (TeraSort records and 100-byte lines next to GNU sort
    /// and the disk limit; see `mr_sort_bench`).
    #[arg(long)]
    pub sort: bool,
    /// Size of the sort benchmark's data, in MB (needs about 6× that free on disk).
    #[arg(long, default_value_t = 2000)]
    pub sort_mb: u64,
}

/// One measured run.
struct Figure {
    name: String,
    seconds: f64,
    /// CPU time (user + system) of this process and its waited-for children during the run.
    cpu_seconds: f64,
    bytes: u64,
}

impl Figure {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / BYTES_PER_MB / self.seconds.max(1e-9)
    }
}

/// Runs the benchmark and prints the figures.
pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.sort {
        return crate::mr_sort_bench::bench(&args);
    }
    let size_mib = if args.quick {
        QUICK_SIZE_MIB
    } else {
        args.size_mib
    };
    let (dir, _temp_guard) = match &args.dir {
        Some(d) => (d.clone(), None),
        None => {
            let d = std::env::temp_dir().join(format!("shoal-bench-mr-{}", std::process::id()));
            (d.clone(), Some(RemoveOnDrop(d)))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let books = locate_books(&args.books)?;
    let corpus = build_corpus(&dir.join("corpus"), &books, size_mib * 1024 * 1024)?;
    let total_bytes: u64 = corpus
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    eprintln!(
        "corpus: {} files, {:.1} MB in {}",
        corpus.len(),
        total_bytes as f64 / BYTES_PER_MB,
        dir.display()
    );
    warm_cache(&corpus)?;
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let mr_run = mr_run_available(&exe);
    if !mr_run {
        eprintln!("note: `shoal mr run` is not available in this build; skipping distributed runs");
    }

    let mut figures: Vec<Figure> = Vec::new();
    let mut ratios_base: Option<f64> = None;

    // 1. The map engine alone, one core, one 64 MiB split.
    figures.push(report(map_engine_figure(&corpus, &dir)?));

    // 2. Wordcount: distributed, sequential, coreutils.
    let seq_out = dir.join("seq-wordcount.txt");
    figures.push(report(time_seq(
        "wordcount",
        None,
        &corpus,
        &seq_out,
        total_bytes,
    )?));
    if mr_run {
        let out = dir.join("out-wordcount");
        let fig = time_mr_run(&exe, &args, "wordcount", &[], &corpus, &out, total_bytes)?;
        check_same_output(&out, &seq_out)?;
        figures.push(report(fig));
    }
    if !args.skip_coreutils {
        let fig = report(time_coreutils(&corpus, total_bytes)?);
        ratios_base = Some(fig.mb_per_s());
        figures.push(fig);
    }

    // 3. Indexer and grep.
    if !args.skip_apps {
        for (app, pattern) in [("indexer", None), ("grep", Some(GREP_PATTERN))] {
            let seq_out = dir.join(format!("seq-{app}.txt"));
            figures.push(report(time_seq(
                app,
                pattern,
                &corpus,
                &seq_out,
                total_bytes,
            )?));
            if mr_run {
                let out = dir.join(format!("out-{app}"));
                let extra: Vec<String> = pattern
                    .map(|p| vec!["--pattern".to_owned(), p.to_owned()])
                    .unwrap_or_default();
                let fig = time_mr_run(&exe, &args, app, &extra, &corpus, &out, total_bytes)?;
                check_same_output(&out, &seq_out)?;
                figures.push(report(fig));
            }
        }
    }

    // 4. Backup tasks: one worker 30x slower (the paper's straggler, §3.6: a bad disk slowing
    //    reads from 30 MB/s to 1 MB/s), backups on vs off.
    if mr_run && !args.skip_backup {
        for backups in ["on", "off"] {
            let out = dir.join(format!("out-backup-{backups}"));
            let extra = [
                "--slow-workers".to_owned(),
                "1".to_owned(),
                "--slow-factor".to_owned(),
                BACKUP_SLOW_FACTOR.to_string(),
                format!("--backup-tasks={backups}"),
            ];
            match time_mr_run(&exe, &args, "wordcount", &extra, &corpus, &out, total_bytes) {
                Ok(mut fig) => {
                    fig.name = format!(
                        "wordcount: 1 of {} workers {BACKUP_SLOW_FACTOR}x slower, backup tasks {backups}",
                        args.workers
                    );
                    figures.push(report(fig));
                }
                Err(e) => eprintln!("backup-task experiment (backups {backups}) failed: {e:#}"),
            }
        }
    }

    print_table(&figures, ratios_base, total_bytes)?;
    Ok(ExitCode::SUCCESS)
}

/// How much slower the straggler of the backup-task experiment is: the paper's example of a
/// machine whose bad disk slows reads from 30 MB/s to 1 MB/s (§3.6).
const BACKUP_SLOW_FACTOR: u32 = 30;

/// Prints a figure as soon as it is measured (the table at the end adds the ratios).
fn report(f: Figure) -> Figure {
    eprintln!(
        "  {:<62} {:>8.2} s {:>8.1} MB/s {:>8.2} CPU s",
        f.name,
        f.seconds,
        f.mb_per_s(),
        f.cpu_seconds
    );
    f
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--books`, or the repository's copy next to this source tree.
fn locate_books(arg: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let candidates = [
        arg.to_path_buf(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/gutenberg"),
    ];
    for dir in &candidates {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut books: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        books.sort();
        if !books.is_empty() {
            return Ok(books);
        }
    }
    bail!(
        "no books (*.txt) in {}; pass --books DIR (the repository ships testdata/gutenberg)",
        arg.display()
    )
}

/// Writes `total_bytes` of repeated books into `CORPUS_FILE_BYTES` files (whole lines), or
/// reuses a complete corpus of that size.
fn build_corpus(dir: &Path, books: &[PathBuf], total_bytes: u64) -> anyhow::Result<Vec<PathBuf>> {
    let marker = dir.join(format!(".complete-{total_bytes}"));
    let files = total_bytes.div_ceil(CORPUS_FILE_BYTES).max(1);
    let paths: Vec<PathBuf> = (0..files)
        .map(|i| dir.join(format!("part-{i:04}.txt")))
        .collect();
    if marker.exists() {
        return Ok(paths);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let texts = books
        .iter()
        .map(|b| std::fs::read(b).with_context(|| format!("reading {}", b.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut next_book = 0usize;
    let mut offset_in_book = 0usize;
    let mut left = total_bytes;
    for path in &paths {
        let mut file_left = left.min(CORPUS_FILE_BYTES);
        left -= file_left;
        let mut w = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        while file_left > 0 {
            let text = &texts[next_book % texts.len()];
            let rest = &text[offset_in_book..];
            let take = (rest.len() as u64).min(file_left) as usize;
            // End on a line boundary when cutting a book.
            let take = if take < rest.len() {
                rest[..take]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(take, |i| i + 1)
            } else {
                take
            };
            w.write_all(&rest[..take])
                .with_context(|| format!("writing {}", path.display()))?;
            file_left = file_left.saturating_sub(take as u64);
            offset_in_book += take;
            if offset_in_book >= text.len() || take == 0 {
                next_book += 1;
                offset_in_book = 0;
            }
        }
        w.flush()
            .with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::write(&marker, b"").with_context(|| format!("creating {}", marker.display()))?;
    Ok(paths)
}

/// Reads the corpus once so that every contender sees a warm page cache.
fn warm_cache(corpus: &[PathBuf]) -> anyhow::Result<()> {
    for p in corpus {
        let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        std::io::copy(&mut f, &mut std::io::sink())
            .with_context(|| format!("reading {}", p.display()))?;
    }
    Ok(())
}

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const PROC_TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds used so far by this process and its waited-for children (0 if unknown).
pub(crate) fn cpu_seconds_now() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name: state is field 3, utime..cstime are fields 14..=17.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..15)
        .map(|f| f.iter().filter_map(|x| x.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / PROC_TICKS_PER_SECOND
}

/// Wall-clock and CPU timing of a benchmark step.
// Benchmark code measures real elapsed time by design.
#[allow(clippy::disallowed_methods)]
fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration, f64)> {
    let cpu_start = cpu_seconds_now();
    let start = Instant::now();
    let r = f()?;
    let wall = start.elapsed();
    Ok((r, wall, cpu_seconds_now() - cpu_start))
}

fn app_config(app: &str, pattern: Option<&str>) -> AppConfig {
    AppConfig {
        name: app.to_owned(),
        pattern: pattern.map(str::to_owned),
        ..AppConfig::default()
    }
}

fn map_engine_figure(corpus: &[PathBuf], dir: &Path) -> anyhow::Result<Figure> {
    let work = dir.join("map-engine");
    let app = build_app(&app_config("wordcount", None), &work)?;
    let splits = plan_splits(&corpus[..1], CORPUS_FILE_BYTES)?;
    let split = splits.first().context("empty corpus")?;
    let (_, took, cpu) =
        timed(|| run_map_task(&*app, split, 0, 10, DEFAULT_TASK_MEMORY_BYTES, &work))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(Figure {
        name: "wordcount map task engine (1 core, one split)".into(),
        seconds: took.as_secs_f64(),
        cpu_seconds: cpu,
        bytes: split.len,
    })
}

fn time_seq(
    app: &str,
    pattern: Option<&str>,
    corpus: &[PathBuf],
    out: &Path,
    bytes: u64,
) -> anyhow::Result<Figure> {
    let a = build_app(
        &app_config(app, pattern),
        out.parent().unwrap_or(Path::new(".")),
    )?;
    let (_, took, cpu) = timed(|| run_sequential(&*a, corpus, out))?;
    Ok(Figure {
        name: format!("{app}: run_sequential (in process, 1 thread)"),
        seconds: took.as_secs_f64(),
        cpu_seconds: cpu,
        bytes,
    })
}

fn mr_run_available(exe: &Path) -> bool {
    Command::new(exe)
        .args(["mr", "run", "--help"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--workers"))
        .unwrap_or(false)
}

fn time_mr_run(
    exe: &Path,
    args: &BenchArgs,
    app: &str,
    extra: &[String],
    corpus: &[PathBuf],
    out: &Path,
    bytes: u64,
) -> anyhow::Result<Figure> {
    let _ = std::fs::remove_dir_all(out);
    let mut cmd = Command::new(exe);
    cmd.args(["mr", "run", "--app", app, "--workers"])
        .arg(args.workers.to_string())
        .arg("--out")
        .arg(out)
        .args(extra)
        .args(corpus)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The supervisor's rule for every child: it dies with us (its workers die with it).
    shoal_cluster::die_with_parent(&mut cmd);
    let (output, took, cpu) = timed(|| cmd.output().context("running shoal mr run"))?;
    if !output.status.success() {
        bail!(
            "shoal mr run --app {app} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(Figure {
        name: format!("{app}: shoal mr run --workers {}", args.workers),
        seconds: took.as_secs_f64(),
        cpu_seconds: cpu,
        bytes,
    })
}

fn time_coreutils(corpus: &[PathBuf], bytes: u64) -> anyhow::Result<Figure> {
    let files: Vec<String> = corpus
        .iter()
        .map(|p| format!("'{}'", p.display().to_string().replace('\'', "'\\''")))
        .collect();
    let script = format!(
        "cat {} | LC_ALL=C tr -cs A-Za-z '\\n' | sort | uniq -c > /dev/null",
        files.join(" ")
    );
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(&script);
    shoal_cluster::die_with_parent(&mut sh);
    let (status, took, cpu) = timed(|| sh.status().context("running the coreutils pipeline"))?;
    if !status.success() {
        bail!("coreutils pipeline failed: {status}");
    }
    Ok(Figure {
        name: "wordcount: LC_ALL=C tr -cs A-Za-z '\\n' | sort | uniq -c".into(),
        seconds: took.as_secs_f64(),
        cpu_seconds: cpu,
        bytes,
    })
}

/// The distributed output (all `mr-out-*`, sorted) must equal the sequential output.
fn check_same_output(out_dir: &Path, seq_file: &Path) -> anyhow::Result<()> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for entry in
        std::fs::read_dir(out_dir).with_context(|| format!("listing {}", out_dir.display()))?
    {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("mr-out-"))
        {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            lines.extend(
                bytes
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec),
            );
        }
    }
    lines.sort();
    let seq = std::fs::read(seq_file).with_context(|| format!("reading {}", seq_file.display()))?;
    let mut expected: Vec<Vec<u8>> = seq
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    expected.sort();
    if lines != expected {
        bail!(
            "distributed output in {} differs from the sequential output {} ({} vs {} lines)",
            out_dir.display(),
            seq_file.display(),
            lines.len(),
            expected.len()
        );
    }
    Ok(())
}

fn print_table(
    figures: &[Figure],
    coreutils_mb_s: Option<f64>,
    total_bytes: u64,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "shoal bench mr: {:.0} MB corpus, {} cores, warm cache",
        total_bytes as f64 / BYTES_PER_MB,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )?;
    writeln!(
        out,
        "{:<62} {:>9} {:>9} {:>11} {:>9}",
        "run", "seconds", "MB/s", "x coreutils", "CPU s"
    )?;
    for f in figures {
        let ratio = coreutils_mb_s
            .map(|base| format!("{:.1}x", f.mb_per_s() / base))
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<62} {:>9.2} {:>9.1} {:>11} {:>9.2}",
            f.name,
            f.seconds,
            f.mb_per_s(),
            ratio,
            f.cpu_seconds
        )?;
    }
    Ok(())
}
