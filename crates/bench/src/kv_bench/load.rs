//! The closed-loop load: N requesters, each with one operation in flight on its own
//! [`KvConn`]; operations are numbered from one shared counter, the first `warmup` are not
//! measured, the next `ops` are.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::target::{KvConn, KvTarget, TargetKind};
use super::{now, SplitMix64, LIVENESS};

/// Pause of a requester after a failed operation (a dead server refuses connections at once;
/// without it a requester would spin).
pub const RETRY_PAUSE: Duration = Duration::from_millis(5);
/// Time between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Attempts of one prefill put beyond the first.
const PREFILL_RETRIES: u32 = 100;
/// A run stops early when this many operations in a row failed (a dead cluster).
const MAX_ERRORS_IN_A_ROW: u64 = 2000;

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mode {
    /// Unconditional puts of random keys.
    Put,
    /// Linearizable gets of random keys.
    Get,
    /// Gets with probability --read-ratio, puts otherwise.
    Mixed,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Put => "put",
            Mode::Get => "get",
            Mode::Mixed => "mixed",
        }
    }
}

/// How keys are formatted: `k` and the key number, zero-padded to `key_size` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    pub key_size: usize,
    pub keyspace: u64,
}

impl Keys {
    /// The smallest key size that holds every key number of the keyspace.
    pub fn min_key_size(keyspace: u64) -> usize {
        1 + keyspace.saturating_sub(1).max(1).ilog10() as usize + 1
    }

    pub fn key(&self, n: u64) -> Vec<u8> {
        format!("k{n:0width$}", width = self.key_size - 1).into_bytes()
    }
}

/// Which keys a run touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrder {
    /// Uniformly random over the keyspace (seeded per requester).
    Random,
    /// Operation number `i` touches key `i mod keyspace` (the prefill).
    Sequential,
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub label: String,
    pub mode: Mode,
    pub read_ratio: f64,
    pub clients: usize,
    pub warmup: u64,
    pub ops: u64,
    pub keys: Keys,
    pub order: KeyOrder,
    pub value: Arc<Vec<u8>>,
    pub seed: u64,
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub target: TargetKind,
    pub mode: Mode,
    pub clients: usize,
    /// Measured operations answered.
    pub ops: u64,
    /// From the start of the first measured operation to the end of the last.
    pub secs: f64,
    /// Latencies of the measured operations, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Measured operations that failed (timeouts, refused connections).
    pub errors: u64,
    /// Failed warmup operations.
    pub warmup_errors: u64,
    /// Measured gets that found no key.
    pub misses: u64,
    /// The first error of the run, if any.
    pub first_error: Option<String>,
}

impl RunResult {
    pub fn ops_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Nearest-rank percentile in milliseconds (0 when nothing was measured).
    pub fn pct_ms(&self, p: f64) -> f64 {
        super::percentile(&self.latencies_us, p).map_or(0.0, |us| f64::from(us) / 1e3)
    }
}

/// Shared by the requesters of one run.
struct Shared {
    /// Set when no operation was answered for [`LIVENESS`]: the requesters stop.
    abort: AtomicBool,
    next_op: AtomicU64,
    answered: AtomicU64,
    errors_in_a_row: AtomicU64,
    /// Set by the requester that takes the first measured operation.
    measure_start: Mutex<Option<Instant>>,
}

/// What one requester measured.
#[derive(Default)]
struct RequesterResult {
    latencies_us: Vec<u32>,
    errors: u64,
    warmup_errors: u64,
    misses: u64,
    last_end: Option<Instant>,
    first_error: Option<String>,
}

/// Runs one closed-loop load against `target`.
pub async fn run_load<T: KvTarget>(target: &Arc<T>, spec: &LoadSpec) -> Result<RunResult> {
    let mut conns = Vec::with_capacity(spec.clients);
    for _ in 0..spec.clients {
        conns.push(target.connect().await?);
    }
    let shared = Arc::new(Shared {
        abort: AtomicBool::new(false),
        next_op: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        errors_in_a_row: AtomicU64::new(0),
        measure_start: Mutex::new(None),
    });
    let total = spec.warmup + spec.ops;
    let started = now();
    let mut tasks = tokio::task::JoinSet::new();
    for (r, conn) in conns.into_iter().enumerate() {
        let shared = shared.clone();
        let spec = spec.clone();
        tasks.spawn(requester(conn, r as u64, spec, shared));
    }

    let finished = Arc::new(AtomicBool::new(false));
    let progress = tokio::spawn(progress(
        format!("{} {}", target.kind().name(), spec.label),
        shared.clone(),
        finished.clone(),
        total,
        started,
    ));

    let mut result = RunResult {
        target: target.kind(),
        mode: spec.mode,
        clients: spec.clients,
        ops: 0,
        secs: 0.0,
        latencies_us: Vec::new(),
        errors: 0,
        warmup_errors: 0,
        misses: 0,
        first_error: None,
    };
    let mut last_end: Option<Instant> = None;
    while let Some(joined) = tasks.join_next().await {
        let r = joined.context("a requester task panicked")?;
        result.latencies_us.extend(r.latencies_us);
        result.errors += r.errors;
        result.warmup_errors += r.warmup_errors;
        result.misses += r.misses;
        last_end = last_end.max(r.last_end);
        if result.first_error.is_none() {
            result.first_error = r.first_error;
        }
    }
    finished.store(true, Ordering::Relaxed);
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    result.latencies_us.sort_unstable();
    result.ops = result.latencies_us.len() as u64;
    let measure_start = *shared.measure_start.lock().expect("measure_start lock");
    if let (Some(a), Some(b)) = (measure_start, last_end) {
        result.secs = b.saturating_duration_since(a).as_secs_f64();
    }
    if shared.abort.load(Ordering::Relaxed) {
        anyhow::bail!(
            "{} {}: no operation answered for {LIVENESS:?} ({} of {total} answered; the first error: {})",
            target.kind().name(),
            spec.label,
            shared.answered.load(Ordering::Relaxed),
            result.first_error.as_deref().unwrap_or("none")
        );
    }
    if shared.errors_in_a_row.load(Ordering::Relaxed) >= MAX_ERRORS_IN_A_ROW {
        anyhow::bail!(
            "{} {}: {MAX_ERRORS_IN_A_ROW} operations in a row failed: is the cluster down?",
            target.kind().name(),
            spec.label
        );
    }
    Ok(result)
}

