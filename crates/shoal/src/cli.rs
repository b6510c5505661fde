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

/// The `--peers` value for servers at `addrs`, with ids 1, 2, … in order: `1=A,2=B,3=C`
/// (what [`parse_peer`] reads back).
pub fn peers_arg(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// A child process SIGKILLed and reaped when dropped, so that no error path leaves one behind.
pub struct KilledOnDrop {
    pub child: std::process::Child,
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes the kernel SIGKILL the process `cmd` starts when this process dies, even by SIGKILL
/// (when no `Drop` runs). The signal follows the spawning *thread*: spawn from a thread that
/// lives as long as the child should. Linux only; elsewhere a no-op.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl(2) is async-signal-safe, as a pre_exec hook requires.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
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
