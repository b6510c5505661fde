//! `shoal sim` (run a simulation: the heartbeat scenario's trace and trace hash, or the Raft /
//! KV workloads of `shoal-lab` checked after every event, over one seed or many) and
//! `shoal bench sim` (simulator speed on a 5-node heartbeat cluster).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_lab::mr::{MrApp, MrOptions};
use shoal_lab::{Report, Workload};
use shoal_sim::scenarios::{heartbeat_cluster, HEARTBEAT_INTERVAL};
use shoal_sim::{NemesisConfig, NetConfig, SimConfig};

/// Target of `shoal bench sim`: simulated seconds per wall-clock second.
const TARGET_SIM_SECONDS_PER_WALL_SECOND: f64 = 1_000.0;

/// `--duration` of the heartbeat scenario when not given.
const HEARTBEAT_DURATION: Duration = Duration::from_secs(10);
/// `--duration` (the nemesis phase) of the raft, kv and shard workloads when not given: long enough
/// for a handful of faults of every kind per seed, short enough that `--seeds 200` of either
/// takes well under two minutes in a release build (docs/simulator.md has the timings).
const WORKLOAD_DURATION: Duration = Duration::from_secs(20);

/// What `shoal sim` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WorkloadArg {
    /// A toy heartbeat cluster: prints its trace, fault summary and trace hash.
    Heartbeat,
    /// Raft servers under the nemesis, proposals through the leader, Figure-3 invariants
    /// checked after every event.
    Raft,
    /// The replicated KV under the nemesis, clients putting and getting, Figure-3 invariants
    /// after every event and the history checked for linearizability.
    Kv,
    /// The sharded KV under the nemesis with reconfiguration as a fault: a controller
    /// joining, removing and moving groups, routing clients putting and getting, Figure 3 on
    /// every group and the shard invariant after every event, the history checked.
    Shard,
    /// A MapReduce job (the coordinator's event machine, workers running a built-in app:
    /// wordcount, indexer, grep, sort or terasort, one per seed in turn) with workers
    /// crashing, pausing and losing map output and a faulty network; every output file
    /// checked after every event, the outputs durable when the job is done, the result
    /// against `shoal mr seq`'s.
    Mr,
}

/// The app of `--workload mr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MrAppArg {
    /// Word counts.
    Wordcount,
    /// An inverted index: word → the inputs holding it.
    Indexer,
    /// Lines matching a pattern drawn per seed.
    Grep,
    /// A total-order sort of lines (range partitioner from a sample of the inputs).
    Sort,
    /// The sort of 100-byte TeraSort records by their 10-byte keys.
    Terasort,
}

impl MrAppArg {
    fn app(self) -> MrApp {
        match self {
            MrAppArg::Wordcount => MrApp::WordCount,
            MrAppArg::Indexer => MrApp::Indexer,
            MrAppArg::Grep => MrApp::Grep,
            MrAppArg::Sort => MrApp::Sort,
            MrAppArg::Terasort => MrApp::TeraSort,
        }
    }
}

/// Arguments of `shoal sim`.
#[derive(Debug, clap::Args)]
#[command(after_help = SIM_HELP)]
pub struct SimArgs {
    /// What to simulate.
    #[arg(long, value_enum, default_value = "heartbeat")]
    workload: WorkloadArg,
    /// Seed of the run (the first one with --seeds): the same seed prints the same output.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// raft, kv, shard and mr: run this many seeds, --seed, --seed + 1, ..., and sum them up.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Virtual time to simulate, e.g. `10s`, `500ms`, `2m` (a bare number is seconds). The
    /// heartbeat scenario's whole run (default 10s); for raft, kv, shard and mr the nemesis
    /// phase, before the heal and the final checks (default 20s).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// mr: the app every seed runs (default: each seed its own, in turn: seed modulo 5 picks
    /// wordcount, indexer, grep, sort, terasort).
    #[arg(long, value_enum)]
    app: Option<MrAppArg>,
    /// heartbeat: nodes in the cluster.
    #[arg(long, default_value_t = 5)]
    nodes: u32,
    /// Trace lines to print (heartbeat: the last ones; raft, kv, shard and mr: of a failing
    /// seed).
    #[arg(long, default_value_t = 40)]
    tail: usize,
    /// heartbeat: print the whole trace instead of its tail.
    #[arg(long)]
    full: bool,
    /// heartbeat: run without the nemesis (no partitions, crashes or network changes).
    #[arg(long)]
    no_nemesis: bool,
}

