//! Simulation tests: Raft nodes on the deterministic simulator, with durable storage on
//! simulated disks, ports of the classic Raft lab scenarios (SCENARIOS.md, Lab 3). Each runs
//! several seeds; `SHOAL_SEEDS=N` runs more, `SHOAL_SEED=S` replays one.
//!
//! The simulated server (`shoal_lab::raft_node::Server`) writes entries and hard state on
//! every Ready; the fsync completes after a simulated latency (a timer), and only then are the
//! dependent messages sent, entries applied and the node advanced. A crash in between loses or
//! tears the unsynced writes. The Figure-3 checker is `shoal_lab::invariants`.

use std::time::Duration;

use shoal_lab::invariants::{Invariants, Journal};
use shoal_lab::raft_node::{self, count_applied, Server, SEGMENT_BYTES};
// The tests' own choices: the lab's deterministic chooser.
use shoal_lab::membership::Choices as TestRng;
use shoal_lab::membership::{leader_membership, members_applied, random_membership_change};
use shoal_raft::{Message, NodeId, Role};
use shoal_sim::{Failure, NetConfig, Sim, SimConfig};

type SimId = shoal_sim::NodeId;

struct Cluster {
    sim: Sim<Message>,
    ids: Vec<SimId>,
    /// The per-event checker of the five Figure 3 properties, fed by the servers' journal.
    inv: Invariants,
}

impl Cluster {
    fn new(seed: u64, n: u64, net: NetConfig, snapshot_every: Option<u64>) -> Cluster {
        Cluster::with_bootstrap(seed, n, n, net, snapshot_every)
    }

    /// `n` servers of which the first `voters` are the bootstrap voters; the others start
    /// empty and join when a membership change adds them.
    fn with_bootstrap(
        seed: u64,
        n: u64,
        voters: u64,
        net: NetConfig,
        snapshot_every: Option<u64>,
    ) -> Cluster {
        let mut sim = Sim::new(
            seed,
            SimConfig {
                net,
                ..SimConfig::default()
            },
        );
        let journal = Journal::default();
        let ids = (0..n)
            .map(|i| {
                let journal = journal.clone();
                let bootstrap: Vec<NodeId> = if i < voters {
                    (1..=voters).map(NodeId).collect()
                } else {
                    Vec::new()
                };
                sim.add_node(move |_| {
                    Server::new(n, snapshot_every, journal.clone()).with_voters(bootstrap.clone())
                })
            })
            .collect();
        Cluster {
            sim,
            ids,
            inv: Invariants::new(journal),
        }
    }

    /// Runs for `duration`, checking the five Figure 3 properties after every event.
    fn run_checked(&mut self, duration: Duration) -> Result<(), Failure> {
        let (sim, inv, ids) = (&mut self.sim, &mut self.inv, &self.ids);
        let r = sim.run_checked(duration, |sim| inv.check::<Message, Server>(sim, ids));
        if r.is_err() && std::env::var_os("SHOAL_DUMP").is_some() {
            self.dump();
        }
        r
    }

    /// Debugging a failed seed (`SHOAL_DUMP=1`): each server's state and its log's
    /// membership changes.
    fn dump(&self) {
        for &id in &self.ids {
            let Some(raw) = self.server(id).and_then(|s| s.raw()) else {
                eprintln!("{id}: down");
                continue;
            };
            let st = raw.status();
            eprintln!(
                "{id}: {:?} term={} vote={:?} applied={} commit={} last={} {}",
                st.role, st.term, st.vote, st.applied, st.commit, st.last_index, st.membership
            );
            for e in raw
                .log_entries(st.first_index, st.last_index.next())
                .unwrap_or_default()
            {
                if let Ok(cc) = postcard::from_bytes::<shoal_raft::ConfChange>(&e.data) {
                    if e.kind == shoal_raft::EntryKind::ConfChange {
                        eprintln!("    {}/{} {:?} -> {}", e.term, e.index, cc.steps, cc.result);
                    }
                }
            }
        }
    }

    fn server(&self, id: SimId) -> Option<&Server> {
        raft_node::server(&self.sim, id)
    }

    /// Leaders among nodes that are up, with their terms.
    fn leaders(&self) -> Vec<(SimId, u64)> {
        self.ids
            .iter()
            .filter_map(|&id| self.server(id).map(|s| (id, s.status())))
            .filter(|(_, st)| st.role == Role::Leader)
            .map(|(id, st)| (id, st.term.0))
            .collect()
    }

    /// SCENARIOS `checkOneLeader`: within 5 s of simulated time, exactly one leader in the
    /// newest term among the connected majority.
    fn check_one_leader(&mut self) -> Result<SimId, Failure> {
        self.check_one_leader_among(&[])
    }

