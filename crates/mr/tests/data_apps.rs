//! Semantics of the built-in apps on small inputs.

mod data_common;

use std::path::Path;

use data_common::{run_job, split_lines, write_inputs};
use shoal_mr::app::{build_app, AppConfig, ShippedFile};
use shoal_mr::seq::run_sequential;

fn app(name: &str) -> std::sync::Arc<dyn shoal_mr::app::App> {
    let cfg = AppConfig {
        name: name.into(),
        ..AppConfig::default()
    };
    build_app(&cfg, Path::new("/nonexistent")).expect("built-in app")
}

fn seq_lines(
    app: &dyn shoal_mr::app::App,
    inputs: &[std::path::PathBuf],
    dir: &Path,
) -> Vec<String> {
    let out = dir.join("seq-out");
    run_sequential(app, inputs, &out).expect("sequential run");
    let bytes = std::fs::read(&out).expect("read output");
    split_lines(&bytes)
        .into_iter()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .collect()
}

#[test]
fn wordcount_counts_letter_runs_case_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = write_inputs(
        dir.path(),
        &[
            ("a.txt", b"The cat, the CAT; the cat's hat.\n" as &[u8]),
            (
                "b.txt",
                "na\u{ef}ve caf\u{e9} \u{201c}cat\u{201d}\n".as_bytes(),
            ),
        ],
    );
    let got = seq_lines(&*app("wordcount"), &inputs, dir.path());
    assert_eq!(
        got,
        [
            "CAT 1",
            "The 1",
            "caf\u{e9} 1",
            "cat 3",
            "hat 1",
            "na\u{ef}ve 1",
            "s 1",
            "the 2"
        ]
    );
}

#[test]
fn wordcount_survives_invalid_utf8_and_empty_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = write_inputs(
        dir.path(),
        &[
            (
                "bad.bin",
                b"ab\xffcd \xc3\x28 ab\xe2\x82\n\xf0\x9f" as &[u8],
            ),
            ("empty.txt", b""),
        ],
    );
    let got = seq_lines(&*app("wordcount"), &inputs, dir.path());
    assert_eq!(got, ["ab 2", "cd 1"]);
}

#[test]
fn indexer_lists_each_document_once_sorted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = write_inputs(
        dir.path(),
        &[
            ("d2", b"apple banana apple\n" as &[u8]),
            ("d1", b"banana cherry\nbanana\n"),
        ],
    );
    let d1 = inputs[1].to_string_lossy().into_owned();
    let d2 = inputs[0].to_string_lossy().into_owned();
    let got = seq_lines(&*app("indexer"), &inputs, dir.path());
    assert_eq!(
        got,
        [
            format!("apple 1 {d2}"),
            format!("banana 2 {d1},{d2}"),
            format!("cherry 1 {d1}")
        ]
    );
    // Split into many small pieces: a document still appears once per word.
    let (lines, _) = run_job(
        &*app("indexer"),
        &inputs,
        4,
        3,
        1 << 20,
        &dir.path().join("job"),
    )
    .expect("job");
    let lines: Vec<String> = lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert_eq!(lines, got);
}

#[test]
fn grep_keys_are_file_and_padded_line_number_even_across_splits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = String::new();
    for i in 1..=30 {
        text.push_str(&format!(
            "line {i} {}\n",
            if i % 7 == 0 { "whale" } else { "fish" }
        ));
    }
    let inputs = write_inputs(dir.path(), &[("moby", text.as_bytes())]);
    let cfg = AppConfig {
        name: "grep".into(),
        pattern: Some("wh[ae]le".into()),
        ..AppConfig::default()
    };
    let grep = build_app(&cfg, dir.path()).expect("grep");
    let name = inputs[0].to_string_lossy().into_owned();
    let expected: Vec<String> = [7, 14, 21, 28]
        .iter()
        .map(|i| format!("{name}:{i:010} line {i} whale"))
        .collect();
    assert_eq!(seq_lines(&*grep, &inputs, dir.path()), expected);
    let (lines, counters) =
        run_job(&*grep, &inputs, 50, 2, 1 << 20, &dir.path().join("job")).expect("job");
    let lines: Vec<String> = lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert_eq!(lines, expected);
    assert_eq!(counters.get("user.grep.matched.lines"), 4);
}

#[test]
fn crash_app_without_crashes_matches_the_lab_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = write_inputs(dir.path(), &[("x", b"hello\n" as &[u8]), ("yy", b"")]);
    let x = inputs[0].to_string_lossy().into_owned();
    let yy = inputs[1].to_string_lossy().into_owned();
    let got = seq_lines(&*app("nocrash"), &inputs, dir.path());
    let mut names = [x.clone(), yy.clone()];
    names.sort();
    let mut lens = [x.len().to_string(), yy.len().to_string()];
    lens.sort();
    assert_eq!(
        got,
        [
            format!("a {} {}", names[0], names[1]),
            format!("b {} {}", lens[0], lens[1]),
            "c 0 6".to_owned(),
            "d xyzzy xyzzy".to_owned(),
        ]
    );
}

#[test]
fn stream_app_runs_shipped_scripts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = write_inputs(
        dir.path(),
        &[("in1", b"b a\nc a\n" as &[u8]), ("in2", b"a\tb\n")],
    );
    let mapper = b"#!/bin/sh\ntr -s ' \\t' '\\n\\n' | grep . | sed 's/$/\\t1/'\n";
    let reducer =
        b"#!/bin/sh\nawk -F '\\t' '{c[$1]+=$2} END {for (k in c) print k \"\\t\" c[k]}' | sort\n";
    let cfg = AppConfig {
        name: "stream".into(),
        mapper: Some("./map.sh".into()),
        reducer: Some("./reduce.sh".into()),
        shipped: vec![
            ShippedFile {
                name: "map.sh".into(),
                contents: mapper.to_vec(),
                executable: true,
            },
            ShippedFile {
                name: "reduce.sh".into(),
                contents: reducer.to_vec(),
                executable: true,
            },
        ],
        ..AppConfig::default()
    };
    let work = dir.path().join("work");
    let stream = build_app(&cfg, &work).expect("stream app");
    assert!(work.join("ship/map.sh").exists());
    assert_eq!(
        seq_lines(&*stream, &inputs, dir.path()),
        ["a 3", "b 2", "c 1"]
    );
    let (lines, counters) = run_job(
        &*stream,
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
    assert_eq!(lines, ["a 3", "b 2", "c 1"]);
    assert_eq!(counters.get("reduce.output.records"), 3);
    assert_eq!(counters.get("reduce.input.records"), 6);

    // A failing mapper fails the task with its stderr.
    let bad = AppConfig {
        name: "stream".into(),
        mapper: Some("echo oops >&2; exit 3".into()),
        ..AppConfig::default()
    };
    let bad = build_app(&bad, &work).expect("stream app");
    let err = run_sequential(&*bad, &inputs, &dir.path().join("bad-out"))
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("oops") && err.contains("in1"), "{err}");
}
