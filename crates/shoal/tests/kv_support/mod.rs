//! Real `shoal kv server` processes on 127.0.0.1 for the KV tests: start, SIGKILL, SIGSTOP,
//! restart from disk, find the leader with `shoal kv status`. The servers are supervised by
//! `shoal_cluster` (the same supervisor as `kv up`, `demo` and the benchmarks): every child is
//! killed on Drop, and dies with the test process even if that is killed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

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
        let out = self.cli_within("1", &["status", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
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