async fn requester<C: KvConn>(
    mut conn: C,
    r: u64,
    spec: LoadSpec,
    shared: Arc<Shared>,
) -> RequesterResult {
    let mut rng = SplitMix64(spec.seed ^ (r + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut out = RequesterResult::default();
    let total = spec.warmup + spec.ops;
    loop {
        if shared.errors_in_a_row.load(Ordering::Relaxed) >= MAX_ERRORS_IN_A_ROW
            || shared.abort.load(Ordering::Relaxed)
        {
            return out;
        }
        let n = shared.next_op.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            return out;
        }
        let measured = n >= spec.warmup;
        let key_n = match spec.order {
            KeyOrder::Random => rng.below(spec.keys.keyspace),
            KeyOrder::Sequential => n % spec.keys.keyspace,
        };
        let key = spec.keys.key(key_n);
        let is_get = match spec.mode {
            Mode::Put => false,
            Mode::Get => true,
            Mode::Mixed => (rng.below(1 << 20) as f64) < spec.read_ratio * f64::from(1 << 20),
        };
        let start = now();
        if n == spec.warmup {
            *shared.measure_start.lock().expect("measure_start lock") = Some(start);
        }
        let mut answer = if is_get {
            conn.get(&key).await
        } else {
            conn.put(&key, &spec.value).await
        };
        // The prefill must write every key: a failed put is retried (a leader change, say).
        let mut retries = 0;
        while answer.is_err()
            && spec.order == KeyOrder::Sequential
            && retries < PREFILL_RETRIES
            && !shared.abort.load(Ordering::Relaxed)
        {
            retries += 1;
            tokio::time::sleep(RETRY_PAUSE).await;
            answer = conn.put(&key, &spec.value).await;
        }
        let end = now();
        match answer {
            Ok(a) => {
                shared.errors_in_a_row.store(0, Ordering::Relaxed);
                shared.answered.fetch_add(1, Ordering::Relaxed);
                if measured {
                    let us = (end - start).as_micros();
                    out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    out.last_end = Some(end);
                    if !a.found {
                        out.misses += 1;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "operation failed");
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
                shared.errors_in_a_row.fetch_add(1, Ordering::Relaxed);
                if measured {
                    out.errors += 1;
                    out.last_end = Some(end);
                } else {
                    out.warmup_errors += 1;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Prints the operations answered so far and the recent rate: one line per second, or one
/// line rewritten in place on a terminal. Also the watchdog: no answer for [`LIVENESS`]
/// aborts the run.
async fn progress(
    label: String,
    shared: Arc<Shared>,
    finished: Arc<AtomicBool>,
    total: u64,
    started: Instant,
) {
    let tty = std::io::stderr().is_terminal();
    let mut last = 0;
    let mut last_at = started;
    let mut last_answer_at = started;
    while !finished.load(Ordering::Relaxed) {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let done = shared.answered.load(Ordering::Relaxed);
        let at = now();
        if done > last {
            last_answer_at = at;
        } else if at - last_answer_at > LIVENESS {
            shared.abort.store(true, Ordering::Relaxed);
        }
        let rate = (done - last) as f64 / (at - last_at).as_secs_f64().max(1e-9);
        let line = format!(
            "kv bench: {label}: {done}/{total} ops, {rate:.0} ops/s, {:.0} s",
            (at - started).as_secs_f64()
        );
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        last = done;
        last_at = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_requested_size() {
        let keys = Keys {
            key_size: 16,
            keyspace: 100_000,
        };
        assert_eq!(keys.key(0), b"k000000000000000");
        assert_eq!(keys.key(99_999).len(), 16);
        assert_eq!(Keys::min_key_size(100_000), 6);
        assert_eq!(Keys::min_key_size(100_001), 7);
        assert_eq!(Keys::min_key_size(1), 2);
        assert_eq!(Keys::min_key_size(10), 2);
    }
}
