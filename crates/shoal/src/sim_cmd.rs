//! `shoal sim` (run a built-in simulated scenario and print its trace and trace hash) and
//! `shoal bench sim` (simulator speed on a 5-node heartbeat cluster).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_sim::scenarios::{heartbeat_cluster, HEARTBEAT_INTERVAL};
use shoal_sim::{NemesisConfig, NetConfig, SimConfig};

/// Target of `shoal bench sim`: simulated seconds per wall-clock second.
const TARGET_SIM_SECONDS_PER_WALL_SECOND: f64 = 1_000.0;

/// Arguments of `shoal sim`.
#[derive(Debug, clap::Args)]
#[command(after_help = SIM_HELP)]
pub struct SimArgs {
    /// Seed of the run: the same seed prints the same trace and hash.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Virtual time to simulate, e.g. `10s`, `500ms`, `2m` (a bare number is seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Nodes in the heartbeat cluster.
    #[arg(long, default_value_t = 5)]
    nodes: u32,
    /// Trace lines to print (the last ones).
    #[arg(long, default_value_t = 40)]
    tail: usize,
    /// Print the whole trace instead of its tail.
    #[arg(long)]
    full: bool,
    /// Run without the nemesis (no partitions, crashes or network changes).
    #[arg(long)]
    no_nemesis: bool,
}

const SIM_HELP: &str = "\
Runs a heartbeat cluster under the nemesis (random partitions, crashes and restarts, pauses,
network changes) for the first 80% of --duration, heals it, and prints: the last --tail trace
events, a summary of every fault and repair over the whole run (count per kind and the first
few with their virtual times), message counters, each node's state, and the trace hash. The
same --seed prints the same output.

Example:
  shoal sim --seed 3 --duration 20s --tail 10";

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
        sim.run_for(args.duration);
        sim
    } else {
        nemesis_scenario(args.seed, args.nodes, args.duration, config)
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
}
