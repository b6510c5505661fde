//! Helpers shared by the MapReduce real-process tests (included with `mod mr_support;`):
//! starting the built `shoal` binary as coordinator and workers in a test's own temporary
//! directory, killing every child on drop, reading outputs.
// Tests wait on wall-clock time (liveness bounds only).
#![allow(
    dead_code,
    clippy::disallowed_methods,
    clippy::len_without_is_empty,
    clippy::new_without_default
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The eight books of the lab.
pub fn books() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/gutenberg");
    let mut books: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata/gutenberg")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    books.sort();
    assert_eq!(
        books.len(),
        8,
        "expected the eight lab books in {}",
        dir.display()
    );
    books
}

/// The built binary, with logs at `warn` unless the test run sets SHOAL_LOG.
pub fn shoal() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
    if std::env::var_os("SHOAL_LOG").is_none() {
        cmd.env("SHOAL_LOG", "warn");
    }
    cmd
}

/// Every child process of a test, supervised by `shoal_cluster` (the same kill and reap rules
/// as every local cluster of Shoal): all are SIGKILLed and reaped on drop (also on panic). The
/// tests spawn the children themselves, with the pipes they read, and hand them over; the list
/// is shared with the threads of a test.
#[derive(Default, Clone)]
pub struct Procs(Arc<Mutex<shoal_cluster::Procs>>);

impl Procs {
    /// Adds a child; returns its index.
    pub fn add(&self, child: Child) -> usize {
        let mut procs = self.0.lock().unwrap();
        let name = format!("child {}", procs.len());
        procs.adopt(name, child)
    }

    /// Runs `f` on child `i`.
    fn with<T>(&self, i: usize, f: impl FnOnce(&mut shoal_cluster::Proc) -> T) -> T {
        let mut procs = self.0.lock().unwrap();
        f(procs.get_mut(i).expect("a child of this test"))
    }

    /// Pid of child `i` (also once it exited).
    pub fn pid(&self, i: usize) -> u32 {
        self.with(i, |p| p.last_pid())
    }

    /// Exit status of child `i` if it has exited.
    pub fn try_wait(&self, i: usize) -> Option<ExitStatus> {
        self.with(i, |p| p.try_exit())
    }

    /// Waits up to `timeout` for child `i`.
    pub fn wait(&self, i: usize, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait(i) {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for child `i` and returns its exit code and what it wrote to its
    /// stdout and stderr (where piped; read while it runs, so a full pipe never blocks it).
    pub fn wait_with_output(
        &self,
        i: usize,
        timeout: Duration,
    ) -> Option<(Option<i32>, String, String)> {
        let (out, err) = self.with(i, |p| {
            let child = p.child_mut();
            (child.stdout.take(), child.stderr.take())
        });
        fn reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut s);
                }
                s
            })
        }
        let (out, err) = (reader(out), reader(err));
        let status = self.wait(i, timeout)?;
        Some((
            status.code(),
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        ))
    }

    /// SIGKILLs child `i` (SIGCONT first, in case it is stopped) and reaps it.
    pub fn kill(&self, i: usize) {
        self.with(i, |p| p.kill());
    }

    /// Number of children.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Indexes of children that have exited.
    pub fn exited(&self) -> Vec<usize> {
        let mut procs = self.0.lock().unwrap();
        (0..procs.len())
            .filter(|&i| procs.get_mut(i).is_some_and(|p| p.try_exit().is_some()))
            .collect()
    }

    /// Stderr of child `i`, once it exited (stderr must have been piped).
    pub fn stderr(&self, i: usize) -> String {
        self.with(i, |p| {
            let mut s = String::new();
            if let Some(e) = p.child_mut().stderr.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        })
    }
}

/// A test's world: a temporary directory (the processes' working directory, as in the lab's
/// `mr-tmp/`) and its processes.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub procs: Procs,
}

/// A started coordinator.
pub struct Coord {
    pub index: usize,
    /// Its stderr (a file, so a chatty coordinator never blocks on a full pipe).
    pub log: PathBuf,
    pub addr: String,
    pub http: Option<String>,
}

