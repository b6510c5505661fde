//! What operators use around the servers: `--metrics ADDR` (Prometheus metrics over HTTP) and
//! `--config FILE` (a TOML file whose keys are the long flags), on `kv server`, `shard server`,
//! `mr coordinator` and `mr worker`. `docs/operations.md` documents both.
//!
//! The config file is expanded into command-line arguments before clap parses (`expand`): each
//! key becomes its `--key VALUE`, placed right after the subcommand, so every flag — present
//! or added later, by any module — has a key without being listed twice, and clap validates
//! file values exactly as it validates flags. A flag given on the command line wins: its key
//! in the file is skipped.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `--metrics` and `--config`, flattened into each long-running command's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerObsArgs {
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics (HOST:PORT; off by default).
    /// The metrics and their meaning: docs/operations.md, "Metrics".
    #[arg(long, value_name = "ADDR", value_parser = crate::cli::parse_addr)]
    pub metrics: Option<SocketAddr>,
    /// Read flags from a TOML file: each key is a long flag without its dashes (`listen =
    /// "10.0.0.1:7001"`, `peers = ["1=…", "2=…"]`, `insecure = true`). Flags given on the
    /// command line override the file; an unknown key is an error. Example:
    /// examples/cluster-node.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Starts the metrics endpoint of a `kv server` or `shard server` if `--metrics` was given.
/// A bad address (in use, not of this machine) fails the command before the server starts.
pub async fn start_server_metrics(
    addr: Option<SocketAddr>,
    kind: shoal_runtime::metrics::ServerKind,
) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let mut registry = Registry::default();
    shoal_runtime::metrics::register(&mut registry, kind);
    shoal_metrics::start(addr, registry).await?;
    Ok(())
}

// ---- MapReduce: the coordinator's status as metrics ----------------------------------------

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    kind: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    name: String,
}

/// The coordinator's metrics, set from each status it publishes (the coordinator's core stays
/// free of metrics; its status is the counter struct).
#[derive(Default, Clone)]
struct MrMetrics {
    tasks: Family<TaskLabels, Gauge>,
    attempts: Family<KindLabel, Gauge>,
    failures: Family<KindLabel, Gauge>,
    workers: Family<StateLabel, Gauge>,
    phase: Family<PhaseLabel, Gauge>,
    bytes: Family<PhaseLabel, Gauge>,
    counters: Family<NameLabel, Gauge>,
    elapsed: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl MrMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "shoal_mr_tasks",
            "Tasks by kind (map, reduce) and state (pending, running, done, committing, committed)",
            self.tasks.clone(),
        );
        r.register(
            "shoal_mr_task_attempts",
            "Attempts started so far, by task kind (retries and speculative copies included)",
            self.attempts.clone(),
        );
        r.register(
            "shoal_mr_task_failures",
            "Attempts that failed so far, by task kind",
            self.failures.clone(),
        );
        r.register(
            "shoal_mr_workers",
            "Workers by state (idle, busy, lost)",
            self.workers.clone(),
        );
        r.register(
            "shoal_mr_job_phase",
            "1 for the job's phase now (starting, map, reduce, done, failed)",
            self.phase.clone(),
        );
        r.register(
            "shoal_mr_phase_bytes",
            "Bytes read or written per phase by the winning attempts (map.input, map.output, …)",
            self.bytes.clone(),
        );
        r.register(
            "shoal_mr_counter",
            "Every counter of the winning attempts (records, spills, the app's own)",
            self.counters.clone(),
        );
        r.register(
            "shoal_mr_job_elapsed_seconds",
            "Time since the coordinator started the job",
            self.elapsed.clone(),
        );
    }

    fn update(&self, s: &shoal_mr::status::JobStatus) {
        use shoal_mr::status::{TaskState, WorkerState};
        for (kind, tasks) in [("map", &s.maps), ("reduce", &s.reduces)] {
            let mut by_state = [0i64; 5];
            let (mut attempts, mut failures) = (0i64, 0i64);
            for t in tasks {
                let i = match t.state {
                    TaskState::Pending => 0,
                    TaskState::Running => 1,
                    TaskState::Done => 2,
                    TaskState::Committing => 3,
                    TaskState::Committed => 4,
                };
                by_state[i] += 1;
                attempts += i64::from(t.attempts);
                failures += i64::from(t.failures);
            }
            let states = ["pending", "running", "done", "committing", "committed"];
            for (state, n) in states.into_iter().zip(by_state) {
                self.tasks.get_or_create(&TaskLabels { kind, state }).set(n);
            }
            self.attempts
                .get_or_create(&KindLabel { kind })
                .set(attempts);
            self.failures
                .get_or_create(&KindLabel { kind })
                .set(failures);
        }
        let mut workers = [0i64; 3];
        for w in &s.workers {
            workers[match w.state {
                WorkerState::Idle => 0,
                WorkerState::Busy => 1,
                WorkerState::Lost => 2,
            }] += 1;
        }
        for (state, n) in ["idle", "busy", "lost"].into_iter().zip(workers) {
            self.workers.get_or_create(&StateLabel { state }).set(n);
        }
        for phase in ["starting", "map", "reduce", "done", "failed", "abandoned"] {
            self.phase
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .set(i64::from(s.phase == phase));
        }
        for (name, v) in &s.counters {
            let v = i64::try_from(*v).unwrap_or(i64::MAX);
            if let Some(phase) = name.strip_suffix(".bytes") {
                self.bytes
                    .get_or_create(&PhaseLabel {
                        phase: phase.to_string(),
                    })
                    .set(v);
            }
            self.counters
                .get_or_create(&NameLabel { name: name.clone() })
                .set(v);
        }
        self.elapsed.set(s.elapsed_ms as f64 / 1000.0);
    }
}

