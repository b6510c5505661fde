//! Failover: under a moderate closed-loop put load, SIGKILL the leader, time until a write is
//! acknowledged again, restart the killed member from its data directory, wait until it has
//! caught up, and do it again.
//!
//! The figure of one kill: from the moment the leader is sent SIGKILL to the acknowledgement
//! of the first put that was *sent after the killed process had been reaped* (so it cannot
//! have been committed by the old leader) and that was answered by a surviving member (etcd's
//! response header names the member, Shoal's `Client::last_server` the server; a put sent
//! after the reap cannot be answered by the dead process anyway). Puts already in flight at
//! the kill do not count, whenever they complete.
//!
//! Those puts come from the closed-loop requesters and from *probes*: from the reap until the
//! first acknowledgement, one probe put is sent every [`PROBE_EVERY`] on an idle connection of
//! a pool (a new one is opened when all are busy). Without them a closed loop would time a
//! stuck request rather than the cluster: an etcd follower that forwarded a put to the dead
//! leader answers only after its 7 s request timeout (5 s + 2 election timeouts), and a
//! client waiting on a request that was lost resends only after its retry timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::cluster::LocalCluster;
use super::load::{Keys, RETRY_PAUSE};
use super::target::{KvConn, KvTarget};
use super::{now, SplitMix64, LIVENESS};

/// Quiet time after a catch-up before the next kill, so that the restarted member's
/// connections have settled.
const SETTLE_BEFORE_KILL: Duration = Duration::from_millis(500);
/// The kill lands at a random point within this much more (a heartbeat period or so of
/// either system: Shoal 50 ms, etcd 100 ms).
const KILL_JITTER: Duration = Duration::from_millis(100);
/// How often the main task looks whether the first acknowledgement has arrived.
const ACK_POLL: Duration = Duration::from_millis(1);
/// Interval of the probe puts while no write has been acknowledged since a kill.
pub const PROBE_EVERY: Duration = Duration::from_millis(5);
/// Probe connections opened (and used once) before the first kill.
const PROBE_POOL: usize = 16;
/// Most probe connections: when all are busy, a probe is skipped (each Shoal client may hold
/// a connection to every server, and a server accepts 1024 clients).
const MAX_PROBE_CONNS: usize = 400;

/// The kill being timed.
struct Epoch {
    reaped_at: Instant,
    killed_member: u64,
    first_ack: Option<(Instant, Option<u64>)>,
}

struct Shared {
    stop: AtomicBool,
    puts: AtomicU64,
    errors: AtomicU64,
    probes: AtomicU64,
    epoch: Mutex<Option<Epoch>>,
}

impl Shared {
    /// A put sent at `sent` was acknowledged at `acked` by `server`.
    fn on_ack(&self, sent: Instant, acked: Instant, server: Option<u64>) {
        let mut epoch = self.epoch.lock().expect("epoch lock");
        if let Some(e) = epoch.as_mut() {
            if e.first_ack.is_none() && sent >= e.reaped_at && server != Some(e.killed_member) {
                e.first_ack = Some((acked, server));
            }
        }
    }

    fn first_ack(&self) -> Option<(Instant, Option<u64>)> {
        self.epoch
            .lock()
            .expect("epoch lock")
            .as_ref()
            .and_then(|e| e.first_ack)
    }
}

/// One timed kill.
#[derive(Debug, Clone)]
pub struct Kill {
    /// Index of the killed member (0-based).
    pub killed: usize,
    pub failover: Duration,
    /// The member that acknowledged the first put, when the client tells.
    pub answered_by: Option<u64>,
}

/// What a failover phase measured.
#[derive(Debug, Clone)]
pub struct Failover {
    pub kills: Vec<Kill>,
    pub clients: usize,
    pub puts: u64,
    pub errors: u64,
    /// Probe puts sent.
    pub probes: u64,
}

