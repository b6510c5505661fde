//! The checker must agree with every published verdict of the bundled histories
//! (`testdata/linearizability`: 102 Jepsen etcd logs and six key/value histories).

use std::path::PathBuf;
use std::time::Duration;

use shoal_check::formats::{jepsen_etcd, jepsen_kv};
use shoal_check::models::{AppendKv, Register};
use shoal_check::{check, check_with_options, Budget, CheckOptions, Verdict};

/// Generous: the whole set takes well under a second in release builds.
const BUDGET: Duration = Duration::from_secs(120);

/// Search steps for c50 as one partition.
const WHOLE_C50_STEPS: u64 = 300_000;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/linearizability")
}

fn read(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn expect(name: &str, verdict: &Verdict, linearizable: bool) {
    match (verdict, linearizable) {
        (Verdict::Linearizable, true) | (Verdict::NotLinearizable(_), false) => {}
        (Verdict::Unknown(reason), _) => panic!("{name}: unknown ({reason})"),
        (verdict, _) => panic!("{name}: expected linearizable = {linearizable}, got {verdict:?}"),
    }
}

#[test]
fn agrees_with_every_jepsen_etcd_verdict() {
    let dir = testdata().join("jepsen-etcd");
    let verdicts = read(&dir.join("verdicts.tsv"));
    let mut checked = 0;
    for row in verdicts.lines().skip(1) {
        let (file, expected) = row.split_once('\t').expect("file<TAB>verdict");
        let linearizable = match expected.trim() {
            "true" => true,
            "false" => false,
            other => panic!("{file}: bad verdict {other:?}"),
        };
        let history =
            jepsen_etcd::parse(&read(&dir.join(file))).unwrap_or_else(|e| panic!("{file}: {e}"));
        // An empty history is trivially linearizable: a parser that skipped every line (as it
        // once did for the space-separated etcd_100 to etcd_102) would pass without this.
        assert!(
            history.len() >= 50,
            "{file}: only {} operations",
            history.len()
        );
        let verdict = check(&Register, &history, Budget::time(BUDGET));
        expect(file, &verdict, linearizable);
        if let Verdict::NotLinearizable(explanation) = &verdict {
            // The explanation is consistent: the blocked op is among those involved and is not
            // in the prefix.
            assert!(
                explanation.involved.contains(&explanation.blocked),
                "{file}"
            );
            assert!(!explanation.prefix.contains(&explanation.blocked), "{file}");
        }
        checked += 1;
    }
    assert_eq!(checked, 102);
}

#[test]
fn agrees_with_the_kv_verdicts_per_key_and_as_one_partition() {
    let dir = testdata().join("kv");
    for clients in ["c01", "c10", "c50"] {
        for (suffix, linearizable) in [("ok", true), ("bad", false)] {
            let file = format!("{clients}-{suffix}.txt");
            let history =
                jepsen_kv::parse(&read(&dir.join(&file))).unwrap_or_else(|e| panic!("{file}: {e}"));
            let per_key = check(&AppendKv, &history, Budget::time(BUDGET));
            expect(&format!("{file} per key"), &per_key, linearizable);
            // As one partition the search space is the product of the keys' (and c50 is
            // beyond reach: see docs/checker.md), so c50 gets a step budget and may only
            // answer the same verdict or unknown, never the opposite one.
            let budget = if clients == "c50" {
                Budget::steps(WHOLE_C50_STEPS)
            } else {
                Budget::time(BUDGET)
            };
            let whole = check_with_options(
                &AppendKv,
                &history,
                &CheckOptions {
                    budget,
                    partition_by_key: false,
                },
            );
            if clients == "c50" {
                assert!(
                    matches!(whole, Verdict::Unknown(_)) || whole.is_linearizable() == linearizable,
                    "{file} as one partition contradicts the verdict: {whole:?}"
                );
            } else {
                expect(&format!("{file} as one partition"), &whole, linearizable);
            }
        }
    }
}
