//! An example MapReduce app in Rust: counts word bigrams ("the cat", "cat sat", ...).
//!
//! Shows the `App` trait: `map` emits pairs, `reduce` folds the values of one key, the
//! native summing combiner shrinks map output, and a user counter is reported as
//! `user.bigram.lines_without_words`. Shoal loads no plugins (DESIGN.md §7): to ship an app
//! in the `shoal` binary, add it under `crates/mr/src/apps/` and register its name in
//! `build_app`; to run your own code without rebuilding, use the `stream` app instead (see
//! `streaming/`). This file is compiled and tested by `crates/mr/tests/data_example_app.rs`.

use shoal_mr::app::{App, Combiner, Emit};
use shoal_mr::apps::text::for_each_word;

/// Counts pairs of consecutive words within a line, lower-cased.
pub struct Bigrams;

impl App for Bigrams {
    fn name(&self) -> &str {
        "bigrams"
    }

    fn map(&self, _name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        let mut key = Vec::new();
        // Lines end with '\n'; the last one may not.
        let body = contents.strip_suffix(b"\n").unwrap_or(contents);
        if body.is_empty() {
            return Ok(());
        }
        for line in body.split(|&b| b == b'\n') {
            let mut previous: Option<Vec<u8>> = None;
            let mut words = 0u64;
            for_each_word(line, |word| {
                let word = word.to_ascii_lowercase();
                if let Some(prev) = &previous {
                    key.clear();
                    key.extend_from_slice(prev);
                    key.push(b' ');
                    key.extend_from_slice(&word);
                    emit.emit(&key, b"1");
                }
                previous = Some(word);
                words += 1;
            });
            if words == 0 {
                emit.counter("bigram.lines_without_words", 1);
            }
        }
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let mut total = 0u64;
        for v in values {
            total += std::str::from_utf8(v)?.parse::<u64>()?;
        }
        out.extend_from_slice(total.to_string().as_bytes());
        Ok(())
    }

    /// Values are decimal counts: let the engine sum them in the map buffer.
    fn combiner(&self) -> Combiner {
        Combiner::SumDecimal
    }
}