impl Lab {
    pub fn new() -> Lab {
        Lab {
            dir: tempfile::tempdir().expect("tempdir"),
            procs: Procs::default(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn out(&self) -> PathBuf {
        self.path().join("out")
    }

    /// Starts `shoal mr coordinator --listen 127.0.0.1:0 --out OUT ARGS… INPUTS…` and reads the
    /// address it listens on from its first line of stdout.
    pub fn coordinator(&self, args: &[&str], inputs: &[PathBuf]) -> Coord {
        let log = self
            .path()
            .join(format!("coordinator-{}.log", self.procs.len()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = shoal();
        cmd.current_dir(self.path())
            .args(["mr", "coordinator", "--listen", "127.0.0.1:0", "--out"])
            .arg(self.out())
            .args(args)
            .args(inputs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        let mut child = cmd.spawn().expect("spawn coordinator");
        let stdout = child.stdout.take().expect("stdout");
        let index = self.procs.add(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
        });
        let mut addr = None;
        let mut http = None;
        let want_http = args.contains(&"--http");
        let deadline = Instant::now() + Duration::from_secs(20);
        while addr.is_none() || (want_http && http.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!(
                    "coordinator printed no address; stderr: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            };
            if let Some(a) = line.strip_prefix("listening on ") {
                addr = Some(a.trim().to_string());
            }
            if let Some(rest) = line.strip_prefix("status page on http://") {
                http = rest.split('/').next().map(str::to_string);
            }
        }
        Coord {
            index,
            log,
            addr: addr.unwrap(),
            http,
        }
    }

    /// Starts a worker of `coord` in the lab directory; returns its index.
    pub fn worker(&self, coord: &Coord, extra: &[&str]) -> usize {
        let work = self.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let child = shoal()
            .current_dir(self.path())
            .args(["mr", "worker", "--coordinator", &coord.addr, "--work-dir"])
            .arg(&work)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn worker");
        self.procs.add(child)
    }

    /// Waits for the coordinator to exit successfully, with a liveness bound.
    pub fn expect_success(&self, coord: &Coord, timeout: Duration) {
        match self.procs.wait(coord.index, timeout) {
            Some(s) if s.success() => {}
            Some(s) => panic!("coordinator failed ({s}): {}", self.log(coord)),
            None => panic!("coordinator did not finish within {timeout:?}"),
        }
    }

    /// The coordinator's stderr so far.
    pub fn log(&self, coord: &Coord) -> String {
        std::fs::read_to_string(&coord.log).unwrap_or_default()
    }

    /// The sequential reference output of `app` (sorted, non-empty lines).
    pub fn seq(&self, app_args: &[&str], inputs: &[PathBuf]) -> Vec<String> {
        let out = self.path().join(format!("seq-{}.txt", rand_suffix()));
        let status = shoal()
            .current_dir(self.path())
            .args(["mr", "seq", "--out"])
            .arg(&out)
            .args(app_args)
            .args(inputs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run seq");
        assert!(status.success(), "shoal mr seq failed");
        sorted_lines(&[out])
    }

    /// Sorted, non-empty lines of every `mr-out-*` in the output directory.
    pub fn output(&self) -> Vec<String> {
        sorted_lines(&mr_outs(&self.out()))
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `mr-out-*` files of a directory.
pub fn mr_outs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("mr-out-"))
        })
        .collect()
}

/// `sort FILES | grep .`
pub fn sorted_lines(files: &[PathBuf]) -> Vec<String> {
    let mut lines = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).unwrap_or_default();
        lines.extend(
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
    }
    lines.sort();
    lines
}

/// Asserts two sorted outputs are equal, showing the first difference.
pub fn assert_same(got: &[String], want: &[String]) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "outputs differ: {} lines vs {} expected; first difference at line {first}: {:?} vs {:?}",
            got.len(),
            want.len(),
            got.get(first),
            want.get(first)
        );
    }
    assert!(!got.is_empty(), "empty output");
}

/// GET `path` from an HTTP server at `addr` (HTTP/1.0, whole body).
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (_, body) = resp.split_once("\r\n\r\n")?;
    Some(body.to_string())
}

/// The coordinator's `/status.json`.
pub fn status(http: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&http_get(http, "/status.json")?).ok()
}

/// The final status a finished job leaves in its output directory: `_status.html` (a page
/// with the timeline's SVG) and `_status.json` (parsed and returned). Panics if either is
/// missing or malformed, or a temporary file of theirs is left.
pub fn final_status(out: &Path) -> serde_json::Value {
    let html = std::fs::read_to_string(out.join("_status.html")).expect("_status.html");
    assert!(
        html.contains("<svg") && html.contains("</svg>") && html.ends_with("</html>\n"),
        "not a whole page with a timeline:\n{html}"
    );
    assert!(!html.contains("location.reload"), "the final page reloads");
    let json = std::fs::read_to_string(out.join("_status.json")).expect("_status.json");
    let leftovers: Vec<_> = std::fs::read_dir(out)
        .expect("list the output directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("_status.json: {e}:\n{json}"))
}

/// The attempts in a final status that ran on the worker whose process id is `pid`.
pub fn attempts_of_pid(status: &serde_json::Value, pid: u32) -> Vec<serde_json::Value> {
    let suffix = format!(":{pid}");
    let id = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["name"].as_str().is_some_and(|n| n.ends_with(&suffix)))
        .and_then(|w| w["id"].as_u64())
        .expect("the worker is listed");
    status["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter(|a| a["worker"].as_u64() == Some(id))
        .cloned()
        .collect()
}
