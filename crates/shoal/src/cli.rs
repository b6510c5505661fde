//! Argument parsers and local-cluster helpers shared by several subcommands.

use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};

/// Parses one `ID=ADDR` entry of a `--peers` list (`shoal kv server`, `shoal raft node`).
pub fn parse_peer(s: &str) -> Result<(u64, SocketAddr)> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("peer {s:?} is not ID=ADDR"))?;
    Ok((
        id.parse().with_context(|| format!("peer id {id:?}"))?,
        addr.parse()
            .with_context(|| format!("peer address {addr:?}"))?,
    ))
}

/// `n` distinct free ports on 127.0.0.1 for local servers: all are bound before any is
/// released, so no two are the same.
pub fn free_local_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")
        })
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().context("reading a free port's address"))
        .collect()
}