    /// [`Cluster::check_one_leader`] ignoring `disconnected` nodes, as the lab's counts only
    /// connected servers.
    fn check_one_leader_among(&mut self, disconnected: &[SimId]) -> Result<SimId, Failure> {
        for _ in 0..10 {
            self.sim.run_for(Duration::from_millis(500));
            let leaders: Vec<_> = self
                .leaders()
                .into_iter()
                .filter(|(id, _)| !disconnected.contains(id))
                .collect();
            let mut terms: Vec<u64> = leaders.iter().map(|l| l.1).collect();
            terms.sort();
            if terms.windows(2).any(|w| w[0] == w[1]) {
                return Err(self
                    .sim
                    .failure(format!("two leaders in one term: {leaders:?}")));
            }
            if let Some(&(id, _)) = leaders.iter().max_by_key(|l| l.1) {
                // The newest leader must be able to reach a majority (else it may be stale).
                return Ok(id);
            }
        }
        Err(self.sim.failure("no leader"))
    }

    fn applied_count(&self, cmd: &[u8]) -> (usize, Option<u64>) {
        let mut count = 0;
        let mut index = None;
        for &id in &self.ids {
            if let Some(s) = self.server(id) {
                if let Some((i, _)) = s.applied().iter().find(|(_, d)| d == cmd) {
                    count += 1;
                    index = Some(*i);
                }
            }
        }
        (count, index)
    }

    /// SCENARIOS `one(cmd, n, retry)`: propose on whichever node is leader until `n` servers
    /// applied it, within 10 s of simulated time.
    fn one(&mut self, cmd: &[u8], n: usize, retry: bool) -> Result<u64, Failure> {
        let start = self.sim.now();
        while self.sim.now().as_nanos() - start.as_nanos() < 10_000_000_000 {
            let mut proposed = false;
            for &id in &self.ids.clone() {
                let cmd = cmd.to_vec();
                let r = self.sim.call::<Server, _>(id, |s, ctx| {
                    s.is_started()
                        && s.status().role == Role::Leader
                        && s.propose(ctx, cmd).is_some()
                });
                proposed |= matches!(r, Ok(true));
            }
            if !proposed {
                self.sim.run_for(Duration::from_millis(50));
                continue;
            }
            let done = self
                .sim
                .run_until_true(Duration::from_secs(2), |sim| count_applied(sim, cmd) >= n);
            if done {
                return Ok(self.applied_count(cmd).1.unwrap_or(0));
            }
            if !retry {
                break;
            }
        }
        Err(self.sim.failure(format!(
            "{:?} not applied on {n} servers",
            String::from_utf8_lossy(cmd)
        )))
    }

    /// Every command any server applied (so committed) is applied on every server: no
    /// acknowledged write lost. Call after healing and a final `one(.., all)`.
    fn check_nothing_lost(&self) -> Result<(), Failure> {
        raft_node::check_nothing_lost(&self.sim, &self.ids).map_err(|m| self.sim.failure(m))
    }

    /// Proposes `cmd` on every node that thinks it leads (like the lab's Start on all).
    fn start_on_leaders(&mut self, cmd: &[u8]) -> bool {
        let mut any = false;
        for &id in &self.ids.clone() {
            let r = self.sim.call::<Server, _>(id, |s, ctx| {
                s.is_started()
                    && s.status().role == Role::Leader
                    && s.propose(ctx, cmd.to_vec()).is_some()
            });
            any |= matches!(r, Ok(true));
        }
        any
    }

    /// Bytes of log segments on a server's disk (the lab's persisted Raft state, without the
    /// snapshot).
    fn log_bytes(&self, id: SimId) -> u64 {
        let Some(disk) = self.sim.disk(id) else {
            return 0;
        };
        disk.list()
            .iter()
            .filter(|n| n.starts_with("seg-"))
            .map(|n| disk.len(n).unwrap_or(0))
            .sum()
    }

    /// Log Matching (Figure 3) between every pair of servers that are up: if two logs have an
    /// entry with the same index and term, they are identical up to it.
    fn check_log_matching(&self) -> Result<(), Failure> {
        raft_node::check_log_matching(&self.sim, &self.ids).map_err(|m| self.sim.failure(m))
    }

    /// State machine safety across all servers (up or not).
    fn check_applied_agree(&self) -> Result<(), Failure> {
        raft_node::check_applied_agree(&self.sim, &self.ids).map_err(|m| self.sim.failure(m))
    }
}

#[test]
fn initial_election() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        let leader = c.check_one_leader()?;
        c.sim.run_for(Duration::from_millis(50));
        let terms: Vec<u64> = c
            .ids
            .iter()
            .map(|&i| c.server(i).unwrap().status().term.0)
            .collect();
        if terms.iter().any(|&t| t != terms[0] || t < 1) {
            return Err(c.sim.failure(format!("terms disagree: {terms:?}")));
        }
        c.sim.run_for(Duration::from_secs(2));
        let again = c.check_one_leader()?;
        if again != leader {
            return Err(c.sim.failure("leader changed without failures"));
        }
        Ok(())
    });
}

