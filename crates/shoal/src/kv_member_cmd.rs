//! `shoal kv member …` (list, add, promote, remove) and the joining half of
//! `shoal kv server --join` (`docs/kv.md`, "Membership changes").

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use shoal_runtime::kv::{Client, ClientConfig};
use shoal_wire::kv::{KvOp, MemberInfo, SnapshotTransfer};

/// `shoal kv member …`.
#[derive(Debug, clap::Subcommand)]
pub enum MemberSub {
    /// List the members as the leader knows them: ID ADDRESS ROLE MATCH BEHIND SNAPSHOT (the
    /// leader is marked `*`; BEHIND is how many log entries a member lacks; SNAPSHOT is the
    /// snapshot the leader is streaming to it, bytes acknowledged of the total, e.g.
    /// `412/1024 MiB 40% 35 MiB/s`, or `-`).
    #[command(
        after_help = "A learner far behind the log gets the leader's snapshot first: run         `shoal kv member list` again to follow it (the servers also log the progress every         few seconds)."
    )]
    List {
        /// `text` (default) or `json`: one JSON document `{leader, members: [{id, addr,
        /// role, match_index, behind, snapshot}]}`, `snapshot` null or `{index, sent_bytes,
        /// total_bytes, attempt, bytes_per_sec}`.
        #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
        output: crate::output::Format,
    },
    /// Add a server (as a learner with --learner: it receives the log but does not vote
    /// until promoted). Then start it with `shoal kv server --id ID --listen ADDR --join …`.
    #[command(
        after_help = "Example, replacing a dead server 1 by a new server 4:\n  \
        shoal kv member add 4 127.0.0.1:7004 --learner\n  \
        shoal kv server --id 4 --listen 127.0.0.1:7004 --join 127.0.0.1:7002,127.0.0.1:7003 --data n4\n  \
        shoal kv member list            # wait until server 4 is 0 behind\n  \
        shoal kv member promote 4\n  \
        shoal kv member remove 1"
    )]
    Add {
        /// The new server's id (unused in this cluster, not 0).
        id: u64,
        /// Where the other servers reach it (IP:PORT; its `kv server --listen`).
        #[arg(value_parser = crate::cli::parse_addr)]
        addr: SocketAddr,
        /// Add it as a learner (the safe way: promote it once it caught up).
        #[arg(long)]
        learner: bool,
    },
    /// Make a learner a voter. Refused while it is behind the leader's log (retry once
    /// `kv member list` shows it caught up).
    Promote {
        /// The learner's id.
        id: u64,
    },
    /// Remove a server (a voter or a learner). The last voter cannot be removed. A removed
    /// server stops taking part and refuses to start again on its data directory.
    Remove {
        /// The member's id.
        id: u64,
    },
}

/// Runs `shoal kv member …` against one cluster's servers.
pub async fn member(mut client: Client, sub: MemberSub) -> Result<ExitCode> {
    let (op, what) = match sub {
        MemberSub::List { output } => {
            let (leader, members, transfers) = client.member_list_with_transfers().await?;
            print_members(leader, &members, &transfers, output)?;
            return Ok(ExitCode::SUCCESS);
        }
        MemberSub::Add { id, addr, learner } => {
            let role = if learner { "learner" } else { "voter" };
            let op = KvOp::MemberAdd {
                id,
                addr: addr.to_string(),
                learner,
            };
            (op, format!("added server {id} at {addr} as a {role}"))
        }
        MemberSub::Promote { id } => (
            KvOp::MemberPromote { id },
            format!("promoted server {id} to voter"),
        ),
        MemberSub::Remove { id } => (KvOp::MemberRemove { id }, format!("removed server {id}")),
    };
    match client.member_change(op).await? {
        Ok((leader, members)) => {
            println!("{what}");
            print_members(leader, &members, &[], crate::output::Format::Text)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => bail!("{reason}"),
    }
}

#[derive(serde::Serialize)]
struct MembersJson<'a> {
    leader: u64,
    members: Vec<MemberJson<'a>>,
}

#[derive(serde::Serialize)]
struct MemberJson<'a> {
    id: u64,
    addr: &'a str,
    role: &'static str,
    match_index: u64,
    behind: u64,
    snapshot: Option<TransferJson>,
}

#[derive(serde::Serialize)]
struct TransferJson {
    index: u64,
    sent_bytes: u64,
    total_bytes: u64,
    attempt: u32,
    bytes_per_sec: u64,
}

/// A snapshot transfer for the SNAPSHOT column: `412/1024 MiB 40% 35 MiB/s`, `queued` while
/// it waits for a send slot, `opening` before its size is known.
pub fn format_transfer(t: &SnapshotTransfer) -> String {
    if t.attempt == 0 {
        return "queued".into();
    }
    if t.total_bytes == 0 {
        return "opening".into();
    }
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    let (unit, name) = match t.total_bytes {
        b if b >= 10 * GIB => (GIB, "GiB"),
        b if b >= MIB => (MIB, "MiB"),
        b if b >= KIB => (KIB, "KiB"),
        _ => (1, "B"),
    };
    let percent = t.sent_bytes.min(t.total_bytes) * 100 / t.total_bytes;
    let mut s = format!(
        "{}/{} {name} {percent}%",
        t.sent_bytes / unit,
        t.total_bytes.div_ceil(unit)
    );
    if t.bytes_per_sec > 0 {
        let rate = t.bytes_per_sec as f64 / MIB as f64;
        s.push_str(&format!(" {rate:.1} MiB/s"));
    }
    if t.attempt > 1 {
        s.push_str(&format!(" (attempt {})", t.attempt));
    }
    s
}
fn role(m: &MemberInfo) -> &'static str {
    if m.voter {
        "voter"
    } else {
        "learner"
    }
}

