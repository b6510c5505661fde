//! The example app of `examples/apps/bigrams.rs` compiles and works.

#[path = "../../../examples/apps/bigrams.rs"]
mod bigrams;

mod data_common;

use data_common::{run_job, write_inputs};

#[test]
fn bigram_example_counts_pairs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = write_inputs(
        dir.path(),
        &[("a", b"The cat sat.\n\nthe CAT sat on the mat\n" as &[u8])],
    );
    let (lines, counters) = run_job(
        &bigrams::Bigrams,
        &inputs,
        1 << 20,
        2,
        1 << 20,
        &dir.path().join("job"),
    )
    .expect("job");
    let lines: Vec<String> = lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert_eq!(
        lines,
        [
            "cat sat 2",
            "on the 1",
            "sat on 1",
            "the cat 2",
            "the mat 1"
        ]
    );
    assert_eq!(counters.get("user.bigram.lines_without_words"), 1);
}
