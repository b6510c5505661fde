//! `shoal bench mr --sort`: the paper's sort benchmark (§5.3) / TeraSort on this machine.
//!
//! On `--sort-mb` of records on disk (default 2000 MB), in one run: the disk's sequential
//! write (+fsync) and read speeds, measured with a Rust loop; GNU `LC_ALL=C sort --parallel=2
//! -S 50%` over a lines file (100-byte lines, a 10-character random key first: GNU sort
//! cannot read binary records with newline bytes in their keys, so it sorts the same number
//! of 100-byte records as whole lines); `shoal mr run --app sort` over that same lines file
//! (its output must equal GNU sort's, byte for byte) and over binary TeraSort records of the
//! same size (validated like valsort). The disk limit is the time to read the input once and
//! write the output once at the measured speeds: no sort can beat it. Shoal's summary lines
//! (bytes per phase, time in tasks, phases) are shown as the profile. Not a test: nothing here
//! passes or fails on a timing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use shoal_mr::apps::sort::SortFormat;
use shoal_mr::sortdata;

use crate::mr_bench::{cpu_seconds_now, BenchArgs};

/// Bytes per MB in the figures (decimal, as `dd`).
const BYTES_PER_MB: f64 = 1e6;
/// Free space needed, in multiples of the data size: both inputs (2×), Shoal's map output
/// (1×), fetched partitions (up to 1×), its reduce outputs and committed outputs (2×).
const FREE_SPACE_FACTOR: u64 = 6;
/// Size of the disk-speed probe file (at most).
const DISK_PROBE_BYTES: u64 = 1 << 30;
/// Write size of the disk-speed probe.
const DISK_PROBE_CHUNK_BYTES: usize = 1 << 20;

struct Row {
    name: String,
    seconds: f64,
    /// CPU time (user + system) of the run's processes (waited-for children).
    cpu_seconds: f64,
    bytes: u64,
}

