//! One Raft node with the trivial replicated-log state machine of `shoal_runtime::demo`, for
//! real-process tests:
//!
//! ```text
//! shoal-raft-node --id 1 --listen 127.0.0.1:7001 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data /var/lib/shoal/1 \
//!     [--cluster 1] [--tick-ms 50] [--election-tick 10] [--heartbeat-tick 1] \
//!     [--snapshot-every 10000]
//! ```
//!
//! The election timeout is randomized in `[election-tick, 2 * election-tick)` ticks of
//! `tick-ms`; the leader sends heartbeats every `heartbeat-tick` ticks.
//!
//! The listen address serves peers and clients (`DemoRequest`/`DemoResponse` frames after a
//! `Client` hello). Stops cleanly on SIGINT or SIGTERM; exits non-zero with the reason on a
//! fatal error, e.g. a data directory of another node or cluster.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use shoal_runtime::demo_node::{run_demo_node, DemoNodeOptions};

fn parse_args() -> Result<DemoNodeOptions> {
    let mut flags = BTreeMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(name) = flag.strip_prefix("--") else {
            bail!("unexpected argument {flag:?}");
        };
        let value = it.next().ok_or_else(|| anyhow!("--{name} needs a value"))?;
        flags.insert(name.to_string(), value);
    }
    let mut take = |name: &str| flags.remove(name);
    let id = take("id")
        .context("--id is required")?
        .parse()
        .context("--id")?;
    let listen = take("listen")
        .context("--listen is required")?
        .parse()
        .context("--listen")?;
    let mut peers = BTreeMap::new();
    for part in take("peers").context("--peers is required")?.split(',') {
        let (pid, addr) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("--peers entry {part:?} is not ID=ADDR"))?;
        peers.insert(
            pid.parse().with_context(|| format!("peer id {pid:?}"))?,
            addr.parse()
                .with_context(|| format!("peer address {addr:?}"))?,
        );
    }
    let data = take("data").context("--data is required")?.into();
    let cluster = take("cluster")
        .map_or(Ok(1), |v| v.parse())
        .context("--cluster")?;
    let tick_ms = take("tick-ms")
        .map_or(Ok(50), |v| v.parse())
        .context("--tick-ms")?;
    let election_tick = take("election-tick")
        .map_or(Ok(shoal_raft::DEFAULT_ELECTION_TICK), |v| v.parse())
        .context("--election-tick")?;
    let heartbeat_tick = take("heartbeat-tick")
        .map_or(Ok(shoal_raft::DEFAULT_HEARTBEAT_TICK), |v| v.parse())
        .context("--heartbeat-tick")?;
    if heartbeat_tick == 0 || election_tick <= heartbeat_tick {
        bail!(
            "need 0 < --heartbeat-tick < --election-tick, got {heartbeat_tick} and {election_tick}"
        );
    }
    let snapshot_every = match take("snapshot-every") {
        None => Some(shoal_runtime::node::DEFAULT_SNAPSHOT_EVERY),
        Some(v) if v == "0" => None,
        Some(v) => Some(v.parse().context("--snapshot-every")?),
    };
    if let Some(unknown) = flags.keys().next() {
        bail!("unknown flag --{unknown}");
    }
    Ok(DemoNodeOptions {
        id,
        listen,
        peers,
        data,
        cluster,
        tick_ms,
        election_tick,
        heartbeat_tick,
        snapshot_every,
    })
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match parse_args() {
        Ok(args) => run_demo_node(args).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
