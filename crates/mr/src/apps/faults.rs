//! The fault-testing apps of the classic MapReduce lab (`test-mr.sh`), ported faithfully.
//!
//! They create marker files in the **current working directory** (the lab runs every process
//! in `mr-tmp/`), count live peers with `kill(pid, 0)`, sleep, and (`crash`) exit the process.
//! These are test apps: they are deliberately non-deterministic in timing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::app::{App, Emit};
use crate::apps::push_decimal;

/// How long `nparallel` holds its marker file, as in the lab.
const PARALLEL_WINDOW: Duration = Duration::from_secs(1);

/// Creates `mr-worker-<phase>-<pid>`, counts the live processes that have such a file, sleeps
/// [`PARALLEL_WINDOW`], removes the file, and returns the count (the lab's `nparallel`).
fn nparallel(phase: &str) -> anyhow::Result<u64> {
    let pid = std::process::id();
    let mine = format!("mr-worker-{phase}-{pid}");
    std::fs::write(&mine, b"x").with_context(|| format!("creating {mine}"))?;
    let prefix = format!("mr-worker-{phase}-");
    let mut live = 0;
    for entry in std::fs::read_dir(".").context("listing the current directory")? {
        let name = entry.context("listing the current directory")?.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        // Like Go's Sscanf("%d"): the leading decimal digits.
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(other) = digits.parse::<libc::pid_t>() else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists; no signal is sent.
        if unsafe { libc::kill(other, 0) } == 0 {
            live += 1;
        }
    }
    std::thread::sleep(PARALLEL_WINDOW);
    std::fs::remove_file(&mine).with_context(|| format!("removing {mine}"))?;
    Ok(live)
}

/// Sorts values and joins them with `sep` (the lab's deterministic reduce).
fn sorted_join(values: &mut dyn Iterator<Item = &[u8]>, sep: &[u8], out: &mut Vec<u8>) {
    let mut vv: Vec<&[u8]> = values.collect();
    vv.sort_unstable();
    for (i, v) in vv.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(sep);
        }
        out.extend_from_slice(v);
    }
}

/// A small RNG for fault injection (splitmix64), seeded from the pid, the time and a counter.
fn fault_random() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    // Fault injection, not protocol code: the wall clock only seeds the random choice.
    #[allow(clippy::disallowed_methods)]
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `mtiming`: checks that map tasks run in parallel.
#[derive(Debug, Default, Clone, Copy)]
pub struct MapTiming;

impl App for MapTiming {
    fn name(&self) -> &str {
        "mtiming"
    }

    fn map(&self, _name: &str, _contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        // The lab records the start time as seconds with one decimal.
        #[allow(clippy::disallowed_methods)]
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let pid = std::process::id();
        let n = nparallel("map")?;
        emit.emit(
            format!("times-{pid}").as_bytes(),
            format!("{ts:.1}").as_bytes(),
        );
        emit.emit(
            format!("parallel-{pid}").as_bytes(),
            n.to_string().as_bytes(),
        );
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        sorted_join(values, b" ", out);
        Ok(())
    }
}

/// `rtiming`: checks that reduce tasks run in parallel.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReduceTiming;

impl App for ReduceTiming {
    fn name(&self) -> &str {
        "rtiming"
    }

    fn map(&self, _name: &str, _contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        for key in b'a'..=b'j' {
            emit.emit(&[key], b"1");
        }
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        _values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        push_decimal(out, nparallel("reduce")?);
        Ok(())
    }
}

/// `jobcount`: checks that no map task runs twice (the output is `a N` with N = map tasks).
#[derive(Debug, Default, Clone, Copy)]
pub struct JobCount;

/// Map invocations in this process (the lab's package-level `count`).
static JOBCOUNT_CALLS: AtomicU64 = AtomicU64::new(0);

impl App for JobCount {
    fn name(&self) -> &str {
        "jobcount"
    }

    fn map(&self, _name: &str, _contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        let k = JOBCOUNT_CALLS.fetch_add(1, Ordering::SeqCst);
        let marker = format!("mr-worker-jobcount-{}-{k}", std::process::id());
        std::fs::write(&marker, b"x").with_context(|| format!("creating {marker}"))?;
        std::thread::sleep(Duration::from_millis(2000 + fault_random() % 3000));
        emit.emit(b"a", b"x");
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        _values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let mut invocations = 0u64;
        for entry in std::fs::read_dir(".").context("listing the current directory")? {
            let entry = entry.context("listing the current directory")?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("mr-worker-jobcount")
            {
                invocations += 1;
            }
        }
        push_decimal(out, invocations);
        Ok(())
    }
}

/// `early_exit`: some reduces are slow, to catch workers or a coordinator exiting early.
#[derive(Debug, Default, Clone, Copy)]
pub struct EarlyExit;

/// How long `early_exit` reduces sleep for keys containing "sherlock" or "tom".
const EARLY_EXIT_SLEEP: Duration = Duration::from_secs(3);

impl App for EarlyExit {
    fn name(&self) -> &str {
        "early_exit"
    }

    fn map(&self, name: &str, _contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        emit.emit(name.as_bytes(), b"1");
        Ok(())
    }

    fn reduce(
        &self,
        key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let has = |needle: &[u8]| key.windows(needle.len()).any(|w| w == needle);
        if has(b"sherlock") || has(b"tom") {
            std::thread::sleep(EARLY_EXIT_SLEEP);
        }
        push_decimal(out, values.count() as u64);
        Ok(())
    }
}

/// `crash` (and `nocrash`): map and reduce exit the process with probability 33% and sleep up
/// to 10 s with probability 33%; `nocrash` never does either. Output: `a` = input names,
/// `b` = their lengths, `c` = contents lengths, `d` = `xyzzy`, values sorted and joined.
#[derive(Debug, Default, Clone, Copy)]
pub struct Crash {
    /// Whether to inject crashes and delays (`crash`) or not (`nocrash`).
    pub crashes: bool,
}

/// Longest `crash` delay.
const CRASH_MAX_DELAY_MS: u64 = 10_000;

impl Crash {
    fn maybe_crash(&self) {
        if !self.crashes {
            return;
        }
        let rr = fault_random() % 1000;
        if rr < 330 {
            tracing::warn!("crash app: exiting the process (fault injection)");
            std::process::exit(1);
        } else if rr < 660 {
            let ms = fault_random() % CRASH_MAX_DELAY_MS;
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

impl App for Crash {
    fn name(&self) -> &str {
        if self.crashes {
            "crash"
        } else {
            "nocrash"
        }
    }

    fn map(&self, name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        self.maybe_crash();
        emit.emit(b"a", name.as_bytes());
        emit.emit(b"b", name.len().to_string().as_bytes());
        emit.emit(b"c", contents.len().to_string().as_bytes());
        emit.emit(b"d", b"xyzzy");
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        self.maybe_crash();
        sorted_join(values, b" ", out);
        Ok(())
    }
}
