//! The sharded database as real processes under faults: a controller store (three `shoal kv
//! server`s), three groups of three `shoal shard server`s, three `shoal kv --controller …
//! shell` clients doing random gets and conditional puts on keys spread over the shards, and,
//! meanwhile, the operator's commands as processes: a group leaves and joins again and shards
//! move (`shoal shard leave|join|move`); the leader of a group taking part in a migration is
//! SIGKILLed mid-way (and restarted from its data) — once asserted to land while a move is
//! recorded and incomplete; the process running a controller change is SIGKILLed mid-way, and
//! the next change completes it first. The recorded history must be
//! linearizable (the versioned-KV model is checked key by key), and every acknowledged put
//! must be present at the end.

mod kv_support;

use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_support::{
    client_worker, clock_seed, final_reads_and_check, free_ports, Cluster, Rng, Shell, SHOAL, WAIT,
};
use shoal_check::models::KvOutput;
use shoal_cluster::{Procs, Spec};

const GROUPS: u64 = 3;
const SHARDS: u32 = 16;
const CLIENTS: u64 = 3;
const KEYS: u64 = 8;
const SHELL_TIMEOUT_SECS: &str = "5";

/// The groups' servers as processes: group `g` server `i` in slot `(g-1)*3 + i-1`.
struct Groups {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    procs: Procs,
}

impl Groups {
    fn start() -> Groups {
        let n = (GROUPS * 3) as usize;
        let mut g = Groups {
            dir: tempfile::tempdir().expect("temp dir"),
            ports: free_ports(n),
            procs: Procs::with_slots(n),
        };
        for gid in 1..=GROUPS {
            for id in 1..=3 {
                g.restart(gid, id);
            }
        }
        g
    }

    fn addr(&self, gid: u64, id: u64) -> String {
        format!(
            "127.0.0.1:{}",
            self.ports[((gid - 1) * 3 + id - 1) as usize]
        )
    }