const SIM_HELP: &str = "\
--workload heartbeat (the default) runs a heartbeat cluster under the nemesis (random
partitions, crashes and restarts, pauses, network changes) for the first 80% of --duration,
heals it, and prints: the last --tail trace events, a summary of every fault and repair over
the whole run (count per kind and the first few with their virtual times), message counters,
each node's state, and the trace hash.

--workload raft and --workload kv run the real protocol on 5 servers under the nemesis for
--duration (partitions, crashes with torn writes, pauses, loss, delay, duplication), check
Raft's five Figure-3 properties after every event, heal, check that a final write commits,
and (kv) check the clients' history with `shoal check`'s versioned-KV model. --workload shard
runs the sharded KV (a 3-server controller store, 4 groups of 3, a controller, 3 routing
clients) the same way, with random joins, leaves and moves as one more fault and the shard
invariant (at most one group serves a shard; it holds every applied write) after every
event. --workload mr runs a MapReduce job (the coordinator's event machine, 4 workers running
the app's map and reduce on generated inputs) while workers crash, pause and lose their map
output and the network drops, delays, reorders and partitions, for --duration or until the
job ends; every
`mr-out-<r>` visible is checked after every event (never partial); the instant the job is
declared done, every reduce must have been committed and the coordinator's disk is crashed
(unsynced data lost or torn): every output must still be whole, and equal `shoal mr seq`'s on
the same inputs (sort and terasort: in total order across the outputs too). Each seed runs one
app in turn (wordcount, indexer, grep, sort, terasort); --app picks one. Per seed one line:
the faults drawn, events, operations checked, the trace hash and the verdict. A failing seed
prints the violation, the trace tail and the one command that replays it, and the exit code
is 1. With --seeds N a summary follows (and a progress bar on a terminal).

The same --seed prints the same output, byte for byte.

Examples:
  shoal sim --seed 3 --duration 20s --tail 10
  shoal sim --workload kv --seeds 200
  shoal sim --workload shard --seeds 50
  shoal sim --workload mr --seeds 1000
  shoal sim --workload mr --app sort --seeds 500
  shoal sim --workload raft --seed 17 --duration 5s";

/// Arguments of `shoal bench sim`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Virtual seconds to simulate.
    #[arg(long, default_value_t = 3600)]
    sim_seconds: u64,
    /// Nodes in the heartbeat cluster.
    #[arg(long, default_value_t = 5)]
    nodes: u32,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Network model: `reliable` or `unreliable` (the lab's: U[0,27) ms delay, 10% loss).
    #[arg(long, default_value = "unreliable")]
    net: String,
    /// Seeds of the second figure: whole runs of `shoal sim`'s scenario (5 nodes, 10 s with
    /// the nemesis, crashes, disk writes) per wall second.
    #[arg(long, default_value_t = 200)]
    scenario_seeds: u64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let value: f64 = num
        .parse()
        .map_err(|e| format!("bad duration {s:?}: {e}"))?;
    let secs = match unit {
        "ms" => value / 1e3,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn run(args: SimArgs) -> anyhow::Result<ExitCode> {
    if args.app.is_some() && args.workload != WorkloadArg::Mr {
        bail!("--app is for --workload mr (the MapReduce job's app)");
    }
    let workload = match args.workload {
        WorkloadArg::Heartbeat => return run_heartbeat(args),
        WorkloadArg::Raft => Workload::Raft,
        WorkloadArg::Kv => Workload::Kv,
        WorkloadArg::Shard => Workload::Shard,
        WorkloadArg::Mr => Workload::Mr,
    };
    if args.full || args.no_nemesis {
        bail!("--full and --no-nemesis are for --workload heartbeat only");
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let Some(last) = args.seed.checked_add(args.seeds - 1) else {
        bail!("--seed + --seeds is past the last seed");
    };
    let duration = args.duration.unwrap_or(WORKLOAD_DURATION);
    let app = args.app.map(MrAppArg::app);
    run_workload(workload, app, args.seed..=last, duration, args.tail)
}

/// Runs `workload` over `seeds`, printing one line per seed (and the details of a failing
/// one), then a summary. Everything on stdout is a function of the arguments alone.
fn run_workload(
    workload: Workload,
    app: Option<MrApp>,
    seeds: std::ops::RangeInclusive<u64>,
    duration: Duration,
    tail: usize,
) -> anyhow::Result<ExitCode> {
    let (first, last) = (*seeds.start(), *seeds.end());
    let many = last > first;
    // A progress bar only for a person watching: never in a pipe or a file (same output).
    let bar = if many && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(last - first + 1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} seeds, {msg} [{elapsed}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (mut failed, mut gave_up, mut events) = (Vec::new(), 0u64, 0u64);
    let mut changes: Option<u64> = None;
    // The simulated servers log through `tracing` with wall-clock stamps: noise here, and
    // thousands of lines per seed. SHOAL_LOG (e.g. `SHOAL_LOG=info` on a replay) shows them.
    let quiet = std::env::var_os("SHOAL_LOG").is_none();
    let run = |seed| match (workload, app) {
        (Workload::Mr, Some(app)) => {
            let options = MrOptions {
                app: Some(app),
                ..MrOptions::default()
            };
            shoal_lab::mr::run_mr_with(seed, duration, options)
        }
        _ => workload.run(seed, duration),
    };
    // mr: passed and failed seeds per app.
    let mut by_app: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    for seed in seeds {
        let report = if quiet {
            let silent = tracing::subscriber::NoSubscriber::default();
            tracing::subscriber::with_default(silent, || run(seed))
        } else {
            run(seed)
        };
        if let Some(name) = report.app {
            let counts = by_app.entry(name).or_default();
            if report.outcome.is_ok() {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
        events += report.events;
        if let Some(n) = report.membership_changes {
            *changes.get_or_insert(0) += n;
        }
        if report.history_gave_up.is_some() {
            gave_up += 1;
        }
        if report.outcome.is_err() {
            failed.push(seed);
        }
        let text = format_report(&report, tail, !many);
        bar.suspend(|| print!("{text}"));
        bar.set_message(format!("{} failed", failed.len()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if many {
        let n = last - first + 1;
        println!(
            "{}: {n} seeds ({first}..={last}), --duration {}: {} passed, {} failed{}; {events} events",
            workload.name(),
            format_duration(duration),
            n - failed.len() as u64,
            failed.len(),
            if gave_up > 0 {
                format!(" ({gave_up} history checks gave up within their step budget)")
            } else {
                String::new()
            }
        );
        if let Some(n) = changes {
            println!("membership changes: {n} committed over all seeds");
        }
        if !by_app.is_empty() {
            let apps: Vec<String> = by_app
                .iter()
                .map(|(name, (ok, bad))| format!("{name} {ok} passed, {bad} failed"))
                .collect();
            println!("by app: {}", apps.join("; "));
        }
        if !failed.is_empty() {
            let list: Vec<String> = failed.iter().map(u64::to_string).collect();
            println!("failed seeds: {}", list.join(" "));
        }
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A duration as `--duration` reads it back.
fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if Duration::from_millis(d.as_millis() as u64) == d {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// The command that replays one seed.
fn replay_command(report: &Report) -> String {
    let app = report
        .app
        .map(|a| format!(" --app {a}"))
        .unwrap_or_default();
    format!(
        "shoal sim --workload {}{app} --seed {} --duration {}",
        report.workload.name(),
        report.seed,
        format_duration(report.duration)
    )
}

/// One line per seed; a failure adds the violation, the trace tail (at most `tail` lines) and
/// the replay command; `detailed` (a single seed) adds the fault summary and the replay
/// command on success too.
fn format_report(r: &Report, tail: usize, detailed: bool) -> String {
    use std::fmt::Write;
    let faults: Vec<String> = r
        .faults
        .counts()
        .map(|(kind, n)| format!("{} {n}", kind.name()))
        .collect();
    let faults = if faults.is_empty() {
        "none".to_string()
    } else {
        faults.join(", ")
    };
    let ops = match r.workload {
        Workload::Raft => format!("proposed {}, committed {}", r.ops, r.committed),
        Workload::Kv | Workload::Shard => {
            format!("ops checked {}, puts acked {}", r.ops, r.committed)
        }
        Workload::Mr => format!(
            "app {}, attempts {}, outputs {}",
            r.app.unwrap_or("?"),
            r.ops,
            r.committed
        ),
    };
    let verdict = match (&r.outcome, &r.history_gave_up) {
        (Err(_), _) => "FAILED".to_string(),
        (Ok(()), None) => "ok".to_string(),
        (Ok(()), Some(_)) => "ok (history check gave up within its step budget)".to_string(),
    };
    let mut out = format!(
        "{} seed {}: faults: {faults} | events {} | {ops} | trace hash {:016x} | {verdict}\n",
        r.workload.name(),
        r.seed,
        r.events,
        r.trace_hash
    );
    if let Some(n) = r.membership_changes {
        let _ = writeln!(out, "  membership changes: {n} committed");
    }
    if detailed && r.faults.total() > 0 {
        let _ = write!(
            out,
            "faults and repairs: {} (count, then the first {} with their times)\n{}",
            r.faults.total(),
            shoal_sim::FaultSummary::FIRST_KEPT,
            r.faults
        );
    }
    if let Err(f) = &r.outcome {
        let _ = writeln!(out, "  violation: {}", f.message);
        if let Some(context) = &f.context {
            // The context is "at T after N events (trace hash H), last events:" and the tail,
            // one event per line: keep its head line and the last `tail` events.
            let mut lines = context.lines();
            if let Some(head) = lines.next() {
                let _ = writeln!(out, "  {head}");
            }
            let events: Vec<&str> = lines.collect();
            for l in &events[events.len().saturating_sub(tail)..] {
                let _ = writeln!(out, "  {l}");
            }
        }
    }
    if detailed || r.outcome.is_err() {
        let _ = writeln!(out, "replay: {}", replay_command(r));
    }
    out
}

/// `shoal sim --workload heartbeat`: the heartbeat scenario and its trace.
fn run_heartbeat(args: SimArgs) -> anyhow::Result<ExitCode> {
    if args.seeds != 1 {
        bail!("--seeds is for --workload raft, kv, shard and mr");
    }
    let duration = args.duration.unwrap_or(HEARTBEAT_DURATION);
    if args.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    let config = SimConfig {
        trace_tail_len: if args.full { usize::MAX } else { args.tail },
        ..SimConfig::default()
    };
    let sim = if args.no_nemesis {
        // Persist the beat counter every 10 beats so the disk model is exercised.
        let mut sim = heartbeat_cluster(
            args.seed,
            args.nodes,
            NetConfig::unreliable(),
            Some(10),
            config,
        );
        sim.run_for(duration);
        sim
    } else {
        nemesis_scenario(args.seed, args.nodes, duration, config)
    };
    let lines = if args.full { usize::MAX } else { args.tail };
    print!("{}", sim.format_trace_tail(lines));
    // The tail is mostly heartbeats; the faults that shaped the run are summed over all of it.
    let faults = sim.fault_summary();
    if faults.total() == 0 {
        println!("faults and repairs: none");
    } else {
        println!(
            "faults and repairs over the whole run: {} (count, then the first {} with their times)",
            faults.total(),
            shoal_sim::FaultSummary::FIRST_KEPT
        );
        print!("{faults}");
    }
    let stats = sim.total_stats();
    println!(
        "heartbeat cluster: {} nodes, beat every {} ms, seed {}, {} simulated",
        args.nodes,
        HEARTBEAT_INTERVAL.as_millis(),
        args.seed,
        sim.now()
    );
    println!(
        "events {}  trace entries {}  messages sent {} ({} bytes) delivered {} dropped {} duplicated {}",
        sim.events_processed(),
        sim.trace_len(),
        stats.msgs_sent,
        stats.bytes_sent,
        stats.msgs_delivered,
        stats.msgs_dropped,
        stats.msgs_duplicated
    );
    for id in sim.node_ids() {
        println!(
            "  {id}: up={} durable bytes {}",
            sim.is_up(id),
            sim.durable_bytes(id)
        );
    }
    println!("trace hash {:016x}", sim.trace_hash());
    Ok(ExitCode::SUCCESS)
}

pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let net = match args.net.as_str() {
        "reliable" => NetConfig::reliable(),
        "unreliable" => NetConfig::unreliable(),
        other => bail!("--net must be reliable or unreliable, not {other:?}"),
    };
    if args.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    let mut sim = heartbeat_cluster(args.seed, args.nodes, net, None, SimConfig::default());
    let sim_time = Duration::from_secs(args.sim_seconds);
    // The benchmark's wall clock is the one place the simulator's side may read real time.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    sim.run_for(sim_time);
    let wall = started.elapsed();
    let wall_secs = wall.as_secs_f64().max(1e-9);
    let events = sim.events_processed();
    let ratio = sim_time.as_secs_f64() / wall_secs;
    let stats = sim.total_stats();
    println!(
        "shoal bench sim: {}-node heartbeat cluster (beat every {} ms, replies), {} net, seed {}",
        args.nodes,
        HEARTBEAT_INTERVAL.as_millis(),
        args.net,
        args.seed
    );
    println!(
        "  simulated {} s in {:.3} s wall: {} events, {} messages sent, trace hash {:016x}",
        args.sim_seconds,
        wall_secs,
        events,
        stats.msgs_sent,
        sim.trace_hash()
    );
    println!(
        "  events per wall second:             {:>12.0}",
        events as f64 / wall_secs
    );
    println!(
        "  simulated seconds per wall second:  {:>12.0}   target >= {:.0}   {}",
        ratio,
        TARGET_SIM_SECONDS_PER_WALL_SECOND,
        if ratio >= TARGET_SIM_SECONDS_PER_WALL_SECOND {
            "MEETS TARGET"
        } else {
            "BELOW TARGET"
        }
    );

    // Second figure: how many short faulty runs (a typical simulated test) per wall second.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    let mut scenario_events = 0;
    for seed in 0..args.scenario_seeds {
        let sim = nemesis_scenario(seed, 5, SCENARIO_DURATION, SimConfig::default());
        scenario_events += sim.events_processed();
    }
    let wall_secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "  nemesis scenario ({} s simulated, 5 nodes): {} seeds in {:.3} s wall = {:.0} seeds/s ({:.0} events/s)",
        SCENARIO_DURATION.as_secs(),
        args.scenario_seeds,
        wall_secs,
        args.scenario_seeds as f64 / wall_secs,
        scenario_events as f64 / wall_secs
    );
    let _ = std::io::Write::flush(&mut std::io::stdout()).context("flushing stdout");
    Ok(ExitCode::SUCCESS)
}

/// Simulated length of one run in the bench's scenario figure.
const SCENARIO_DURATION: Duration = Duration::from_secs(10);

/// `shoal sim`'s scenario: a heartbeat cluster persisting its counter every 10 beats, under
/// the nemesis for the first 80% of `duration`, then healed.
fn nemesis_scenario(
    seed: u64,
    nodes: u32,
    duration: Duration,
    config: SimConfig,
) -> shoal_sim::Sim<shoal_sim::scenarios::HeartbeatMsg> {
    let mut sim = heartbeat_cluster(seed, nodes, NetConfig::unreliable(), Some(10), config);
    sim.start_nemesis(NemesisConfig::new(sim.node_ids()));
    let fault_time = duration.mul_f64(0.8);
    sim.run_for(fault_time);
    sim.heal_all();
    sim.run_for(duration.saturating_sub(fault_time));
    sim
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3x").is_err());
    }

    #[test]
    fn a_failing_seed_prints_the_violation_the_trace_tail_and_the_replay() {
        let report = Report {
            workload: Workload::Kv,
            seed: 17,
            duration: Duration::from_millis(2500),
            faults: shoal_sim::FaultSummary::default(),
            events: 1234,
            sim_time: shoal_sim::SimTime::from_nanos(3_000_000_000),
            ops: 40,
            committed: 9,
            history_gave_up: None,
            membership_changes: None,
            app: None,
            trace_hash: 0xabc,
            outcome: Err(shoal_sim::Failure {
                message: "history not linearizable: ...".into(),
                context: Some(
                    "at 3.000000s after 1234 events (trace hash 0000000000000abc), last events:\n\
                     [1] a\n[2] b\n[3] c"
                        .into(),
                ),
            }),
        };
        let text = format_report(&report, 2, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "kv seed 17: faults: none | events 1234 | ops checked 40, puts acked 9 | trace hash 0000000000000abc | FAILED",
                "  violation: history not linearizable: ...",
                "  at 3.000000s after 1234 events (trace hash 0000000000000abc), last events:",
                "  [2] b",
                "  [3] c",
                "replay: shoal sim --workload kv --seed 17 --duration 2500ms",
            ]
        );
    }

    #[test]
    fn an_mr_seed_names_its_app_in_the_line_and_the_replay() {
        let report = Report {
            workload: Workload::Mr,
            seed: 3,
            duration: Duration::from_secs(20),
            faults: shoal_sim::FaultSummary::default(),
            events: 10,
            sim_time: shoal_sim::SimTime::from_nanos(1_000_000_000),
            ops: 7,
            committed: 2,
            history_gave_up: None,
            membership_changes: None,
            app: Some("sort"),
            trace_hash: 0xabc,
            outcome: Ok(()),
        };
        let text = format_report(&report, 2, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "mr seed 3: faults: none | events 10 | app sort, attempts 7, outputs 2 | trace hash 0000000000000abc | ok",
                "replay: shoal sim --workload mr --app sort --seed 3 --duration 20s",
            ]
        );
    }

    #[test]
    fn replayed_durations_parse_back() {
        for d in [
            Duration::from_secs(5),
            Duration::from_millis(1500),
            Duration::from_millis(250),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