/// Starts the coordinator's metrics endpoint if `--metrics` was given: the job's status, as
/// the coordinator publishes it, turned into gauges.
pub async fn start_mr_metrics(
    addr: Option<SocketAddr>,
    mut status: tokio::sync::watch::Receiver<Arc<shoal_mr::status::JobStatus>>,
) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let metrics = MrMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    metrics.update(&status.borrow_and_update());
    shoal_metrics::start(addr, registry).await?;
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let snapshot = status.borrow_and_update().clone();
            metrics.update(&snapshot);
        }
    });
    Ok(())
}

/// Starts an `mr worker`'s metrics endpoint if `--metrics` was given: the tasks it ran and
/// their bytes (`shoal_runtime::mr::metrics`).
pub async fn start_worker_metrics(addr: Option<SocketAddr>) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let mut registry = Registry::default();
    shoal_runtime::mr::metrics::register(&mut registry);
    shoal_metrics::start(addr, registry).await?;
    Ok(())
}

// ---- --config FILE -------------------------------------------------------------------------

/// The arguments after expanding `--config FILE`, and what came from the file (to name the
/// file and key when clap refuses one of its values).
#[derive(Debug, Default)]
pub struct Expanded {
    /// The arguments for clap.
    pub args: Vec<OsString>,
    /// The file, if one was given.
    pub file: Option<PathBuf>,
    /// The keys taken from it.
    pub keys: Vec<String>,
}

/// Expands `--config FILE` in `argv` (the process's arguments, program name first) against the
/// command tree `root`. Without `--config`, or for a command that has no `--config` (clap then
/// says so), the arguments are returned unchanged.
pub fn expand(argv: Vec<OsString>, mut root: clap::Command) -> Result<Expanded, String> {
    root.build();
    // Walk the subcommands: `shoal kv [--cluster 5] server …`.
    let mut cmd = &root;
    let mut leaf_at = 0;
    let mut i = 1;
    while i < argv.len() {
        let Some(tok) = argv[i].to_str() else { break };
        if tok == "--" {
            break;
        }
        if let Some(sub) = cmd.find_subcommand(tok) {
            cmd = sub;
            leaf_at = i;
        } else if let Some(long) = tok.strip_prefix("--") {
            // An option of a parent before the subcommand: skip its value too.
            if !long.contains('=')
                && cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .is_some_and(takes_value)
            {
                i += 1;
            }
        } else if !tok.starts_with('-') {
            break;
        }
        i += 1;
    }
    let user = &argv[leaf_at + 1..];
    let Some(file) = config_path(user) else {
        return Ok(Expanded {
            args: argv,
            ..Expanded::default()
        });
    };
    if !cmd.get_arguments().any(|a| a.get_id() == "config") {
        return Ok(Expanded {
            args: argv,
            ..Expanded::default()
        });
    }
    let shown = file.display().to_string();
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read the config file {shown} (--config): {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("config file {shown} is not valid TOML: {e}"))?;
    let path = command_path(&argv[1..=leaf_at]);
    let mut from_file = Vec::new();
    let mut keys = Vec::new();
    for (key, value) in &table {
        let arg = cmd.get_arguments().find(|a| {
            a.get_long() == Some(key.as_str())
                && !a.is_hide_set()
                && !matches!(key.as_str(), "config" | "help" | "version")
        });
        let Some(arg) = arg else {
            return Err(format!(
                "config file {shown}: unknown key `{key}`: `shoal {path}` has no --{key} \
                 (keys are its long flags without the dashes: see `shoal {path} --help`)"
            ));
        };
        if given_on_command_line(user, arg) {
            continue; // the command line wins
        }
        let flag = format!("--{key}");
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(n) => Ok(n.to_string()),
                toml::Value::Float(x) => Ok(x.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => Err(format!(
                    "config file {shown}: key `{key}`: a value of type {} is not a flag's \
                     value: write a string, a number, a boolean or an array of them",
                    other.type_str()
                )),
            }
        };
        match value {
            toml::Value::Boolean(b) if !takes_value(arg) => {
                if *b {
                    from_file.push(OsString::from(&flag));
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    from_file.push(OsString::from(&flag));
                    from_file.push(OsString::from(scalar(item)?));
                }
            }
            other => {
                from_file.push(OsString::from(&flag));
                from_file.push(OsString::from(scalar(other)?));
            }
        }
        keys.push(key.clone());
    }
    let mut args = argv[..=leaf_at].to_vec();
    args.extend(from_file);
    args.extend_from_slice(&argv[leaf_at + 1..]);
    Ok(Expanded {
        args,
        file: Some(file),
        keys,
    })
}

