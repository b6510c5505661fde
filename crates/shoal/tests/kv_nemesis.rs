//! The real-process nemesis test: five `shoal kv server`s, several `shoal kv shell` clients
//! doing random gets and conditional puts on a few keys, and a nemesis that SIGKILLs and
//! restarts servers and SIGSTOPs/SIGCONTs the leader. The recorded history (times from this
//! test's clock; `timeout` = unknown outcome) must be linearizable under the versioned-KV
//! model, and every acknowledged put must be present at the end.

mod kv_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_support::{client_worker, clock_seed, final_reads_and_check, signal, Cluster, Rng};

const SERVERS: usize = 5;
const CLIENTS: u64 = 3;
const KEYS: u64 = 3;
const NEMESIS_RUN: Duration = Duration::from_secs(14);
const SHELL_TIMEOUT_SECS: &str = "3";

#[test]
#[allow(clippy::disallowed_methods)] // the history's times come from this test's clock
fn five_servers_kill_stop_restart_history_is_linearizable() {
    let seed = clock_seed();
    eprintln!("kv nemesis seed {seed}");
    let mut cluster = Cluster::start(SERVERS);
    cluster.wait_leader();
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let shell = cluster.shell(SHELL_TIMEOUT_SECS);
            client_worker(shell, c, seed, KEYS, epoch, Arc::clone(&stop))
        })
        .collect();

    // The nemesis.
    let mut rng = Rng(seed);
    let mut down: Option<u64> = None;
    let mut faults = 0;
    while epoch.elapsed() < NEMESIS_RUN {
        std::thread::sleep(Duration::from_millis(500 + rng.below(1000)));
        match (rng.below(3), down) {
            (0, None) => {
                let id = 1 + rng.below(SERVERS as u64);
                cluster.kill(id);
                down = Some(id);
            }
            (0 | 1, Some(id)) => {
                cluster.restart(id);
                down = None;
            }
            _ => {
                if let Some(leader) = cluster.leader() {
                    if let Some(pid) = cluster.pid(leader) {
                        signal(pid, libc::SIGSTOP);
                        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
                        signal(pid, libc::SIGCONT);
                    }
                }
            }
        }
        faults += 1;
    }
    if let Some(id) = down {
        cluster.restart(id);
    }
    stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    for w in workers {
        records.extend(w.join().expect("client thread"));
    }
    eprintln!("{faults} faults");
    // Final reads through a fresh shell (linearizable reads), part of the history.
    final_reads_and_check(cluster.shell("20"), KEYS, epoch, records, seed);
}