#[test]
fn re_election() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        let l1 = c.check_one_leader()?;
        c.sim.isolate(l1);
        let l2 = c.check_one_leader_among(&[l1])?;
        if l2 == l1 {
            return Err(c.sim.failure("isolated leader still the newest leader"));
        }
        c.sim.heal();
        let l3 = c.check_one_leader()?;
        // Disconnect the leader and one more: no leader.
        let other = *c.ids.iter().find(|&&i| i != l3).unwrap();
        c.sim.isolate(l3);
        c.sim.isolate(other);
        c.sim.run_for(Duration::from_secs(2));
        let third = *c.ids.iter().find(|&&i| i != l3 && i != other).unwrap();
        if c.server(third).unwrap().status().role == Role::Leader {
            return Err(c.sim.failure("a leader without a majority"));
        }
        c.sim.heal();
        c.sim.isolate(l3);
        c.check_one_leader_among(&[l3])?;
        c.sim.heal();
        c.check_one_leader()?;
        Ok(())
    });
}

#[test]
fn many_elections() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 7, NetConfig::reliable(), None);
        c.check_one_leader()?;
        let mut rng = seed;
        for _ in 0..9 {
            let mut victims = Vec::new();
            for _ in 0..3 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let victim = c.ids[(rng >> 33) as usize % 7];
                c.sim.isolate(victim);
                victims.push(victim);
            }
            c.check_one_leader_among(&victims)?;
            c.sim.heal();
        }
        c.check_one_leader()?;
        Ok(())
    });
}

#[test]
fn basic_agreement() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        for (i, cmd) in [b"100", b"200", b"300"].iter().enumerate() {
            let idx = c.one(*cmd, 3, false)?;
            // Index 1 is the first leader's no-op.
            if idx != i as u64 + 2 {
                return Err(c.sim.failure(format!("command {i} got index {idx}")));
            }
        }
        Ok(())
    });
}

#[test]
fn fail_agree_and_fail_no_agree() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::reliable(), None);
        c.one(b"101", 5, false)?;
        let l = c.check_one_leader()?;
        // Lose three followers: no agreement.
        let followers: Vec<SimId> = c.ids.iter().copied().filter(|&i| i != l).take(3).collect();
        for &f in &followers {
            c.sim.isolate(f);
        }
        let idx = c
            .sim
            .call::<Server, _>(l, |s, ctx| s.propose(ctx, b"102".to_vec()))?
            .ok_or_else(|| c.sim.failure("leader refused"))?;
        c.sim.run_for(Duration::from_secs(2));
        if c.applied_count(b"102").0 > 0 {
            return Err(c
                .sim
                .failure(format!("committed at {idx} without a majority")));
        }
        c.sim.heal();
        c.one(b"103", 5, true)?;
        c.one(b"104", 5, true)?;
        c.check_applied_agree()
    });
}

#[test]
fn rejoin_of_partitioned_leader() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        c.one(b"101", 3, true)?;
        let l1 = c.check_one_leader()?;
        c.sim.isolate(l1);
        for cmd in [b"102", b"103", b"104"] {
            c.sim
                .call::<Server, _>(l1, |s, ctx| s.propose(ctx, cmd.to_vec()))?;
        }
        c.one(b"103b", 2, true)?;
        let l2 = c.check_one_leader()?;
        c.sim.isolate(l2);
        c.sim
            .connect(l1, *c.ids.iter().find(|&&i| i != l1 && i != l2).unwrap());
        c.sim
            .connect(*c.ids.iter().find(|&&i| i != l1 && i != l2).unwrap(), l1);
        c.one(b"104b", 2, true)?;
        c.sim.heal();
        c.one(b"105", 3, true)?;
        if c.applied_count(b"102").0 > 0 {
            return Err(c.sim.failure("a partitioned leader's entry was applied"));
        }
        c.check_applied_agree()
    });
}

#[test]
fn backup_far_behind_follower_catches_up() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::reliable(), None);
        c.one(b"start", 5, true)?;
        let l = c.check_one_leader()?;
        let f = *c.ids.iter().find(|&&i| i != l).unwrap();
        let rest: Vec<SimId> = c
            .ids
            .iter()
            .copied()
            .filter(|&i| i != l && i != f)
            .collect();
        c.sim.partition(&[&[l, f], &rest]);
        for i in 0..50 {
            c.sim
                .call::<Server, _>(l, |s, ctx| s.propose(ctx, format!("lost{i}").into_bytes()))?;
        }
        c.sim.run_for(Duration::from_millis(500));
        c.sim.partition(&[&[l], &[f], &rest]);
        for i in 0..50 {
            c.one(format!("won{i}").as_bytes(), 3, true)?;
        }
        c.sim.heal();
        c.one(b"end", 5, true)?;
        if c.applied_count(b"lost0").0 > 0 {
            return Err(c.sim.failure("uncommitted entry of a minority applied"));
        }
        c.check_applied_agree()
    });
}

#[test]
fn persistence_across_crashes_of_all_nodes() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        c.one(b"11", 3, true)?;
        for &id in &c.ids.clone() {
            c.sim.crash(id);
        }
        for &id in &c.ids.clone() {
            c.sim.restart(id);
        }
        c.one(b"12", 3, true)?;
        let l = c.check_one_leader()?;
        c.sim.crash(l);
        c.sim.restart(l);
        c.one(b"13", 3, true)?;
        // Every server has all three, in order.
        for &id in &c.ids {
            let s = c.server(id).unwrap();
            let cmds: Vec<&[u8]> = s.applied().iter().map(|(_, d)| d.as_slice()).collect();
            if cmds != [b"11".as_slice(), b"12", b"13"] {
                return Err(c.sim.failure(format!("server {id} applied {cmds:?}")));
            }
        }
        Ok(())
    });
}

