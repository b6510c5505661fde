//! Argument parsers shared by several subcommands (local clusters: `shoal_cluster`).

use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};

/// Parses one `ID=ADDR` entry of a `--peers` list (`shoal kv server`, `shoal raft node`).
pub fn parse_peer(s: &str) -> Result<(u64, SocketAddr)> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("peer {s:?} is not ID=ADDR"))?;
    Ok((
        id.parse().with_context(|| format!("peer id {id:?}"))?,
        parse_addr(addr).with_context(|| format!("peer {id}"))?,
    ))
}

/// Parses a `HOST:PORT` address where HOST is an IP literal or a host name (`localhost:7001`,
/// `db1.example.com:7001`, `[::1]:7001`). A name is resolved once, here, through the system
/// resolver (as etcd resolves its `--initial-cluster` at start); the first address wins. Every
/// flag that takes an address parses it with this function, so names work everywhere.
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs as _;
    if !s.contains(':') {
        anyhow::bail!("address {s:?} has no port: write HOST:PORT, e.g. localhost:7001");
    }
    let mut addrs = s
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve address {s:?}"))?;
    addrs
        .next()
        .ok_or_else(|| anyhow!("address {s:?} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_ip_literals_and_host_names() {
        assert_eq!(
            parse_addr("127.0.0.1:7001").unwrap(),
            "127.0.0.1:7001".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(parse_addr("[::1]:7001").unwrap().port(), 7001);
        let local = parse_addr("localhost:7001").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 7001);
        let (id, addr) = parse_peer("2=localhost:7002").unwrap();
        assert_eq!((id, addr.port()), (2, 7002));
        assert!(parse_addr("localhost")
            .unwrap_err()
            .to_string()
            .contains("no port"));
        assert!(parse_addr("no-such-host.invalid:1").is_err());
    }
}
