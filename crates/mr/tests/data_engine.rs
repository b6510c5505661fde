//! The map and reduce task engines: equivalence with the sequential reference, spilling under
//! a tiny memory budget, arbitrary bytes in records, corruption and panics.

mod data_common;

use std::path::{Path, PathBuf};

use data_common::{books, run_job, split_lines, write_inputs};
use shoal_mr::app::{build_app, App, AppConfig, Combiner, Emit};
use shoal_mr::seq::run_sequential;
use shoal_mr::split::InputSplit;
use shoal_mr::task::{run_map_task, run_reduce_task};

fn app(name: &str) -> std::sync::Arc<dyn App> {
    let cfg = AppConfig {
        name: name.into(),
        ..AppConfig::default()
    };
    build_app(&cfg, Path::new("/nonexistent")).expect("built-in app")
}

fn seq(app: &dyn App, inputs: &[PathBuf], dir: &Path) -> Vec<Vec<u8>> {
    seq_checked(app, inputs, dir, true)
}

fn seq_checked(app: &dyn App, inputs: &[PathBuf], dir: &Path, check_order: bool) -> Vec<Vec<u8>> {
    let out = dir.join("seq.out");
    run_sequential(app, inputs, &out).expect("sequential");
    let mut lines = split_lines(&std::fs::read(&out).expect("read"));
    let sorted = {
        let mut s = lines.clone();
        s.sort();
        s
    };
    if check_order {
        assert_eq!(lines, sorted, "sequential output must be in key order");
    }
    lines.sort();
    lines
}

/// A smaller corpus than the books, for the slow (unoptimised) test profile.
fn corpus(dir: &Path) -> Vec<PathBuf> {
    books()
        .iter()
        .take(3)
        .map(|b| {
            let bytes = std::fs::read(b).expect("book");
            let p = dir.join(b.file_name().expect("name"));
            std::fs::write(&p, &bytes[..bytes.len().min(150_000)]).expect("write");
            p
        })
        .collect()
}

#[test]
fn distributed_equals_sequential_for_wordcount_and_indexer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = corpus(dir.path());
    for name in ["wordcount", "indexer"] {
        let a = app(name);
        let expected = seq(&*a, &inputs, dir.path());
        let (got, counters) = run_job(
            &*a,
            &inputs,
            64 * 1024,
            5,
            256 << 20,
            &dir.path().join(name),
        )
        .expect("job");
        assert_eq!(got, expected, "{name}");
        assert_eq!(counters.get("map.spills"), 0);
        assert!(counters.get("map.input.bytes") > 0);
        assert_eq!(counters.get("reduce.output.records"), expected.len() as u64);
    }
}

#[test]
fn tiny_memory_budget_spills_and_gives_identical_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = corpus(dir.path());
    const BUDGET: u64 = 64 * 1024;
    let apps: [(&str, std::sync::Arc<dyn App>); 4] = [
        ("wordcount", app("wordcount")),
        ("indexer", app("indexer")),
        ("ones", std::sync::Arc::new(Ones(Combiner::SumDecimal))),
        (
            "ones-no-combiner",
            std::sync::Arc::new(Ones(Combiner::None)),
        ),
    ];
    for (name, a) in apps {
        let expected = seq(&*a, &inputs, dir.path());
        let (got, counters) =
            run_job(&*a, &inputs, 1 << 20, 4, BUDGET, &dir.path().join(name)).expect("job");
        assert_eq!(got, expected, "{name}");
        assert!(counters.get("map.spills") >= 2, "{name}: {counters:?}");
        // Each spill must hold many pairs (not one spill per pair).
        assert!(
            counters.get("map.spills") * 10 <= counters.get("map.output.records"),
            "{name}: too many spills: {counters:?}"
        );
        // wordcount counts in its mapper, so its emitted volume is small; the others emit
        // several times the budget.
        if name != "wordcount" {
            assert!(
                counters.get("map.output.bytes") >= 5 * BUDGET,
                "{name}: intermediate data must be several times the budget: {counters:?}"
            );
        }
    }
    // The same words through the summing combiner and without a combiner.
    let ones = seq(&Ones(Combiner::None), &inputs, dir.path());
    assert_eq!(ones, seq(&*app("wordcount"), &inputs, dir.path()));
}

