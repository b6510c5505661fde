//! `shoal demo`: the tour. A 3-server KV cluster and a MapReduce job on this machine, the job's
//! top words stored in the database, its leader SIGKILLed, the words read back through the
//! survivors — every process started here, stopped here, and nothing left behind.
//!
//! The KV servers and the MapReduce workers are this executable's own `shoal kv server` and
//! `shoal mr worker` processes (their logs go to files in the demo directory); the MapReduce
//! coordinator and the KV client run in this process.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use shoal_cluster::{Proc, Procs, Spec};
use shoal_mr::app::AppConfig;
use shoal_mr::coordinator::{prepare_job, JobOptions, JobReport};
use shoal_runtime::kv::{Client, ClientConfig, PutOutcome};
use shoal_wire::kv::{Expected, ServerStatus};

/// Servers of the demo cluster (a majority survives one crash).
const SERVERS: usize = 3;
/// The steps, as numbered on screen.
const STEPS: usize = 6;
/// How long the servers may take to start and elect a leader.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_millis(300);
/// Overall time one KV operation may take, retries through the survivors included.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the MapReduce job may take before the demo gives up.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the servers get to exit after SIGTERM before they are SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long the workers get to exit on their own once the job is over.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(5);
/// Lines of a log printed when a step fails.
const LOG_TAIL_LINES: usize = 12;
/// Largest --top (keys are `top/001`…; the demo stays small).
const MAX_TOP: usize = 999;
/// The key holding a one-line description of what the demo stored.
const SUMMARY_KEY: &str = "demo/summary";

const DEMO_HELP: &str = "\
What it does, step by step (a few seconds; nothing to configure):
  1. starts a 3-node KV cluster on 127.0.0.1 (this executable's own `shoal kv server`
     processes, free ports, data and logs in a temporary directory) and waits for a leader;
  2. counts the words of eight bundled books with MapReduce: a coordinator in this process
     and --workers `shoal mr worker` processes;
  3. stores the --top most frequent words in the KV (keys top/01 … top/10 -> `WORD COUNT`,
     plus demo/summary), each write fsynced on a majority before it is acknowledged;
  4. asks every server for its status and SIGKILLs the leader;
  5. reads the words back (linearizable reads; the client retries through the survivors
     until they elect a new leader), checks they are exactly what was stored, and prints
     them, the new leader and how long the failover took;
  6. stops every process and removes the directory (unless --keep).
Ctrl-C or a failure at any step also stops every process and removes the directory; a
failure names the step and prints the tail of the relevant log.

Next: `shoal kv up` for a cluster of your own, `shoal mr run --help`, `shoal bench kv`.";

/// `shoal demo`.
#[derive(Debug, clap::Args)]
#[command(after_help = DEMO_HELP)]
pub struct DemoArgs {
    /// Keep the directory (data, logs, MapReduce output) and print its path.
    #[arg(long)]
    keep: bool,
    /// Work in DIR (created if missing; must be empty) instead of a fresh temporary directory.
    /// It is removed at the end unless --keep.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// MapReduce worker processes.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// How many of the most frequent words to store and read back.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print only a one-line result (and errors).
    #[arg(long)]
    quiet: bool,
}