/// TestFigure83C: crash the leader over and over with proposals in flight; agreement at the
/// end, state machine safety throughout.
#[test]
fn figure_8_with_crashes() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::reliable(), None);
        c.one(b"start", 1, true)?;
        let mut up = 5;
        for iter in 0..60u64 {
            let mut leader = None;
            for &id in &c.ids.clone() {
                let r = c.sim.call::<Server, _>(id, |s, ctx| {
                    if s.is_started() && s.status().role == Role::Leader {
                        s.propose(ctx, format!("f{iter}").into_bytes());
                        true
                    } else {
                        false
                    }
                });
                if matches!(r, Ok(true)) {
                    leader = Some(id);
                }
            }
            let ms = if (seed + iter) % 10 == 0 { 300 } else { 10 };
            c.run_checked(Duration::from_millis(ms))?;
            if let Some(l) = leader {
                c.sim.crash(l);
                up -= 1;
            }
            if up < 3 {
                let down: Vec<SimId> = c.ids.iter().copied().filter(|&i| !c.sim.is_up(i)).collect();
                let pick = down[(iter as usize) % down.len()];
                c.sim.restart(pick);
                up += 1;
            }
            c.check_applied_agree()?;
        }
        for &id in &c.ids.clone() {
            if !c.sim.is_up(id) {
                c.sim.restart(id);
            }
        }
        c.one(b"end", 5, true)?;
        c.check_applied_agree()
    });
}

#[test]
fn unreliable_agreement() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::unreliable(), None);
        for i in 0..20 {
            c.one(format!("u{i}").as_bytes(), 1, true)?;
        }
        c.sim.set_net(NetConfig::reliable());
        c.one(b"100", 5, true)?;
        c.check_applied_agree()
    });
}

#[test]
fn snapshot_install_to_crashed_follower() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), Some(10));
        c.one(b"s0", 3, true)?;
        for round in 0..6 {
            let l = c.check_one_leader()?;
            let victim = *c.ids.iter().find(|&&i| i != l).unwrap();
            c.sim.crash(victim);
            for i in 0..12 {
                c.one(format!("r{round}-{i}").as_bytes(), 2, true)?;
            }
            c.sim.restart(victim);
            c.one(format!("r{round}-end").as_bytes(), 3, true)?;
        }
        // The log stays bounded by snapshots.
        for &id in &c.ids {
            let st = c.server(id).unwrap().status();
            if st.last_index.0 - st.first_index.0 > 40 {
                return Err(c.sim.failure(format!("log of {id} not compacted: {st:?}")));
            }
        }
        c.check_applied_agree()
    });
}

#[test]
fn snapshot_all_crash() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::unreliable(), Some(10));
        let mut last = 0;
        for round in 0..5 {
            for i in 0..12 {
                last = c.one(format!("a{round}-{i}").as_bytes(), 1, true)?;
            }
            for &id in &c.ids.clone() {
                c.sim.crash(id);
            }
            for &id in &c.ids.clone() {
                c.sim.restart(id);
            }
            let next = c.one(format!("after{round}").as_bytes(), 1, true)?;
            if next <= last {
                return Err(c
                    .sim
                    .failure(format!("index went back from {last} to {next}")));
            }
        }
        c.check_applied_agree()
    });
}

/// Counts messages by kind as they are put on the wire.
fn count_kinds(
    sim: &mut Sim<Message>,
) -> std::rc::Rc<std::cell::RefCell<std::collections::BTreeMap<&'static str, u64>>> {
    let counts = std::rc::Rc::new(std::cell::RefCell::new(std::collections::BTreeMap::new()));
    let c2 = counts.clone();
    sim.set_message_filter(move |_, _, m: &Message| {
        let kind = match &m.body {
            shoal_raft::MessageBody::AppendEntries { entries, .. } if entries.is_empty() => {
                "AppendEntries(empty)"
            }
            b => b.name(),
        };
        *c2.borrow_mut().entry(kind).or_insert(0) += 1;
        true
    });
    counts
}

