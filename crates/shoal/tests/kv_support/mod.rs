//! Real `shoal kv server` processes on 127.0.0.1 for the KV tests: start, SIGKILL, SIGSTOP,
//! restart from disk, find the leader with `shoal kv status`. The servers are supervised by
//! `shoal_cluster` (the same supervisor as `kv up`, `demo` and the benchmarks): every child is
//! killed on Drop, and dies with the test process even if that is killed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use shoal_check::models::{Expected, KvInput, KvOutput, VersionedKv};
use shoal_check::{check, Budget, HistoryBuilder, Verdict};
use shoal_cluster::{Procs, Spec};
use std::time::Duration;

/// The binary under test.
pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
/// Longest a test waits for one condition.
pub const WAIT: Duration = Duration::from_secs(30);

/// Free ports on 127.0.0.1 (bound together so that they differ, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let probes: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port"))
        .collect();
    probes
        .iter()
        .map(|p| p.local_addr().expect("probe address").port())
        .collect()
}

/// A cluster of server processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
    /// Server `id` in slot `id - 1`.
    pub servers: Procs,
}

impl Cluster {
    /// Starts `n` servers (ids 1..=n).
    pub fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(n);
        let mut c = Cluster {
            dir,
            ports,
            servers: Procs::with_slots(n),
        };
        for id in 1..=n as u64 {
            c.restart(id);
        }
        c
    }

    pub fn peers(&self) -> String {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn endpoints(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}.log"))
    }

    /// The arguments of `shoal kv server` for server `id` with `data` as its directory.
    fn server_args(&self, id: u64, data: &Path) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = ["kv", "server", "--id", &id.to_string()]
            .iter()
            .map(Into::into)
            .collect();
        args.push("--listen".into());
        args.push(format!("127.0.0.1:{}", self.ports[id as usize - 1]).into());
        args.extend(["--peers".into(), self.peers().into(), "--data".into()]);
        args.push(data.into());
        args.extend(["--snapshot-bytes".into(), "20000".into()]);
        args
    }

    /// A `shoal kv server` command for server `id` with `data` as its directory.
    pub fn server_command(&self, id: u64, data: &Path) -> Command {
        let mut cmd = Command::new(SHOAL);
        cmd.args(self.server_args(id, data))
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1");
        cmd
    }

    /// (Re)starts server `id` from its data directory, appending its log to `node{id}.log`.
    pub fn restart(&mut self, id: u64) {
        let spec = Spec::new(format!("server {id}"), SHOAL, self.log_path(id))
            .args(self.server_args(id, &self.data_dir(id)))
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1")
            .append_log()
            .stdout_null();
        self.servers
            .spawn_at(id as usize - 1, spec)
            .expect("start a server");
    }

    /// SIGKILLs server `id` (if running; SIGCONT first, in case it is paused) and reaps it.
    pub fn kill(&mut self, id: u64) {
        self.servers.kill(id as usize - 1);
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.servers.get(id as usize - 1)?.pid()
    }

    /// The running server that answers `shoal kv status` as leader (the highest term's, if
    /// two think they lead).
    pub fn leader(&self) -> Option<u64> {
        let out = self.cli_within("1", &["status", "-o", "json"]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        doc["servers"]
            .as_array()?
            .iter()
            .filter(|v| v["role"] == "leader")
            .filter_map(|v| Some((v["term"].as_u64()?, v["id"].as_u64()?)))
            .filter(|&(_, id)| id >= 1 && self.pid(id).is_some())
            .max()
            .map(|(_, id)| id)
    }

    /// Waits until some running server says it leads.
    #[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
    pub fn wait_leader(&self) -> u64 {
        let start = std::time::Instant::now();
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(start.elapsed() < WAIT, "no leader within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a client command against the cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_within("20", args)
    }

    /// Runs a client command with `--timeout SECS`.
    pub fn cli_within(&self, secs: &str, args: &[&str]) -> Output {
        Command::new(SHOAL)
            .args(["kv", "--endpoints", &self.endpoints(), "--timeout", secs])
            .args(args)
            .output()
            .expect("run shoal kv")
    }

    /// Runs a client command and returns its stdout, asserting success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "shoal kv {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a `shoal kv shell` on the cluster.
    pub fn shell(&self, timeout_secs: &str) -> Shell {
        Shell::start(&[
            "kv",
            "--endpoints",
            &self.endpoints(),
            "--timeout",
            timeout_secs,
            "shell",
        ])
    }
}

impl Shell {
    /// Starts `shoal ARGS` (a `kv … shell` command line).
    pub fn start(args: &[&str]) -> Shell {
        let mut child = Command::new(SHOAL)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a shell");
        let stdin = child.stdin.take().expect("shell stdin");
        let stdout = BufReader::new(child.stdout.take().expect("shell stdout"));
        Shell {
            child,
            stdin,
            stdout,
        }
    }
}

/// A `shoal kv shell` child: one line in, one line out.
pub struct Shell {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Shell {
    /// Sends one line and returns the answer line.
    pub fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to the shell");
        self.stdin.flush().expect("flush the shell");
        let mut answer = String::new();
        let n = self.stdout.read_line(&mut answer).expect("read the shell");
        assert!(n > 0, "the shell exited after {line:?}");
        answer.trim_end_matches('\n').to_string()
    }

    /// Reads one more line of a multi-line answer (`scan`, `status`, `help`).
    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).expect("read the shell");
        assert!(n > 0, "the shell exited in the middle of an answer");
        line.trim_end_matches('\n').to_string()
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process of this test.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits until something accepts TCP connections at `addr`.
#[allow(clippy::disallowed_methods)] // a real-process test: bounded waits on the wall clock
pub fn wait_listening(addr: &str) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < WAIT,
            "nothing listens on {addr} after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A small deterministic RNG (xorshift64*), seeded per test run and printed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed from the clock, for a run that prints it.
#[allow(clippy::disallowed_methods)] // a test's seed, printed: not protocol time
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1
}