/// Runs `shoal demo`.
pub fn run(args: DemoArgs) -> Result<ExitCode> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.top == 0 || args.top > MAX_TOP {
        bail!("--top must be between 1 and {MAX_TOP}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // The demo's future runs on this (the main) thread: the children are spawned from it,
    // which matters for their parent-death signal (see `child_spec`).
    runtime.block_on(async move {
        let workspace = Workspace::new(args.dir.as_deref(), args.keep)?;
        let mut demo = Demo {
            say: Say::new(args.quiet),
            servers: Procs::new(),
            workers: Procs::new(),
            workspace,
            endpoints: Vec::new(),
            step: 0,
            args,
        };
        // Ctrl-C, SIGTERM (a supervisor, `timeout`, `kill`) and SIGHUP (the terminal closed)
        // all clean up the same way.
        let mut signals = shoal_cluster::StopSignals::install()?;
        // `None`: interrupted. Dropping the tour's future first stops whatever it waits for.
        let result = tokio::select! {
            r = demo.tour() => Some(r),
            _ = signals.recv() => None,
        };
        demo.finish(result)
    })
}

/// One demo run. Fields drop in order: the processes are killed before the directory goes.
struct Demo {
    args: DemoArgs,
    say: Say,
    servers: Procs,
    workers: Procs,
    workspace: Workspace,
    endpoints: Vec<SocketAddr>,
    /// The step in progress (1-based; 0 before the first).
    step: usize,
}

/// What the tour found, for the closing lines.
struct Tour {
    words: usize,
    old_leader: u64,
    new_leader: ServerStatus,
    failover: Duration,
}

impl Demo {
    async fn tour(&mut self) -> Result<Tour> {
        self.say.line(&format!(
            "shoal demo: a 3-node KV cluster, a MapReduce job and a leader crash, in {}\n",
            self.workspace.path.display()
        ));

        let start = self.begin(1, "starting a 3-node KV cluster");
        let (client, leader) = self.start_cluster().await?;
        self.say.done(start);
        let ports = self
            .endpoints
            .iter()
            .map(|e| e.port().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        self.say.detail(&format!(
            "servers 1-3 on 127.0.0.1 ports {ports}; server {} leads (term {})",
            leader.id, leader.term
        ));

        // Short enough that the live progress after it fits an 80-column line.
        let title = format!(
            "counting words in {} books with MapReduce, {} workers",
            shoal_mr::local::BUNDLED_BOOKS.len(),
            self.args.workers
        );
        let start = self.begin(2, &title);
        let (report, maps) = self.word_count().await?;
        let top = shoal_mr::local::top_counts(&report.outputs, self.args.top)
            .context("reading the MapReduce output")?;
        if top.is_empty() {
            bail!("the word count produced no words");
        }
        self.say.done(start);
        let secs = report.elapsed.as_secs_f64().max(1e-6);
        self.say.detail(&format!(
            "{maps} map tasks, {} reduce tasks, {:.1} MB in {secs:.2} s; output in {}",
            report.outputs.len(),
            report.input_bytes as f64 / 1e6,
            self.workspace.path.join("mr-out").display()
        ));

        let start = self.begin(3, &format!("storing the top {} words in the KV", top.len()));
        let mut client = client;
        let summary = format!(
            "the {} most frequent words of {} bundled books ({:.1} MB), counted by MapReduce",
            top.len(),
            shoal_mr::local::BUNDLED_BOOKS.len(),
            report.input_bytes as f64 / 1e6
        );
        let mut stored = Vec::with_capacity(top.len() + 1);
        for (i, (word, count)) in top.iter().enumerate() {
            stored.push((top_key(i, top.len()), format!("{word} {count}")));
        }
        stored.push((SUMMARY_KEY.to_string(), summary));
        for (key, value) in &stored {
            let put = client.put(key.as_bytes(), value.as_bytes(), Expected::Any);
            match with_majority(&mut self.servers, put)
                .await?
                .with_context(|| format!("storing {key}"))?
            {
                PutOutcome::Written(_) => {}
                other => bail!("storing {key}: unexpected answer {other:?}"),
            }
        }
        self.say.done(start);
        self.say.detail(&format!(
            "{} writes ({} … {}, {SUMMARY_KEY}), each acknowledged once fsynced on a majority",
            stored.len(),
            stored[0].0,
            stored[top.len() - 1].0
        ));

        let leader = self.leader().await?;
        let pid = self
            .server(leader.id)
            .ok_or_else(|| anyhow!("the leader's id {} is not one of ours", leader.id))?
            .pid()
            .ok_or_else(|| anyhow!("server {} (the leader) has exited", leader.id))?;
        let start = self.begin(
            4,
            &format!(
                "SIGKILL the leader: server {} (pid {pid}, term {})",
                leader.id, leader.term
            ),
        );
        self.kill_server(leader.id).await?;
        let killed = now();
        self.say.done(start);

        let start = self.begin(5, "reading the words back through the survivors");
        let mut read = Vec::with_capacity(stored.len());
        let mut failover = None;
        for (key, _) in &stored {
            let get = client.get(key.as_bytes());
            let value = with_majority(&mut self.servers, get)
                .await?
                .with_context(|| format!("reading {key}"))?
                .map(|(value, _version)| String::from_utf8_lossy(&value).into_owned());
            failover.get_or_insert_with(|| killed.elapsed());
            read.push((key.clone(), value, client.last_server()));
        }
        let failover = failover.unwrap_or_default();
        for ((key, want), (_, got, _)) in stored.iter().zip(&read) {
            match got {
                Some(got) if got == want => {}
                Some(got) => bail!("{key} reads {got:?}, but {want:?} was stored"),
                None => bail!("{key} is missing, but {want:?} was stored"),
            }
        }
        let answered_by = read.last().and_then(|(_, _, server)| *server);
        let new_leader = self.new_leader(leader.id).await?;
        self.say.done(start);
        self.say.detail(&format!(
            "all {} words read back match what was stored (linearizable reads, answered by \
             server {})",
            top.len(),
            answered_by.map_or("?".to_string(), |s| s.to_string())
        ));
        self.say.table(&top);
        self.say.detail(&format!(
            "leader changed: server {} -> server {} (term {} -> {})",
            leader.id, new_leader.id, leader.term, new_leader.term
        ));
        self.say.detail(&format!(
            "failover: {:.2} s from the SIGKILL to the first successful read",
            failover.as_secs_f64()
        ));

        Ok(Tour {
            words: top.len(),
            old_leader: leader.id,
            new_leader,
            failover,
        })
    }

    /// Prints the step's title and makes it the current step.
    fn begin(&mut self, step: usize, title: &str) -> Instant {
        self.step = step;
        self.say.begin(step, title);
        now()
    }

    /// Step 1: spawns the servers and waits until one of them leads.
    async fn start_cluster(&mut self) -> Result<(Client, ServerStatus)> {
        self.endpoints = shoal_cluster::free_local_addrs(SERVERS)?;
        let peers = shoal_cluster::peers_arg(&self.endpoints);
        let exe = std::env::current_exe().context("locating the shoal executable")?;
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let id = i + 1;
            let log = self.workspace.path.join(format!("node{id}.log"));
            let spec = child_spec(format!("server {id}"), &exe, log)
                .args(["kv", "server", "--id", &id.to_string()])
                .args(["--listen", &endpoint.to_string(), "--peers", &peers])
                .arg("--data")
                .arg(self.workspace.path.join(format!("node{id}")));
            self.servers.spawn(spec)?;
        }
        let mut config = ClientConfig::new(self.endpoints.clone());
        config.op_timeout = OP_TIMEOUT;
        let client = Client::new(config).context("creating the KV client")?;
        // A server that exits meanwhile (a port taken, a refused flag) fails the wait at once,
        // quoting its log.
        let leader = self
            .servers
            .wait_for(
                "server became leader",
                STARTUP_TIMEOUT,
                Duration::from_millis(50),
                || client.find_leader(STATUS_TIMEOUT),
            )
            .await?;
        Ok((client, leader))
    }

    /// Step 2: the word count, with a one-line progress display on a terminal.
    async fn word_count(&mut self) -> Result<(JobReport, usize)> {
        let dir = &self.workspace.path;
        let books = shoal_mr::local::write_bundled_books(&dir.join("books"))
            .context("writing the bundled books")?;
        let job = prepare_job(JobOptions {
            app: AppConfig {
                name: "wordcount".into(),
                pattern: None,
                mapper: None,
                reducer: None,
                shipped: Vec::new(),
                sort: None,
            },
            inputs: books,
            split_size_bytes: 64 << 20,
            reduces: 10,
            memory_bytes: 64 << 20,
            task_timeout: Duration::from_secs(10),
            max_attempts: 4,
            backup_tasks: true,
            out_dir: dir.join("mr-out"),
        })
        .context("planning the job")?;
        let maps = job.splits.len();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("listening on 127.0.0.1 for workers")?;
        let addr = listener.local_addr().context("reading the port")?;
        let exe = std::env::current_exe().context("locating the shoal executable")?;
        for i in 1..=self.args.workers {
            let work = dir.join("mr-work").join(format!("worker{i}"));
            std::fs::create_dir_all(&work)
                .with_context(|| format!("creating {}", work.display()))?;
            let log = dir.join(format!("worker{i}.log"));
            let spec = child_spec(format!("worker {i}"), &exe, log)
                .args(["mr", "worker", "--coordinator", &addr.to_string()])
                .arg("--work-dir")
                .arg(&work)
                .args(["--shuffle-listen", "127.0.0.1:0"]);
            self.workers.spawn(spec)?;
        }
        let (publisher, feed) = shoal_runtime::mr::status_channel();
        let mut rx = feed.subscribe();
        let job_future = shoal_runtime::mr::run_job(
            job,
            shoal_runtime::tls::Security::plain(),
            listener,
            publisher,
            std::future::pending(),
        );
        tokio::pin!(job_future);
        let deadline = tokio::time::sleep(JOB_TIMEOUT);
        tokio::pin!(deadline);
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        let report = loop {
            tokio::select! {
                r = &mut job_future => break r.context("the MapReduce job failed")?,
                _ = poll.tick() => {
                    let s = rx.borrow_and_update().clone();
                    self.say.progress(&format!(
                        "map {}/{} reduce {}/{}",
                        s.maps_done, s.maps_total, s.reduces_done, s.reduces_total
                    ));
                    if self.workers.all_exited() {
                        // Workers exit once told the job is over, which may be noticed here
                        // just before the coordinator returns: give it a moment.
                        match tokio::time::timeout(Duration::from_secs(2), &mut job_future).await {
                            Ok(r) => break r.context("the MapReduce job failed")?,
                            Err(_) => bail!("every worker process exited before the job finished"),
                        }
                    }
                }
                _ = &mut deadline => bail!("the job did not finish within {} s", JOB_TIMEOUT.as_secs()),
            }
        };
        // The workers exit on their own once told the job is over.
        let deadline = now() + WORKER_EXIT_GRACE;
        while !self.workers.all_exited() && now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.workers.stop(STOP_GRACE);
        self.workers.expect_exits();
        Ok((report, maps))
    }

    /// The current leader, asked of every server (retried while an election runs).
    async fn leader(&self) -> Result<ServerStatus> {
        let deadline = now() + STARTUP_TIMEOUT;
        loop {
            if let Some(leader) = self.client()?.find_leader(STATUS_TIMEOUT).await {
                return Ok(leader);
            }
            if now() > deadline {
                bail!("no server answers as leader");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader once it is another server than `old`.
    async fn new_leader(&self, old: u64) -> Result<ServerStatus> {
        let deadline = now() + STARTUP_TIMEOUT;
        loop {
            let leader = self.client()?.find_leader(STATUS_TIMEOUT).await;
            match leader {
                Some(leader) if leader.id != old => return Ok(leader),
                _ if now() > deadline => {
                    bail!("no server other than {old} answers as leader")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Server `id` (1-based).
    fn server(&mut self, id: u64) -> Option<&mut Proc> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.servers.get_mut(index)
    }

    fn client(&self) -> Result<Client> {
        Client::new(ClientConfig::new(self.endpoints.clone())).context("creating a KV client")
    }

    /// Step 4: `kill(pid, SIGKILL)` on server `id`, then reaps it.
    async fn kill_server(&mut self, id: u64) -> Result<()> {
        let proc = self.server(id).ok_or_else(|| anyhow!("no server {id}"))?;
        if !proc.is_running() {
            bail!("server {id} had already exited");
        }
        let status = proc.kill();
        tracing::debug!(id, ?status, "leader killed");
        Ok(())
    }

    /// Step 6 (or the cleanup after a failure), and the closing lines.
    fn finish(mut self, result: Option<Result<Tour>>) -> Result<ExitCode> {
        let tour = match result {
            Some(Ok(tour)) => tour,
            Some(Err(e)) => return self.abandon(Some(e)),
            None => return self.abandon(None),
        };
        let dir = self.workspace.path.clone();
        let start = if self.args.keep {
            self.begin(6, "stopping every process")
        } else {
            self.begin(
                6,
                &format!("stopping every process, removing {}", dir.display()),
            )
        };
        self.servers.stop(STOP_GRACE);
        self.workers.stop(STOP_GRACE);
        let kept = self.workspace.release();
        self.say.done(start);
        if let Some(path) = kept {
            self.say.detail(&format!(
                "kept {} (node*/ data, node*.log, worker*.log, mr-out/)",
                path.display()
            ));
        }
        self.say.line(&format!(
            "\nWhat happened: MapReduce counted the words of {} books; a replicated database\n\
             stored the top {} (each write on a majority's disk) and lost its leader to SIGKILL;\n\
             the two survivors elected server {} and {:.2} s later answered with exactly what\n\
             was stored. Nothing is left running, nothing was lost.\n",
            shoal_mr::local::BUNDLED_BOOKS.len(),
            tour.words,
            tour.new_leader.id,
            tour.failover.as_secs_f64()
        ));
        self.say.line(
            "Try next:\n  \
             shoal kv up             # a 3-node cluster of your own (then: shoal kv --help)\n  \
             shoal mr run --help     # MapReduce on your own files, or several hosts\n  \
             shoal bench kv          # the database's throughput and latency",
        );
        if self.say.quiet {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "demo ok: {} words stored, leader server {} SIGKILLed, read back through server {} \
                 after {:.2} s",
                tour.words,
                tour.old_leader,
                tour.new_leader.id,
                tour.failover.as_secs_f64()
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl Demo {
    /// Cleans up after a failed (`Some(error)`) or interrupted tour, saying which step it was.
    fn abandon(mut self, error: Option<anyhow::Error>) -> Result<ExitCode> {
        self.say.end(if error.is_some() {
            "failed"
        } else {
            "interrupted"
        });
        let step = self.step;
        let what = step_name(step);
        let logs = match step {
            2 => self.workers.logs(),
            _ => self.servers.logs(),
        };
        if error.is_some() {
            report_exits(&mut self.servers);
            report_exits(&mut self.workers);
        }
        self.servers.stop(STOP_GRACE);
        self.workers.stop(STOP_GRACE);
        if error.is_some() {
            print_log_tails(&logs);
        }
        match self.workspace.release() {
            Some(path) => eprintln!("shoal demo: stopped every process; kept {}", path.display()),
            None => eprintln!(
                "shoal demo: stopped every process and removed its directory (--keep keeps it, \
                 with the logs)"
            ),
        }
        match error {
            None => {
                eprintln!("shoal demo: interrupted during step {step}/{STEPS} ({what})");
                Ok(ExitCode::from(130))
            }
            Some(e) => Err(e.context(format!("step {step}/{STEPS} ({what}) failed"))),
        }
    }
}

/// Runs a KV operation, but fails at once (instead of at the operation's timeout) if so many
/// servers have exited that no majority is left to answer it.
async fn with_majority<T>(
    servers: &mut Procs,
    op: impl std::future::Future<Output = T>,
) -> Result<T> {
    let majority = SERVERS / 2 + 1;
    let lost = async {
        loop {
            let running = servers.running();
            if running < majority {
                return anyhow!(
                    "only {running} of {SERVERS} servers are running: no majority to answer ({})",
                    servers.exits().join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = op => Ok(r),
        e = lost => Err(e),
    }
}

fn step_name(step: usize) -> &'static str {
    match step {
        0 => "preparing the directory",
        1 => "starting the KV cluster",
        2 => "the MapReduce word count",
        3 => "storing the words in the KV",
        4 => "killing the leader",
        5 => "reading the words back",
        _ => "cleaning up",
    }
}

/// `top/01` … for up to 99 words, `top/001` … beyond.
fn top_key(index: usize, count: usize) -> String {
    let width = count.to_string().len().max(2);
    format!("top/{:0width$}", index + 1)
}

/// The demo's only clock read. clippy.toml forbids `Instant::now` because protocol code must
/// take time from its driver; the demo reports wall-clock timings and bounds its waits.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// Says which processes died unexpectedly (before the demo stops the rest).
fn report_exits(procs: &mut Procs) {
    for p in procs.iter_mut() {
        if p.exit_expected() {
            continue;
        }
        if let Some(status) = p.try_exit() {
            eprintln!("shoal demo: {} had exited ({status})", p.name());
        }
    }
}

/// A child of the demo: its stdout and stderr in a fresh `log`, plain text, in a process
/// group of its own (a Ctrl-C in the terminal reaches only the demo, which then stops its
/// children itself, in order, and says which step was interrupted). The supervisor gives it
/// the parent-death signal: `run` spawns from the main thread, which the signal follows, so a
/// SIGKILLed demo takes its children along.
fn child_spec(name: String, exe: &Path, log: PathBuf) -> Spec {
    Spec::new(name, exe, log)
        .env("NO_COLOR", "1")
        .own_process_group()
}

fn print_log_tails(logs: &[(String, PathBuf)]) {
    for (name, path) in logs {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            continue;
        }
        eprintln!("--- last lines of {name}'s log ({}):", path.display());
        for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
            eprintln!("    {line}");
        }
    }
}

/// The demo's directory: a fresh temporary one, or --dir.
struct Workspace {
    path: PathBuf,
    /// The temporary directory (removed on drop unless released).
    temp: Option<tempfile::TempDir>,
    /// --dir was created by us (so the whole of it goes at the end).
    created: bool,
    keep: bool,
    released: bool,
}

impl Workspace {
    fn new(dir: Option<&Path>, keep: bool) -> Result<Workspace> {
        match dir {
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("shoal-demo-")
                    .tempdir()
                    .context("creating a temporary directory")?;
                Ok(Workspace {
                    path: temp.path().to_path_buf(),
                    temp: Some(temp),
                    created: false,
                    keep,
                    released: false,
                })
            }
            Some(dir) => {
                let created = !dir.exists();
                if !created {
                    let mut entries = std::fs::read_dir(dir).with_context(|| {
                        format!("--dir {}: not a readable directory", dir.display())
                    })?;
                    if entries.next().is_some() {
                        bail!(
                            "--dir {} is not empty (the demo needs a directory of its own)",
                            dir.display()
                        );
                    }
                }
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = std::path::absolute(dir)
                    .with_context(|| format!("resolving {}", dir.display()))?;
                Ok(Workspace {
                    path,
                    temp: None,
                    created,
                    keep,
                    released: false,
                })
            }
        }
    }

    /// Removes the directory (or, for an existing --dir, what the demo put in it), unless
    /// --keep: then returns its path.
    fn release(&mut self) -> Option<PathBuf> {
        if self.released {
            return None;
        }
        self.released = true;
        if self.keep {
            if let Some(temp) = self.temp.take() {
                let _ = temp.keep();
            }
            return Some(self.path.clone());
        }
        if let Some(temp) = self.temp.take() {
            let _ = temp.close();
        } else if self.created {
            let _ = std::fs::remove_dir_all(&self.path);
        } else if let Ok(entries) = std::fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
        None
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.release();
    }
}

/// The demo's screen output: step lines as it goes (a live progress line on a terminal), or
/// nothing with --quiet. A closed stdout is ignored.
struct Say {
    quiet: bool,
    terminal: bool,
    /// The step line that is open (its title printed, its timing not yet).
    open: Option<(usize, String)>,
}

impl Say {
    fn new(quiet: bool) -> Say {
        Say {
            quiet,
            terminal: std::io::stdout().is_terminal(),
            open: None,
        }
    }

    fn print(&self, text: &str) {
        if self.quiet {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    fn line(&self, text: &str) {
        self.print(&format!("{text}\n"));
    }

    fn begin(&mut self, step: usize, title: &str) {
        self.print(&format!("[{step}/{STEPS}] {title} … "));
        self.open = Some((step, title.to_string()));
    }

    /// Rewrites the open step line with `status` after its title (terminals only).
    fn progress(&self, status: &str) {
        if let (true, Some((step, title))) = (self.terminal, &self.open) {
            self.print(&format!("\r\x1b[K[{step}/{STEPS}] {title} … {status}"));
        }
    }

    /// Ends the open step line with `end`.
    fn end(&mut self, end: &str) {
        if let Some((step, title)) = self.open.take() {
            if self.terminal {
                // Rewrite the line: progress may have been written after the title.
                self.line(&format!("\r\x1b[K[{step}/{STEPS}] {title} … {end}"));
            } else {
                self.line(end);
            }
        }
    }

    fn done(&mut self, start: Instant) {
        self.end(&format!("{:.2} s", start.elapsed().as_secs_f64()));
    }

    fn detail(&self, text: &str) {
        self.line(&format!("      {text}"));
    }

    fn table(&self, words: &[(String, u64)]) {
        let width = words.iter().map(|(w, _)| w.len()).max().unwrap_or(4).max(4);
        let mut text = format!("\n      {:>4}  {:<width$}  {:>8}\n", "#", "WORD", "COUNT");
        for (i, (word, count)) in words.iter().enumerate() {
            text.push_str(&format!("      {:>4}  {word:<width$}  {count:>8}\n", i + 1));
        }
        text.push('\n');
        self.print(&text);
    }
}