/// TestCount3B and TestRPCBytes3B in message terms: an election, agreements and idle time stay
/// within the lab's bounds, and each entry travels to each follower about once.
#[test]
fn message_counts_and_bytes() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        let counts = count_kinds(&mut c.sim);
        c.check_one_leader()?;
        let election: u64 = [
            "PreVote",
            "RequestVote",
            "PreVoteResponse",
            "RequestVoteResponse",
        ]
        .iter()
        .map(|k| counts.borrow().get(k).copied().unwrap_or(0))
        .sum();
        // The lab allows 30 RPCs; a request and its response are two messages here.
        if !(1..=60).contains(&election) {
            return Err(c.sim.failure(format!("election used {election} messages")));
        }
        c.one(b"99", 3, false)?;
        let all_appends = |c: &std::collections::BTreeMap<&str, u64>| {
            c.get("AppendEntries").copied().unwrap_or(0)
                + c.get("AppendEntries(empty)").copied().unwrap_or(0)
        };
        let appends_before = all_appends(&counts.borrow());
        let bytes_before = c.sim.total_stats().bytes_sent;
        for i in 0..10u8 {
            let cmd: Vec<u8> = (0..5000).map(|j| (j as u8).wrapping_mul(i + 1)).collect();
            c.one(&cmd, 3, false)?;
        }
        let appends = all_appends(&counts.borrow()) - appends_before;
        if appends > 2 * (10 + 3) {
            return Err(c.sim.failure(format!(
                "{appends} appends for 10 agreements: {:?}",
                counts.borrow()
            )));
        }
        let bytes = c.sim.total_stats().bytes_sent - bytes_before;
        if bytes > 2 * 50_000 + 50_000 {
            return Err(c
                .sim
                .failure(format!("{bytes} bytes for 10 x 5000-byte entries")));
        }
        let idle_before = c.sim.total_stats().msgs_sent;
        c.sim.run_for(Duration::from_secs(1));
        let idle = c.sim.total_stats().msgs_sent - idle_before;
        if idle > 60 {
            return Err(c.sim.failure(format!("{idle} messages in 1 s idle")));
        }
        Ok(())
    });
}

/// Pre-vote + check-quorum: a follower isolated for a long time rejoins without forcing an
/// election or raising the term of the healthy cluster.
#[test]
fn isolated_follower_rejoins_without_an_election() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        c.one(b"x", 3, true)?;
        let l = c.check_one_leader()?;
        let term = c.server(l).unwrap().status().term;
        let f = *c.ids.iter().find(|&&i| i != l).unwrap();
        c.sim.isolate(f);
        c.sim.run_for(Duration::from_secs(10));
        c.sim.heal();
        c.sim.run_for(Duration::from_secs(2));
        let st = c.server(l).unwrap().status();
        if st.role != Role::Leader || st.term != term {
            return Err(c
                .sim
                .failure(format!("leader disrupted: {st:?}, was term {term}")));
        }
        c.one(b"y", 3, true)?;
        Ok(())
    });
}

/// The nemesis mixes partitions of every shape, crashes with torn writes, loss, duplication and
/// reordering while clients propose and servers take snapshots. After **every** simulator
/// event the five Figure 3 properties are checked (`tests/invariants`: election safety, leader
/// append-only, log matching, leader completeness, state machine safety). After healing, a
/// leader commits within 10 s and every command that any server applied is applied everywhere
/// (no committed entry lost).
#[test]
fn nemesis() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::reliable(), Some(20));
        c.sim
            .start_nemesis(shoal_sim::NemesisConfig::new(c.ids.clone()));
        let ids = c.ids.clone();
        for round in 0..100u64 {
            for &id in &ids {
                let _ = c.sim.call::<Server, _>(id, |s, ctx| {
                    if s.is_started() && s.status().role == Role::Leader {
                        s.propose(ctx, format!("n{round}-{id}").into_bytes());
                    }
                });
            }
            c.run_checked(Duration::from_millis(100))?;
        }
        c.check_applied_agree()?;
        c.check_log_matching()?;
        c.sim.heal_all();
        c.run_checked(Duration::from_secs(1))?;
        c.one(b"final", 5, true)?;
        c.run_checked(Duration::from_millis(500))?;
        c.check_applied_agree()?;
        c.check_log_matching()?;
        let mut everything = std::collections::BTreeSet::new();
        for &id in &ids {
            for (i, d) in c.server(id).unwrap().applied() {
                everything.insert((*i, d.clone()));
            }
        }
        for &id in &ids {
            let mine: std::collections::BTreeSet<_> =
                c.server(id).unwrap().applied().iter().cloned().collect();
            if let Some(missing) = everything.difference(&mine).next() {
                return Err(c
                    .sim
                    .failure(format!("{id} lacks committed entry {missing:?}")));
            }
        }
        Ok(())
    });
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// In-simulator figures for docs/benchmarks.md (virtual time: the reliable network, U[0,1) ms
/// per message, and a simulated fsync of U[0.2,2) ms). Closed-loop proposers, each with one
/// proposal outstanding, on a 3-node group.
/// `cargo test -p shoal-raft --test sim -- --ignored --nocapture bench_`
#[test]
#[ignore]
fn bench_commit_throughput_and_latency() {
    for proposers in [1usize, 64, 256] {
        let mut c = Cluster::new(1, 3, NetConfig::reliable(), None);
        let leader = c.check_one_leader().expect("leader");
        let mut outstanding: std::collections::BTreeMap<Vec<u8>, u64> = Default::default();
        let mut next_id = 0u64;
        let mut latencies = Vec::new();
        let mut seen = 0usize;
        let start = c.sim.now().as_nanos();
        let duration_ns = 5_000_000_000u64;
        while c.sim.now().as_nanos() - start < duration_ns {
            while outstanding.len() < proposers {
                let cmd = format!("bench{next_id}").into_bytes();
                next_id += 1;
                let now = c.sim.now().as_nanos();
                let ok = c
                    .sim
                    .call::<Server, _>(leader, |s, ctx| s.propose(ctx, cmd.clone()).is_some())
                    .unwrap_or(false);
                assert!(ok, "leader refused a proposal");
                outstanding.insert(cmd, now);
            }
            c.sim.run_for(Duration::from_micros(50));
            let s = c.server(leader).unwrap();
            for (cmd, at) in &s.apply_times()[seen..] {
                if let Some(t0) = outstanding.remove(cmd) {
                    latencies.push(at - t0);
                }
            }
            seen = s.apply_times().len();
        }
        latencies.sort_unstable();
        let secs = duration_ns as f64 / 1e9;
        println!(
            "proposers {proposers:>3}: {:>8.0} commits/s, p50 {:.2} ms, p99 {:.2} ms",
            latencies.len() as f64 / secs,
            percentile(&latencies, 0.5) as f64 / 1e6,
            percentile(&latencies, 0.99) as f64 / 1e6,
        );
    }
}

