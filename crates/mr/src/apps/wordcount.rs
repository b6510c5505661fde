//! `wordcount`: word → number of occurrences (paper §2.1). Uses the native summing combiner.

use crate::app::{App, Combiner, Emit};
use crate::apps::{parse_decimal, push_decimal, text};

/// The word count app: emits `(word, "1")` per word; reduce sums.
#[derive(Debug, Default, Clone, Copy)]
pub struct WordCount;

impl App for WordCount {
    fn name(&self) -> &str {
        "wordcount"
    }

    fn map(&self, _name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        text::for_each_word(contents, |word| emit.emit(word, b"1"));
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
