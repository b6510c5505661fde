//! `shoal kv up`: a local cluster of `shoal kv server` children, supervised.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::kv_cmd::{read_endpoints, DEFAULT_DIR, ENDPOINTS_FILE};

/// How long `shoal kv up` waits for its servers to exit after asking them to stop.
const UP_STOP_GRACE: Duration = Duration::from_secs(5);
/// `shoal kv up` restarts a server that died after this delay, from its data directory.
const UP_RESTART_DELAY: Duration = Duration::from_secs(1);
/// A server that exits sooner than this after starting has failed to start.
const UP_QUICK_FAILURE: Duration = Duration::from_secs(3);
/// After this many failed starts in a row `shoal kv up` gives up and stops the cluster.
const UP_MAX_QUICK_FAILURES: u32 = 3;
/// Arguments of `shoal kv up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Number of servers (ignored when DIR already holds a cluster).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Directory of the cluster: DIR/endpoints and one data directory per server.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
}

/// `shoal kv up`: one `shoal kv server` child per node; ports recorded in DIR/endpoints.
pub(crate) async fn up(args: UpArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let endpoints_path = args.dir.join(ENDPOINTS_FILE);
    let endpoints = if endpoints_path.exists() {
        read_endpoints(&endpoints_path)?
    } else {
        if args.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        let endpoints = crate::cli::free_local_addrs(args.nodes as usize)?;
        let text: String = endpoints.iter().map(|e| format!("{e}\n")).collect();
        std::fs::write(&endpoints_path, text)
            .with_context(|| format!("writing {}", endpoints_path.display()))?;
        endpoints
    };
    let peers = crate::cli::peers_arg(&endpoints);
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let spawn = |id: usize| -> Result<tokio::process::Child> {
        let data = args.dir.join(format!("node{id}"));
        tokio::process::Command::new(&exe)
            .args([
                "kv",
                "server",
                "--id",
                &id.to_string(),
                "--listen",
                &endpoints[id - 1].to_string(),
            ])
            .args(["--peers", &peers, "--data"])
            .arg(&data)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting server {id}"))
    };
    let mut slots = Vec::new();
    for id in 1..=endpoints.len() {
        slots.push(UpSlot {
            child: Some(spawn(id)?),
            started: tokio::time::Instant::now(),
            restart_at: None,
            quick_failures: 0,
        });
    }
    let list = endpoints
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // A closed stdout (a script that read the first line and left) must not stop the
    // cluster: errors writing it are ignored.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "endpoints {list}");
    let _ = writeln!(
        out,
        "cluster of {} in {} (endpoints in {}); Ctrl-C stops it",
        endpoints.len(),
        args.dir.display(),
        endpoints_path.display()
    );
    let _ = out.flush();
    drop(out);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // Supervise: a server that dies (killed, crashed) is reported and restarted from its data
    // directory while the others keep serving; one that keeps failing right after it starts
    // (a port taken, a foreign data directory) stops the cluster with an error.
    let failure = loop {
        let event = {
            let next_restart = slots.iter().filter_map(|slot| slot.restart_at).min();
            let waits: Vec<_> = slots
                .iter_mut()
                .enumerate()
                .filter_map(|(i, slot)| {
                    let child = slot.child.as_mut()?;
                    Some(Box::pin(async move { (i, child.wait().await) }))
                })
                .collect();
            let any_exit = async move {
                if waits.is_empty() {
                    std::future::pending().await
                } else {
                    futures::future::select_all(waits).await.0
                }
            };
            let restart_due = async move {
                match next_restart {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => UpEvent::Stop,
                _ = sigterm.recv() => UpEvent::Stop,
                (i, status) = any_exit => UpEvent::Exited(i, status),
                _ = restart_due => UpEvent::RestartDue,
            }
        };
        let now = tokio::time::Instant::now();
        match event {
            UpEvent::Stop => break None,
            UpEvent::Exited(i, status) => {
                let slot = &mut slots[i];
                slot.child = None;
                let status = match status {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                if now.duration_since(slot.started) < UP_QUICK_FAILURE {
                    slot.quick_failures += 1;
                } else {
                    slot.quick_failures = 0;
                }
                if slot.quick_failures >= UP_MAX_QUICK_FAILURES {
                    break Some(format!(
                        "server {} failed {} times right after starting (last: {status}); \
                         see its messages above",
                        i + 1,
                        slot.quick_failures
                    ));
                }
                eprintln!(
                    "server {} exited ({status}); the others keep serving; restarting it from {} in {} s",
                    i + 1,
                    args.dir.join(format!("node{}", i + 1)).display(),
                    UP_RESTART_DELAY.as_secs()
                );
                slot.restart_at = Some(now + UP_RESTART_DELAY);
            }
            UpEvent::RestartDue => {
                for (i, slot) in slots.iter_mut().enumerate() {
                    if slot.restart_at.is_some_and(|at| at <= now) {
                        slot.restart_at = None;
                        slot.child = Some(spawn(i + 1)?);
                        slot.started = now;
                        eprintln!("server {} restarted", i + 1);
                    }
                }
            }
        }
    };
    let mut children: Vec<_> = slots.into_iter().filter_map(|slot| slot.child).collect();
    // Ask every server to stop (SIGTERM: they finish the write in progress), then wait.
    for child in &children {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on a child's pid we started and have not yet reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for child in &mut children {
        if tokio::time::timeout(UP_STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    match failure {
        Some(message) => bail!(message),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// One server of `shoal kv up`.
struct UpSlot {
    /// The running process, or `None` while it waits for its restart.
    child: Option<tokio::process::Child>,
    started: tokio::time::Instant,
    restart_at: Option<tokio::time::Instant>,
    /// Exits in a row, each within [`UP_QUICK_FAILURE`] of its start.
    quick_failures: u32,
}

/// What woke `shoal kv up`'s supervisor.
enum UpEvent {
    Stop,
    Exited(usize, std::io::Result<std::process::ExitStatus>),
    RestartDue,
}