impl Expanded {
    /// When clap refuses an argument that came from the config file: the file and key, to put
    /// before clap's own message.
    pub fn blame(&self, err: &clap::Error) -> Option<String> {
        let file = self.file.as_ref()?;
        let clap::error::ContextValue::String(arg) =
            err.get(clap::error::ContextKind::InvalidArg)?
        else {
            return None;
        };
        let long = arg.strip_prefix("--")?;
        let long = long.split([' ', '=', '<']).next()?;
        self.keys
            .iter()
            .any(|k| k == long)
            .then(|| format!("config file {}, key `{long}`", file.display()))
    }
}

fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values()
}

/// The `--config FILE` among the user's arguments of the subcommand, if any.
fn config_path(user: &[OsString]) -> Option<PathBuf> {
    let mut it = user.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            return None;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// Whether the user gave `arg` on the command line (`--key`, `--key=…`, or its short form).
fn given_on_command_line(user: &[OsString], arg: &clap::Arg) -> bool {
    let long = arg.get_long().map(|l| format!("--{l}"));
    let short = arg.get_short().map(|c| format!("-{c}"));
    user.iter().map(|a| a.to_string_lossy()).any(|a| {
        long.as_deref()
            .is_some_and(|l| a == l || a.strip_prefix(l).is_some_and(|r| r.starts_with('=')))
            || short.as_deref().is_some_and(|s| a.starts_with(s))
    })
}

fn command_path(tokens: &[OsString]) -> String {
    tokens
        .iter()
        .map(|t| t.to_string_lossy())
        .filter(|t| !t.starts_with('-'))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> clap::Command {
        use clap::{Arg, ArgAction, Command};
        Command::new("shoal").subcommand(
            Command::new("db")
                .arg(Arg::new("cluster").long("cluster").global(true))
                .subcommand(
                    Command::new("server")
                        .arg(Arg::new("listen").long("listen"))
                        .arg(Arg::new("peers").long("peers").action(ArgAction::Append))
                        .arg(
                            Arg::new("insecure")
                                .long("insecure")
                                .action(ArgAction::SetTrue),
                        )
                        .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
                        .arg(Arg::new("secret").long("secret").hide(true))
                        .arg(Arg::new("config").long("config")),
                ),
        )
    }

    fn expand_with(toml: &str, args: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, toml).expect("write");
        let mut argv: Vec<OsString> = vec!["shoal".into(), "db".into(), "server".into()];
        argv.push("--config".into());
        argv.push(file.clone().into());
        argv.extend(args.iter().map(OsString::from));
        let expanded = expand(argv, tree())?;
        Ok(expanded
            .args
            .iter()
            .map(|a| {
                a.to_string_lossy()
                    .replace(&*file.to_string_lossy(), "FILE")
            })
            .collect())
    }

    #[test]
    fn keys_become_flags_before_the_users_and_the_command_line_wins() {
        let args = expand_with(
            "listen = \"a:1\"\npeers = [\"x\", \"y\"]\ninsecure = true\nquiet = false\ncluster = 7\n",
            &["--listen=b:2"],
        )
        .unwrap();
        // Keys in the file's sorted order; a false switch is left out; `listen` is the user's.
        assert_eq!(
            args,
            [
                "shoal",
                "db",
                "server",
                "--cluster",
                "7",
                "--insecure",
                "--peers",
                "x",
                "--peers",
                "y",
                "--config",
                "FILE",
                "--listen=b:2"
            ]
        );
    }

    #[test]
    fn unknown_hidden_and_table_keys_are_refused_with_file_and_key() {
        for (toml, expect) in [
            ("lisen = \"a\"\n", "unknown key `lisen`"),
            ("secret = \"a\"\n", "unknown key `secret`"),
            ("config = \"other.toml\"\n", "unknown key `config`"),
            (
                "listen = { host = \"a\" }\n",
                "key `listen`: a value of type table",
            ),
            ("peers = [[\"a\"]]\n", "key `peers`: a value of type array"),
            ("listen = \n", "is not valid TOML"),
        ] {
            let err = expand_with(toml, &[]).unwrap_err();
            assert!(
                err.contains(expect) && err.contains("c.toml"),
                "{toml}: {err}"
            );
        }
    }

    #[test]
    fn without_config_the_arguments_are_untouched() {
        let argv: Vec<OsString> = ["shoal", "db", "--cluster", "3", "server", "--listen", "a"]
            .map(OsString::from)
            .to_vec();
        let expanded = expand(argv.clone(), tree()).unwrap();
        assert_eq!(expanded.args, argv);
        assert!(expanded.file.is_none());
    }
}
