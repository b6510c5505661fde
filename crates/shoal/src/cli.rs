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
