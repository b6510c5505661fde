//! The closed-loop load of `shoal bench shard`: N requesters sharing one [`ShardClientPool`],
//! each with one operation in flight, for a fixed time (or until told to stop); every
//! operation's start and latency are kept so that a window (after the warm-up, during a move)
//! can be cut out afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_runtime::shard::{ShardClient, ShardClientPool};
use shoal_wire::kv::Expected;

use super::report::Workload;
use crate::bench_util::{now, percentile, SplitMix64};

/// Pause of a requester after a failed operation (so a dead group is not spun on).
const RETRY_PAUSE: Duration = Duration::from_millis(5);
/// A load stops with an error when nothing was answered for this long.
pub const LIVENESS: Duration = Duration::from_secs(60);
/// Attempts of one preload put.
const PRELOAD_ATTEMPTS: u32 = 100;

/// One answered (or failed) operation.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub start: Instant,
    pub end: Instant,
    pub ok: bool,
}

impl Sample {
    pub fn latency(&self) -> Duration {
        self.end.saturating_duration_since(self.start)
    }
}

/// What a load does.
#[derive(Clone)]
pub struct LoadSpec {
    pub workload: Workload,
    pub clients: usize,
    /// The keys operations pick from, uniformly at random.
    pub keys: Arc<Vec<Vec<u8>>>,
    pub value: Arc<Vec<u8>>,
    /// Stop after this long (also stops when `stop` is set).
    pub duration: Duration,
    pub seed: u64,
}

/// Every operation of a load, in no particular order, and the first error seen.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub samples: Vec<Sample>,
    pub first_error: Option<String>,
}

/// Figures over the operations that started and ended within `[from, to]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub ok: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl LoadResult {
    pub fn window(&self, from: Instant, to: Instant) -> Window {
        let mut lat: Vec<Duration> = Vec::new();
        let mut errors = 0;
        for s in &self.samples {
            if s.start >= from && s.end <= to {
                if s.ok {
                    lat.push(s.latency());
                } else {
                    errors += 1;
                }
            }
        }
        lat.sort_unstable();
        let secs = to.saturating_duration_since(from).as_secs_f64();
        let ms = |p| percentile(&lat, p).map_or(0.0, |d: Duration| d.as_secs_f64() * 1e3);
        Window {
            ok: lat.len() as u64,
            errors,
            ops_per_sec: if secs > 0.0 {
                lat.len() as f64 / secs
            } else {
                0.0
            },
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }
}

/// Runs `spec` on `pool` until its duration is over or `stop` is set.
pub async fn run(
    pool: &ShardClientPool,
    spec: &LoadSpec,
    stop: Arc<AtomicBool>,
) -> Result<LoadResult> {
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let deadline = now() + spec.duration;
    for r in 0..spec.clients {
        let client = ShardClient::with_pool(pool).context("creating a shard client")?;
        let spec = spec.clone();
        let stop = stop.clone();
        let answered = answered.clone();
        tasks.spawn(requester(client, r as u64, spec, deadline, stop, answered));
    }
    // Watchdog: nothing answered for LIVENESS stops the load with an error.
    let watch = {
        let stop = stop.clone();
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut last_at = now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = answered.load(Ordering::Relaxed);
                if n > last {
                    last = n;
                    last_at = now();
                } else if now() - last_at > LIVENESS {
                    stop.store(true, Ordering::Relaxed);
                    return true;
                }
            }
        })
    };
    let mut out = LoadResult::default();
    while let Some(joined) = tasks.join_next().await {
        let (samples, err) = joined.context("a requester task panicked")?;
        out.samples.extend(samples);
        if out.first_error.is_none() {
            out.first_error = err;
        }
    }
    watch.abort();
    if let Ok(true) = watch.await {
        bail!(
            "{}: nothing answered for {LIVENESS:?} (the first error: {})",
            spec.workload.name(),
            out.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(out)
}

async fn requester(
    mut client: ShardClient,
    r: u64,
    spec: LoadSpec,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> (Vec<Sample>, Option<String>) {
    let mut rng = SplitMix64(spec.seed ^ (r + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut samples = Vec::new();
    let mut first_error = None;
    while !stop.load(Ordering::Relaxed) && now() < deadline {
        let key = &spec.keys[rng.below(spec.keys.len() as u64) as usize];
        let start = now();
        let result = match spec.workload {
            Workload::Put => client
                .put(key, &spec.value, Expected::Any)
                .await
                .map(|_| ()),
            Workload::Get => client.get(key).await.map(|_| ()),
        };
        let end = now();
        samples.push(Sample {
            start,
            end,
            ok: result.is_ok(),
        });
        match result {
            Ok(()) => {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(error = %e, "operation failed");
                first_error.get_or_insert_with(|| e.to_string());
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
    (samples, first_error)
}

/// Writes every key once (`value` each), `clients` at a time, retrying failures.
pub async fn preload(
    pool: &ShardClientPool,
    keys: Arc<Vec<Vec<u8>>>,
    value: Arc<Vec<u8>>,
    clients: usize,
) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.clamp(1, keys.len().max(1)) {
        let mut client = ShardClient::with_pool(pool).context("creating a shard client")?;
        let (next, keys, value) = (next.clone(), keys.clone(), value.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(key) = keys.get(i) else {
                    return Ok(());
                };
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match client.put(key, &value, Expected::Any).await {
                        Ok(_) => break,
                        Err(e) if attempt >= PRELOAD_ATTEMPTS => {
                            bail!("preloading key {}: {e}", String::from_utf8_lossy(key))
                        }
                        Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
                    }
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a preload task panicked")??;
    }
    Ok(())
}

/// The longest time between two successful answers of `samples` (one client's, in order)
/// within `[from, to]`, counting from `from` and up to `to` (if nothing was answered after
/// the last success, the window runs to `to`).
pub fn longest_gap(samples: &[Sample], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for s in samples
        .iter()
        .filter(|s| s.ok && s.end > from && s.end <= to)
    {
        longest = longest.max(s.end - last);
        last = s.end;
    }
    longest.max(to.saturating_duration_since(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_gaps() {
        let t0 = now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let s = |a, b, ok| Sample {
            start: at(a),
            end: at(b),
            ok,
        };
        let r = LoadResult {
            samples: vec![
                s(0, 10, true),
                s(100, 102, true),
                s(100, 200, true),
                s(150, 160, false),
                s(990, 1010, true),
            ],
            first_error: None,
        };
        let w = r.window(at(100), at(1100));
        assert_eq!((w.ok, w.errors), (3, 1));
        assert_eq!(w.ops_per_sec, 3.0);
        assert_eq!(w.p50_ms, 20.0);
        assert_eq!(w.p99_ms, 100.0);
        let poll = [
            s(0, 10, true),
            s(10, 20, true),
            s(20, 600, false),
            s(600, 900, true),
        ];
        assert_eq!(
            longest_gap(&poll, at(5), at(950)),
            Duration::from_millis(880)
        );
        assert_eq!(
            longest_gap(&poll, at(0), at(2000)),
            Duration::from_millis(1100)
        );
        assert_eq!(longest_gap(&[], at(0), at(300)), Duration::from_millis(300));
    }
}