/// Figure 16 of the Raft paper: time to elect a new leader after the leader crashes, 5 nodes,
/// election timeout U[300, 600) ms (30–60 ticks of 10 ms), pre-vote on, over many seeds.
#[test]
#[ignore]
fn bench_election_time_after_leader_crash() {
    let seeds: u64 = std::env::var("SHOAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let mut times = Vec::new();
    for seed in 0..seeds {
        let mut c = Cluster::new(seed, 5, NetConfig::reliable(), None);
        let l = c.check_one_leader().expect("leader");
        c.sim.run_for(Duration::from_millis(seed % 100));
        let t0 = c.sim.now().as_nanos();
        c.sim.crash(l);
        let ok = c.sim.run_until_true(Duration::from_secs(10), |sim| {
            sim.node_ids().into_iter().any(|id| {
                sim.node::<Server>(id)
                    .and_then(|s| s.raw())
                    .is_some_and(|r| r.status().role == Role::Leader)
            })
        });
        assert!(ok, "seed {seed}: no new leader");
        times.push(c.sim.now().as_nanos() - t0);
    }
    times.sort_unstable();
    let ms = |p| percentile(&times, p) as f64 / 1e6;
    println!(
        "election after leader crash over {seeds} seeds: min {:.0} ms, p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms(0.0),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(1.0)
    );
}

/// TestReliableChurn3C / TestUnreliableChurn3C: clients propose continuously while servers are
/// disconnected, crashed and restarted; after healing nothing committed is lost.
fn churn(seed: u64, net: NetConfig) -> Result<(), Failure> {
    let mut c = Cluster::new(seed, 5, net, None);
    let mut rng = TestRng(seed ^ 0xc0ffee);
    let mut next = 0u64;
    for _round in 0..20 {
        // 0.7 s per round, three clients proposing every ~20 ms.
        for _ in 0..35 {
            for _ in 0..3 {
                next += 1;
                c.start_on_leaders(format!("c{next}").as_bytes());
            }
            c.run_checked(Duration::from_millis(20))?;
        }
        if rng.below(100) < 20 {
            let v = c.ids[rng.below(5) as usize];
            c.sim.isolate(v);
        }
        if rng.below(100) < 50 {
            let v = c.ids[rng.below(5) as usize];
            if !c.sim.is_up(v) {
                c.sim.restart(v);
            }
            for &o in &c.ids.clone() {
                c.sim.connect(v, o);
                c.sim.connect(o, v);
            }
        }
        if rng.below(100) < 20 {
            let v = c.ids[rng.below(5) as usize];
            if c.ids.iter().filter(|&&i| c.sim.is_up(i)).count() > 3 {
                c.sim.crash(v);
            }
        }
        c.check_applied_agree()?;
    }
    c.sim.heal();
    c.sim.set_net(NetConfig::reliable());
    for &id in &c.ids.clone() {
        if !c.sim.is_up(id) {
            c.sim.restart(id);
        }
    }
    c.one(b"final", 5, true)?;
    c.check_applied_agree()?;
    c.check_log_matching()?;
    c.check_nothing_lost()
}

#[test]
fn reliable_churn() {
    shoal_sim::check_seeds!(3, |seed| churn(seed, NetConfig::reliable()));
}

#[test]
fn unreliable_churn() {
    shoal_sim::check_seeds!(3, |seed| churn(seed, NetConfig::unreliable()));
}

/// TestFigure8Unreliable3C: an unreliable network with long reordering switched on midway;
/// leaders are disconnected at random; agreement at the end.
#[test]
fn figure_8_unreliable() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::unreliable(), None);
        let mut rng = TestRng(seed ^ 0xf18);
        c.one(b"start", 1, true)?;
        let mut disconnected: Vec<SimId> = Vec::new();
        for iter in 0..300u64 {
            if iter == 100 {
                c.sim
                    .set_net(NetConfig::unreliable().with_long_reordering());
            }
            c.start_on_leaders(format!("u{iter}").as_bytes());
            let ms = if rng.below(1000) < 100 {
                rng.below(500)
            } else {
                rng.below(13)
            };
            c.run_checked(Duration::from_millis(ms))?;
            let leaders: Vec<SimId> = c
                .leaders()
                .into_iter()
                .map(|(id, _)| id)
                .filter(|id| !disconnected.contains(id))
                .collect();
            if let Some(&l) = leaders.first() {
                if rng.below(2) == 0 {
                    c.sim.isolate(l);
                    disconnected.push(l);
                }
            }
            if c.ids.len() - disconnected.len() < 3 {
                let back = disconnected.remove(rng.below(disconnected.len() as u64) as usize);
                for &o in &c.ids.clone() {
                    if !disconnected.contains(&o) {
                        c.sim.connect(back, o);
                        c.sim.connect(o, back);
                    }
                }
            }
            c.check_applied_agree()?;
        }
        c.sim.heal();
        c.sim.set_net(NetConfig::reliable());
        c.one(b"end", 5, true)?;
        c.check_applied_agree()?;
        c.check_nothing_lost()
    });
}