/// Runs the sort benchmark.
pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let bytes =
        args.sort_mb * 1_000_000 / sortdata::RECORD_BYTES as u64 * sortdata::RECORD_BYTES as u64;
    let records = bytes / sortdata::RECORD_BYTES as u64;
    if records == 0 {
        bail!("--sort-mb must be at least 1");
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("shoal-bench-sort-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = args.dir.is_none().then(|| RemoveOnDrop(dir.clone()));
    let need = bytes * FREE_SPACE_FACTOR;
    let free = free_bytes(&dir)?;
    eprintln!(
        "sort benchmark: {:.0} MB of records in {}; needs about {:.1} GB free ({}× the data), \
         {:.1} GB free",
        bytes as f64 / BYTES_PER_MB,
        dir.display(),
        need as f64 / 1e9,
        FREE_SPACE_FACTOR,
        free as f64 / 1e9
    );
    if free < need {
        bail!(
            "not enough free space in {}: the sort benchmark needs about {:.1} GB, {:.1} GB are \
             free; choose a smaller --sort-mb or another --dir",
            dir.display(),
            need as f64 / 1e9,
            free as f64 / 1e9
        );
    }
    let exe = std::env::current_exe().context("locating the shoal binary")?;

    // Inputs (reused when a previous run left complete ones).
    let tera = dir.join("terasort/part-0");
    let lines = dir.join("lines/part-0");
    for (format, path) in [(SortFormat::Terasort, &tera), (SortFormat::Lines, &lines)] {
        let complete = std::fs::metadata(path).is_ok_and(|m| m.len() == bytes);
        if !complete {
            let (_, took) = timed(|| sortdata::generate(format, records, 0, path))?;
            eprintln!(
                "  generated {} ({} records) in {took:.1} s",
                path.display(),
                records
            );
        }
    }

    // The disk.
    let (write_mb_s, read_mb_s) = disk_speed(&dir, bytes.min(DISK_PROBE_BYTES))?;
    let limit_s =
        bytes as f64 / BYTES_PER_MB / read_mb_s + bytes as f64 / BYTES_PER_MB / write_mb_s;
    eprintln!(
        "  disk: sequential write+fsync {write_mb_s:.0} MB/s, read (evicted from the cache) \
         {read_mb_s:.0} MB/s; disk limit (read the input once, write the output once) {limit_s:.1} s"
    );
    warm(&lines)?;
    warm(&tera)?;

    let mut rows = Vec::new();
    // GNU sort over the lines file.
    let gnu_out = dir.join("gnu-sorted");
    let gnu_tmp = dir.join("gnu-tmp");
    std::fs::create_dir_all(&gnu_tmp)?;
    let mut cmd = Command::new("sort");
    cmd.env("LC_ALL", "C")
        .args(["--parallel=2", "-S", "50%", "-T"])
        .arg(&gnu_tmp)
        .arg("-o")
        .arg(&gnu_out)
        .arg(&lines)
        .stdout(Stdio::null());
    shoal_cluster::die_with_parent(&mut cmd);
    let (status, took, cpu) = timed_cpu(|| {
        let status = cmd.status().context("running GNU sort")?;
        // The same durability as Shoal's committed output.
        std::fs::File::open(&gnu_out)?.sync_all()?;
        Ok(status)
    })?;
    if !status.success() {
        bail!("GNU sort failed: {status}");
    }
    rows.push(report(Row {
        name: "GNU sort: LC_ALL=C sort --parallel=2 -S 50% (100-byte lines), + fsync".into(),
        seconds: took,
        cpu_seconds: cpu,
        bytes,
    }));

    // Shoal over the same lines, then over TeraSort records.
    let mut profiles = Vec::new();
    for (format, input) in [("lines", &lines), ("terasort", &tera)] {
        let out = dir.join(format!("out-{format}"));
        let _ = std::fs::remove_dir_all(&out);
        let mut cmd = Command::new(&exe);
        cmd.args([
            "mr",
            "run",
            "--app",
            "sort",
            "--format",
            format,
            "--workers",
        ])
        .arg(args.workers.to_string())
        .arg("--out")
        .arg(&out)
        .arg(input)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped());
        shoal_cluster::die_with_parent(&mut cmd);
        let (output, took, cpu) = timed_cpu(|| cmd.output().context("running shoal mr run"))?;
        if !output.status.success() {
            bail!(
                "shoal mr run --app sort --format {format} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let profile: Vec<String> = text
            .lines()
            .filter(|l| {
                [
                    "Done in",
                    "Bytes through",
                    "Time in tasks",
                    "Partitions:",
                    "Phases:",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .map(str::to_owned)
            .collect();
        rows.push(report(Row {
            name: format!(
                "shoal mr run --app sort --format {format} --workers {}",
                args.workers
            ),
            seconds: took,
            cpu_seconds: cpu,
            bytes,
        }));
        let fmt = SortFormat::parse(format)?;
        sortdata::validate(&out, fmt, std::slice::from_ref(input))
            .with_context(|| format!("validating {}", out.display()))?;
        if format == "lines" {
            same_bytes(&sortdata::output_files(&out)?, &gnu_out)?;
            eprintln!("  shoal's output equals GNU sort's, byte for byte");
        }
        let _ = std::fs::remove_dir_all(&out);
        profiles.push((format, profile));
    }
    let _ = std::fs::remove_file(&gnu_out);
    let _ = std::fs::remove_dir_all(&gnu_tmp);

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "shoal bench mr --sort: {:.0} MB ({} records of 100 bytes), {} cores, inputs in the page \
         cache, outputs fsynced",
        bytes as f64 / BYTES_PER_MB,
        records,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )?;
    writeln!(
        out,
        "disk: write+fsync {write_mb_s:.0} MB/s, read {read_mb_s:.0} MB/s; disk limit {limit_s:.1} s \
         ({:.0} MB/s)",
        bytes as f64 / BYTES_PER_MB / limit_s
    )?;
    writeln!(
        out,
        "{:<72} {:>8} {:>8} {:>7} {:>10} {:>7}",
        "run", "seconds", "MB/s", "x GNU", "x limit", "CPU s"
    )?;
    let gnu = rows.first().map_or(1.0, |r| r.seconds);
    for r in &rows {
        writeln!(
            out,
            "{:<72} {:>8.2} {:>8.1} {:>6.2}x {:>9.2}x {:>7.1}",
            r.name,
            r.seconds,
            r.bytes as f64 / BYTES_PER_MB / r.seconds.max(1e-9),
            gnu / r.seconds.max(1e-9),
            r.seconds / limit_s.max(1e-9),
            r.cpu_seconds
        )?;
    }
    for (format, profile) in profiles {
        writeln!(out, "\nshoal, {format}:")?;
        for l in profile {
            writeln!(out, "  {l}")?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn report(r: Row) -> Row {
    eprintln!(
        "  {:<72} {:>8.2} s {:>8.1} MB/s {:>7.1} CPU s",
        r.name,
        r.seconds,
        r.bytes as f64 / BYTES_PER_MB / r.seconds.max(1e-9),
        r.cpu_seconds
    );
    r
}

/// Wall-clock seconds of `f`.
// Benchmark code measures real elapsed time by design.
#[allow(clippy::disallowed_methods)]
fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let start = Instant::now();
    let r = f()?;
    Ok((r, start.elapsed().as_secs_f64()))
}

/// Wall-clock and CPU seconds (this process and its waited-for children) of `f`.
fn timed_cpu<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64, f64)> {
    let cpu = cpu_seconds_now();
    let (r, wall) = timed(f)?;
    Ok((r, wall, cpu_seconds_now() - cpu))
}

/// Free bytes of the file system holding `dir` (for unprivileged users).
fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).context("path with a NUL byte")?;
    // SAFETY: statvfs fills the zeroed struct from a valid C path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", dir.display()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Sequential write (1 MiB writes, then fsync) and read speed of `bytes` in `dir`, MB/s. The
/// file's pages are dropped from the cache (`posix_fadvise(DONTNEED)` after the fsync) before
/// it is read back.
fn disk_speed(dir: &Path, bytes: u64) -> anyhow::Result<(f64, f64)> {
    use std::os::fd::AsRawFd;
    let path = dir.join("disk-probe");
    let chunk: Vec<u8> = (0..DISK_PROBE_CHUNK_BYTES)
        .map(|i| (i * 131) as u8)
        .collect();
    let (file, write_s) = timed(|| {
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        Ok(f)
    })?;
    // SAFETY: advice on our own open file; failure only makes the read figure warmer.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
    drop(file);
    let (_, read_s) = timed(|| {
        let mut f = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; DISK_PROBE_CHUNK_BYTES];
        while f.read(&mut buf)? > 0 {}
        Ok(())
    })?;
    let _ = std::fs::remove_file(&path);
    let mb = bytes as f64 / BYTES_PER_MB;
    Ok((mb / write_s.max(1e-9), mb / read_s.max(1e-9)))
}

/// Reads a file once (every contender starts with its input in the page cache).
fn warm(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// The concatenation of `files` has the bytes of `expected`.
fn same_bytes(files: &[PathBuf], expected: &Path) -> anyhow::Result<()> {
    let mut want = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(expected)?);
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    for f in files {
        let mut got = std::fs::File::open(f)?;
        loop {
            let n = got.read(&mut a)?;
            if n == 0 {
                break;
            }
            want.read_exact(&mut b[..n]).with_context(|| {
                format!("shoal's output is longer than GNU sort's (at byte {offset})")
            })?;
            if a[..n] != b[..n] {
                bail!(
                    "shoal's output differs from GNU sort's near byte {offset} ({})",
                    f.display()
                );
            }
            offset += n as u64;
        }
    }
    if want.read(&mut b)? != 0 {
        bail!("shoal's output is shorter than GNU sort's ({offset} bytes)");
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