    fn servers(&self, gid: u64) -> String {
        (1..=3)
            .map(|id| self.addr(gid, id))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn restart(&mut self, gid: u64, id: u64) {
        let slot = ((gid - 1) * 3 + id - 1) as usize;
        let log = self.dir.path().join(format!("g{gid}n{id}.log"));
        let data = self.dir.path().join(format!("g{gid}n{id}"));
        let spec = Spec::new(format!("group {gid} server {id}"), SHOAL, log)
            .args(["shard", "server", "--gid", &gid.to_string()])
            .args(["--id", &id.to_string(), "--listen", &self.addr(gid, id)])
            .args([
                "--peers",
                &self.servers(gid),
                "--shards",
                &SHARDS.to_string(),
            ])
            .arg("--data")
            .arg(&data)
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1")
            .append_log()
            .stdout_null();
        self.procs
            .spawn_at(slot, spec)
            .expect("start a group server");
    }

    fn kill(&mut self, gid: u64, id: u64) {
        self.procs.kill(((gid - 1) * 3 + id - 1) as usize);
    }

    /// The server of `gid` that says it leads, if one does.
    fn leader(&self, rt: &tokio::runtime::Runtime, gid: u64) -> Option<u64> {
        (1..=3).find(|&id| {
            let addr: SocketAddr = self.addr(gid, id).parse().expect("address");
            rt.block_on(shoal_runtime::shard::group_server_status(
                addr,
                gid,
                1,
                Duration::from_millis(500),
            ))
            .is_ok_and(|s| s.leader)
        })
    }
}

fn shard_cmd(store: &str, args: &[&str]) -> Command {
    let mut c = Command::new(SHOAL);
    c.args(["shard"])
        .args(args)
        .args(["--controller", store])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    c
}

/// Runs an operator command to its end; asserts success.
fn operator(store: &str, args: &[&str]) -> String {
    let out: Output = shard_cmd(store, args).output().expect("run shoal shard");
    assert!(
        out.status.success(),
        "shoal shard {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A shard and a group that does not own it now: a move that changes something.
fn a_real_move(rt: &tokio::runtime::Runtime, store: &[SocketAddr], rng: &mut Rng) -> (u64, u64) {
    let record = rt
        .block_on(shoal_runtime::shard::read_latest(store, 1, WAIT))
        .expect("read the controller store")
        .expect("a configuration");
    let shard = rng.below(u64::from(SHARDS));
    let owner = record.config.shards[shard as usize];
    (shard, owner % GROUPS + 1)
}

/// The latest record in the controller store: (number, complete).
fn latest(rt: &tokio::runtime::Runtime, store: &[SocketAddr]) -> Option<(u64, bool)> {
    rt.block_on(shoal_runtime::shard::read_latest(store, 1, WAIT))
        .ok()
        .flatten()
        .map(|r| (r.config.num, r.complete))
}

#[test]
#[allow(clippy::disallowed_methods)] // the history's times come from this test's clock
fn migrations_under_sigkill_of_leaders_and_of_the_controller_stay_linearizable() {
    let seed = clock_seed();
    eprintln!("shard faults seed {seed}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store_cluster = Cluster::start(3);
    store_cluster.wait_leader();
    let store = store_cluster.endpoints();
    let store_addrs: Vec<SocketAddr> = store
        .split(',')
        .map(|a| a.parse().expect("address"))
        .collect();
    let mut groups = Groups::start();
    let joins: Vec<String> = (1..=GROUPS)
        .map(|g| format!("{g}={}", groups.servers(g)))
        .collect();
    let shards = SHARDS.to_string();
    let mut join_args = vec!["join", "--shards", &shards];
    join_args.extend(joins.iter().map(String::as_str));
    operator(&store, &join_args);
    let (first, complete) = latest(&rt, &store_addrs).expect("a configuration");
    assert!(complete, "join returns once its change is complete");

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let shell = Shell::start(&[
                "kv",
                "--controller",
                &store,
                "--timeout",
                SHELL_TIMEOUT_SECS,
                "shell",
            ]);
            client_worker(shell, c, seed, KEYS, epoch, Arc::clone(&stop))
        })
        .collect();

    std::thread::sleep(Duration::from_millis(500));
    let mut rng = Rng(seed);

    // 1. Group 3 leaves; while its shards move, SIGKILL the leader of a group taking part.
    let mut leave = shard_cmd(&store, &["leave", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shard leave");
    std::thread::sleep(Duration::from_millis(50 + rng.below(150)));
    let victim_group = 1 + rng.below(GROUPS);
    let killed_leader = groups.leader(&rt, victim_group);
    if let Some(id) = killed_leader {
        groups.kill(victim_group, id);
        eprintln!("killed group {victim_group}'s leader (server {id}) during the leave");
    }
    std::thread::sleep(Duration::from_millis(300));
    if let Some(id) = killed_leader {
        groups.restart(victim_group, id);
    }
    assert!(wait_exit(&mut leave).success(), "the leave completes");
    let (after_leave, complete) = latest(&rt, &store_addrs).expect("a configuration");
    assert!(after_leave > first && complete);

    // 2. Group 3 joins again with the same servers; a new owner's leader is killed mid-way.
    let mut join = shard_cmd(&store, &["join", &joins[2]])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shard join");
    std::thread::sleep(Duration::from_millis(50 + rng.below(150)));
    let killed = groups.leader(&rt, 3);
    if let Some(id) = killed {
        groups.kill(3, id);
        std::thread::sleep(Duration::from_millis(300));
        groups.restart(3, id);
    }
    assert!(wait_exit(&mut join).success(), "the join completes");

    // 3. A move whose new owner's leader is SIGKILLed while the change is recorded and
    //    incomplete (retried until a kill lands then; asserted), restarted from its data; the
    //    move completes.
    let mut killed_mid_move = false;
    for attempt in 0..8u64 {
        let (before, _) = latest(&rt, &store_addrs).expect("a configuration");
        let (shard, gid) = a_real_move(&rt, &store_addrs, &mut rng);
        let mut mv = shard_cmd(&store, &["move", &shard.to_string(), &gid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start shard move");
        let start = Instant::now();
        let mut killed = None;
        loop {
            if let Some((num, complete)) = latest(&rt, &store_addrs) {
                if num > before {
                    if !complete {
                        killed = groups.leader(&rt, gid);
                        if let Some(id) = killed {
                            groups.kill(gid, id);
                            // Still incomplete after the kill: the kill landed mid-change.
                            killed_mid_move = latest(&rt, &store_addrs).is_some_and(|l| !l.1);
                        }
                    }
                    break;
                }
            }
            if let Ok(Some(_)) = mv.try_wait() {
                break;
            }
            assert!(start.elapsed() < WAIT, "shard move made no configuration");
        }
        std::thread::sleep(Duration::from_millis(300));
        if let Some(id) = killed {
            groups.restart(gid, id);
        }
        assert!(wait_exit(&mut mv).success(), "the move completes");
        eprintln!("attempt {attempt}: killed group {gid}'s leader mid-move: {killed_mid_move}");
        if killed_mid_move {
            break;
        }
    }
    assert!(
        killed_mid_move,
        "no SIGKILL of the new owner's leader landed while a move was incomplete in 8 attempts"
    );

    // 4. The process running a change is SIGKILLed mid-way (retried with another delay until a
    //    kill lands while the change is recorded but incomplete); the next change runs after
    //    completing it.
    let mut landed_mid_change = false;
    for attempt in 0..8u64 {
        let (before, _) = latest(&rt, &store_addrs).expect("a configuration");
        let (shard, gid) = a_real_move(&rt, &store_addrs, &mut rng);
        let mut mv = shard_cmd(&store, &["move", &shard.to_string(), &gid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start shard move");
        // Poll for the new configuration, then kill at once.
        let start = Instant::now();
        loop {
            if let Some((num, complete)) = latest(&rt, &store_addrs) {
                if num > before {
                    let _ = mv.kill();
                    let _ = mv.wait();
                    landed_mid_change =
                        !complete || latest(&rt, &store_addrs).is_some_and(|l| !l.1);
                    break;
                }
            }
            if let Ok(Some(_)) = mv.try_wait() {
                break; // refused (already the owner) or done before we saw it
            }
            assert!(start.elapsed() < WAIT, "shard move made no configuration");
        }
        let _ = mv.kill();
        let _ = mv.wait();
        eprintln!("attempt {attempt}: killed the controller mid-change: {landed_mid_change}");
        if landed_mid_change {
            break;
        }
    }
    assert!(
        landed_mid_change,
        "no SIGKILL of `shard move` landed while its change was incomplete in 8 attempts"
    );
    let (half_done, complete) = latest(&rt, &store_addrs).expect("a configuration");
    assert!(!complete);
    // The next change completes the half-done one first.
    let (shard, gid) = a_real_move(&rt, &store_addrs, &mut rng);
    operator(&store, &["move", &shard.to_string(), &gid.to_string()]);
    let (after, complete) = latest(&rt, &store_addrs).expect("a configuration");
    assert!(complete && after >= half_done, "{after} {half_done}");

    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    for w in workers {
        records.extend(w.join().expect("client thread"));
    }
    let acked = records
        .iter()
        .filter(|r| matches!(r.3, Some((KvOutput::Written { .. }, _))))
        .count();
    assert!(
        acked > 10,
        "seed {seed}: only {acked} puts were acknowledged"
    );
    let shell = Shell::start(&["kv", "--controller", &store, "--timeout", "30", "shell"]);
    final_reads_and_check(shell, KEYS, epoch, records, seed);
}

#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                eprintln!("operator command failed: {status}: {err}");
            }
            return status;
        }
        assert!(
            start.elapsed() < WAIT * 2,
            "an operator command did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