/// `(word, "1")` per word, like the paper's word count, with a chosen combiner.
struct Ones(Combiner);

impl App for Ones {
    fn map(&self, _name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        shoal_mr::apps::text::for_each_word(contents, |w| emit.emit(w, b"1"));
        Ok(())
    }
    fn reduce(
        &self,
        key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        app("wordcount").reduce(key, values, out)
    }
    fn combiner(&self) -> Combiner {
        self.0
    }
}

fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// Emits records made of awkward bytes and counts them with a custom combiner.
struct Awkward;

impl App for Awkward {
    fn map(&self, _name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        let contents = contents.strip_suffix(b"\n").unwrap_or(contents);
        for line in contents.split(|&b| b == b'\n') {
            let mut key = b"k \t\n\r\0\xff ".to_vec();
            key.push((line.len() % 7) as u8);
            emit.emit(&key, line);
            emit.emit(b"", b"empty key");
            emit.counter("lines", 1);
        }
        Ok(())
    }

    fn reduce(
        &self,
        key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        // Escaped, so that the output stays one line per key.
        let mut v: Vec<&[u8]> = values.collect();
        v.sort();
        out.extend_from_slice(format!("{}|{}|", v.len(), escape(key)).as_bytes());
        for x in v {
            out.extend_from_slice(escape(x).as_bytes());
            out.push(b';');
        }
        Ok(())
    }

    fn combiner(&self) -> Combiner {
        Combiner::None
    }
}

#[test]
fn arbitrary_bytes_round_trip_through_spills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = Vec::new();
    for i in 0..3000 {
        text.extend_from_slice(format!("value {i} with spaces\tand tabs \x01\r").as_bytes());
        text.push(b'\n');
    }
    let inputs = write_inputs(dir.path(), &[("awk", &text)]);
    let expected = seq_checked(&Awkward, &inputs, dir.path(), false);
    let (got, counters) = run_job(
        &Awkward,
        &inputs,
        10_000,
        3,
        16 * 1024,
        &dir.path().join("job"),
    )
    .expect("job");
    assert_eq!(got, expected);
    assert!(counters.get("map.spills") > 0);
    assert_eq!(counters.get("user.lines"), 3000);
    let text: Vec<String> = got
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    // The empty key: one value per line.
    assert!(
        text.iter().any(|l| l.starts_with(" 3000||empty key;")),
        "{:?}",
        &text[..1]
    );
    // One awkward key per distinct line length modulo 7 (lengths 29..=32 here).
    let awkward: Vec<&String> = text
        .iter()
        .filter(|l| l.contains("k \\t\\n\\r\\x00\\xff "))
        .collect();
    assert_eq!(awkward.len(), 4, "{awkward:?}");
    assert!(awkward
        .iter()
        .any(|l| l.contains("|value 0 with spaces\\tand tabs \\x01\\r;")));
}

/// Sums with a custom combiner that also counts how often it ran.
struct CustomSum;

