//! `wordcount`: word → number of occurrences (paper §2.1). Counts in the mapper and uses the
//! native summing combiner.

use crate::app::{App, Combiner, Emit};
use crate::apps::{parse_decimal, push_decimal, text};
use crate::task::sum_table::SumTable;

/// Memory of wordcount's in-mapper table before it hands its counts to the engine.
const LOCAL_TABLE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// The word count app: emits `(word, count)` per distinct word of a split (its in-mapper
/// combiner; logically `(word, "1")` per word); reduce sums.
#[derive(Debug, Default, Clone, Copy)]
pub struct WordCount;

impl App for WordCount {
    fn name(&self) -> &str {
        "wordcount"
    }

    fn map(&self, _name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        // In-mapper combining: count the split's words in a local table (keys borrowed from
        // the split until first insertion) and hand the engine one (word, count) pair per
        // distinct word, every LOCAL_TABLE_MAX_BYTES at most. Saves a dynamic call per word
        // (≈ 8% of the job's CPU); the engine's summing combiner merges the batches.
        let mut counts = SumTable::default();
        let mut words = 0u64;
        let mut digits = Vec::with_capacity(20);
        let mut flush = |counts: &mut SumTable, emit: &mut dyn Emit| {
            counts.drain(|word, n| {
                digits.clear();
                push_decimal(&mut digits, n);
                emit.emit(word, &digits);
            });
        };
        text::for_each_word(contents, |word| {
            words += 1;
            if counts.add(word, 1) && counts.bytes() > LOCAL_TABLE_MAX_BYTES {
                flush(&mut counts, emit);
            }
        });
        flush(&mut counts, emit);
        emit.counter("wordcount.words", words);
        Ok(())
    }

    fn reduce(
        &self,
        key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let mut total: u64 = 0;
        for v in values {
            let n = parse_decimal(v).ok_or_else(|| {
                anyhow::anyhow!(
                    "wordcount: value {:?} of key {:?} is not a count",
                    String::from_utf8_lossy(v),
                    String::from_utf8_lossy(key)
                )
            })?;
            total = total.saturating_add(n);
        }
        push_decimal(out, total);
        Ok(())
    }

    fn combiner(&self) -> Combiner {
        Combiner::SumDecimal
    }
}
