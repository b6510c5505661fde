//! `stream`: Hadoop-streaming style apps written as external commands.
//!
//! Protocol (see `docs/mapreduce-apps.md`):
//! - the **mapper** (`sh -c MAPPER`, cwd = the ship directory) reads the split's raw bytes on
//!   stdin and writes lines `key<TAB>value\n`; a line without a TAB is a key with an empty
//!   value; the key ends at the first TAB, the value may contain more TABs;
//! - the **reducer** (`sh -c REDUCER`, one process per reduce task) reads all of the task's
//!   pairs as lines `key<TAB>value\n`, sorted by key (byte order), and writes lines
//!   `key<TAB>value\n`, each written to the output as `key value\n` (first TAB → one space;
//!   a line without a TAB is written unchanged). Without a reducer, the identity reducer
//!   writes every pair as `key value\n`.
//! - environment: `SHOAL_MR_INPUT` (input name) and `SHOAL_MR_INPUT_OFFSET` (split offset)
//!   for mappers; a non-zero exit status fails the task with the tail of stderr.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::app::{App, Emit, MapInput, ShippedFile};

/// How much of a command's stderr is kept for the error message.
const STDERR_TAIL_BYTES: usize = 4096;

/// A streaming app.
#[derive(Debug, Clone)]
pub struct Stream {
    mapper: String,
    reducer: Option<String>,
    ship_dir: PathBuf,
}

impl Stream {
    /// A streaming app running `mapper` (and `reducer`, if any) in `ship_dir`.
    pub fn new(mapper: String, reducer: Option<String>, ship_dir: PathBuf) -> Self {
        Self {
            mapper,
            reducer,
            ship_dir,
        }
    }

    fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .current_dir(&self.ship_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

/// Writes shipped files into `ship_dir` (created if missing).
pub fn materialize(files: &[ShippedFile], ship_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(ship_dir)
        .with_context(|| format!("creating {}", ship_dir.display()))?;
    for f in files {
        let plain = Path::new(&f.name).file_name().map(|n| n == f.name.as_str());
        if f.name.is_empty() || f.name == "." || f.name == ".." || plain != Some(true) {
            bail!("shipped file name {:?} must be a plain file name", f.name);
        }
        let path = ship_dir.join(&f.name);
        let tmp = ship_dir.join(format!(".{}.tmp-{}", f.name, std::process::id()));
        std::fs::write(&tmp, &f.contents).with_context(|| format!("writing {}", tmp.display()))?;
        if f.executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    }
    Ok(())
}

/// Collects the last [`STDERR_TAIL_BYTES`] of a child's stderr.
fn read_tail(mut r: impl Read) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * STDERR_TAIL_BYTES {
            tail.drain(..tail.len() - STDERR_TAIL_BYTES);
        }
    }
    if tail.len() > STDERR_TAIL_BYTES {
        tail.drain(..tail.len() - STDERR_TAIL_BYTES);
    }
    tail
}

/// A write error that only means the child stopped reading early.
fn ignorable(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}

