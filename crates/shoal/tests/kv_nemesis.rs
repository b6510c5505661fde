//! The real-process nemesis test: five `shoal kv server`s, several `shoal kv shell` clients
//! doing random gets and conditional puts on a few keys, and a nemesis that SIGKILLs and
//! restarts servers and SIGSTOPs/SIGCONTs the leader. The recorded history (times from this
//! test's clock; `timeout` = unknown outcome) must be linearizable under the versioned-KV
//! model, and every acknowledged put must be present at the end.

mod kv_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_support::{signal, Cluster};
use shoal_check::models::{Expected, KvInput, KvOutput, VersionedKv};
use shoal_check::{check, Budget, HistoryBuilder, Verdict};

const SERVERS: usize = 5;
const CLIENTS: u64 = 3;
const KEYS: u64 = 3;
const NEMESIS_RUN: Duration = Duration::from_secs(14);
const SHELL_TIMEOUT_SECS: &str = "3";

/// A small deterministic RNG (xorshift64*), seeded per test run and printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One recorded operation: (client, input, invoked ns, Some((output, returned ns))).
type Record = (u64, KvInput, u64, Option<(KvOutput, u64)>);

fn parse_answer(answer: &str) -> Option<KvOutput> {
    let mut words = answer.splitn(3, ' ');
    match words.next()? {
        "value" => {
            let version = words.next()?.parse().ok()?;
            Some(KvOutput::Found {
                value: words.next().unwrap_or("").to_string(),
                version,
            })
        }
        "nokey" => Some(KvOutput::NoKey),
        "ok" => Some(KvOutput::Written {
            version: words.next()?.parse().ok()?,
        }),
        "mismatch" => Some(KvOutput::VersionMismatch),
        "maybe" => Some(KvOutput::Maybe),
        _ => None,
    }
}

#[test]
#[allow(clippy::disallowed_methods)] // the history's times come from this test's clock
fn five_servers_kill_stop_restart_history_is_linearizable() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("kv nemesis seed {seed}");
    let mut cluster = Cluster::start(SERVERS);
    cluster.wait_leader();
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));

    let mut workers = Vec::new();
    for c in 0..CLIENTS {
        let mut shell = cluster.shell(SHELL_TIMEOUT_SECS);
        let stop = Arc::clone(&stop);
        let mut rng = Rng(seed.wrapping_add(c.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
        workers.push(std::thread::spawn(move || {
            let mut records: Vec<Record> = Vec::new();
            let mut client = c * 1000;
            let mut known: BTreeMap<u64, u64> = BTreeMap::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = rng.below(KEYS);
                let (line, input) = if rng.below(2) == 0 {
                    (
                        format!("get k{key}"),
                        KvInput::Get {
                            key: format!("k{key}"),
                        },
                    )
                } else {
                    // Usually the version last seen (often right), sometimes a guess.
                    let seen = known.get(&key).copied().unwrap_or(0);
                    let expected = if rng.below(4) == 0 {
                        seen.saturating_sub(1)
                    } else {
                        seen
                    };
                    n += 1;
                    let value = format!("c{c}-{n}");
                    (
                        format!("put k{key} {expected} {value}"),
                        KvInput::Put {
                            key: format!("k{key}"),
                            value,
                            expected: Expected::Version(expected),
                        },
                    )
                };
                let invoked = epoch.elapsed().as_nanos() as u64;
                let answer = shell.ask(&line);
                let returned = epoch.elapsed().as_nanos() as u64;
                if answer == "timeout" {
                    records.push((client, input, invoked, None));
                    client += 1; // an open operation: continue as a new client
                    continue;
                }
                let output = parse_answer(&answer)
                    .unwrap_or_else(|| panic!("unexpected answer {answer:?} to {line:?}"));
                match &output {
                    KvOutput::Found { version, .. } | KvOutput::Written { version } => {
                        known.insert(key, *version);
                    }
                    _ => {}
                }
                records.push((client, input, invoked, Some((output, returned))));
            }
            records
        }));
    }

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
    let count = |f: &dyn Fn(&Record) -> bool| records.iter().filter(|r| f(r)).count();
    eprintln!(
        "{} operations ({} ok puts, {} maybe, {} timeouts), {faults} faults",
        records.len(),
        count(&|r| matches!(r.3, Some((KvOutput::Written { .. }, _)))),
        count(&|r| matches!(r.3, Some((KvOutput::Maybe, _)))),
        count(&|r| r.3.is_none()),
    );

    // Final reads: every key through a fresh shell (linearizable reads), part of the history.
    let mut shell = cluster.shell("20");
    let mut final_versions = BTreeMap::new();
    for key in 0..KEYS {
        let invoked = epoch.elapsed().as_nanos() as u64;
        let answer = shell.ask(&format!("get k{key}"));
        let returned = epoch.elapsed().as_nanos() as u64;
        let output = parse_answer(&answer).unwrap_or_else(|| panic!("final read: {answer:?}"));
        if let KvOutput::Found { version, .. } = &output {
            final_versions.insert(format!("k{key}"), *version);
        }
        records.push((
            1_000_000,
            KvInput::Get {
                key: format!("k{key}"),
            },
            invoked,
            Some((output, returned)),
        ));
    }

    // Every acknowledged put is present: versions only grow (no deletes here).
    let acked = records
        .iter()
        .filter(|r| matches!(r.3, Some((KvOutput::Written { .. }, _))))
        .count();
    assert!(acked > 0, "no put was acknowledged");
    for (_, input, _, out) in &records {
        if let (KvInput::Put { key, .. }, Some((KvOutput::Written { version }, _))) = (input, out) {
            let now = final_versions.get(key).copied().unwrap_or(0);
            assert!(
                now >= *version,
                "acknowledged {key} v{version} lost (now v{now})"
            );
        }
    }

    let mut b = HistoryBuilder::new();
    records.sort_by_key(|r| r.2);
    for (client, input, invoked, out) in records {
        let id = b.invoke(client, input, invoked);
        if let Some((output, returned)) = out {
            b.complete(id, output, returned)
                .expect("complete an operation");
        }
    }
    match check(
        &VersionedKv,
        &b.build(),
        Budget::time(Duration::from_secs(20)),
    ) {
        Verdict::Linearizable => {}
        Verdict::Unknown(r) => panic!("seed {seed}: the checker gave up: {r:?}"),
        Verdict::NotLinearizable(e) => panic!("seed {seed}: not linearizable: {e:?}"),
    }
}