#[test]
fn concurrent_starts() {
    shoal_sim::check_seeds!(5, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::reliable(), None);
        let l = c.check_one_leader()?;
        let mut indices = Vec::new();
        for i in 0..5 {
            let idx = c
                .sim
                .call::<Server, _>(l, |s, ctx| s.propose(ctx, format!("cs{i}").into_bytes()))?
                .ok_or_else(|| c.sim.failure("leader refused"))?;
            indices.push(idx.0);
        }
        if !c.sim.run_until_true(Duration::from_secs(2), |sim| {
            (0..5).all(|i| count_applied(sim, format!("cs{i}").as_bytes()) == 3)
        }) {
            return Err(c.sim.failure("concurrent proposals not all committed"));
        }
        let mut sorted = indices.clone();
        sorted.dedup();
        if sorted.len() != 5 {
            return Err(c.sim.failure(format!("duplicate indices {indices:?}")));
        }
        Ok(())
    });
}

/// SCENARIOS `snapcommon`: 30 iterations of 5–14 proposals (from a follower every third time,
/// which must be refused and retried on the leader), a victim disconnected or crashed, and the
/// persisted log kept small by snapshots.
fn snapcommon(seed: u64, net: NetConfig, disconnect: bool, crash: bool) -> Result<(), Failure> {
    let mut c = Cluster::new(seed, 3, net, Some(10));
    let mut rng = TestRng(seed ^ 0x5a5);
    c.one(b"first", 3, true)?;
    let mut victim = None;
    for iter in 0..30u64 {
        let l = c.check_one_leader()?;
        let mut sender = l;
        if iter % 3 == 1 {
            sender = *c.ids.iter().find(|&&i| i != l).unwrap();
            victim = Some(sender);
        }
        if disconnect {
            if let Some(v) = victim.filter(|&v| v != l) {
                c.sim.isolate(v);
                c.one(format!("d{iter}").as_bytes(), 2, true)?;
            }
        }
        if crash {
            if let Some(v) = victim.filter(|&v| v != l) {
                c.sim.crash(v);
                c.one(format!("k{iter}").as_bytes(), 2, true)?;
            }
        }
        let n = 5 + rng.below(10);
        for i in 0..n {
            let cmd = format!("s{iter}-{i}").into_bytes();
            let r = c.sim.call::<Server, _>(sender, |s, ctx| {
                s.is_started() && s.propose(ctx, cmd).is_some()
            });
            let _ = r; // a follower refuses; `one` below retries on the leader
        }
        c.one(
            format!("s{iter}-end").as_bytes(),
            if disconnect || crash { 2 } else { 3 },
            true,
        )?;
        for &id in &c.ids {
            let bytes = c.log_bytes(id);
            if bytes > 8 * SEGMENT_BYTES {
                return Err(c.sim.failure(format!("{id} keeps {bytes} bytes of log")));
            }
        }
        if let Some(v) = victim {
            if disconnect {
                c.sim.heal();
            }
            if crash && !c.sim.is_up(v) {
                c.sim.restart(v);
            }
            c.one(format!("r{iter}").as_bytes(), 3, true)?;
            victim = None;
        }
    }
    c.check_applied_agree()
}

#[test]
fn snapshot_basic() {
    shoal_sim::check_seeds!(3, |seed| snapcommon(
        seed,
        NetConfig::reliable(),
        false,
        false
    ));
}

#[test]
fn snapshot_install_disconnected() {
    shoal_sim::check_seeds!(3, |seed| snapcommon(
        seed,
        NetConfig::reliable(),
        true,
        false
    ));
}

#[test]
fn snapshot_install_disconnected_unreliable() {
    shoal_sim::check_seeds!(3, |seed| snapcommon(
        seed,
        NetConfig::unreliable(),
        true,
        false
    ));
}

#[test]
fn snapshot_install_crash() {
    shoal_sim::check_seeds!(3, |seed| snapcommon(
        seed,
        NetConfig::reliable(),
        false,
        true
    ));
}

#[test]
fn snapshot_install_uncrash_unreliable() {
    shoal_sim::check_seeds!(3, |seed| snapcommon(
        seed,
        NetConfig::unreliable(),
        false,
        true
    ));
}

