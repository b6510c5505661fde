//! `grep`: every line matching a regular expression. Key `file:LINENO` with the 1-based line
//! number zero-padded to 10 digits (so keys sort by file, then line), value the line without
//! its newline.

use std::io::Read;

use anyhow::Context;

use crate::app::{App, Emit, MapInput};

/// Width of the zero-padded line number in keys.
pub const LINE_NUMBER_DIGITS: usize = 10;

/// Bytes read at a time when counting the lines before a split.
const COUNT_CHUNK_BYTES: usize = 1 << 20;

/// The grep app.
#[derive(Debug, Clone)]
pub struct Grep {
    regex: regex::bytes::Regex,
}

impl Grep {
    /// Compiles `pattern` (Rust `regex` syntax; matched against each line's raw bytes).
    pub fn new(pattern: &str) -> anyhow::Result<Self> {
        let regex = regex::bytes::Regex::new(pattern)
            .with_context(|| format!("grep: invalid pattern {pattern:?}"))?;
        Ok(Self { regex })
    }

    fn grep(&self, name: &str, first_line: u64, contents: &[u8], emit: &mut dyn Emit) {
        let mut key = Vec::with_capacity(name.len() + 1 + LINE_NUMBER_DIGITS);
        let mut matched = 0u64;
        let mut line_no = first_line;
        let mut rest = contents;
        while !rest.is_empty() {
            let (line, next) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            if self.regex.is_match(line) {
                key.clear();
                key.extend_from_slice(name.as_bytes());
                key.push(b':');
                key.extend_from_slice(format!("{line_no:0LINE_NUMBER_DIGITS$}").as_bytes());
                emit.emit(&key, line);
                matched += 1;
            }
            line_no += 1;
            rest = next;
        }
        emit.counter("grep.matched.lines", matched);
    }
}

/// Counts the lines before `offset` in `path` (a split's first line number minus one).
fn lines_before(path: &std::path::Path, offset: u64) -> anyhow::Result<u64> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("grep: opening {} to number lines", path.display()))?;
    let mut reader = file.take(offset);
    let mut buf = vec![0u8; COUNT_CHUNK_BYTES];
    let mut lines = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("grep: reading {}", path.display()))?;
        if n == 0 {
            return Ok(lines);
        }
        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
    }
}

impl App for Grep {
    fn name(&self) -> &str {
        "grep"
    }

    fn map(&self, name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        self.grep(name, 1, contents, emit);
        Ok(())
    }

    fn map_input(&self, input: &MapInput<'_>, emit: &mut dyn Emit) -> anyhow::Result<()> {
        let first_line = if input.offset == 0 {
            1
        } else {
            lines_before(input.path, input.offset)? + 1
        };
        self.grep(input.name, first_line, input.contents, emit);
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        // One line per key; if the same file was given twice, its copies are identical.
        if let Some(line) = values.next() {
            out.extend_from_slice(line);
        }
        Ok(())
    }
}
