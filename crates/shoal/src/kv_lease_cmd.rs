//! `shoal kv lease …`, `shoal kv put --lease` and `shoal kv lock`: leases and the lock that
//! holds its key under one (`docs/kv.md`, "Leases" and "kv lock").

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use shoal_kv::{Lock, LockStep, Outcome};
use shoal_runtime::kv::{Client, GrantOutcome};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::time::Instant;

/// Default TTL of `kv lock`'s lease: how long the lock stays taken after its holder died.
pub const DEFAULT_LOCK_TTL_SECS: f64 = 10.0;
/// A waiting `kv lock` re-reads the lock this often.
const LOCK_POLL: Duration = Duration::from_millis(100);
/// Exit status of `kv lock` when `--wait-timeout` passed without the lock (EX_TEMPFAIL).
pub const EXIT_WAIT_TIMEOUT: u8 = 75;
/// Exit status of `kv lock` when the lease was lost while the command ran and the command
/// was terminated (EX_SOFTWARE; not 128 + SIGTERM, which would pass for the command's own).
pub const EXIT_LEASE_LOST: u8 = 70;

/// `shoal kv lease …`.
#[derive(Debug, clap::Subcommand)]
pub enum LeaseSub {
    /// Grant a lease; prints its id. Keys put with `--lease ID` are deleted when it expires
    /// (no keep-alive within TTL) or is revoked.
    #[command(after_help = "Example:\n  id=$(shoal kv lease grant 30)\n  \
        shoal kv put session/alice online --lease $id\n  \
        shoal kv lease keep-alive $id        # until Ctrl-C")]
    Grant {
        /// Time to live in seconds (the server's bounds: 1 s to 1 day by default).
        ttl_seconds: f64,
    },
    /// Keep a lease alive (renew it every third of its TTL) until Ctrl-C, or once.
    #[command(name = "keep-alive")]
    KeepAlive {
        /// The lease id.
        id: u64,
        /// Renew once, print the TTL in seconds, and exit.
        #[arg(long)]
        once: bool,
    },
    /// Revoke a lease now: deletes every key attached to it.
    Revoke {
        /// The lease id.
        id: u64,
    },
    /// List the live leases: ID TTL REMAINING KEYS (seconds; remaining as the leader counts).
    List {
        /// `text` (default) or `json`: one JSON document `{leases: [{id, ttl_ms,
        /// remaining_ms, keys}]}` (see docs/operations.md).
        #[arg(short = 'o', long, value_enum, default_value_t = crate::output::Format::Text)]
        output: crate::output::Format,
    },
}

