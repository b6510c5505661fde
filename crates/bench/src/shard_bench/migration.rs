//! The migration figure: two groups (under quota where available), one shard filled with
//! large values, then `Move` it to the other group while requesters hammer the other shards
//! and one client polls the moving shard.
//!
//! A shard travels in chunks of about 256 KiB, copied while it serves (`ExportChunk` at the old owner, `Stage` at the
//! new owner; `docs/sharding.md`, "Large shards travel in chunks"). The size is still capped at
//! the controller's message limit (`CONTROLLER_MAX_MESSAGE_BYTES`, 1 GiB), the bound of the
//! whole-shard path the groups still answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::json;
use shoal_shard::{shard_of, Op};

use super::cluster::{ClusterSpec, ShardCluster};
use super::load::{self, longest_gap, LoadSpec, Sample};
use super::report::Workload;
use crate::bench_util::now;

/// The message limit every shard must fit in to move (the export, and the install request).
pub const MESSAGE_LIMIT: u64 = shoal_runtime::shard::CONTROLLER_MAX_MESSAGE_BYTES as u64;
/// Room left in the message for the envelope, keys, versions and the shard's dedup table.
pub const MESSAGE_HEADROOM: u64 = 16 * 1024 * 1024;
/// Bound on the move (it waits forever while a group is unreachable).
const MOVE_TIMEOUT: Duration = Duration::from_secs(120);
/// The poller's pause between gets (so it measures availability, not throughput).
const POLL_EVERY: Duration = Duration::from_millis(2);

/// What the migration measured.
#[derive(Debug, Clone)]
pub struct Migration {
    pub requested_bytes: u64,
    pub moved_bytes: u64,
    pub value_bytes: usize,
    pub shard: u32,
    pub from: u64,
    pub to: u64,
    pub duration: Duration,
    pub p99_without_ms: f64,
    pub p99_during_ms: f64,
    pub ops_during: u64,
    pub errors_during: u64,
    pub longest_unavailable: Duration,
    /// Why fewer bytes moved than requested.
    pub limit_note: Option<String>,
}

/// The bytes that will move for a request of `requested` bytes, and the reason if fewer.
pub fn moved_bytes(requested: u64) -> (u64, Option<String>) {
    let cap = MESSAGE_LIMIT - MESSAGE_HEADROOM;
    if requested <= cap {
        (requested, None)
    } else {
        (
            cap,
            Some(format!(
                "{:.1} MB requested, {:.1} MB moved: a shard moves only up to {} MiB, the \
                 controller's message limit (the bound of the whole-shard path)",
                requested as f64 / 1e6,
                cap as f64 / 1e6,
                MESSAGE_LIMIT >> 20
            )),
        )
    }
}

/// Keys `prefix` + number that fall in `shard` of `shards`, the first `count` of them.
pub fn keys_in_shard(prefix: &str, shard: u32, shards: u32, count: usize) -> Vec<Vec<u8>> {
    (0u64..)
        .map(|n| format!("{prefix}{n:09}").into_bytes())
        .filter(|k| shard_of(k, shards) == shard)
        .take(count)
        .collect()
}