impl App for CustomSum {
    fn map(&self, _name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        for w in contents
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
        {
            emit.emit(w, b"1");
        }
        Ok(())
    }
    fn reduce(
        &self,
        _key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let n: u64 = values
            .map(|v| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum();
        out.extend_from_slice(n.to_string().as_bytes());
        Ok(())
    }
    fn combiner(&self) -> Combiner {
        Combiner::Custom
    }
    fn combine(
        &self,
        key: &[u8],
        values: &mut dyn Iterator<Item = &[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        self.reduce(key, values, out)
    }
}

#[test]
fn custom_combiner_shrinks_map_output_and_keeps_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "x y z x y x\n".repeat(2000);
    let inputs = write_inputs(dir.path(), &[("t", text.as_bytes())]);
    let expected = seq(&CustomSum, &inputs, dir.path());
    assert_eq!(
        expected,
        [b"x 6000".to_vec(), b"y 4000".to_vec(), b"z 2000".to_vec()]
    );
    for budget in [8 * 1024, 1 << 20] {
        let (got, counters) = run_job(
            &CustomSum,
            &inputs,
            5000,
            2,
            budget,
            &dir.path().join(format!("j{budget}")),
        )
        .expect("job");
        assert_eq!(got, expected);
        assert!(counters.get("combine.output.records") < counters.get("map.output.records") / 100);
    }
}

#[test]
fn corrupted_intermediate_file_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "alpha beta gamma delta\n".repeat(500);
    let inputs = write_inputs(dir.path(), &[("t", text.as_bytes())]);
    let split = InputSplit {
        path: inputs[0].clone(),
        offset: 0,
        len: text.len() as u64,
    };
    let a = app("indexer");
    let out = run_map_task(&*a, &split, 0, 1, 1 << 20, &dir.path().join("map")).expect("map");
    let part = &out.partitions[0];
    let mut bytes = std::fs::read(part).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(part, &bytes).expect("write");
    let err = run_reduce_task(
        &*a,
        0,
        &out.partitions,
        1 << 20,
        dir.path(),
        &dir.path().join("o"),
    )
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(
        err.contains("corrupt") && err.contains(&part.display().to_string()),
        "{err}"
    );
    assert!(
        !dir.path().join("o/mr-out-0").exists(),
        "no output from corrupt input"
    );

    // Truncation too.
    std::fs::write(part, &bytes[..mid]).expect("write");
    assert!(run_reduce_task(
        &*a,
        0,
        &out.partitions,
        1 << 20,
        dir.path(),
        &dir.path().join("o")
    )
    .is_err());
}

struct Panicky;

impl App for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }
    fn map(&self, _name: &str, contents: &[u8], emit: &mut dyn Emit) -> anyhow::Result<()> {
        if contents.starts_with(b"boom") {
            panic!("map exploded");
        }
        emit.emit(b"key with space", b"v");
        Ok(())
    }
    fn reduce(
        &self,
        key: &[u8],
        _values: &mut dyn Iterator<Item = &[u8]>,
        _out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        panic!("reduce exploded on {}", String::from_utf8_lossy(key));
    }
}

#[test]
fn app_panics_become_errors_naming_the_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = write_inputs(
        dir.path(),
        &[("ok", b"fine\n" as &[u8]), ("bad", b"x\nboom\n")],
    );
    let split = InputSplit {
        path: inputs[1].clone(),
        offset: 2,
        len: 5,
    };
    let err = run_map_task(&Panicky, &split, 3, 2, 1 << 20, dir.path())
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        err.contains("panicky")
            && err.contains("map exploded")
            && err.contains("bad")
            && err.contains("offset 2"),
        "{err}"
    );
    let split = InputSplit {
        path: inputs[0].clone(),
        offset: 0,
        len: 5,
    };
    let out = run_map_task(&Panicky, &split, 0, 1, 1 << 20, dir.path()).expect("map");
    let err = run_reduce_task(
        &Panicky,
        0,
        &out.partitions,
        1 << 20,
        dir.path(),
        dir.path(),
    )
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(
        err.contains("key with space") && err.contains("reduce exploded"),
        "{err}"
    );
}

#[test]
fn crash_app_counts_are_stable_across_engines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = corpus(dir.path());
    let a = app("nocrash");
    let expected = seq(&*a, &inputs, dir.path());
    let (got, _) =
        run_job(&*a, &inputs, 64 << 20, 10, 1 << 20, &dir.path().join("j")).expect("job");
    assert_eq!(got, expected);
}