impl Failover {
    /// Failover times in milliseconds, sorted.
    pub fn sorted_ms(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .kills
            .iter()
            .map(|k| k.failover.as_secs_f64() * 1e3)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn pct_ms(&self, p: f64) -> Option<f64> {
        super::percentile(&self.sorted_ms(), p)
    }
}

async fn requester<C: KvConn>(
    mut conn: C,
    r: u64,
    keys: Keys,
    value: Arc<Vec<u8>>,
    seed: u64,
    shared: Arc<Shared>,
) {
    let mut rng = SplitMix64(seed ^ (r + 1).wrapping_mul(0x9e37_79b9));
    while !shared.stop.load(Ordering::Relaxed) {
        let key = keys.key(rng.below(keys.keyspace));
        let sent = now();
        match conn.put(&key, &value).await {
            Ok(answer) => {
                shared.puts.fetch_add(1, Ordering::Relaxed);
                shared.on_ack(sent, now(), answer.server);
            }
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Runs `kills` timed leader kills on `cluster` under `clients` closed-loop putters.
pub async fn failover<T: KvTarget>(
    target: &Arc<T>,
    cluster: &mut LocalCluster,
    kills: u32,
    clients: usize,
    keys: Keys,
    value: Arc<Vec<u8>>,
    seed: u64,
) -> Result<Failover> {
    let name = target.kind().name();
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        puts: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        probes: AtomicU64::new(0),
        epoch: Mutex::new(None),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..clients {
        let conn = target.connect().await?;
        tasks.spawn(requester(
            conn,
            r as u64,
            keys,
            value.clone(),
            seed,
            shared.clone(),
        ));
    }
    let mut probes = Probes {
        target: target.clone(),
        opened: PROBE_POOL,
        pool: Arc::new(Mutex::new(Vec::new())),
        tasks: tokio::task::JoinSet::new(),
        keys,
        value,
        rng: SplitMix64(seed.wrapping_add(0x9b0be)),
    };
    for _ in 0..PROBE_POOL {
        let mut conn = target.connect().await?;
        // Opens the connection (and Shoal's session) before the clock matters.
        let _ = conn.put(&keys.key(0), &probes.value).await;
        probes.pool.lock().expect("pool lock").push(conn);
    }
    let result = kill_loop(name, cluster, kills, seed, &shared, &mut probes).await;
    shared.stop.store(true, Ordering::Relaxed);
    // Requesters and probes finish their operation in flight (bounded by the client's timeout).
    while let Some(joined) = tasks.join_next().await {
        joined.context("a failover requester panicked")?;
    }
    while let Some(joined) = probes.tasks.join_next().await {
        joined.context("a failover probe panicked")?;
    }
    Ok(Failover {
        kills: result?,
        clients,
        puts: shared.puts.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        probes: shared.probes.load(Ordering::Relaxed),
    })
}

/// The probe puts and their connections.
struct Probes<T: KvTarget> {
    target: Arc<T>,
    /// Connections opened so far (idle in `pool` or busy in a task).
    opened: usize,
    pool: Arc<Mutex<Vec<T::Conn>>>,
    tasks: tokio::task::JoinSet<()>,
    keys: Keys,
    value: Arc<Vec<u8>>,
    rng: SplitMix64,
}

impl<T: KvTarget> Probes<T> {
    /// Sends one probe put on an idle connection (or a new one).
    async fn send(&mut self, shared: &Arc<Shared>) -> Result<()> {
        let idle = self.pool.lock().expect("pool lock").pop();
        let mut conn = match idle {
            Some(c) => c,
            None if self.opened < MAX_PROBE_CONNS => {
                self.opened += 1;
                self.target.connect().await?
            }
            None => return Ok(()),
        };
        let key = self.keys.key(self.rng.below(self.keys.keyspace));
        let value = self.value.clone();
        let pool = self.pool.clone();
        let shared = shared.clone();
        shared.probes.fetch_add(1, Ordering::Relaxed);
        self.tasks.spawn(async move {
            let sent = now();
            if let Ok(answer) = conn.put(&key, &value).await {
                shared.on_ack(sent, now(), answer.server);
            }
            pool.lock().expect("pool lock").push(conn);
        });
        Ok(())
    }
}

async fn kill_loop<T: KvTarget>(
    name: &str,
    cluster: &mut LocalCluster,
    kills: u32,
    seed: u64,
    shared: &Arc<Shared>,
    probes: &mut Probes<T>,
) -> Result<Vec<Kill>> {
    let mut rng = SplitMix64(seed.wrapping_add(0x5eed));
    let mut done = Vec::new();
    let mut attempts = 0;
    while done.len() < kills as usize {
        attempts += 1;
        if attempts > 2 * kills + 10 {
            bail!(
                "{name}: the leader kept changing on its own before the kills (a loaded machine?)"
            );
        }
        let leader = cluster.wait_leader().await?;
        let jitter = Duration::from_micros(rng.below(KILL_JITTER.as_micros() as u64));
        tokio::time::sleep(SETTLE_BEFORE_KILL + jitter).await;
        // Still the leader? (A spurious election during the settle time.)
        if cluster.wait_leader().await? != leader {
            continue;
        }
        let killed_member = cluster.member_ids[leader];
        let killed_at = now();
        cluster.kill(leader);
        let reaped_at = now();
        *shared.epoch.lock().expect("epoch lock") = Some(Epoch {
            reaped_at,
            killed_member,
            first_ack: None,
        });
        let deadline = killed_at + LIVENESS;
        let mut next_probe = reaped_at;
        let (acked, answered_by) = loop {
            if let Some(first) = shared.first_ack() {
                break first;
            }
            let t = now();
            if t > deadline {
                bail!(
                    "{name}: no write acknowledged within {LIVENESS:?} of leader kill {} \
                     (SHOAL_BENCH_KEEP_DATA=1 keeps the members' logs)",
                    done.len() + 1
                );
            }
            if t >= next_probe {
                probes.send(shared).await?;
                next_probe += PROBE_EVERY;
            }
            cluster.check_alive()?;
            tokio::time::sleep(ACK_POLL).await;
        };
        *shared.epoch.lock().expect("epoch lock") = None;
        let kill = Kill {
            killed: leader,
            failover: acked - killed_at,
            answered_by,
        };
        let k = done.len();
        let answered_index = kill
            .answered_by
            .and_then(|m| cluster.member_ids.iter().position(|&x| x == m));
        println!(
            "{}",
            serde_json::json!({
                "bench": "kv",
                "kind": "failover_kill",
                "target": name,
                "kill": k,
                "failover_ms": super::ms(kill.failover),
                "killed_member": kill.killed + 1,
                "answered_by_member": answered_index.map(|i| i + 1),
                "load_avg_1m": super::load_avg_1m(),
            })
        );
        eprintln!(
            "kv bench: {name} kill {}/{kills}: member {} killed, a write was acknowledged after {:.1} ms",
            k + 1,
            leader + 1,
            super::ms(kill.failover)
        );
        done.push(kill);
        cluster.spawn(leader)?;
        cluster.wait_caught_up(leader).await?;
    }
    Ok(done)
}