/// One recorded operation: (client, input, invoked ns, Some((output, returned ns))).
pub type Record = (u64, KvInput, u64, Option<(KvOutput, u64)>);

/// A shell's answer to a get or put, as the checker's output.
pub fn parse_answer(answer: &str) -> Option<KvOutput> {
    let mut words = answer.splitn(3, ' ');
    match words.next()? {
        "value" => {
            let version = words.next()?.parse().ok()?;
            Some(KvOutput::Found {
                value: words.next().unwrap_or("").to_string(),
                version,
            })
        }
        "nokey" => Some(KvOutput::NoKey),
        "ok" => Some(KvOutput::Written {
            version: words.next()?.parse().ok()?,
        }),
        "mismatch" => Some(KvOutput::VersionMismatch),
        "maybe" => Some(KvOutput::Maybe),
        _ => None,
    }
}

/// A client thread: random gets and conditional puts (usually at the version last seen,
/// sometimes a stale guess) on keys `k0..k{keys}` through `shell` until `stop`, each recorded
/// with this test's clock; a `timeout` answer is an open operation, and the client continues
/// as a new one.
#[allow(clippy::disallowed_methods)] // the history's times come from the test's clock
pub fn client_worker(
    mut shell: Shell,
    c: u64,
    seed: u64,
    keys: u64,
    epoch: std::time::Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Record>> {
    let mut rng = Rng(seed.wrapping_add(c.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
    std::thread::spawn(move || {
        let mut records: Vec<Record> = Vec::new();
        let mut client = c * 1000;
        let mut known: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let key = rng.below(keys);
            let (line, input) = if rng.below(2) == 0 {
                let input = KvInput::Get {
                    key: format!("k{key}"),
                };
                (format!("get k{key}"), input)
            } else {
                let seen = known.get(&key).copied().unwrap_or(0);
                let expected = if rng.below(4) == 0 {
                    seen.saturating_sub(1)
                } else {
                    seen
                };
                n += 1;
                let value = format!("c{c}-{n}");
                (
                    format!("put k{key} {expected} {value}"),
                    KvInput::Put {
                        key: format!("k{key}"),
                        value,
                        expected: Expected::Version(expected),
                    },
                )
            };
            let invoked = epoch.elapsed().as_nanos() as u64;
            let answer = shell.ask(&line);
            let returned = epoch.elapsed().as_nanos() as u64;
            if answer == "timeout" {
                records.push((client, input, invoked, None));
                client += 1;
                continue;
            }
            let output = parse_answer(&answer)
                .unwrap_or_else(|| panic!("unexpected answer {answer:?} to {line:?}"));
            if let KvOutput::Found { version, .. } | KvOutput::Written { version } = &output {
                known.insert(key, *version);
            }
            records.push((client, input, invoked, Some((output, returned))));
        }
        records
    })
}

/// Reads every key once more through `shell` (recorded as part of the history), then checks
/// that every acknowledged put is present (versions only grow: no deletes) and that the
/// history is linearizable under the versioned-KV model. Panics naming `seed` otherwise.
#[allow(clippy::disallowed_methods)] // the history's times come from the test's clock
pub fn final_reads_and_check(
    mut shell: Shell,
    keys: u64,
    epoch: std::time::Instant,
    mut records: Vec<Record>,
    seed: u64,
) {
    let count =
        |records: &[Record], f: &dyn Fn(&Record) -> bool| records.iter().filter(|r| f(r)).count();
    eprintln!(
        "{} operations ({} ok puts, {} maybe, {} timeouts)",
        records.len(),
        count(&records, &|r| matches!(
            r.3,
            Some((KvOutput::Written { .. }, _))
        )),
        count(&records, &|r| matches!(r.3, Some((KvOutput::Maybe, _)))),
        count(&records, &|r| r.3.is_none()),
    );
    let mut final_versions = std::collections::BTreeMap::new();
    for key in 0..keys {
        let invoked = epoch.elapsed().as_nanos() as u64;
        let answer = shell.ask(&format!("get k{key}"));
        let returned = epoch.elapsed().as_nanos() as u64;
        let output = parse_answer(&answer).unwrap_or_else(|| panic!("final read: {answer:?}"));
        if let KvOutput::Found { version, .. } = &output {
            final_versions.insert(format!("k{key}"), *version);
        }
        let input = KvInput::Get {
            key: format!("k{key}"),
        };
        records.push((1_000_000, input, invoked, Some((output, returned))));
    }
    let acked = count(&records, &|r| {
        matches!(r.3, Some((KvOutput::Written { .. }, _)))
    });
    assert!(acked > 0, "seed {seed}: no put was acknowledged");
    for (_, input, _, out) in &records {
        if let (KvInput::Put { key, .. }, Some((KvOutput::Written { version }, _))) = (input, out) {
            let now = final_versions.get(key).copied().unwrap_or(0);
            assert!(
                now >= *version,
                "seed {seed}: acknowledged {key} v{version} lost (now v{now})"
            );
        }
    }
    let mut b = HistoryBuilder::new();
    records.sort_by_key(|r| r.2);
    for (client, input, invoked, out) in records {
        let id = b.invoke(client, input, invoked);
        if let Some((output, returned)) = out {
            b.complete(id, output, returned)
                .expect("complete an operation");
        }
    }
    match check(
        &VersionedKv,
        &b.build(),
        Budget::time(Duration::from_secs(20)),
    ) {
        Verdict::Linearizable => {}
        Verdict::Unknown(r) => panic!("seed {seed}: the checker gave up: {r:?}"),
        Verdict::NotLinearizable(e) => panic!("seed {seed}: not linearizable: {e:?}"),
    }
}