fn print_members(
    leader: u64,
    members: &[MemberInfo],
    transfers: &[SnapshotTransfer],
    output: crate::output::Format,
) -> Result<()> {
    let transfer = |id: u64| transfers.iter().find(|t| t.to == id);
    match output {
        crate::output::Format::Json => crate::output::print_json(&MembersJson {
            leader,
            members: members
                .iter()
                .map(|m| MemberJson {
                    id: m.id,
                    addr: &m.addr,
                    role: role(m),
                    match_index: m.match_index,
                    behind: m.behind,
                    snapshot: transfer(m.id).map(|t| TransferJson {
                        index: t.index,
                        sent_bytes: t.sent_bytes,
                        total_bytes: t.total_bytes,
                        attempt: t.attempt,
                        bytes_per_sec: t.bytes_per_sec,
                    }),
                })
                .collect(),
        }),
        crate::output::Format::Text => {
            println!(
                "{:<6} {:<22} {:<8} {:>10} {:>8}  SNAPSHOT",
                "ID", "ADDRESS", "ROLE", "MATCH", "BEHIND"
            );
            for m in members {
                let id = format!("{}{}", m.id, if m.id == leader { "*" } else { "" });
                let snapshot = transfer(m.id).map_or_else(|| "-".to_string(), format_transfer);
                println!(
                    "{:<6} {:<22} {:<8} {:>10} {:>8}  {}",
                    id,
                    m.addr,
                    role(m),
                    m.match_index,
                    m.behind,
                    snapshot
                );
            }
            Ok(())
        }
    }
}

/// How often a joining server asks the cluster whether it was added.
const JOIN_POLL: Duration = Duration::from_secs(1);

/// `kv server --join`: asks the cluster at `join` for its members until server `id` is one
/// of them (logging what to run meanwhile), then returns every member's address, this
/// server's included.
pub async fn wait_until_added(
    id: u64,
    listen: SocketAddr,
    join: &[SocketAddr],
    cluster: u64,
    security: shoal_runtime::tls::Security,
) -> Result<BTreeMap<u64, SocketAddr>> {
    let mut config = ClientConfig::new(join.to_vec());
    config.cluster_id = cluster;
    config.security = security;
    config.op_timeout = Duration::from_secs(5);
    let mut client = Client::new(config)?;
    let joined = join
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut polls = 0u64;
    loop {
        // Any of the servers answers with what it knows (it need not be the leader).
        let mut answer = None;
        for i in 0..join.len() {
            match client.member_list_at(i, Duration::from_secs(2)).await {
                Ok(a) => {
                    // A server that has the membership entry but not yet the address table behind it
                    // answers an empty address: not an answer yet.
                    let has_me = a.1.iter().any(|m| m.id == id && !m.addr.is_empty());
                    answer = Some(Ok(a));
                    if has_me {
                        break;
                    }
                }
                Err(e) => {
                    if answer.is_none() {
                        answer = Some(Err(e));
                    }
                }
            }
        }
        let Some(answer) = answer else {
            bail!("--join needs at least one address");
        };
        match answer {
            Ok((_, members)) => {
                if let Some(me) = members.iter().find(|m| m.id == id && !m.addr.is_empty()) {
                    let at: Option<SocketAddr> = me.addr.parse().ok();
                    let same = at.is_some_and(|a| {
                        a.port() == listen.port()
                            && (listen.ip().is_unspecified() || a.ip() == listen.ip())
                    });
                    if !same {
                        bail!(
                            "server {id} is a member at {}, not at --listen {listen}: start it \
                             with --listen {}, or remove it (`shoal kv member remove {id}`) \
                             and add it again at {listen}",
                            me.addr,
                            me.addr
                        );
                    }
                    let mut peers = BTreeMap::new();
                    for m in &members {
                        if let Ok(a) = m.addr.parse() {
                            peers.insert(m.id, a);
                        }
                    }
                    peers.insert(id, listen);
                    tracing::info!(
                        node = id,
                        members = members.len(),
                        role = role(me),
                        "this server is a member; joining"
                    );
                    return Ok(peers);
                }
                if polls.is_multiple_of(10) {
                    tracing::warn!(
                        node = id,
                        "this server is not a member yet; waiting. Add it with: shoal kv \
                         member add {id} {listen} --learner --endpoints {joined}"
                    );
                }
            }
            Err(e) => {
                if polls.is_multiple_of(10) {
                    tracing::warn!(node = id, error = %e,
                        "cannot get the members from --join {joined}; retrying");
                }
            }
        }
        polls += 1;
        tokio::time::sleep(JOIN_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(sent: u64, total: u64, attempt: u32, rate: u64) -> SnapshotTransfer {
        SnapshotTransfer {
            to: 4,
            index: 100,
            sent_bytes: sent,
            total_bytes: total,
            attempt,
            bytes_per_sec: rate,
        }
    }

    #[test]
    fn a_transfer_reads_as_bytes_of_total_percent_and_rate() {
        const MIB: u64 = 1 << 20;
        assert_eq!(
            format_transfer(&transfer(412 * MIB, 1024 * MIB, 1, 35 * MIB)),
            "412/1024 MiB 40% 35.0 MiB/s"
        );
        assert_eq!(
            format_transfer(&transfer(3 * MIB, 30 << 30, 2, 0)),
            "0/30 GiB 0% (attempt 2)"
        );
        assert_eq!(format_transfer(&transfer(512, 2048, 1, 0)), "0/2 KiB 25%");
        assert_eq!(format_transfer(&transfer(10, 10, 1, 0)), "10/10 B 100%");
        assert_eq!(format_transfer(&transfer(0, 0, 1, 0)), "opening");
        assert_eq!(format_transfer(&transfer(0, 0, 0, 0)), "queued");
    }
}
