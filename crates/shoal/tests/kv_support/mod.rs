//! Real `shoal kv server` processes on 127.0.0.1 for the KV tests: start, SIGKILL, SIGSTOP,
//! restart from disk, find the leader with `shoal kv status`. Every child is killed on Drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
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
    pub servers: Vec<Option<Child>>,
}

impl Cluster {
    /// Starts `n` servers (ids 1..=n).
    pub fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(n);
        let mut c = Cluster {
            dir,
            ports,
            servers: (0..n).map(|_| None).collect(),
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

    /// A `shoal kv server` command for server `id` with `data` as its directory.
    pub fn server_command(&self, id: u64, data: &Path) -> Command {
        let mut cmd = Command::new(SHOAL);
        cmd.args(["kv", "server", "--id", &id.to_string()])
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.ports[id as usize - 1]),
            ])
            .args(["--peers", &self.peers(), "--data"])
            .arg(data)
            .args(["--snapshot-bytes", "20000"])
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1");
        cmd
    }

    /// (Re)starts server `id` from its data directory, appending its log to `node{id}.log`.
    pub fn restart(&mut self, id: u64) {
        self.kill(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .expect("open the server log");
        let child = self
            .server_command(id, &self.data_dir(id))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a server");
        self.servers[id as usize - 1] = Some(child);
    }

    /// SIGKILLs server `id` (if running).
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.servers[id as usize - 1].take() {
            signal(child.id(), libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.servers[id as usize - 1].as_ref().map(Child::id)
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
            .filter(|&(_, id)| self.servers[id as usize - 1].is_some())
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
        let mut child = Command::new(SHOAL)
            .args([
                "kv",
                "--endpoints",
                &self.endpoints(),
                "--timeout",
                timeout_secs,
            ])
            .arg("shell")
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

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.servers.len() as u64 {
            self.kill(id);
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