/// Runs the migration measurement: `requested_bytes` in values of `value_bytes`.
pub async fn measure(
    spec: &ClusterSpec,
    requested_bytes: u64,
    value_bytes: usize,
    clients: usize,
    keys: Arc<Vec<Vec<u8>>>,
    small_value: Arc<Vec<u8>>,
    seconds: Duration,
) -> Result<Migration> {
    let (moved, limit_note) = moved_bytes(requested_bytes);
    if let Some(note) = &limit_note {
        eprintln!("shard bench: migration: {note}");
    }
    let mut cluster = tokio::task::block_in_place(|| ShardCluster::start(spec))?;
    cluster.join_all().await?;
    let pool = cluster.pool();
    load::preload(&pool, keys.clone(), small_value.clone(), 64).await?;
    let config = shoal_runtime::shard::read_latest(&cluster.store, 1, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow!("reading the configuration: {e}"))?
        .ok_or_else(|| anyhow!("no configuration in the store after the Join"))?
        .config;
    let (from, to) = (1, 2);
    let shard = *config
        .shards_of(from)
        .first()
        .ok_or_else(|| anyhow!("group {from} owns no shard after the Join"))?;
    // Fill the shard.
    let count = moved.div_ceil(value_bytes as u64) as usize;
    let big = keys_in_shard("m", shard, cluster.shards, count);
    eprintln!(
        "shard bench: migration: filling shard {shard} (group {from}) with {count} values of {value_bytes} bytes ({:.1} MB)",
        (count * value_bytes) as f64 / 1e6
    );
    let big_value = Arc::new(vec![b'm'; value_bytes]);
    load::preload(&pool, Arc::new(big), big_value, 8).await?;
    let polled = keys_in_shard("p", shard, cluster.shards, 1);
    load::preload(&pool, Arc::new(polled.clone()), small_value.clone(), 1).await?;
    // The other shards' keys.
    let others: Vec<Vec<u8>> = keys
        .iter()
        .filter(|k| shard_of(k, cluster.shards) != shard)
        .cloned()
        .collect();
    let others = Arc::new(others);
    let spec_load = |duration| LoadSpec {
        workload: Workload::Put,
        clients,
        keys: others.clone(),
        value: small_value.clone(),
        duration,
        seed: 14,
    };

    // Without a move.
    eprintln!("shard bench: migration: puts to the other shards for {seconds:?}, no move");
    let t0 = now();
    let base = load::run(&pool, &spec_load(seconds), Arc::new(AtomicBool::new(false))).await?;
    let warm = Duration::from_secs(1).min(seconds / 4);
    let without = base.window(t0 + warm, now());

    // With the move.
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (pool, spec, stop) = (pool.clone(), spec_load(MOVE_TIMEOUT * 2), stop.clone());
        tokio::spawn(async move { load::run(&pool, &spec, stop).await })
    };
    let poller = {
        let pool = pool.clone();
        let stop = stop.clone();
        let key = polled[0].clone();
        tokio::spawn(async move {
            let mut client = shoal_runtime::shard::ShardClient::with_pool(&pool)?;
            let mut samples: Vec<Sample> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = now();
                let ok = client.get(&key).await.is_ok_and(|v| v.is_some());
                samples.push(Sample {
                    start,
                    end: now(),
                    ok,
                });
                tokio::time::sleep(POLL_EVERY).await;
            }
            anyhow::Ok(samples)
        })
    };
    tokio::time::sleep(warm).await;
    eprintln!("shard bench: migration: moving shard {shard} from group {from} to group {to}");
    let move_start = now();
    let moved_to = cluster
        .submit(Op::Move { shard, gid: to }, MOVE_TIMEOUT)
        .await;
    let move_end = now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let during = hammer.await.context("the load task panicked")??;
    let polls = poller.await.context("the poller panicked")??;
    moved_to?;
    let w = during.window(move_start, move_end);
    let mut polls = polls;
    polls.sort_by_key(|s| s.end);
    let unavailable = longest_gap(&polls, move_start, move_end + Duration::from_secs(1));
    cluster.stop().await;
    Ok(Migration {
        requested_bytes,
        moved_bytes: (count * value_bytes) as u64,
        value_bytes,
        shard,
        from,
        to,
        duration: move_end - move_start,
        p99_without_ms: without.p99_ms,
        p99_during_ms: w.p99_ms,
        ops_during: w.ok,
        errors_during: w.errors,
        longest_unavailable: unavailable,
        limit_note,
    })
}

impl Migration {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "kind": "migration",
            "requested_bytes": self.requested_bytes,
            "moved_bytes": self.moved_bytes,
            "value_bytes": self.value_bytes,
            "shard": self.shard,
            "from": self.from,
            "to": self.to,
            "move_ms": self.duration.as_secs_f64() * 1e3,
            "p99_without_ms": self.p99_without_ms,
            "p99_during_ms": self.p99_during_ms,
            "ops_during": self.ops_during,
            "errors_during": self.errors_during,
            "longest_unavailable_ms": self.longest_unavailable.as_secs_f64() * 1e3,
        })
    }

    /// The Markdown table of the migration, with the targets.
    pub fn table(&self) -> String {
        let ratio = if self.p99_without_ms > 0.0 {
            self.p99_during_ms / self.p99_without_ms
        } else {
            f64::NAN
        };
        let met = |ok: bool| if ok { "met" } else { "not met" };
        let mut out = format!(
            "| shard size moved | move took | p99 other shards, no move | p99 during the move ({} ops, {} errors) | ratio (target ≤ 1.5×) | longest unanswered window of the moving shard (target < 1 s) |\n\
             |---:|---:|---:|---:|---:|---:|\n\
             | {:.1} MB ({} × {} KiB) | {:.0} ms | {:.1} ms | {:.1} ms | {:.2}× {} | {:.0} ms {} |\n",
            self.ops_during,
            self.errors_during,
            self.moved_bytes as f64 / 1e6,
            self.moved_bytes / self.value_bytes as u64,
            self.value_bytes / 1024,
            self.duration.as_secs_f64() * 1e3,
            self.p99_without_ms,
            self.p99_during_ms,
            ratio,
            met(ratio <= 1.5),
            self.longest_unavailable.as_secs_f64() * 1e3,
            met(self.longest_unavailable < Duration::from_secs(1)),
        );
        if let Some(note) = &self.limit_note {
            out.push_str(&format!("\n{note}.\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_a_message_are_capped_and_said() {
        assert_eq!(moved_bytes(100_000_000), (100_000_000, None));
        let (m, note) = moved_bytes(2_000_000_000);
        assert_eq!(m, MESSAGE_LIMIT - MESSAGE_HEADROOM);
        assert!(note.unwrap().contains("1024 MiB"));
    }

    #[test]
    fn keys_fall_in_the_shard() {
        let keys = keys_in_shard("m", 5, 128, 10);
        assert_eq!(keys.len(), 10);
        assert!(keys.iter().all(|k| shard_of(k, 128) == 5));
        assert_eq!(keys[0].len(), 10);
    }
}