/// TestSnapshotInit3D: restart from a snapshot with nothing after it.
#[test]
fn snapshot_init() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 3, NetConfig::unreliable(), Some(10));
        for i in 0..11 {
            c.one(format!("i{i}").as_bytes(), 3, true)?;
        }
        for round in 0..2 {
            for &id in &c.ids.clone() {
                c.sim.crash(id);
            }
            for &id in &c.ids.clone() {
                c.sim.restart(id);
            }
            c.one(format!("after{round}").as_bytes(), 3, true)?;
        }
        c.check_applied_agree()
    });
}

/// TestPersist23C: rounds of crashing two then three of five servers with staged restarts.
#[test]
fn persistence_staged_crashes() {
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::new(seed, 5, NetConfig::reliable(), None);
        let mut index = 1;
        for _ in 0..5 {
            c.one(format!("p{index}").as_bytes(), 5, true)?;
            index += 1;
            let l1 = c.check_one_leader()?;
            let a = c.ids[(l1.index() + 1) % 5];
            let b = c.ids[(l1.index() + 2) % 5];
            c.sim.crash(a);
            c.sim.crash(b);
            c.one(format!("p{index}").as_bytes(), 3, true)?;
            index += 1;
            let d = c.ids[(l1.index() + 3) % 5];
            let e = c.ids[(l1.index() + 4) % 5];
            c.sim.crash(l1);
            c.sim.crash(d);
            c.sim.crash(e);
            c.sim.restart(a);
            c.sim.restart(b);
            c.sim.run_for(Duration::from_secs(1));
            c.sim.restart(d);
            c.one(format!("p{index}").as_bytes(), 3, true)?;
            index += 1;
            c.sim.restart(l1);
            c.sim.restart(e);
        }
        c.one(b"1000", 5, true)?;
        c.check_applied_agree()
    });
}

/// Membership changes as a fault (issue 15): seven servers, three bootstrap voters and four
/// that start empty; while the nemesis partitions, crashes, pauses and degrades the network,
/// the leader proposes commands and, every few rounds, a random membership change (learners
/// added and promoted, voters and learners removed, the leader too, joint changes of two
/// voters). After every event the Figure 3 properties hold across configurations (at most
/// one leader per term, leader append-only, log matching, leader completeness, state
/// machine safety). After healing, a command commits and every current member applies it,
/// and no member lacks a command any server applied.
#[test]
fn membership_nemesis() {
    const N: u64 = 7;
    // Changes accepted over all seeds: the run must actually change the membership.
    static ACCEPTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    shoal_sim::check_seeds!(3, |seed| -> Result<(), Failure> {
        let mut c = Cluster::with_bootstrap(seed, N, 3, NetConfig::reliable(), Some(20));
        c.sim
            .start_nemesis(shoal_sim::NemesisConfig::new(c.ids.clone()));
        let mut rng = TestRng(seed ^ 0x6d65_6d62);
        let ids = c.ids.clone();
        let mut accepted = 0u64;
        for round in 0..120u64 {
            for &id in &ids {
                let _ = c.sim.call::<Server, _>(id, |s, ctx| {
                    if s.is_started() && s.status().role == Role::Leader {
                        s.propose(ctx, format!("m{round}-{id}").into_bytes());
                    }
                });
            }
            if round % 3 == 0 && random_membership_change(&mut c.sim, &ids, &mut rng) {
                accepted += 1;
            }
            c.run_checked(Duration::from_millis(100))?;
        }
        c.check_applied_agree()?;
        c.check_log_matching()?;
        c.sim.heal_all();
        c.run_checked(Duration::from_secs(2))?;
        // A final command, retried on whoever leads, until every member of the leader's
        // membership applied it (20 s of simulated time at most).
        let mut done = false;
        for attempt in 0..100 {
            let cmd = format!("final-{attempt}").into_bytes();
            c.start_on_leaders(&cmd);
            c.run_checked(Duration::from_millis(200))?;
            if members_applied(&c.sim, &ids, |d| d.starts_with(b"final")).is_some() {
                done = true;
                break;
            }
        }
        if !done {
            if std::env::var_os("SHOAL_DUMP").is_some() {
                c.dump();
            }
            let m = leader_membership(&c.sim, &ids);
            return Err(c.sim.failure(format!(
                "after healing, the members did not all apply a final command ({m:?}, \
                 {accepted} changes accepted)"
            )));
        }
        c.run_checked(Duration::from_millis(500))?;
        c.check_applied_agree()?;
        c.check_log_matching()?;
        let (_, m) =
            leader_membership(&c.sim, &ids).ok_or_else(|| c.sim.failure("no leader at the end"))?;
        let members: Vec<SimId> = m.members().into_iter().map(raft_node::sim_id).collect();
        raft_node::check_nothing_lost(&c.sim, &members).map_err(|e| c.sim.failure(e))?;
        eprintln!("seed {seed}: {accepted} changes accepted, final {m}");
        ACCEPTED.fetch_add(accepted, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    assert!(
        ACCEPTED.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no membership change was accepted in any seed"
    );
}