/// Arguments of `shoal kv lock`.
#[derive(Debug, clap::Args)]
pub struct LockArgs {
    /// The lock's name (the key is `lock/NAME`).
    pub name: String,
    /// Seconds the lock stays taken after its holder died (the lease's TTL; kept alive every
    /// third of it while the command runs).
    #[arg(long, default_value_t = DEFAULT_LOCK_TTL_SECS)]
    pub ttl: f64,
    /// Give up waiting for the lock after this many seconds (exit status 75). Default: wait
    /// as long as it takes.
    #[arg(long)]
    pub wait_timeout: Option<f64>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// The `after_help` of `shoal kv lock`.
pub const LOCK_HELP: &str = "\
The lock is the key lock/NAME, held under a lease kept alive while COMMAND runs. If this \
process dies (even SIGKILL) the lease expires within --ttl and the next `kv lock` gets the \
lock; COMMAND is killed with it (it must not run unlocked). SIGINT and SIGTERM are forwarded \
to COMMAND; when it exits the lock is released at once and `kv lock` exits with COMMAND's \
status (128+N if killed by signal N). A waiter prints once who holds the lock.

COMMAND's environment:
  SHOAL_LOCK_KEY      the lock's key (lock/NAME)
  SHOAL_LOCK_VERSION  the key's version: a fencing token, larger for every later holder
                      (pass it to what the lock protects; refuse requests with a smaller one)
  SHOAL_LOCK_LEASE    the lease id

If the lease is lost while COMMAND runs (no keep-alive got through for a TTL), `kv lock` \
says so on stderr, sends COMMAND SIGTERM (another holder may already have the lock), and \
exits with status 70.

Example:
  shoal kv lock nightly --ttl 10 -- ./report.sh   # one report at a time across hosts\n\
The lock coordinates clients; it does not pause the servers: a copy of their data directories \
taken under it is not a consistent backup.";

/// Runs `shoal kv lease …`.
pub async fn lease(mut client: Client, sub: LeaseSub) -> Result<ExitCode> {
    match sub {
        LeaseSub::Grant { ttl_seconds } => {
            let ttl = secs(ttl_seconds, "TTL")?;
            match client.lease_grant(ttl).await.context("granting a lease")? {
                GrantOutcome::Granted { id, .. } => {
                    println!("{id}");
                    Ok(ExitCode::SUCCESS)
                }
                GrantOutcome::Refused(reason) => {
                    eprintln!("lease refused: {reason}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        LeaseSub::KeepAlive { id, once } => {
            if once {
                return match client.lease_keep_alive(id).await? {
                    Some(ttl_ms) => {
                        println!("{}", fmt_secs(ttl_ms));
                        Ok(ExitCode::SUCCESS)
                    }
                    None => not_found(id),
                };
            }
            let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
            let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
            loop {
                let Some(ttl_ms) = client.lease_keep_alive(id).await? else {
                    return not_found(id);
                };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ttl_ms / 3)) => {}
                    _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
                    _ = terminate.recv() => return Ok(ExitCode::SUCCESS),
                }
            }
        }
        LeaseSub::Revoke { id } => match client.lease_revoke(id).await? {
            Some(keys) => {
                println!("revoked ({keys} keys deleted)");
                Ok(ExitCode::SUCCESS)
            }
            None => not_found(id),
        },
        LeaseSub::List { output } => {
            let leases = client.lease_list().await?;
            if output == crate::output::Format::Json {
                let leases = leases
                    .iter()
                    .map(|l| LeaseJson {
                        id: l.id,
                        ttl_ms: l.ttl_ms,
                        remaining_ms: l.remaining_ms,
                        keys: l.keys,
                    })
                    .collect();
                crate::output::print_json(&LeasesJson { leases })?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<12}{:>10}{:>11}{:>8}",
                "ID", "TTL", "REMAINING", "KEYS"
            )?;
            for l in leases {
                writeln!(
                    out,
                    "{:<12}{:>10}{:>11}{:>8}",
                    l.id,
                    fmt_secs(l.ttl_ms),
                    fmt_secs(l.remaining_ms),
                    l.keys
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `kv lease list -o json`.
#[derive(Debug, serde::Serialize)]
struct LeasesJson {
    leases: Vec<LeaseJson>,
}

/// One live lease (times in milliseconds; remaining as the leader counts it).
#[derive(Debug, serde::Serialize)]
struct LeaseJson {
    id: u64,
    ttl_ms: u64,
    remaining_ms: u64,
    keys: u64,
}

fn not_found(id: u64) -> Result<ExitCode> {
    eprintln!("lease {id} not found (expired or revoked)");
    Ok(ExitCode::from(1))
}

/// Seconds given on the command line as a duration.
fn secs(s: f64, what: &str) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0) {
        bail!("{what} must be a positive number of seconds, not {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

/// Milliseconds as seconds with one decimal.
fn fmt_secs(ms: u64) -> String {
    format!("{}.{}", ms / 1000, (ms % 1000) / 100)
}

/// `shoal kv lock NAME -- COMMAND…`. `new_client` makes a client of the cluster: one runs the
/// lock, one the keep-alives (a client runs one operation at a time), and the release uses a
/// fresh one (a signal may have abandoned an operation of the first).
pub async fn lock(new_client: impl Fn() -> Result<Client>, args: LockArgs) -> Result<ExitCode> {
    let mut client = new_client()?;
    let keeper = new_client()?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow!("no command given after --"))?;
    let ttl = secs(args.ttl, "--ttl")?;
    let wait_deadline = match args.wait_timeout {
        Some(s) => Some(Instant::now() + secs(s, "--wait-timeout")?),
        None => None,
    };
    let key = format!("lock/{}", args.name);
    // Signals are ours from here on: a Ctrl-C while waiting must release the lease too.
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;

    let mut lease = grant_lease(&mut client, ttl).await?;
    let (lost_tx, mut lost) = watch::channel(false);
    let mut keep = tokio::spawn(keep_alive(keeper, lease, ttl, lost_tx));
    let owner = owner_value(lease, ttl);
    let mut lock = Lock::with_lease(key.clone().into_bytes(), owner.into_bytes(), lease);
    lock.set_retry(LOCK_POLL);

    // Acquire, printing the holder once, bounded by --wait-timeout and the signals.
    let mut told = false;
    let mut step = lock.acquire();
    let acquired: Result<(), (u8, String)> = loop {
        step = match step {
            LockStep::Acquired => break Ok(()),
            LockStep::Run(op) => {
                // A signal must not wait for an operation against an unreachable cluster.
                let result = tokio::select! {
                    r = client.execute(op) => r,
                    _ = interrupt.recv() => break Err((128 + libc::SIGINT as u8, String::new())),
                    _ = terminate.recv() => break Err((128 + libc::SIGTERM as u8, String::new())),
                };
                match result {
                    Ok(outcome) => lock.on_outcome(outcome),
                    Err(e) => {
                        tracing::debug!(error = %e, "lock operation failed; retrying");
                        lock.on_outcome(Outcome::Maybe)
                    }
                }
            }
            LockStep::Wait(d) => {
                if !told {
                    if let Some(holder) = lock.holder() {
                        eprintln!("waiting for {key} held by {}", describe_holder(holder));
                        told = true;
                    }
                }
                let sleep = match wait_deadline {
                    Some(deadline) if Instant::now() + d >= deadline => {
                        let by = lock
                            .holder()
                            .map(describe_holder)
                            .unwrap_or_else(|| "another client".into());
                        break Err((
                            EXIT_WAIT_TIMEOUT,
                            format!(
                                "gave up waiting for {key} after --wait-timeout {}s: held by {by}",
                                args.wait_timeout.unwrap_or_default()
                            ),
                        ));
                    }
                    _ => d,
                };
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => lock.on_wait_done(),
                    _ = interrupt.recv() => break Err((128 + libc::SIGINT as u8, String::new())),
                    _ = terminate.recv() => break Err((128 + libc::SIGTERM as u8, String::new())),
                    _ = lost.changed() => LockStep::LeaseLost,
                }
            }
            LockStep::LeaseLost => {
                // Only while waiting (the cluster was out of reach for a TTL): nothing is held
                // yet, so wait on under a new lease.
                keep.abort();
                release(&new_client, lease, &key).await;
                eprintln!(
                    "lost the lease of {key} while waiting for it; waiting on with a new one"
                );
                lease = grant_lease(&mut client, ttl).await?;
                let (lost_tx, lost_rx) = watch::channel(false);
                lost = lost_rx;
                keep = tokio::spawn(keep_alive(new_client()?, lease, ttl, lost_tx));
                let owner = owner_value(lease, ttl);
                lock = Lock::with_lease(key.clone().into_bytes(), owner.into_bytes(), lease);
                lock.set_retry(LOCK_POLL);
                lock.acquire()
            }
            LockStep::Released => break Err((1, format!("{key}: lock step out of order"))),
        };
    };
    if let Err((code, message)) = acquired {
        keep.abort();
        release(&new_client, lease, &key).await;
        if !message.is_empty() {
            eprintln!("{message}");
        }
        return Ok(ExitCode::from(code));
    }
    let version = lock.version().unwrap_or_default();
    tracing::debug!(lock = %key, version, lease, "lock acquired");

    let mut cmd = std::process::Command::new(program);
    cmd.args(rest)
        .env("SHOAL_LOCK_KEY", &key)
        .env("SHOAL_LOCK_VERSION", version.to_string())
        .env("SHOAL_LOCK_LEASE", lease.to_string());
    // If this process dies without releasing, the command must not go on unlocked. (The
    // parent-death signal follows the spawning thread: this runs on the main thread, inside
    // `block_on`.)
    shoal_cluster::die_with_parent(&mut cmd);
    let mut child = match tokio::process::Command::from(cmd).spawn() {
        Ok(c) => c,
        Err(e) => {
            keep.abort();
            release(&new_client, lease, &key).await;
            return Err(e).with_context(|| format!("running {program:?}"));
        }
    };
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let forward = |sig: i32| {
        if let Some(pid) = pid {
            // SAFETY: kill(2) with our own child's pid (not reaped yet: we still wait on it).
            unsafe {
                libc::kill(pid, sig);
            }
        }
    };
    let mut lease_lost = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = interrupt.recv() => forward(libc::SIGINT),
            _ = terminate.recv() => forward(libc::SIGTERM),
            _ = lost.changed(), if !lease_lost => {
                lease_lost = true;
                eprintln!(
                    "LOST THE LOCK {key}: no keep-alive of lease {lease} got through for {:?}; \
                     another client may hold it now. Sending SIGTERM to the command.",
                    ttl
                );
                forward(libc::SIGTERM);
            }
        }
    };
    keep.abort();
    release(&new_client, lease, &key).await;
    let status = status.with_context(|| format!("waiting for {program:?}"))?;
    if lease_lost {
        return Ok(ExitCode::from(EXIT_LEASE_LOST));
    }
    Ok(ExitCode::from(exit_code(status)))
}

/// Grants the lock's lease.
async fn grant_lease(client: &mut Client, ttl: Duration) -> Result<u64> {
    match client
        .lease_grant(ttl)
        .await
        .context("granting the lock's lease")?
    {
        GrantOutcome::Granted { id, .. } => Ok(id),
        GrantOutcome::Refused(reason) => bail!("the lock's lease was refused: {reason}"),
    }
}

/// The exit status of a command as a shell reports it: its code, or 128+N if signal N killed
/// it.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

/// Revokes the lock's lease (deleting the key: the lock is free at once). On failure the
/// lease expires by itself within its TTL.
async fn release(new_client: &impl Fn() -> Result<Client>, lease: u64, key: &str) {
    let revoked = match new_client() {
        Ok(mut client) => client
            .lease_revoke(lease)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if let Err(e) = revoked {
        eprintln!("could not release {key} ({e:#}); it frees itself when lease {lease} expires");
    }
}

/// Keeps `lease` alive every third of `ttl`. Reports (once) on `lost` when the lease is gone
/// or when no keep-alive got through for a whole TTL since the last one that did was sent:
/// past that point the lease may have expired.
async fn keep_alive(mut client: Client, lease: u64, ttl: Duration, lost: watch::Sender<bool>) {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        let sent = Instant::now();
        match tokio::time::timeout(ttl, client.lease_keep_alive(lease)).await {
            Ok(Ok(Some(_))) => last_ok = sent,
            Ok(Ok(None)) => {
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => tracing::warn!(lease, error = %e, "lease keep-alive failed"),
            Err(_) => tracing::warn!(lease, "lease keep-alive timed out"),
        }
        if Instant::now() >= last_ok + ttl {
            let _ = lost.send(true);
            return;
        }
    }
}

/// The lock key's value: who holds it, for a waiter's message (and unique per holder).
fn owner_value(lease: u64, ttl: Duration) -> String {
    format!(
        "pid={} host={} since={} lease={lease} ttl={}",
        std::process::id(),
        host_name(),
        utc_clock(),
        ttl.as_secs_f64()
    )
}

/// "pid 123 on host H since 12:03:04 UTC (lease 7, expires within 10 s if its holder dies)"
/// from an [`owner_value`]; any other value as it is.
fn describe_holder(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let field = |name: &str| {
        text.split(' ')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    match (
        field("pid"),
        field("host"),
        field("since"),
        field("lease"),
        field("ttl"),
    ) {
        (Some(pid), Some(host), Some(since), Some(lease), Some(ttl)) => format!(
            "pid {pid} on host {host} since {since} UTC (lease {lease}, expires within {ttl} s \
             if its holder dies)"
        ),
        _ => format!("{text:?}"),
    }
}

/// This machine's host name ("unknown" if it has none).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The wall-clock time of day in UTC, HH:MM:SS (for people; never compared).
#[allow(clippy::disallowed_methods)] // a binary showing a person the time of day
fn utc_clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02}", day / 3600, (day / 60) % 60, day % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_is_described_from_its_value() {
        let v = owner_value(7, Duration::from_secs(10));
        let d = describe_holder(v.as_bytes());
        assert!(
            d.starts_with(&format!("pid {} on host ", std::process::id())),
            "{d}"
        );
        assert!(
            d.ends_with("UTC (lease 7, expires within 10 s if its holder dies)"),
            "{d}"
        );
        assert_eq!(describe_holder(b"someone"), "\"someone\"");
        assert_eq!(fmt_secs(9_950), "9.9");
    }
}
