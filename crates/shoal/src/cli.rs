//! Argument parsers shared by several subcommands.

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