/// Splits a `key<TAB>value` line (newline already removed).
fn split_tab(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b'\t', line) {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

fn strip_newline(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

impl App for Stream {
    fn name(&self) -> &str {
        "stream"
    }

    fn map(&self, name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        let input = MapInput {
            name,
            path: Path::new(name),
            offset: 0,
            contents,
        };
        self.map_input(&input, emit)
    }

    fn map_input(&self, input: &MapInput<'_>, emit: &mut dyn Emit) -> anyhow::Result<()> {
        let mut child = self
            .command(&self.mapper)
            .env("SHOAL_MR_INPUT", input.name)
            .env("SHOAL_MR_INPUT_OFFSET", input.offset.to_string())
            .spawn()
            .with_context(|| format!("stream: starting mapper `{}`", self.mapper))?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("stream: mapper pipes missing");
        };
        let contents = input.contents;
        let (write_result, read_result, tail) = std::thread::scope(|s| {
            let writer = s.spawn(move || match stdin.write_all(contents) {
                Err(e) if !ignorable(&e) => Err(e),
                _ => Ok(()),
            });
            let err_reader = s.spawn(move || read_tail(stderr));
            let mut reader = BufReader::with_capacity(1 << 16, stdout);
            let mut line = Vec::new();
            let read_result: std::io::Result<()> = loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) => break Ok(()),
                    Ok(_) => {
                        let (k, v) = split_tab(strip_newline(&line));
                        emit.emit(k, v);
                    }
                    Err(e) => break Err(e),
                }
            };
            let write_result = writer.join();
            let tail = err_reader.join().unwrap_or_default();
            (write_result, read_result, tail)
        });
        let status = child.wait().context("stream: waiting for the mapper")?;
        if !status.success() {
            bail!(
                "stream: mapper `{}` failed ({status}) on {} at offset {}; stderr: {}",
                self.mapper,
                input.name,
                input.offset,
                String::from_utf8_lossy(&tail).trim_end()
            );
        }
        match write_result {
            Ok(r) => r.context("stream: writing the split to the mapper")?,
            Err(_) => bail!("stream: mapper input thread panicked"),
        }
        read_result.context("stream: reading the mapper's output")?;
        Ok(())
    }

    fn reduce(
        &self,
        key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        // Only used if someone calls it directly: the identity reducer keeps the first value.
        let _ = key;
        if let Some(v) = values.next() {
            out.extend_from_slice(v);
        }
        Ok(())
    }

    fn reduces_whole_task(&self) -> bool {
        true
    }

    fn reduce_task_stream(
        &self,
        records: &mut dyn Iterator<Item = (&[u8], &[u8])>,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<()> {
        let Some(reducer) = &self.reducer else {
            for (k, v) in records {
                out.write_all(k)?;
                out.write_all(b" ")?;
                out.write_all(v)?;
                out.write_all(b"\n")?;
            }
            return Ok(());
        };
        let mut child = self
            .command(reducer)
            .spawn()
            .with_context(|| format!("stream: starting reducer `{reducer}`"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("stream: reducer pipes missing");
        };
        let (write_result, read_result, tail) = std::thread::scope(|s| {
            let out_reader = s.spawn(move || -> std::io::Result<()> {
                let mut reader = BufReader::with_capacity(1 << 16, stdout);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    if reader.read_until(b'\n', &mut line)? == 0 {
                        return Ok(());
                    }
                    let body = strip_newline(&line);
                    match memchr::memchr(b'\t', body) {
                        Some(i) => {
                            out.write_all(&body[..i])?;
                            out.write_all(b" ")?;
                            out.write_all(&body[i + 1..])?;
                        }
                        None => out.write_all(body)?,
                    }
                    out.write_all(b"\n")?;
                }
            });
            let err_reader = s.spawn(move || read_tail(stderr));
            let mut w = std::io::BufWriter::with_capacity(1 << 16, stdin);
            let write_result = (|| -> std::io::Result<()> {
                for (k, v) in records {
                    w.write_all(k)?;
                    w.write_all(b"\t")?;
                    w.write_all(v)?;
                    w.write_all(b"\n")?;
                }
                w.flush()
            })();
            drop(w);
            let read_result = out_reader.join();
            let tail = err_reader.join().unwrap_or_default();
            (write_result, read_result, tail)
        });
        let status = child.wait().context("stream: waiting for the reducer")?;
        if !status.success() {
            bail!(
                "stream: reducer `{reducer}` failed ({status}); stderr: {}",
                String::from_utf8_lossy(&tail).trim_end()
            );
        }
        match write_result {
            Err(e) if !ignorable(&e) => {
                return Err(e).context("stream: writing records to the reducer")
            }
            _ => {}
        }
        match read_result {
            Ok(r) => r.context("stream: copying the reducer's output")?,
            Err(_) => bail!("stream: reducer output thread panicked"),
        }
        Ok(())
    }
}
