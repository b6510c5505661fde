//! `indexer`: word → `N doc1,doc2,...`, the documents (map input names) containing the word,
//! sorted in byte order, each once.

use crate::app::{App, Emit};
use crate::apps::{push_decimal, text};
use crate::task::sum_table::SumTable;

/// The inverted index app.
#[derive(Debug, Default, Clone, Copy)]
pub struct Indexer;

impl App for Indexer {
    fn name(&self) -> &str {
        "indexer"
    }

    fn map(&self, name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        // Each word once per split (an in-mapper combiner), using the engine's fast table as
        // a set. Its memory is bounded by the split's distinct words.
        let mut seen = SumTable::default();
        text::for_each_word(contents, |word| {
            seen.add(word, 1);
        });
        seen.drain(|word, _| emit.emit(word, name.as_bytes()));
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let mut docs: Vec<&[u8]> = values.collect();
        docs.sort_unstable();
        docs.dedup();
        push_decimal(out, docs.len() as u64);
        out.push(b' ');
        for (i, doc) in docs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(doc);
        }
        Ok(())
    }
}
